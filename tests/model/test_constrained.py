"""Constrained decoding: the allowed-token masks and their effect on greedy / beam search (PyTorch and ORT)."""

from __future__ import annotations

import pytest
import torch
from conftest import EVAL_PAIRS

from pipelines.common.constrained import VocabularyText, allowed_mask, allowed_words
from pipelines.common.generate import generate
from pipelines.common.model_io import load_for_generation
from pipelines.common.onnx_model import load_onnx
from pipelines.common.schema import SchemaSnapshot
from pipelines.common.serialize import serialize, serialize_target


@pytest.fixture(scope="module")
def loaded(eval_workspace):
    model, tokenizer, config = load_for_generation(eval_workspace / "models" / "student", device="cpu")
    schema = SchemaSnapshot.load(eval_workspace / "data" / "ingested" / "schemas" / "shop.json")
    questions = [q for q, _ in EVAL_PAIRS]
    inputs = [serialize(q, schema, config.serialization) for q in questions]
    vocabulary = VocabularyText(tokenizer)
    masks = [allowed_mask(vocabulary, allowed_words(q, schema), model.config.vocab_size) for q in questions]
    return model, tokenizer, config, schema, inputs, masks


def test_mask_allows_sql_schema_names_question_words_and_symbols_only(loaded):
    _, tokenizer, _, schema, _, _ = loaded
    words = allowed_words("customers in Paris", schema)
    assert {"select", "count", "t1", "paris", "customers"} <= words
    vocabulary = VocabularyText(tokenizer)
    mask = allowed_mask(vocabulary, words, len(tokenizer))
    for text in ("select count(*) from customers where city = 'Paris'", "t1.city <= 3"):
        assert all(mask[i] for i in tokenizer(text, add_special_tokens=False).input_ids), text
    assert mask[tokenizer.eos_token_id] and not mask[tokenizer.pad_token_id]
    # Without the schema's names, a table name cannot be spelled out of allowed pieces any more.
    narrow = allowed_mask(vocabulary, {"select", "from"}, len(tokenizer))
    assert not narrow[tokenizer("customers", add_special_tokens=False).input_ids].all()
    assert narrow[tokenizer("select", add_special_tokens=False).input_ids].all()


def test_constrained_outputs_use_allowed_tokens_and_gold_is_still_reachable(loaded):
    model, tokenizer, config, _, inputs, masks = loaded
    for beams in (1, 3):
        outputs = generate(model, tokenizer, inputs, num_beams=beams, num_return_sequences=beams,
                           max_new_tokens=32, allowed=masks)
        for candidates, mask in zip(outputs, masks):
            for text in candidates:
                assert all(mask[i] for i in tokenizer(text, add_special_tokens=False).input_ids), text
    # The gold queries only use allowed tokens, so the fitted model still decodes them.
    targets = [serialize_target(sql, config.serialization) for _, sql in EVAL_PAIRS]
    greedy = [g[0] for g in generate(model, tokenizer, inputs, max_new_tokens=32, allowed=masks)]
    assert sum(g == t for g, t in zip(greedy, targets)) >= len(targets) - 1


def test_a_mask_changes_what_is_generated(loaded):
    model, tokenizer, _, _, inputs, _ = loaded
    only = tokenizer("select", add_special_tokens=False).input_ids
    mask = torch.zeros(model.config.vocab_size, dtype=torch.bool)
    mask[only] = True
    mask[tokenizer.eos_token_id] = True
    [[text]] = generate(model, tokenizer, inputs[:1], max_new_tokens=6, allowed=[mask])
    assert set(text.split()) <= {"select"}, text


def test_onnx_runtime_model_is_constrained_the_same(loaded, eval_onnx):
    model, tokenizer, _, _, inputs, masks = loaded
    onnx_model = load_onnx(eval_onnx, device="cpu")
    for beams in (1, 3):
        options = dict(max_new_tokens=32, batch_size=4, allowed=masks, num_beams=beams, num_return_sequences=beams)
        assert generate(onnx_model, tokenizer, inputs, **options) == generate(model, tokenizer, inputs, **options)
