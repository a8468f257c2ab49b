"""Evaluate stage: how well a saved model answers held-out questions, measured on the databases.

DVC mode (`python -m pipelines.evaluate`, params `evaluate`): the model named by `evaluate.model`
(onnx-int8 -> models/onnx/int8, onnx-fp32 -> models/onnx/fp32, student, teacher) on split `evaluate.split` of
data/validated/examples.parquet, with the schemas and databases of data/ingested. Writes metrics/eval.json,
reports/predictions.jsonl, plots/ex_by_hardness.csv, and logs the metrics + a chart to MLflow (the training
run of metrics/train.json when it exists in the tracking store, else a new run).

CLI mode evaluates any saved model on any supported dataset without retraining:

    python -m pipelines.evaluate --model models/onnx/int8 --dataset spiderman:../shared/datasets/spiderman \\
        --out reports/spiderman [--split test|dev|train|all] [--max-examples N]

SOURCE is `spiderman` or `spider` (ingested into a temporary workspace with the ingest stage's code, using
params.yaml's ingest split settings and seed, so `test` is the same held-out split a pipeline on that dataset
would have), or `ingested` for an existing data/ingested folder. DIR gets eval.json, predictions.jsonl and
ex_by_hardness.csv (no MLflow logging in this mode).

Decodings: greedy; beam search (`num_beams`, top beam); execution-guided, what serving answers: the first of the
candidates that executes, the candidates being, with `example_candidates: K`, the SQL of the K nearest bank
examples and then the beams (pipelines/common/candidates.py; `answered_from_examples` is the share of answers
that were an example's SQL). Latency is per example at batch size 1 for that decoding;
greedy runs batched. EX compares results as documented in pipelines/common/metrics.py; examples whose gold
SQL fails to execute are excluded from every rate and counted in `n_gold_failed`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from pipelines.common import metrics as m
from pipelines.common.cli import run_stage, setup_logging
from pipelines.common.errors import PipelineError
from pipelines.common.io import read_json, write_json, write_jsonl, write_text
from pipelines.common.params import EvaluateParams, Params, load_params
from pipelines.common.paths import (
    DATABASES_INDEX,
    INGESTED,
    INGESTED_EXAMPLES,
    INGESTED_SCHEMAS,
    METRICS,
    ONNX_FP32,
    ONNX_INT8,
    PLOTS,
    PREDICTIONS,
    STUDENT,
    TEACHER,
    VALIDATED_EXAMPLES,
)

log = logging.getLogger(__name__)

MODEL_DIRS = {"onnx-int8": ONNX_INT8, "onnx-fp32": ONNX_FP32, "student": STUDENT, "teacher": TEACHER}
DECODINGS = ("greedy", "beam", "execution_guided")
EVAL_METRICS = METRICS / "eval.json"
TRAIN_METRICS = METRICS / "train.json"
HARDNESS_PLOT = PLOTS / "ex_by_hardness.csv"
CLI_SOURCES = ("spiderman", "spider", "ingested")
SPLIT_CHOICES = ("train", "dev", "test", "all")
GREEDY_BATCH_SIZE = 16


@dataclass
class EvalSet:
    """The examples to score and what is needed to run their SQL and build their inputs."""

    examples: pd.DataFrame
    schemas: dict = field(default_factory=dict)   # db_id -> SchemaSnapshot
    targets: dict = field(default_factory=dict)   # db_id -> connectable target


def load_eval_set(examples_path: Path, ingested: Path, split: str, max_examples: int | None) -> EvalSet:
    """Examples of `split` ('all' = every split) with their schemas and database targets."""
    from pipelines.common.databases import resolve
    from pipelines.common.schema import SchemaSnapshot

    if not examples_path.is_file():
        raise PipelineError(f"{examples_path}: examples not found (run the ingest/validate stages first)")
    frame = pd.read_parquet(examples_path)
    missing = [c for c in ("example_id", "db_id", "question", "sql", "split") if c not in frame.columns]
    if missing:
        raise PipelineError(f"{examples_path}: missing column(s) {', '.join(missing)}")
    if split != "all":
        frame = frame[frame["split"] == split]
    if frame.empty:
        raise PipelineError(f"{examples_path}: no examples in split {split!r} (evaluate.split)")
    if max_examples is not None:
        frame = frame.head(max_examples)
    frame = frame.reset_index(drop=True)
    schemas_dir = ingested / INGESTED_SCHEMAS.relative_to(INGESTED)
    index_path = ingested / DATABASES_INDEX.relative_to(INGESTED)
    db_ids = sorted(set(frame["db_id"]))
    schemas = {db: SchemaSnapshot.load(schemas_dir / f"{db}.json") for db in db_ids}
    targets = {db: resolve(db, index_path) for db in db_ids}
    return EvalSet(frame, schemas, targets)


def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: it is a latency someone actually saw)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def evaluate_model(model, tokenizer, config, eval_set: EvalSet,
                   options: EvaluateParams) -> tuple[dict, list[dict]]:
    """Score the three decodings on `eval_set`: (flat metrics, one prediction record per example)."""
    from pipelines.common.candidates import answer_candidates, model_inputs
    from pipelines.common.generate import first_executable, generate

    examples = eval_set.examples
    log.info("serializing %d questions", len(examples))
    values = {}
    if config.serialization.schema_linking and config.serialization.linking_values:
        from pipelines.common.schema_linking import value_indexes

        values = value_indexes(eval_set.schemas, eval_set.targets, config.serialization.linking_values)
    inputs, similar = model_inputs(config, tokenizer, examples["question"].tolist(),
                                   [eval_set.schemas[db] for db in examples["db_id"]], examples["db_id"].tolist(),
                                   [values.get(db) for db in examples["db_id"]],
                                   [eval_set.targets[db] for db in examples["db_id"]], k=options.example_candidates)
    run = {"timeout_s": options.sql_timeout_s, "max_rows": options.max_rows}
    masks = None
    if options.constrained:
        from pipelines.common.constrained import VocabularyText, allowed_mask, allowed_words

        vocabulary = VocabularyText(tokenizer)
        masks = [allowed_mask(vocabulary, allowed_words(row.question, eval_set.schemas[row.db_id]),
                              model.config.vocab_size) for row in examples.itertuples()]

    log.info("running %d gold queries", len(examples))
    gold_runs = [m.run_query(eval_set.targets[row.db_id], row.sql, **run) for row in examples.itertuples()]

    log.info("greedy decoding (batch %d)", GREEDY_BATCH_SIZE)
    greedy = [c[0] for c in generate(model, tokenizer, inputs, num_beams=1,
                                     max_new_tokens=options.max_new_tokens, batch_size=GREEDY_BATCH_SIZE,
                                     max_source_length=config.max_source_length, allowed=masks)]

    log.info("beam search (%d beams)%s + execution-guided selection, batch 1, timed", options.num_beams,
             f" + the {options.example_candidates} nearest examples" if options.example_candidates else "")
    beams, guided, origins, latencies = [], [], [], []
    for position, (text, row) in enumerate(tqdm(list(zip(inputs, examples.itertuples())),
                                                desc="beam + execution-guided", unit="ex", disable=len(inputs) < 20)):
        start = time.perf_counter()
        [found] = answer_candidates(
            model, tokenizer, config, [text], [similar[position]], num_beams=options.num_beams,
            example_candidates=options.example_candidates, max_new_tokens=options.max_new_tokens, batch_size=1,
            allowed=None if masks is None else [masks[position]])
        chosen = first_executable(found.candidates, eval_set.targets[row.db_id], timeout_s=options.sql_timeout_s)
        chosen = chosen if chosen is not None else 0
        latencies.append((time.perf_counter() - start) * 1000)
        beams.append(found.beams)
        guided.append(found.candidates[chosen])
        origins.append(found.origins[chosen])

    records = []
    rows = list(examples.itertuples())
    for i, row in enumerate(tqdm(rows, desc="scoring", unit="ex", disable=len(rows) < 50)):
        gold = gold_runs[i]
        target = eval_set.targets[row.db_id]
        schema_columns = {t.name: [c.name for c in t.columns] for t in eval_set.schemas[row.db_id].tables}
        try:
            level = m.hardness(row.sql)
        except m.SQLError:
            level = "unknown"
        ordered = m.has_top_level_order_by(row.sql)
        record = {"example_id": row.example_id, "db_id": row.db_id, "question": row.question, "gold": row.sql,
                  "hardness": level, "gold_error": gold.error, "latency_ms": round(latencies[i], 3),
                  "beams": beams[i]}
        executed: dict[str, m.Execution] = {}  # decodings often agree: run each distinct query once
        for decoding, sql in zip(DECODINGS, (greedy[i], beams[i][0], guided[i])):
            if gold.ok and sql not in executed:
                executed[sql] = m.run_query(target, sql, **run)
            predicted = executed.get(sql)
            verdict = m.execution_verdict(predicted, gold, ordered=ordered) if gold.ok else m.GOLD_ERROR
            record[decoding] = {
                "sql": sql,
                "verdict": verdict,
                "error": predicted.error if predicted is not None else None,
                "exact_match": m.exact_set_match(sql, row.sql, schema=schema_columns),
            }
        record["execution_guided"]["origin"] = origins[i]
        if similar[i] and gold.ok:
            # Reference, not a decoding: what copying the nearest training example's SQL would score.
            record["retrieved"] = {"sql": similar[i][0].sql, "verdict": m.execution_verdict(
                m.run_query(target, similar[i][0].sql, **run), gold, ordered=ordered)}
        records.append(record)
    return summarize(records), records


def summarize(records: list[dict]) -> dict:
    """Flat metrics over prediction records (gold failures excluded from every rate)."""
    scored = [r for r in records if r["gold_error"] is None]
    n = len(scored)

    def rate(hits: int, total: int) -> float | None:
        return round(hits / total, 4) if total else None

    summary: dict = {"n": n, "n_total": len(records), "n_gold_failed": len(records) - n}
    for decoding in DECODINGS:
        summary[f"ex_{decoding}"] = rate(sum(r[decoding]["verdict"] == m.CORRECT for r in scored), n)
        summary[f"exact_match_{decoding}"] = rate(sum(r[decoding]["exact_match"] for r in scored), n)
        summary[f"valid_sql_{decoding}"] = rate(sum(r[decoding]["error"] is None for r in scored), n)
    # Share of served answers that are a known example's SQL rather than a beam (example_candidates > 0).
    summary["answered_from_examples"] = rate(
        sum(r["execution_guided"].get("origin") == "example" for r in scored), n)
    retrieved = [r for r in scored if "retrieved" in r]
    if retrieved:
        summary["ex_retrieved_copy"] = rate(sum(r["retrieved"]["verdict"] == m.CORRECT for r in retrieved), n)
    # The served decoding (beam + execution-guided) is the headline for the unsuffixed keys.
    summary["exact_match"] = summary["exact_match_execution_guided"]
    summary["valid_sql"] = summary["valid_sql_execution_guided"]
    for level in (*m.HARDNESS_LEVELS, "unknown"):
        at_level = [r for r in scored if r["hardness"] == level]
        if at_level or level != "unknown":
            summary[f"n_{level}"] = len(at_level)
        if at_level:
            for decoding in DECODINGS:
                hits = sum(r[decoding]["verdict"] == m.CORRECT for r in at_level)
                key = f"ex_{level}" if decoding == "execution_guided" else f"ex_{level}_{decoding}"
                summary[key] = rate(hits, len(at_level))
    latencies = [r["latency_ms"] for r in records]
    if latencies:
        summary["latency_ms_p50"] = round(_percentile(latencies, 50), 3)
        summary["latency_ms_p95"] = round(_percentile(latencies, 95), 3)
        summary["latency_ms_mean"] = round(sum(latencies) / len(latencies), 3)
    return summary


def hardness_table(summary: dict) -> str:
    """plots/ex_by_hardness.csv: EX (execution-guided) per Spider level that has examples."""
    lines = ["hardness,ex,n"]
    for level in m.HARDNESS_LEVELS:
        if summary.get(f"n_{level}"):
            lines.append(f"{level},{summary[f'ex_{level}']},{summary[f'n_{level}']}")
    return "\n".join(lines) + "\n"


def hardness_chart(summary: dict, path: Path, title: str) -> Path:
    """A grouped bar chart of EX per hardness level for each decoding, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [lvl for lvl in m.HARDNESS_LEVELS if summary.get(f"n_{lvl}")]
    figure, axis = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(DECODINGS)
    for k, decoding in enumerate(DECODINGS):
        values = [summary[f"ex_{lvl}" if decoding == "execution_guided" else f"ex_{lvl}_{decoding}"] or 0
                  for lvl in levels]
        axis.bar([i + k * width for i in range(len(levels))], values, width, label=decoding.replace("_", "-"))
    axis.set_xticks([i + width for i in range(len(levels))],
                    [f"{lvl}\n(n={summary[f'n_{lvl}']})" for lvl in levels])
    axis.set_ylim(0, 1)
    axis.set_ylabel("execution accuracy")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def write_outputs(summary: dict, records: list[dict], metrics_path: Path, predictions_path: Path,
                  plot_path: Path) -> None:
    write_jsonl(predictions_path, records)
    write_text(plot_path, hardness_table(summary))
    write_json(metrics_path, summary)


def log_to_mlflow(params: Params, summary: dict, model_dir: Path) -> str:
    """Metrics, chart and predictions on the training run of metrics/train.json if the tracking store knows
    it, else on a new run; returns the run id."""
    import mlflow

    from pipelines.common.tracking import configure, start_run

    configure(params.tracking)
    run_id = None
    if TRAIN_METRICS.is_file():
        train = read_json(TRAIN_METRICS)
        run_id = train.get("mlflow_run_id") if isinstance(train, dict) else None
    numeric = {k: float(v) for k, v in summary.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    with start_run("evaluate", resume_run_id=run_id) as run, tempfile.TemporaryDirectory() as tmp:
        mlflow.log_metrics(numeric)
        # Tags, not params: params are immutable, and one training run is evaluated again after each export.
        mlflow.set_tags({"eval_model": params.evaluate.model, "eval_split": params.evaluate.split,
                         "eval_num_beams": params.evaluate.num_beams})
        chart = hardness_chart(summary, Path(tmp) / "ex_by_hardness.png",
                               f"{model_dir} on {params.evaluate.split} (n={summary['n']})")
        mlflow.log_artifact(str(chart), artifact_path="evaluation")
        mlflow.log_artifact(str(PREDICTIONS), artifact_path="evaluation")
        mlflow.log_artifact(str(EVAL_METRICS), artifact_path="evaluation")
        return run.info.run_id


def _headline(summary: dict) -> str:
    s = summary
    return (f"n={s['n']} (gold failed {s['n_gold_failed']}) EX greedy={s['ex_greedy']} beam={s['ex_beam']} "
            f"execution-guided={s['ex_execution_guided']} exact-match={s['exact_match']} "
            f"valid-SQL={s['valid_sql']} latency p50={s.get('latency_ms_p50')} ms "
            f"p95={s.get('latency_ms_p95')} ms")


def main(params: Params) -> dict:
    from pipelines.common.model_io import check_model_dir, load_for_generation

    model_dir = check_model_dir(MODEL_DIRS[params.evaluate.model])
    eval_set = load_eval_set(VALIDATED_EXAMPLES, INGESTED, params.evaluate.split,
                             params.evaluate.max_examples)
    model, tokenizer, config = load_for_generation(model_dir)
    log.info("evaluating %s on %d %s examples", model_dir, len(eval_set.examples), params.evaluate.split)
    summary, records = evaluate_model(model, tokenizer, config, eval_set, params.evaluate)
    summary.update(model=params.evaluate.model, split=params.evaluate.split)
    write_outputs(summary, records, EVAL_METRICS, PREDICTIONS, HARDNESS_PLOT)
    run_id = log_to_mlflow(params, summary, model_dir)
    log.info("%s (MLflow run %s)", _headline(summary), run_id)
    return summary


# --- CLI mode --------------------------------------------------------------------------------------

def parse_dataset(spec: str) -> tuple[str, Path]:
    source, sep, path = spec.partition(":")
    if not sep or not path:
        raise PipelineError(f"--dataset {spec!r}: expected SOURCE:PATH, "
                            "e.g. spiderman:../shared/datasets/spiderman")
    if source not in CLI_SOURCES:
        raise PipelineError(f"--dataset {spec!r}: unknown source {source!r} "
                            f"(supported: {', '.join(CLI_SOURCES)})")
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise PipelineError(f"--dataset {spec!r}: dataset folder {folder} not found")
    return source, folder


def _ingest_into(workspace: Path, params: Params, source: str, folder: Path) -> Path:
    """Run the ingest stage's own code on `folder` inside `workspace`; returns the ingested folder."""
    from pipelines import ingest

    ingest_params = params.model_copy(update={"ingest": params.ingest.model_copy(
        update={"source": source, "path": str(folder), "max_examples": None})})
    log.info("ingesting %s from %s into a temporary workspace", source, folder)
    with contextlib.chdir(workspace):
        ingest.main(ingest_params)
    return workspace / INGESTED


def evaluate_cli(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="python -m pipelines.evaluate",
                                     description="Evaluate a saved model on a dataset without retraining.")
    parser.add_argument("--model", required=True, help="model directory (ONNX export or save_pretrained)")
    parser.add_argument("--dataset", required=True,
                        help="SOURCE:PATH, SOURCE one of " + ", ".join(CLI_SOURCES))
    parser.add_argument("--out", required=True,
                        help="directory for eval.json, predictions.jsonl, ex_by_hardness.csv")
    parser.add_argument("--split", choices=SPLIT_CHOICES, help="split to score (default: evaluate.split)")
    parser.add_argument("--max-examples", type=int, help="score at most this many examples of the split")
    parser.add_argument("--params", default="params.yaml",
                        help="params file for evaluate/ingest settings (defaults are used when it is absent)")
    args = parser.parse_args(argv)

    from pipelines.common.model_io import check_model_dir, load_for_generation

    params = load_params(args.params) if Path(args.params).is_file() else Params()
    options = params.evaluate
    if args.max_examples:
        options = options.model_copy(update={"max_examples": args.max_examples})
    split = args.split or options.split
    model_dir = check_model_dir(Path(args.model).expanduser().resolve())
    source, folder = parse_dataset(args.dataset)
    out = Path(args.out).expanduser().resolve()
    with tempfile.TemporaryDirectory(prefix="nl2sql-eval-") as tmp:
        ingested = folder if source == "ingested" else _ingest_into(Path(tmp), params, source, folder)
        examples_path = ingested / INGESTED_EXAMPLES.relative_to(INGESTED)
        eval_set = load_eval_set(examples_path, ingested, split, options.max_examples)
        model, tokenizer, config = load_for_generation(model_dir)
        log.info("evaluating %s on %d %s examples of %s", model_dir, len(eval_set.examples), split, folder)
        summary, records = evaluate_model(model, tokenizer, config, eval_set, options)
    summary.update(model=str(model_dir), split=split, dataset=f"{source}:{folder}")
    write_outputs(summary, records, out / "eval.json", out / "predictions.jsonl", out / "ex_by_hardness.csv")
    log.info("%s -> %s", _headline(summary), out)
    return summary


def cli_main(argv: list[str]) -> None:
    setup_logging()
    try:
        evaluate_cli(argv)
    except PipelineError as exc:
        log.error("%s", exc)
        sys.exit(2)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        cli_main(sys.argv[1:])
    else:
        run_stage(main)
