"""A tokenized split as generation inputs + gold SQL + database targets, and its execution accuracy.

Distill (student vs teacher) and export (ONNX fp32 vs int8) compare models on the dev split. The model
inputs are the split's own `input_ids` decoded back to text, i.e. exactly what the model was trained and
validated on (serialization and truncation already applied); gold SQL is the validated example's, joined
by `example_id`; each database target comes from `data/ingested/databases.json`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipelines.common.databases import resolve
from pipelines.common.errors import PipelineError
from pipelines.common.metrics import CORRECT, GOLD_ERROR, execution_match
from pipelines.common.paths import DATABASES_INDEX, TOKENIZED, VALIDATED_EXAMPLES


@dataclass(frozen=True)
class LabelledSplit:
    example_ids: list[str]
    inputs: list[str]
    gold_sql: list[str]
    targets: list[str]  # database target of each example (SQLite path or URL)

    def __len__(self) -> int:
        return len(self.inputs)

    def head(self, n: int) -> LabelledSplit:
        return LabelledSplit(self.example_ids[:n], self.inputs[:n], self.gold_sql[:n], self.targets[:n])

    def tail(self, n: int) -> LabelledSplit:
        return LabelledSplit(self.example_ids[n:], self.inputs[n:], self.gold_sql[n:], self.targets[n:])


def load_split(tokenizer, split: str = "dev", tokenized: Path = TOKENIZED,
               examples_path: Path = VALIDATED_EXAMPLES, index_path: Path = DATABASES_INDEX) -> LabelledSplit:
    """The examples of `split`, checked up front: a missing split, example or database is a PipelineError."""
    import pandas as pd
    from datasets import load_from_disk

    split_dir = tokenized / split
    if not split_dir.is_dir():
        raise PipelineError(f"{split_dir}: tokenized {split} split not found (run the tokenize stage first)")
    dataset = load_from_disk(str(split_dir))
    if dataset.num_rows == 0:
        raise PipelineError(f"{split_dir}: the {split} split is empty; set ingest.dev_fraction > 0")
    if not examples_path.is_file():
        raise PipelineError(f"{examples_path}: validated examples not found (run the validate stage first)")
    gold_by_id = dict(zip(*(pd.read_parquet(examples_path, columns=["example_id", "sql"])[c].astype(str)
                            for c in ("example_id", "sql"))))
    example_ids = list(dataset["example_id"])
    missing = [i for i in example_ids if i not in gold_by_id]
    if missing:
        raise PipelineError(f"{examples_path}: example_id {missing[0]!r} of {split_dir} not found "
                            f"({len(missing)} missing; re-run tokenize after validate)")
    targets_by_db = {db: resolve(db, index_path) for db in set(dataset["db_id"])}
    inputs = tokenizer.batch_decode(dataset["input_ids"], skip_special_tokens=True,
                                    clean_up_tokenization_spaces=False)
    return LabelledSplit(
        example_ids=example_ids,
        inputs=[text.strip() for text in inputs],
        gold_sql=[gold_by_id[i] for i in example_ids],
        targets=[targets_by_db[db] for db in dataset["db_id"]],
    )


def execution_accuracy(predictions: list[str], split: LabelledSplit, *, timeout_s: float,
                       max_rows: int) -> dict[str, float | int]:
    """EX of `predictions` (one per example of `split`); examples whose gold query fails are not scored."""
    if len(predictions) != len(split):
        raise ValueError(f"{len(predictions)} predictions for {len(split)} examples")
    verdicts = [execution_match(p, g, t, timeout_s=timeout_s, max_rows=max_rows)
                for p, g, t in zip(predictions, split.gold_sql, split.targets)]
    scored = [v for v in verdicts if v != GOLD_ERROR]
    correct = sum(v == CORRECT for v in scored)
    return {"ex": correct / len(scored) if scored else 0.0, "n_scored": len(scored),
            "n_correct": correct, "n_gold_error": len(verdicts) - len(scored)}
