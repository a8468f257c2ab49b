"""Stage tokenize on tiny inputs: scratch Unigram tokenizer, tokenized splits, clear errors on bad input."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import make_tiny_params, write_tiny_tokenize_inputs

from pipelines import tokenize
from pipelines.common.errors import PipelineError
from pipelines.common.paths import TOKENIZED, TOKENIZER, VALIDATED_EXAMPLES
from pipelines.common.serialize import load_config

SQL_WITH_EVERY_CHARACTER = (
    "select t1.name, count(*) from customers as t1 where t1.age <= 30 and t1.age >= 18 and t1.city != 'Zurich' "
    "and t1.score < 9.5 and t1.score > 0 and t1.name like '%O''Brien%' and t1.note = \"Say \"\"hi\"\"\" "
    "and t1.id = 1234567890 group by t1.name"
)


@pytest.fixture
def tokenized(workspace):
    write_tiny_tokenize_inputs(workspace)
    tokenize.main(make_tiny_params())
    return workspace


def test_scratch_tokenizer_round_trips_sql_and_uses_t5_special_ids(tokenized):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    sql = SQL_WITH_EVERY_CHARACTER  # upper-case literals and rare characters the tiny train set never shows
    ids = tokenizer(sql).input_ids
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == sql
    for char in "<>=!'\"(),.*%0123456789ABCXYZ":
        assert tokenizer.unk_token_id not in tokenizer(char, add_special_tokens=False).input_ids, char


def test_split_punctuation_tokenizes_an_identifier_alike_in_schema_and_sql():
    corpus = ["question: names of shops | schema: shop: shop_id (number, pk), name (text), city (text)",
              "select t1 . name from shop as t1 where t1 . city = 'Nice'", "select count ( * ) from shop"] * 20
    tokenizer = tokenize.train_unigram_tokenizer(corpus, vocab_size=200, max_length=64, split_punctuation=True)

    def pieces(text: str) -> list[str]:
        return tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False).input_ids)

    schema, sql = pieces("schema: shop: shop_id (number, pk), name (text),"), pieces("select t1 . name, t1 . shop_id")
    for name in ("name", "shop_id"):
        spelled = pieces(name)
        assert any(schema[i:i + len(spelled)] == spelled for i in range(len(schema))), (name, schema)
        assert any(sql[i:i + len(spelled)] == spelled for i in range(len(sql))), (name, sql)
    ids = tokenizer(SQL_WITH_EVERY_CHARACTER).input_ids
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == SQL_WITH_EVERY_CHARACTER


def test_scratch_tokenizer_gives_the_same_ids_every_time():
    corpus = ["question: how many customers live in paris? | schema: customers: id (number, pk), city (text)",
              "select count ( * ) from customers where city = 'Paris'", "select name from customers"] * 20
    first, second = (tokenize.train_unigram_tokenizer(corpus, vocab_size=120, max_length=64) for _ in range(2))
    assert first.get_vocab() == second.get_vocab()
    assert (first.pad_token_id, first.eos_token_id, first.unk_token_id) == (0, 1, 2)


def test_tokenized_splits_match_the_contract(tokenized):
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    dataset = load_from_disk(str(TOKENIZED))
    assert {split: dataset[split].num_rows for split in dataset} == {"train": 48, "dev": 8, "test": 8}
    assert set(dataset["train"].column_names) == {"input_ids", "attention_mask", "labels", "example_id", "db_id"}
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    examples = pd.read_parquet(tokenized / VALIDATED_EXAMPLES).set_index("example_id")
    first = dataset["dev"][0]
    source = examples.loc[first["example_id"]]
    assert first["db_id"] == source["db_id"]
    assert tokenizer.decode(first["labels"], skip_special_tokens=True) == tokenize.serialize_target(
        source["sql"], make_tiny_params().tokenize.serialization
    )
    assert tokenizer.decode(first["input_ids"], skip_special_tokens=True).startswith(
        f"question: {source['question'].lower()} | similar: "
    )
    labels = [i for row in dataset["train"]["labels"] for i in row]
    assert tokenizer.unk_token_id not in labels
    config = load_config(TOKENIZED)
    assert (config.max_source_length, config.max_target_length, config.model_base) == (256, 96, "scratch")
    stats = json.loads((TOKENIZED / "stats.json").read_text())
    assert stats["examples"]["train"] == 48 and stats["vocab_size"] == len(tokenizer)


def test_retrieval_puts_other_training_examples_into_the_inputs(workspace):
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    write_tiny_tokenize_inputs(workspace)
    params = make_tiny_params(tokenize={"serialization": {"retrieval_k": 1, "retrieval_dropout": 0.25}})
    tokenize.main(params)
    config = load_config(TOKENIZED)
    examples = pd.read_parquet(VALIDATED_EXAMPLES)
    train = examples[examples["split"] == "train"]
    assert [e.question for e in config.examples] == train["question"].tolist()  # the bank is the train split
    dataset = load_from_disk(str(TOKENIZED))
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    decoded = {split: tokenizer.batch_decode(dataset[split]["input_ids"], skip_special_tokens=True)
               for split in ("train", "test")}
    assert all(" | similar: " in text for text in decoded["test"])
    with_neighbour = [text for text in decoded["train"] if " | similar: " in text]
    assert 0 < len(with_neighbour) < len(decoded["train"])  # dropout leaves some train inputs without
    unique = train["question"].map(train["question"].value_counts()) == 1
    assert unique.sum() >= 10
    for text, question, alone in zip(decoded["train"], train["question"], unique):
        if alone:  # never its own question: the neighbour is another training example
            assert f"similar: {question.lower()} =>" not in text


def test_long_schemas_are_shortened_to_max_source_length(workspace):
    write_tiny_tokenize_inputs(workspace)
    tokenize.main(make_tiny_params(tokenize={"max_source_length": 24}))
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    dataset = load_from_disk(str(TOKENIZED))
    stats = json.loads((TOKENIZED / "stats.json").read_text())
    assert stats["inputs_schema_shortened"] > 0
    assert max(len(ids) for ids in dataset["train"]["input_ids"]) <= 24
    # The question survives shortening: the input still starts with it.
    assert tokenizer.decode(dataset["train"][0]["input_ids"]).startswith("question: how many customers live in")


def test_empty_train_split_is_a_clear_error(workspace):
    write_tiny_tokenize_inputs(workspace)
    frame = pd.read_parquet(VALIDATED_EXAMPLES)
    frame.loc[frame["split"] == "train", "split"] = "dev"
    frame.to_parquet(VALIDATED_EXAMPLES, index=False)
    with pytest.raises(PipelineError, match=r"examples\.parquet: the train split is empty"):
        tokenize.main(make_tiny_params())
    assert not TOKENIZER.exists() and not TOKENIZED.exists()


def test_missing_schema_and_missing_inputs_are_clear_errors(workspace):
    with pytest.raises(PipelineError, match="validated examples not found"):
        tokenize.main(make_tiny_params())
    write_tiny_tokenize_inputs(workspace)
    (workspace / "data/ingested/schemas/school.json").unlink()
    with pytest.raises(PipelineError, match=r"schemas: no schema snapshot for database\(s\) school"):
        tokenize.main(make_tiny_params())


def test_unknown_base_model_is_a_clear_error(workspace):
    write_tiny_tokenize_inputs(workspace)
    with pytest.raises(PipelineError, match="model.base 'no-such-org/no-such-t5'.*local Hugging Face cache"):
        tokenize.main(make_tiny_params(model={"base": "no-such-org/no-such-t5"}))
