"""Stage tokenize: validated examples + schema snapshots -> tokenizer and tokenized train/dev/test splits.

`model.base == "scratch"` trains a Unigram tokenizer on the train split (serialized inputs + SQL targets);
otherwise the base checkpoint's tokenizer is used (local directory or the local HF cache; no network).
Writes models/tokenizer/ and data/tokenized/ (DatasetDict + serialization.json + stats.json)."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from pipelines.common.cli import run_stage
from pipelines.common.databases import resolve
from pipelines.common.errors import PipelineError
from pipelines.common.io import atomic_dir, write_json
from pipelines.common.params import Params
from pipelines.common.paths import DATABASES_INDEX, INGESTED_SCHEMAS, TOKENIZED, TOKENIZER, VALIDATED_EXAMPLES
from pipelines.common.schema import SchemaSnapshot
from pipelines.common.retrieval import BankExample
from pipelines.common.serialize import SerializationConfig, save_config, serialize, serialize_target

log = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")
REQUIRED_COLUMNS = ("example_id", "db_id", "question", "sql", "split")
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"  # ids 0, 1, 2 as in T5
# Every printable ASCII character is in the vocabulary even if the training SQL happens not to use it
# (operators, quotes, %, digits, upper-case letters of string literals); others are learnt from the corpus.
SQL_ALPHABET = [chr(code) for code in range(33, 127)]


def load_examples(path: Path = VALIDATED_EXAMPLES) -> pd.DataFrame:
    if not path.is_file():
        raise PipelineError(f"{path}: validated examples not found (run the validate stage first)")
    frame = pd.read_parquet(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise PipelineError(f"{path}: missing column(s) {', '.join(missing)}")
    unknown = sorted(set(frame["split"]) - set(SPLITS))
    if unknown:
        row = int(frame.index[frame["split"].isin(unknown)][0])
        raise PipelineError(f"{path}: row {row}: split {unknown[0]!r} is not one of {', '.join(SPLITS)}")
    if not (frame["split"] == "train").any():
        raise PipelineError(f"{path}: the train split is empty ({len(frame)} rows, none with split == 'train')")
    return frame


def load_schemas(db_ids: set[str], directory: Path = INGESTED_SCHEMAS) -> dict[str, SchemaSnapshot]:
    missing = sorted(db for db in db_ids if not (directory / f"{db}.json").is_file())
    if missing:
        raise PipelineError(
            f"{directory}: no schema snapshot for database(s) {', '.join(missing[:5])}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        )
    return {db: SchemaSnapshot.load(directory / f"{db}.json") for db in sorted(db_ids)}


# Isolated by the pre-tokenizer with `serialization.split_punctuation` (with the space before it, if any, so
# ` = ` costs one token): never merged into a word's piece.
SQL_PUNCTUATION = r"""▁?[.,()\[\]:;|*=<>!'"]"""


def train_unigram_tokenizer(corpus: list[str], vocab_size: int, max_length: int, split_punctuation: bool = False):
    """A T5-style Unigram tokenizer (Metaspace, `</s>` appended) wrapped as a transformers fast tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.Unigram())
    # No normalizer: string literals must decode byte-identical to the database values.
    steps = [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    if split_punctuation:
        # `isolated` keeps every character, so decoding stays lossless (literals included); `_` is not
        # punctuation here, so `job_title` stays one word.
        steps.append(pre_tokenizers.Split(Regex(SQL_PUNCTUATION), behavior="isolated"))
    # Numbers digit by digit: values like 1998 or 45.5 stay composable from a tiny vocabulary.
    steps.append(pre_tokenizers.Digits(individual_digits=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS, UNK],
        unk_token=UNK,
        initial_alphabet=SQL_ALPHABET,
        max_piece_length=16,
        show_progress=False,
    )
    log.info("training a Unigram tokenizer (vocab %d) on %d texts", vocab_size, len(corpus))
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    tokenizer = reproducible(restore_frequent_words(tokenizer, corpus))
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, tokenizer.token_to_id(EOS))]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )
    ids = (wrapped.pad_token_id, wrapped.eos_token_id, wrapped.unk_token_id)
    if ids != (0, 1, 2):
        raise RuntimeError(f"special token ids {ids}, expected (0, 1, 2)")
    return wrapped


def restore_frequent_words(tokenizer, corpus: list[str], min_share: float = 0.01):
    """The tokenizer with every pre-tokenized word that occurs at least `min_share` x len(corpus) times as a
    piece that segmentation picks whole, at the same vocabulary size.

    The Unigram trainer's pruning is known to drop or under-score some of the most frequent whole words and
    spell them from fragments (sentencepiece#967, tokenizers#1027): here `select` came out as `▁ s elect`,
    `what` as `▁wha t` and `to` as `▁ t o`, costing tokens in every example. Each such word gets at least its
    unigram log-probability as score (so Viterbi segmentation picks it whole); missing ones replace the
    lowest-scoring multi-character pieces."""
    import json
    import math

    from tokenizers import Tokenizer

    state = json.loads(tokenizer.to_str())
    vocab = state["model"]["vocab"]  # [[piece, log-probability], ...], special tokens first
    position = {piece: i for i, (piece, _) in enumerate(vocab)}
    counts = Counter(word for text in corpus for word, _ in tokenizer.pre_tokenizer.pre_tokenize_str(text))
    total = sum(counts.values())
    frequent = [(word, math.log(n / total)) for word, n in counts.most_common()
                if n >= min_share * len(corpus) and len(word) <= 16]
    missing, raised = [], 0
    for word, score in frequent:
        if word not in position:
            missing.append([word, score])
        elif vocab[position[word]][1] < score:
            vocab[position[word]][1], raised = score, raised + 1
    frequent_words = {word for word, _ in frequent}
    removable = sorted((i for i, (piece, score) in enumerate(vocab)
                        if len(piece) > 1 and score < 0 and piece not in frequent_words),
                       key=lambda i: vocab[i][1])[: len(missing)]
    dropped = set(removable)
    state["model"]["vocab"] = [entry for i, entry in enumerate(vocab) if i not in dropped] + missing[: len(removable)]
    log.info("frequent whole words the Unigram trainer had split: %d restored, %d re-scored (e.g. %s)",
             len(removable), raised, ", ".join(word for word, _ in missing[:5]))
    return Tokenizer.from_str(json.dumps(state))


def reproducible(tokenizer, special_tokens: int = 3, decimals: int = 2):
    """The tokenizer with its vocabulary in a canonical order: special tokens first as they are, then the
    pieces sorted by text, scores rounded to `decimals`. The Unigram trainer is not deterministic: trained
    twice on the same corpus it finds the same pieces, but in another order and with scores a few
    thousandths apart, so token ids (and every model trained on them) changed from run to run. Now ids are
    the same every run; a score near a rounding boundary can still differ by one step."""
    import json

    from tokenizers import Tokenizer

    state = json.loads(tokenizer.to_str())
    vocab = state["model"]["vocab"]
    pieces = sorted(vocab[special_tokens:], key=lambda entry: entry[0])
    state["model"]["vocab"] = vocab[:special_tokens] + [[piece, round(score, decimals)] for piece, score in pieces]
    return Tokenizer.from_str(json.dumps(state))


def load_pretrained_tokenizer(base: str):
    from transformers import AutoTokenizer

    try:
        # local_files_only: a hub id works only from the local HF cache; there is no network at run time.
        return AutoTokenizer.from_pretrained(base, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise PipelineError(
            f"params.yaml: model.base {base!r} is neither a local directory with a saved tokenizer nor a hub id "
            f"in the local Hugging Face cache (no network here): {str(exc).splitlines()[0]}"
        ) from exc


def unknown_characters(tokenizer, texts: list[str]) -> Counter:
    """Characters of `texts` that the tokenizer can only map to <unk>."""
    unk_id = tokenizer.unk_token_id
    unknown: Counter = Counter()
    if unk_id is None:
        return unknown
    for ids, text in zip(tokenizer(texts, add_special_tokens=False).input_ids, texts):
        if unk_id in ids:
            for char in set(text):
                if unk_id in tokenizer(char, add_special_tokens=False).input_ids:
                    unknown[char] += 1
    return unknown


def build_tokenizer(params: Params, train_inputs: list[str], train_targets: list[str]):
    if params.model.base == "scratch":
        tokenizer = train_unigram_tokenizer(
            train_inputs + train_targets, params.tokenize.vocab_size, params.tokenize.max_source_length,
            split_punctuation=params.tokenize.serialization.split_punctuation,
        )
    else:
        tokenizer = load_pretrained_tokenizer(params.model.base)
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise PipelineError(f"model.base {params.model.base!r}: tokenizer has no pad/eos token (not a T5 one?)")
        missing = unknown_characters(tokenizer, train_targets)
        if missing:
            # Pretrained T5 vocabularies lack e.g. `<`; new tokens get fresh embedding rows in train.
            log.info("adding %d character(s) missing from the base vocabulary: %s", len(missing), "".join(missing))
            tokenizer.add_tokens(sorted(missing))
    unknown = unknown_characters(tokenizer, train_targets)
    if unknown:
        chars = ", ".join(f"{c!r} ({n} queries)" for c, n in unknown.most_common(10))
        raise PipelineError(f"{VALIDATED_EXAMPLES}: training SQL has characters the tokenizer maps to <unk>: {chars}")
    return tokenizer


def main(params: Params) -> None:
    examples = load_examples()
    schemas = load_schemas(set(examples["db_id"]))
    cfg = params.tokenize.serialization
    max_source, max_target = params.tokenize.max_source_length, params.tokenize.max_target_length

    database_targets = {db: resolve(db, DATABASES_INDEX) for db in schemas}
    values = linking_value_indexes(schemas, database_targets, cfg)
    targets = [serialize_target(sql, cfg) for sql in examples["sql"]]
    is_train = (examples["split"] == "train").to_numpy()
    config = SerializationConfig(
        serialization=cfg, max_source_length=max_source, max_target_length=max_target, model_base=params.model.base,
        examples=retrieval_bank(examples, targets, is_train) if cfg.retrieval_k else [],
    )
    # Dev/test databases without training examples retrieve as evaluation and serving will see them.
    config.cover_databases(schemas, database_targets)
    similar = retrieved_examples(examples, is_train, config, params.seed)
    untruncated = [
        serialize(q, schemas[db], cfg, value_index=values.get(db), similar=near)
        for q, db, near in tqdm(
            zip(examples["question"], examples["db_id"], similar), total=len(examples), desc="serialize",
            mininterval=5,
        )
    ]
    tokenizer = build_tokenizer(
        params,
        [text for text, train in zip(untruncated, is_train) if train],
        [text for text, train in zip(targets, is_train) if train],
    )

    def count_tokens(text: str) -> int:
        # verbose=False: over-long texts are expected here; they are what the truncation policy shortens.
        return len(tokenizer(text, verbose=False).input_ids)

    inputs, n_shortened, n_cut_sources = [], 0, 0
    for text, question, db, near in tqdm(
        zip(untruncated, examples["question"], examples["db_id"], similar), total=len(examples), desc="fit",
        mininterval=5,
    ):
        if count_tokens(text) > max_source:
            text = serialize(question, schemas[db], cfg, max_tokens=max_source, count_tokens=count_tokens,
                             value_index=values.get(db), similar=near)
            n_shortened += 1
            # Still too long (a long question over a big schema): the tokenizer cuts the tail below.
            n_cut_sources += count_tokens(text) > max_source
        inputs.append(text)

    source = tokenizer(inputs, max_length=max_source, truncation=True)
    target = tokenizer(text_target=targets, max_length=max_target, truncation=True)
    target_lengths = [len(ids) for ids in tokenizer(text_target=targets, verbose=False).input_ids]
    n_cut_targets = sum(n > max_target for n in target_lengths)
    if n_cut_targets:
        log.warning("%d SQL targets are longer than tokenize.max_target_length=%d and were cut", n_cut_targets, max_target)

    dataset = build_dataset_dict(examples, source, target)
    stats = {
        "examples": {split: dataset[split].num_rows for split in SPLITS},
        "vocab_size": len(tokenizer),
        "inputs_schema_shortened": n_shortened,
        "inputs_cut_at_max_source_length": n_cut_sources,
        "targets_cut_at_max_target_length": n_cut_targets,
        "max_target_tokens": max(target_lengths),
        "mean_source_tokens": round(sum(map(len, source.input_ids)) / len(inputs), 1),
        "mean_target_tokens": round(sum(target_lengths) / len(targets), 1),
    }
    with atomic_dir(TOKENIZED) as tmp:
        # One shard per split: datasets writes an empty split as zero shards, which load_from_disk cannot read.
        dataset.save_to_disk(str(tmp), num_shards={split: 1 for split in SPLITS})
        save_config(tmp, config)
        write_json(tmp / "stats.json", stats)
    with atomic_dir(TOKENIZER) as tmp:
        tokenizer.save_pretrained(str(tmp))
    log.info("tokenized %s; vocab %d; %d inputs shortened by the truncation policy", stats["examples"],
             len(tokenizer), n_shortened)


def retrieval_bank(examples: pd.DataFrame, targets: list[str], is_train) -> list[BankExample]:
    """The train split as retrieval examples, in row order (bank index i = i-th train row)."""
    return [BankExample(db_id=str(db), question=str(q), sql=t)
            for db, q, t, train in zip(examples["db_id"], examples["question"], targets, is_train) if train]


def retrieved_examples(examples: pd.DataFrame, is_train, config: SerializationConfig, seed: int) -> list[list]:
    """Each example's retrieved neighbours: a train example never retrieves itself, and a seeded
    `retrieval_dropout` fraction of train examples get none; dev and test retrieve from the whole bank."""
    import random

    cfg = config.serialization
    rng = random.Random(seed)
    bank_index = iter(range(len(examples)))
    excludes = [next(bank_index) if train else None for train in is_train]
    dropped = [bool(train) and rng.random() < cfg.retrieval_dropout for train in is_train]
    similar = config.similar_batch(examples["question"].tolist(), examples["db_id"].tolist(), excludes)
    return [[] if drop else near for near, drop in zip(similar, dropped)]


def linking_value_indexes(schemas: dict[str, SchemaSnapshot], targets: dict[str, str], cfg) -> dict:
    """Per-database value indexes for schema linking (read-only queries on data/ingested's databases);
    empty when linking is off."""
    if not cfg.schema_linking or cfg.linking_values == 0:
        return {}
    from pipelines.common.schema_linking import value_indexes

    return value_indexes(schemas, targets, cfg.linking_values)


def build_dataset_dict(examples: pd.DataFrame, source, target):
    from datasets import Dataset, DatasetDict, Features, Sequence, Value

    features = Features(
        {
            "input_ids": Sequence(Value("int32")),
            "attention_mask": Sequence(Value("int8")),
            "labels": Sequence(Value("int32")),
            "example_id": Value("string"),
            "db_id": Value("string"),
        }
    )
    splits = examples["split"].tolist()
    columns = {
        "input_ids": source.input_ids,
        "attention_mask": source.attention_mask,
        "labels": target.input_ids,
        "example_id": examples["example_id"].astype(str).tolist(),
        "db_id": examples["db_id"].astype(str).tolist(),
    }
    return DatasetDict(
        {
            split: Dataset.from_dict(
                {name: [v for v, s in zip(values, splits) if s == split] for name, values in columns.items()},
                features=features,
            )
            for split in SPLITS
        }
    )


if __name__ == "__main__":
    run_stage(main)
