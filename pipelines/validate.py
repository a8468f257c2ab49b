"""Validate stage: check every ingested example with a Great Expectations suite before training.

Checks that need more than a column's own values (does the gold SQL parse, does it run on its
database, is the (db_id, question) pair a repeat, does the database leak across splits) are computed
here per row into boolean columns; the GX suite then asserts those columns, so Data Docs, the
summary, the metrics and the quarantine file all name the same checks.

Reads  data/ingested/{examples.parquet, databases.json, manifest.json} and the databases.
Writes data/validated/{examples.parquet, quarantine.parquet}, reports/validation/ (Data Docs +
summary.md) and metrics/validation.json. With `validate.on_failure: fail` any violation raises
PipelineError and leaves no data/validated behind; with `quarantine` failing rows are set aside."""

from __future__ import annotations

import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from pipelines.common import databases
from pipelines.common.cli import run_stage
from pipelines.common.errors import PipelineError
from pipelines.common.io import atomic_dir, read_json, write_json
from pipelines.common.params import Params
from pipelines.common.paths import (
    DATABASES_INDEX,
    INGEST_MANIFEST,
    INGESTED_EXAMPLES,
    METRICS,
    QUARANTINE,
    VALIDATED,
    VALIDATED_EXAMPLES,
    VALIDATION_REPORT,
)
from pipelines.common.sql import SQLError, SQLTimeoutError, execute_readonly, parse_sql

log = logging.getLogger(__name__)
# GX logs dozens of INFO lines on import and on every context; only its warnings are worth reading.
logging.getLogger("great_expectations").setLevel(logging.WARNING)

REQUIRED_COLUMNS = ("example_id", "db_id", "question", "sql", "split", "source")
SPLITS = ("train", "dev", "test")
VALIDATION_METRICS = METRICS / "validation.json"
SUMMARY_FILE = "summary.md"
SITE_NAME = "validation"
# Rows fetched when executing a gold query: as many as evaluation compares, so a query that only
# fails or runs out of time after its first rows is caught here and not at evaluation.
GOLD_FETCH_ROWS = 10_000
# Gold queries run concurrently: enough to overlap SQLite work on a few cores, few enough that a
# shared machine does not push every query towards its time limit.
EXECUTION_THREADS = min(4, os.cpu_count() or 1)
# Failing rows listed per check: in the error message / in summary.md (all of them are in the metrics
# counts, the Data Docs and, in quarantine mode, quarantine.parquet).
MESSAGE_ROWS_PER_CHECK = 5
SUMMARY_ROWS_PER_CHECK = 50


@dataclass
class CheckOutcome:
    """One named check (a GX expectation over one column) and the rows that fail it."""

    name: str
    expectation: Any  # the great_expectations Expectation
    failing_rows: list[int]  # positions in the examples frame

    @property
    def expectation_type(self) -> str:
        return self.expectation.expectation_type

    @property
    def column(self) -> str:
        return self.expectation.column


def main(params: Params) -> dict:
    cfg = params.validate_
    if cfg.question_min_chars > cfg.question_max_chars:
        raise PipelineError(f"params.yaml: validate.question_min_chars ({cfg.question_min_chars}) is larger "
                            f"than validate.question_max_chars ({cfg.question_max_chars})")
    started = time.monotonic()
    examples = _read_examples(INGESTED_EXAMPLES)
    index = databases.read_index(DATABASES_INDEX)
    manifest = read_json(INGEST_MANIFEST)
    split_mode = _split_mode(manifest)
    targets = _reachable_targets(examples, index)
    log.info("validating %d examples over %d databases (split mode %s, on_failure %s)",
             len(examples), examples["db_id"].nunique(), split_mode, cfg.on_failure)

    checked, details = _compute_row_checks(examples, targets, cfg.sql_timeout_s, split_mode)
    expectations = _build_expectations(cfg.question_min_chars, cfg.question_max_chars, sorted(index),
                                       split_mode)
    with atomic_dir(VALIDATION_REPORT) as report_dir:
        outcomes = _run_suite(checked, expectations, report_dir,
                              run_name=f"{manifest.get('source')}-{split_mode}")
        failed = _failed_checks_per_row(outcomes)
        metrics = _metrics(len(examples), failed, outcomes, cfg.on_failure, split_mode)
        (report_dir / SUMMARY_FILE).write_text(_summary_markdown(examples, details, outcomes, metrics))
    write_json(VALIDATION_METRICS, metrics)
    log.info("validation: %d of %d rows pass, %d fail (%.1f s); report in %s",
             metrics["passed"], metrics["total"], metrics["failed"], time.monotonic() - started,
             VALIDATION_REPORT / "index.html")

    if failed and cfg.on_failure == "fail":
        # A failed stage must not leave an earlier run's validated data for the next stage to pick up.
        shutil.rmtree(VALIDATED, ignore_errors=True)
        raise PipelineError(_failure_message(examples, details, outcomes, metrics))
    if metrics["passed"] == 0:
        raise PipelineError(f"{INGESTED_EXAMPLES}: no example passed validation; "
                            f"see {VALIDATION_REPORT / SUMMARY_FILE}")
    _write_validated(examples, failed, details)
    for outcome in outcomes:
        if outcome.failing_rows:
            log.warning("quarantined %d rows failing %s", len(outcome.failing_rows), outcome.name)
    return metrics


# --- inputs -------------------------------------------------------------------------------------


def _read_examples(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise PipelineError(f"{path}: file not found (run the ingest stage first)")
    try:
        examples = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a corrupt file
        raise PipelineError(f"{path}: cannot read as Parquet: {exc}") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in examples.columns]
    if missing:
        raise PipelineError(f"{path}: missing required column(s) {', '.join(missing)} "
                            f"(found: {', '.join(map(str, examples.columns))})")
    if examples.empty:
        raise PipelineError(f"{path}: no examples to validate")
    # Positions identify rows in GX results; the file's own index carries no meaning.
    return examples.reset_index(drop=True)


def _split_mode(manifest: Any) -> str:
    mode = manifest.get("split_mode") if isinstance(manifest, dict) else None
    if mode not in ("by_question", "by_database"):
        raise PipelineError(f"{INGEST_MANIFEST}: key split_mode must be by_question or by_database, "
                            f"got {mode!r}")
    return mode


def _reachable_targets(examples: pd.DataFrame, index: dict[str, str]) -> dict[str, str]:
    """The connectable target of every known database the examples use, each connected to once,
    so a missing file or an unreachable server stops the stage before thousands of queries time out."""
    targets = {}
    used = sorted({db for db in examples["db_id"].dropna().unique() if db in index})
    for db_id in used:
        targets[db_id] = databases.resolve(db_id, DATABASES_INDEX)
        databases.check_reachable(targets[db_id])
    return targets


# --- per-row checks ------------------------------------------------------------------------------


def _compute_row_checks(examples: pd.DataFrame, targets: dict[str, str], timeout_s: float,
                        split_mode: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The frame GX validates (examples + one column per computed check) and a frame of readable
    details per row and check. A check whose inputs are null is left null: GX skips nulls, so such a
    row fails only the not-null expectation of the missing field instead of every check at once."""
    checked = examples[list(REQUIRED_COLUMNS)].copy()
    details = pd.DataFrame(index=examples.index, dtype=object)

    checked["question_chars"] = pd.array(
        [None if pd.isna(q) else len(" ".join(str(q).split())) for q in examples["question"]], dtype="Int64")
    checked["unique_db_question"], details["unique_db_question"] = _first_occurrences(examples)
    parses, details["sql_parses"] = _parses(examples["sql"])
    checked["sql_parses"] = parses
    checked["sql_executes"], details["sql_executes"] = _executes(examples, parses, targets, timeout_s)
    if split_mode == "by_database":
        checked["no_split_leakage"], details["no_split_leakage"] = _split_leak_free(examples)
    details["question_length"] = [None if pd.isna(n) else f"{n} characters"
                                  for n in checked["question_chars"]]
    return checked, details


def _question_key(question: str) -> str:
    # Questions differing only in case or spacing are the same question to a model.
    return " ".join(question.split()).casefold()


def _first_occurrences(examples: pd.DataFrame) -> tuple[list, list]:
    """False for the second and later rows with the same (db_id, question): the first one is kept."""
    seen: dict[tuple[str, str], str] = {}
    flags, notes = [], []
    for db_id, question, example_id in zip(examples["db_id"], examples["question"], examples["example_id"]):
        if pd.isna(db_id) or pd.isna(question):
            flags.append(None)
            notes.append(None)
            continue
        key = (db_id, _question_key(str(question)))
        if key in seen:
            flags.append(False)
            notes.append(f"same question as example_id={seen[key]}")
        else:
            seen[key] = example_id
            flags.append(True)
            notes.append(None)
    return flags, notes


def _parses(sql: pd.Series) -> tuple[list, list]:
    flags, notes = [], []
    for statement in tqdm(sql, desc="parse gold SQL", unit="query", mininterval=5, leave=False):
        if pd.isna(statement):
            flags.append(None)
            notes.append(None)
            continue
        try:
            parse_sql(str(statement))
        except SQLError as exc:
            flags.append(False)
            notes.append(str(exc))
        else:
            flags.append(True)
            notes.append(None)
    return flags, notes


def _executes(examples: pd.DataFrame, parses: list, targets: dict[str, str],
              timeout_s: float) -> tuple[list, list]:
    """Run each parsing gold query on its database (read-only, time-limited); rows whose SQL does not
    parse or whose database is unknown are left null, since other checks already name them.

    Queries run on a few threads (SQLite releases the GIL while it works). The time limit is wall
    clock, so a query can run out of time just because the machine is busy: the ones that time out
    get one more try each, alone, before they count as failing."""
    flags: list = [None] * len(examples)
    notes: list = [None] * len(examples)
    runnable = [i for i in range(len(examples)) if parses[i] is True and examples["db_id"].iat[i] in targets]
    seconds: dict[int, float] = {}
    timed_out: set[int] = set()

    def run(i: int) -> None:
        start = time.monotonic()
        timed_out.discard(i)
        try:
            execute_readonly(targets[examples["db_id"].iat[i]], str(examples["sql"].iat[i]),
                             timeout_s=timeout_s, max_rows=GOLD_FETCH_ROWS)
        except SQLTimeoutError as exc:
            flags[i], notes[i] = False, str(exc)
            timed_out.add(i)
        except SQLError as exc:
            flags[i], notes[i] = False, str(exc)
        else:
            flags[i], notes[i] = True, None
        seconds[i] = time.monotonic() - start

    with ThreadPoolExecutor(max_workers=EXECUTION_THREADS) as pool:
        for _ in tqdm(pool.map(run, runnable), total=len(runnable), desc="execute gold SQL", unit="query",
                      mininterval=5):
            pass
    if timed_out:
        log.info("%d gold queries ran out of time; retrying them one at a time", len(timed_out))
        for i in sorted(timed_out):
            run(i)
    if runnable:
        slowest = max(runnable, key=seconds.__getitem__)
        log.info("slowest gold query: %.2f s (example_id=%s)", seconds[slowest],
                 examples["example_id"].iat[slowest])
    return flags, notes


def _split_leak_free(examples: pd.DataFrame) -> tuple[list, list]:
    """In by_database mode every database belongs to one split. A database found on several keeps its
    majority split (ties: train, then dev, then test); its rows on the other splits are the leak."""
    counts = examples.dropna(subset=["db_id", "split"]).groupby(["db_id", "split"]).size()
    home: dict[str, str] = {}
    spread: dict[str, str] = {}
    for db_id, per_split in counts.groupby(level=0):
        per_split = per_split.droplevel(0)
        if len(per_split) > 1:
            order = sorted(per_split.index,
                           key=lambda s: (-per_split[s], SPLITS.index(s) if s in SPLITS else len(SPLITS), s))
            home[db_id] = order[0]
            spread[db_id] = ", ".join(f"{s} ({per_split[s]} rows)" for s in order)
    flags, notes = [], []
    for db_id, split in zip(examples["db_id"], examples["split"]):
        if pd.isna(db_id) or pd.isna(split):
            flags.append(None)
            notes.append(None)
        elif db_id in home and split != home[db_id]:
            flags.append(False)
            notes.append(f"database {db_id} is on {spread[db_id]}; kept on {home[db_id]}")
        else:
            flags.append(True)
            notes.append(None)
    return flags, notes


# --- the GX suite ------------------------------------------------------------------------------


def _build_expectations(min_chars: int, max_chars: int, known_db_ids: list[str], split_mode: str) -> list:
    """The suite, in report order. meta["check"] is the short name used in messages, metrics and
    quarantine.parquet; notes explain computed columns in the Data Docs."""
    import great_expectations.expectations as gxe

    def check(name: str, expectation_class, column: str, notes: str, **kwargs):
        return expectation_class(column=column, notes=notes, meta={"check": name}, **kwargs)

    expectations = [check(f"{column}_not_null", gxe.ExpectColumnValuesToNotBeNull, column,
                          f"{column} is set on every example") for column in REQUIRED_COLUMNS]
    expectations += [
        check("example_id_unique", gxe.ExpectColumnValuesToBeUnique, "example_id",
              "example_id identifies one example"),
        check("split_known", gxe.ExpectColumnValuesToBeInSet, "split", "split is one of train, dev, test",
              value_set=list(SPLITS)),
        check("db_id_known", gxe.ExpectColumnValuesToBeInSet, "db_id",
              f"db_id is a database listed in {DATABASES_INDEX}", value_set=known_db_ids),
        check("question_length", gxe.ExpectColumnValuesToBeBetween, "question_chars",
              "question_chars: characters of the question, runs of whitespace counted as one space",
              min_value=min_chars, max_value=max_chars),
        check("unique_db_question", gxe.ExpectColumnValuesToBeInSet, "unique_db_question",
              "unique_db_question: False for a repeat of an earlier (db_id, question) pair, "
              "compared ignoring case and spacing", value_set=[True]),
        check("sql_parses", gxe.ExpectColumnValuesToBeInSet, "sql_parses",
              "sql_parses: the gold SQL parses as one SQLite statement (sqlglot)", value_set=[True]),
        check("sql_executes", gxe.ExpectColumnValuesToBeInSet, "sql_executes",
              "sql_executes: the gold SQL runs read-only on its database within validate.sql_timeout_s",
              value_set=[True]),
    ]
    if split_mode == "by_database":
        expectations.append(check("no_split_leakage", gxe.ExpectColumnValuesToBeInSet, "no_split_leakage",
                                  "no_split_leakage: False for rows of a database that also appears on "
                                  "another split", value_set=[True]))
    return expectations


def _gx_context(site_dir: Path):
    """An in-memory GX context whose only Data Docs site is `site_dir`: nothing else touches disk."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    site = {
        "class_name": "SiteBuilder",
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                          "base_directory": str(site_dir.resolve())},
    }
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        data_docs_sites={SITE_NAME: site},
        # GX draws a progress bar per metric batch; this stage reports its own progress.
        progress_bars=ProgressBarsConfig(globally=False),
        analytics_enabled=False,
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def _run_suite(checked: pd.DataFrame, expectations: list, site_dir: Path,
               run_name: str) -> list[CheckOutcome]:
    """Validate `checked` with a checkpoint that renders Data Docs into `site_dir`; the failing rows
    of each check come from GX's own results (COMPLETE format lists every unexpected index)."""
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.core.run_identifier import RunIdentifier

    context = _gx_context(site_dir)
    batch = (context.data_sources.add_pandas("nl2sql")
             .add_dataframe_asset("ingested_examples")
             .add_batch_definition_whole_dataframe("all_rows"))
    suite = context.suites.add(gx.ExpectationSuite(name="nl2sql_examples", expectations=expectations))
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name="validate_examples", data=batch, suite=suite))
    checkpoint = context.checkpoints.add(gx.Checkpoint(
        name="validate", validation_definitions=[definition],
        actions=[UpdateDataDocsAction(name="update_data_docs", site_names=[SITE_NAME])],
        result_format={"result_format": "COMPLETE"}))
    result = checkpoint.run(batch_parameters={"dataframe": checked}, run_id=RunIdentifier(run_name=run_name))

    order = [e.meta["check"] for e in expectations]
    by_name = dict(zip(order, expectations))
    outcomes = []
    (suite_result,) = result.run_results.values()
    for expectation_result in suite_result.results:
        name = expectation_result.expectation_config.meta["check"]
        unexpected = (expectation_result.result or {}).get("unexpected_index_list")
        if unexpected is None:
            # GX reports an expectation it could not evaluate as a failure without rows; never let
            # that pass as "no failing rows".
            reason = _exception_message(expectation_result.exception_info)
            raise PipelineError(f"{INGESTED_EXAMPLES}: check {name} could not be evaluated on column "
                                f"{by_name[name].column}: {reason}")
        outcomes.append(CheckOutcome(name, by_name[name], sorted(int(i) for i in unexpected)))
    return sorted(outcomes, key=lambda o: order.index(o.name))


def _exception_message(exception_info: Any) -> str:
    """GX's exception info is one {raised_exception, exception_message, ...} record, or one per metric."""
    records = [exception_info]
    if isinstance(exception_info, dict) and "exception_message" not in exception_info:
        records = list(exception_info.values())
    messages = {str(r.get("exception_message") if isinstance(r, dict) else getattr(r, "exception_message", r))
                for r in records}
    return "; ".join(sorted(messages)) or "no reason given"


def _failed_checks_per_row(outcomes: list[CheckOutcome]) -> dict[int, list[str]]:
    failed: dict[int, list[str]] = {}
    for outcome in outcomes:
        for row in outcome.failing_rows:
            failed.setdefault(row, []).append(outcome.name)
    return failed


# --- outputs -----------------------------------------------------------------------------------


def _metrics(total: int, failed: dict[int, list[str]], outcomes: list[CheckOutcome], on_failure: str,
             split_mode: str) -> dict:
    return {
        "total": total,
        "passed": total - len(failed),
        "failed": len(failed),
        "quarantined": len(failed) if on_failure == "quarantine" else 0,
        "success": not failed,
        "on_failure": on_failure,
        "split_mode": split_mode,
        "failures": {o.name: len(o.failing_rows) for o in outcomes},
    }


def _snippet(question: Any, width: int = 60) -> str:
    if pd.isna(question):
        return "<null>"
    text = " ".join(str(question).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _detail(details: pd.DataFrame, row: int, check: str) -> str:
    """The one-line reason a row fails `check` ("" when the check's name says it all)."""
    detail = details[check].iat[row] if check in details else None
    return _snippet(detail, 240) if isinstance(detail, str) else ""


def _row_line(examples: pd.DataFrame, details: pd.DataFrame, row: int, check: str) -> str:
    line = (f"example_id={examples['example_id'].iat[row]} db_id={examples['db_id'].iat[row]} "
            f"question={_snippet(examples['question'].iat[row])!r}")
    detail = _detail(details, row, check)
    return f"{line} ({detail})" if detail else line


def _failure_message(examples: pd.DataFrame, details: pd.DataFrame, outcomes: list[CheckOutcome],
                     metrics: dict) -> str:
    lines = [f"{INGESTED_EXAMPLES}: {metrics['failed']} of {metrics['total']} rows fail validation "
             f"(details: {VALIDATION_REPORT / SUMMARY_FILE}, Data Docs: {VALIDATION_REPORT / 'index.html'})"]
    for outcome in outcomes:
        if not outcome.failing_rows:
            continue
        lines.append(f"  {outcome.name} ({outcome.expectation_type} on {outcome.column}): "
                     f"{len(outcome.failing_rows)} row(s)")
        for row in outcome.failing_rows[:MESSAGE_ROWS_PER_CHECK]:
            lines.append(f"    row {row}: {_row_line(examples, details, row, outcome.name)}")
        if len(outcome.failing_rows) > MESSAGE_ROWS_PER_CHECK:
            lines.append(f"    ... and {len(outcome.failing_rows) - MESSAGE_ROWS_PER_CHECK} more")
    lines.append("Fix the data, or set validate.on_failure: quarantine in params.yaml "
                 "to set these rows aside.")
    return "\n".join(lines)


def _md(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _summary_markdown(examples: pd.DataFrame, details: pd.DataFrame, outcomes: list[CheckOutcome],
                      metrics: dict) -> str:
    if metrics["success"]:
        verdict = "passed"
    elif metrics["on_failure"] == "quarantine":
        verdict = f"passed with {metrics['quarantined']} rows quarantined"
    else:
        verdict = "failed (on_failure: fail)"
    lines = [
        f"# Validation of `{INGESTED_EXAMPLES}`", "",
        f"Result: **{verdict}**. Rows: {metrics['total']} total, {metrics['passed']} pass, "
        f"{metrics['failed']} fail. Split mode: {metrics['split_mode']}.", "",
        "Great Expectations Data Docs: [index.html](index.html)", "",
        "| Check | GX expectation | Column | Failing rows | What it asserts |",
        "|---|---|---|---:|---|",
    ]
    for outcome in outcomes:
        lines.append(f"| {outcome.name} | `{outcome.expectation_type}` | {outcome.column} | "
                     f"{len(outcome.failing_rows)} | {_md(outcome.expectation.notes)} |")
    for outcome in outcomes:
        if not outcome.failing_rows:
            continue
        name = outcome.name
        lines += ["", f"## {name}: failing rows: {len(outcome.failing_rows)}", "",
                  "| Row | example_id | db_id | question | detail |", "|---:|---|---|---|---|"]
        for row in outcome.failing_rows[:SUMMARY_ROWS_PER_CHECK]:
            cells = [row, examples["example_id"].iat[row], examples["db_id"].iat[row],
                     _snippet(examples["question"].iat[row], 100), _detail(details, row, name)]
            lines.append("| " + " | ".join(_md(cell) for cell in cells) + " |")
        if len(outcome.failing_rows) > SUMMARY_ROWS_PER_CHECK:
            lines.append(f"\n... and {len(outcome.failing_rows) - SUMMARY_ROWS_PER_CHECK} more "
                         "(all are in the Data Docs and, in quarantine mode, in quarantine.parquet)")
    return "\n".join(lines) + "\n"


def _write_validated(examples: pd.DataFrame, failed: dict[int, list[str]], details: pd.DataFrame) -> None:
    failing = sorted(failed)
    passing = examples.drop(index=failing)
    quarantine = examples.loc[failing].copy()
    quarantine["failed_expectations"] = pd.Series([", ".join(failed[r]) for r in failing],
                                                  index=quarantine.index, dtype=object)
    quarantine["failure_detail"] = pd.Series(
        ["; ".join(f"{name}: {_detail(details, r, name)}" for name in failed[r] if _detail(details, r, name))
         for r in failing], index=quarantine.index, dtype=object)
    with atomic_dir(VALIDATED) as out:
        passing.to_parquet(out / VALIDATED_EXAMPLES.name, index=False)
        quarantine.to_parquet(out / QUARANTINE.name, index=False)


if __name__ == "__main__":
    run_stage(main)
