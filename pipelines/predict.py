"""Ask a saved model one question about a live database, from the command line.

    python -m pipelines.predict --model models/onnx/int8 --database data/ingested/databases/shop.sqlite \\
        [--execute] "how many customers live in paris?"

The database (SQLite file or SQLAlchemy URL such as postgresql://user@host/db) is introspected, the question
serialized with the model's serialization.json, SQL chosen as serving chooses it (the SQL of the nearest known
examples with `serving.example_candidates`, then the beams; the first that executes) and printed. With
--execute the query also runs read-only (row and time limits) and the rows are printed tab-separated under a
header of column names."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipelines.common.cli import setup_logging
from pipelines.common.errors import PipelineError
from pipelines.common.params import ServingParams

log = logging.getLogger(__name__)


def _serving_defaults() -> ServingParams:
    """params.yaml's `serving` section when run from a checkout, so predict answers as the service does."""
    from pipelines.common.params import load_params

    return load_params("params.yaml").serving if Path("params.yaml").is_file() else ServingParams()


def _parse_args(argv: list[str]) -> argparse.Namespace:
    defaults = _serving_defaults()
    parser = argparse.ArgumentParser(prog="python -m pipelines.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("question")
    parser.add_argument("--model", required=True, help="model directory (ONNX export or save_pretrained)")
    parser.add_argument("--database", required=True, help="SQLite file or SQLAlchemy URL")
    parser.add_argument("--db-id", help="database name given to the schema snapshot (default: file stem)")
    parser.add_argument("--execute", action="store_true",
                        help="also run the SQL read-only and print the rows")
    parser.add_argument("--num-beams", type=int, default=defaults.num_beams)
    parser.add_argument("--example-candidates", type=int, default=defaults.example_candidates,
                        help="nearest known examples whose SQL joins the beams as candidates (0 = beams only)")
    parser.add_argument("--max-rows", type=int, default=defaults.max_rows)
    parser.add_argument("--timeout-s", type=float, default=defaults.sql_timeout_s)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    return parser.parse_args(argv)


def _check_database(database: str) -> str:
    from pipelines.common.databases import is_url, sqlite_path

    if not is_url(database):
        path = Path(database).expanduser()
        if not path.is_file():
            raise PipelineError(f"--database {database}: SQLite database file not found")
        return str(path.resolve())
    path = sqlite_path(database)
    if path is not None and not path.is_file():
        raise PipelineError(f"--database {database}: SQLite database file not found")
    return database


def predict(question: str, model_dir: str | Path, database: str, *, db_id: str | None = None,
            num_beams: int = 4, example_candidates: int = 0, timeout_s: float = 5.0, device: str = "auto") -> str:
    """The SQL the model answers `question` with on `database` (candidates as in `common.candidates`, the first
    that executes)."""
    from pipelines.common.candidates import answer_candidates, model_inputs
    from pipelines.common.databases import check_reachable, is_url
    from pipelines.common.generate import execution_guided
    from pipelines.common.model_io import check_model_dir, load_for_generation
    from pipelines.common.schema import introspect

    if not question.strip():
        raise PipelineError("the question is empty")
    check_model_dir(model_dir)
    target = _check_database(database)
    check_reachable(target)
    if db_id is None:
        name = target.rsplit("/", 1)[-1].split("?")[0] if is_url(target) else Path(target).stem
        db_id = name or "database"
    model, tokenizer, config = load_for_generation(model_dir, device=device)
    schema = introspect(target, db_id, sample_values=config.serialization.sample_values)

    values = None
    if config.serialization.schema_linking and config.serialization.linking_values:
        from pipelines.common.schema_linking import value_index_for

        values = value_index_for(target, schema, config.serialization.linking_values)
    inputs, nearest = model_inputs(config, tokenizer, [question], [schema], [db_id], [values], [target],
                                   k=example_candidates)
    [found] = answer_candidates(model, tokenizer, config, inputs, nearest, num_beams=num_beams,
                                example_candidates=example_candidates, max_new_tokens=config.max_target_length,
                                batch_size=1)
    return execution_guided(found.candidates, target, timeout_s)


def format_rows(columns: list[str], rows: list[tuple], truncated: bool, max_rows: int) -> str:
    lines = ["\t".join(columns)]
    lines += ["\t".join("NULL" if v is None else str(v) for v in row) for row in rows]
    lines.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''}"
                 + (f", truncated at the limit of {max_rows})" if truncated else ")"))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from pipelines.common.sql import SQLError, execute_readonly

    args = _parse_args(argv)
    sql = predict(args.question, args.model, args.database, db_id=args.db_id, num_beams=args.num_beams,
                  example_candidates=args.example_candidates, timeout_s=args.timeout_s, device=args.device)
    print(sql)
    if not args.execute:
        return 0
    try:
        result = execute_readonly(_check_database(args.database), sql, timeout_s=args.timeout_s,
                                  max_rows=args.max_rows)
    except SQLError as exc:
        print(f"error: the generated SQL did not run: {exc}", file=sys.stderr)
        return 1
    print(format_rows(result.columns, result.rows, result.truncated, args.max_rows))
    return 0


if __name__ == "__main__":
    setup_logging()
    try:
        sys.exit(main(sys.argv[1:]))
    except PipelineError as exc:
        log.error("%s", exc)
        sys.exit(2)
