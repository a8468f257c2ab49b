"""Accuracy ablation (issue 7): the real stages once per lever, one table.

    python bench/accuracy.py --dataset spiderman:/work/shared/datasets/spiderman --split-mode by_question \\
        --train-minutes 30 [--levers baseline,linking,synthetic,constrained,all] [--max-examples N] [--eval-examples N]
    python bench/accuracy.py --dataset demo --train-minutes 2 --levers baseline,linking

Each row runs ingest -> validate -> tokenize -> train -> evaluate (on the teacher, `evaluate.split`) with
params.yaml's settings in a fresh temporary workspace (its own MLflow sqlite; ingest + validate are run once
and copied to later rows with the same data settings), with a row's levers switched on (`a+b` for a row
with both, e.g. `--levers baseline,linking,linking+retrieval`):
- baseline: params.yaml as it is, with every lever below forced off;
- linking: `tokenize.serialization.schema_linking: true` (plus params.yaml's linking knobs);
- synthetic: `ingest.synthetic_ratio` = `--synthetic-ratio` (default 1.0);
- retrieval: `tokenize.serialization.retrieval_k` = `--retrieval-k` (default params.yaml's), the nearest training examples
  of the same database in the input (column "EX copy": what copying the nearest example's SQL scores alone);
- punctuation: `tokenize.serialization.split_punctuation: true` (SQL punctuation as tokens of its own,
  spaced SQL targets);
- constrained: `evaluate.constrained: true`;
- candidates: `evaluate.example_candidates` = `--example-candidates` (default params.yaml's, or 3 where that is 0):
  the SQL of the nearest examples is tried before the beams (column "from examples": the share of answers
  that were an example's SQL); needs retrieval for a bank of examples;
- all: every lever above together.
With `--distill-minutes M`, each trained row also runs the distill stage (a `distill.student` T5 from that
row's teacher, M minutes, `--distill-epochs`) and a second table compares student and teacher as the stage reports them
(metrics/distill.json): parameters, greedy dev EX, batch-1 latency, and their ratios (the issue-4 target:
at most a quarter of the parameters, at least 90% of the teacher's EX).
constrained and candidates change decoding only: a row that differs from an earlier row by them alone
re-evaluates that row's model (its tokenize/train figures are that row's) instead of training again.
Training gets `--train-minutes` of wall clock (`train.max_train_minutes`) and `--epochs` (default params.yaml's;
the learning-rate schedule is planned over the epochs, so pick them to roughly fill the budget); tokenization and evaluation are timed separately. The table shows EX for greedy / beam /
execution-guided decoding, valid-SQL rate (execution-guided), EX per Spider hardness (execution-guided), mean
tokens per input, training examples/s and the times; the JSON of every row goes to `--out`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.common.errors import PipelineError  # noqa: E402
from pipelines.common.metrics import HARDNESS_LEVELS  # noqa: E402
from pipelines.common.params import Params, load_params  # noqa: E402

LEVERS = ("baseline", "linking", "synthetic", "retrieval", "punctuation", "constrained", "candidates", "all")
DECODING_LEVERS = {"constrained", "candidates"}


def row_levers(row: str) -> set[str]:
    """`baseline` -> none, `all` -> every lever, else the `+`-joined levers (`linking+retrieval`)."""
    if row == "baseline":
        return set()
    if row == "all":
        return set(LEVERS) - {"baseline", "all"}
    return set(row.split("+"))


def row_params(base: Params, row: str, args: argparse.Namespace) -> Params:
    """params.yaml with the dataset, budget and exactly this row's levers applied."""
    levers = row_levers(row)
    raw = base.model_dump(by_alias=True)
    source, _, path = args.dataset.partition(":")
    # Absolute: the stages run with the row's temporary workspace as the working directory.
    raw["ingest"].update(source=source, path=str(Path(path).resolve()) if path else None,
                         split_mode=args.split_mode, max_examples=args.max_examples,
                         synthetic_ratio=args.synthetic_ratio if "synthetic" in levers else 0.0)
    if source != "demo":
        # Public benchmarks carry a few gold queries that do not execute (SpiderMan: 2 use MySQL's
        # STR_TO_DATE): set them aside and report it, rather than stop the benchmark.
        raw["validate"]["on_failure"] = "quarantine"
    raw["tokenize"]["serialization"].update(
        schema_linking="linking" in levers, split_punctuation="punctuation" in levers,
        retrieval_k=(args.retrieval_k or base.tokenize.serialization.retrieval_k or 1) if "retrieval" in levers else 0)
    if args.retrieval_dropout is not None:
        raw["tokenize"]["serialization"]["retrieval_dropout"] = args.retrieval_dropout
    raw["train"]["max_train_minutes"] = args.train_minutes
    if args.epochs is not None:
        raw["train"]["epochs"] = args.epochs
    if args.distill_minutes is not None:
        raw["distill"]["max_train_minutes"] = args.distill_minutes
        epochs = args.distill_epochs if args.distill_epochs is not None else args.epochs
        if epochs is not None:
            raw["distill"]["epochs"] = epochs
    raw["evaluate"].update(
        model="teacher", max_examples=args.eval_examples, constrained="constrained" in levers,
        example_candidates=(args.example_candidates or base.evaluate.example_candidates or 3)
        if "candidates" in levers else 0)
    return Params.model_validate(raw)


def data_key(params: Params) -> str:
    """What ingest + validate depend on: rows with the same key share their validated data."""
    return json.dumps([params.seed, params.ingest.model_dump(), params.validate_.model_dump()], sort_keys=True)


def run_row(params: Params, workspace: Path, evaluate_only: bool = False, data_from: Path | None = None,
            distill_student: bool = False) -> dict:
    """The real stages in `workspace` (only evaluate when `evaluate_only`: the workspace already holds a
    trained model; ingest + validate are copied from `data_from`, an earlier row's workspace, when given;
    then distill when `distill_student`); returns the row's figures."""
    from pipelines import distill, evaluate, ingest, tokenize, train, validate

    stages = [("ingest", ingest), ("validate", validate), ("tokenize", tokenize), ("train", train)]
    if data_from is not None:
        for folder in ("data/ingested", "data/validated"):
            shutil.copytree(data_from / folder, workspace / folder, dirs_exist_ok=True)
        stages = stages[2:]
    times = {}
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workspace / 'mlflow.db'}"
    with contextlib.chdir(workspace):
        for name, stage in ([] if evaluate_only else stages) + [("eval", evaluate)]:
            started = time.monotonic()
            summary = stage.main(params)
            times[name] = round(time.monotonic() - started, 1)
        distilled = None
        if distill_student:
            started = time.monotonic()
            distilled = distill.main(params)
            times["distill"] = round(time.monotonic() - started, 1)
        stats = json.loads(Path("data/tokenized/stats.json").read_text())
        train_metrics = json.loads(Path("metrics/train.json").read_text())
    return {"eval": summary, "tokenize_stats": stats, "train": train_metrics, "times_s": times,
            "distill": distilled}


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def table(rows: list[dict]) -> str:
    header = ["row", "EX greedy", "EX beam", "EX exec-guided", "EX copy", "from examples", "valid SQL",
              *(f"EX {h}" for h in HARDNESS_LEVELS),
              "n test", "train ex", "tokens/input", "train ex/s", "tokenize s", "train s", "eval s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        e, t = row["eval"], row["train"]
        cells = [row["lever"], _pct(e["ex_greedy"]), _pct(e["ex_beam"]), _pct(e["ex_execution_guided"]),
                 _pct(e.get("ex_retrieved_copy")), _pct(e.get("answered_from_examples")), _pct(e["valid_sql"]),
                 *(f"{_pct(e.get(f'ex_{h}'))} (n={e.get(f'n_{h}', 0)})" for h in HARDNESS_LEVELS),
                 str(e["n"]), str(row["tokenize_stats"]["examples"]["train"]),
                 str(row["tokenize_stats"]["mean_source_tokens"]), str(t.get("examples_per_s")),
                 str(row["times_s"]["tokenize"]), str(t.get("train_time_s", row["times_s"]["train"])),
                 str(row["times_s"]["eval"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def distill_table(rows: list[dict]) -> str:
    header = ["row", "model", "parameters", "weights MB", "dev EX greedy", "latency ms (batch 1)", "training"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        d = row["distill"]
        for name, training in (("teacher", row["train"]), ("student", d)):
            m = d[name]
            cells = [row["lever"], name, f"{m['parameters'] / 1e6:.2f}M", f"{m['weights_bytes'] / 1e6:.2f}",
                     f"{_pct(m['dev_ex'])} ({m['dev_n_correct']}/{m['dev_n_scored']})",
                     str(m["latency_ms_batch1_p50"]), f"{training['steps']} updates, {training['stopped_by']}"]
            lines.append("| " + " | ".join(cells) + " |")
        r = d["ratios"]
        ex = "-" if r["dev_ex"] is None else f"{r['dev_ex']:.2f}"
        lines.append(f"| {row['lever']} | student / teacher | {r['parameters']:.2f} | {r['weights_bytes']:.2f} | "
                     f"{ex} | {r['latency']:.2f} | |")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python bench/accuracy.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True,
                        help="demo, or SOURCE:PATH with SOURCE spiderman | spider (e.g. spiderman:../shared/datasets/spiderman)")
    parser.add_argument("--split-mode", choices=("by_question", "by_database"), default="by_question")
    parser.add_argument("--train-minutes", type=float, default=30.0, help="training wall-clock budget per row")
    parser.add_argument("--epochs", type=float, help="train.epochs (default: params.yaml's)")
    parser.add_argument("--levers", default=",".join(LEVERS), help=f"comma-separated rows among {', '.join(LEVERS)}")
    parser.add_argument("--synthetic-ratio", type=float, default=1.0, help="ingest.synthetic_ratio of the synthetic rows")
    parser.add_argument("--retrieval-k", type=int,
                        help="retrieval_k of the retrieval rows (default: params.yaml's, or 1 where that is 0)")
    parser.add_argument("--retrieval-dropout", type=float,
                        help="retrieval_dropout of the retrieval rows (default: params.yaml's)")
    parser.add_argument("--example-candidates", type=int,
                        help="evaluate.example_candidates of the candidates rows (default: params.yaml's, or 3 where that is 0)")
    parser.add_argument("--distill-minutes", type=float,
                        help="also distill a student from each trained row's teacher with this budget (see above)")
    parser.add_argument("--distill-epochs", type=float, help="distill.epochs of those students (default: --epochs)")
    parser.add_argument("--max-examples", type=int, help="ingest.max_examples (a seeded subset of the dataset)")
    parser.add_argument("--eval-examples", type=int, help="evaluate.max_examples (default: the whole split)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the issue's budget: 2 cores)")
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--workdir", help="keep each row's workspace (data, models, mlflow.db) under this folder "
                                          "instead of a temporary one, e.g. to re-evaluate a model later")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "accuracy.json"))
    args = parser.parse_args(argv)
    levers = [row.strip() for row in args.levers.split(",") if row.strip()]
    unknown = [part for row in levers for part in row.split("+") if part not in LEVERS]
    if unknown or not levers:
        parser.error(f"--levers: unknown {', '.join(unknown) or '(none given)'}; choose among {', '.join(LEVERS)}"
                     " (join several with + for one row)")
    source, sep, path = args.dataset.partition(":")
    if source != "demo" and (source not in ("spiderman", "spider") or not sep or not Path(path).is_dir()):
        parser.error(f"--dataset {args.dataset!r}: expected demo or spiderman:PATH / spider:PATH to a folder")
    if source == "demo" and args.split_mode == "by_database":
        parser.error("--dataset demo has one database; by_database needs several")
    args.levers = levers
    return args


def main(argv: list[str]) -> int:
    import logging

    import torch

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    base = load_params(args.params)
    rows, data_workspaces = [], {}
    with contextlib.ExitStack() as stack:
        tmp = args.workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="nl2sql-bench-"))
        trained: dict[frozenset, tuple[str, Path]] = {}  # training levers -> (row, workspace) already trained
        for lever in args.levers:
            params = row_params(base, lever, args)
            print(f"== {lever}: {args.dataset} {args.split_mode}, {args.train_minutes} min training", flush=True)
            training_levers = frozenset(row_levers(lever) - DECODING_LEVERS)
            reused = trained.get(training_levers)
            workspace = reused[1] if reused else Path(tmp) / lever
            workspace.mkdir(parents=True, exist_ok=True)
            key = data_key(params)
            try:
                figures = run_row(params, workspace, evaluate_only=reused is not None,
                                  data_from=None if reused else data_workspaces.get(key),
                                  distill_student=args.distill_minutes is not None and reused is None)
            except PipelineError as exc:
                print(f"{lever}: failed: {exc}", file=sys.stderr)
                return 2
            data_workspaces.setdefault(key, workspace)
            trained.setdefault(training_levers, (lever, workspace))
            if reused:
                figures["times_s"].update({k: v for k, v in rows[[r["lever"] for r in rows].index(reused[0])]
                                           ["times_s"].items() if k != "eval"})
            rows.append({"lever": lever + (f" ({reused[0]} model)" if reused else ""), **figures})
            print(table(rows[-1:]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"command": "python bench/accuracy.py " + " ".join(argv), "dataset": args.dataset,
              "split_mode": args.split_mode, "train_minutes": args.train_minutes, "threads": args.threads,
              "rows": rows}
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\n{args.dataset} {args.split_mode}, {args.train_minutes} min training per row, "
          f"{args.threads} thread(s); EX/valid in %, execution-guided unless marked\n")
    print(table(rows))
    distilled = [row for row in rows if row.get("distill")]
    if distilled:
        print(f"\nstudent vs teacher (distill stage, {args.distill_minutes} min; dev split, greedy)\n")
        print(distill_table(distilled))
    print(f"\nrows as JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
