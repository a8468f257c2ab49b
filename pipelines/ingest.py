"""Ingest stage: one source (demo | spiderman | spider | custom) -> data/ingested/.

Writes examples.parquet (example_id, db_id, question, sql in canonical SQLite dialect, split, source),
schemas/<db_id>.json, databases/<db_id>.sqlite (or a URL in databases.json for a live server),
databases.json and manifest.json. The folder is built in a temporary directory and renamed into place,
so a failed ingest never leaves a partial data/ingested behind.

A structurally broken input (malformed CSV/JSON, missing database, a CSV for an unknown table,
an unreachable server) is a PipelineError naming the file and line/row. One gold query that does not
parse is not: it is stored as given and counted in the manifest; the validate stage reports it."""

from __future__ import annotations

import csv
import json
import logging
import random
import shutil
import sqlite3
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError
from tqdm import tqdm

from pipelines.common import databases
from pipelines.common.cli import run_stage
from pipelines.common.errors import PipelineError
from pipelines.common.io import atomic_dir, write_json
from pipelines.common.params import IngestParams, Params
from pipelines.common.paths import (
    DATABASES_INDEX,
    INGEST_MANIFEST,
    INGESTED,
    INGESTED_DATABASES,
    INGESTED_EXAMPLES,
    INGESTED_SCHEMAS,
)
from pipelines.common.schema import SchemaSnapshot, introspect
from pipelines.common.sql import SQLError, execute_readonly, to_canonical

log = logging.getLogger("pipelines.ingest")

SPLITS = ("train", "dev", "test")
# Per gold query when counting how many execute: generous, as the count is about correctness, and a
# few benchmark queries (baseball_1 joins) need several seconds on a busy CPU.
GOLD_TIMEOUT_S = 30.0
DEMO_DB_ID = "demo"
# Above the default 128 KiB cell limit, so one long text cell is not reported as a malformed file.
csv.field_size_limit(16 * 1024 * 1024)


@dataclass
class Example:
    db_id: str
    question: str
    sql: str
    origin: str  # "file:line" the row came from, for messages
    canonical: bool = True  # False when the gold SQL did not parse and is stored as given
    example_id: str = ""  # "<db_id>-<position in the source>", set before sampling so ids are stable


@dataclass
class Loaded:
    """What a source hands back: examples, plus each database's target under the output folder."""
    examples: list[Example]
    targets: dict[str, str]  # db_id -> target as recorded in databases.json
    snapshots: dict[str, SchemaSnapshot]
    notes: dict = field(default_factory=dict)  # source-specific facts for the manifest


# --- shared helpers -------------------------------------------------------------------------------

def _canonical_example(db_id: str, question: str, sql: str, origin: str, dialect: str,
                       column_names: set[str] | None = None) -> Example:
    question = " ".join(str(question).split())
    sql = str(sql).strip()
    try:
        return Example(db_id, question, to_canonical(sql, dialect, column_names, database=db_id), origin)
    except SQLError as exc:
        log.warning("%s: gold SQL kept as given, it does not parse as %s: %s", origin, dialect,
                    str(exc).splitlines()[0])
        return Example(db_id, question, sql, origin, canonical=False)


def _column_names(snapshot: SchemaSnapshot) -> set[str]:
    return {c.name.lower() for t in snapshot.tables for c in t.columns}


def _read_csv_rows(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) of a CSV with a header; errors name the file and line."""
    if not path.is_file():
        raise PipelineError(f"{path}: file not found")
    rows: list[tuple[int, dict[str, str]]] = []
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle, strict=True)
        try:
            header = next(reader, None)
            if header is None:
                raise PipelineError(f"{path}: empty file, expected a header row with {', '.join(required)}")
            header = [h.strip() for h in header]
            missing = [c for c in required if c not in header]
            if missing:
                raise PipelineError(f"{path}: line 1: header lacks column(s) {', '.join(missing)} "
                                    f"(found {', '.join(header)})")
            for record in reader:
                if not record:
                    continue
                if len(record) != len(header):
                    raise PipelineError(f"{path}: line {reader.line_num}: {len(record)} fields, "
                                        f"the header has {len(header)}")
                rows.append((reader.line_num, dict(zip(header, record))))
        except csv.Error as exc:
            raise PipelineError(f"{path}: line {reader.line_num}: malformed CSV: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise PipelineError(f"{path}: not UTF-8 text: {exc}") from exc
    return rows


def _read_json(path: Path) -> object:
    if not path.is_file():
        raise PipelineError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{path}: line {exc.lineno}: invalid JSON: {exc.msg}") from exc
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{path}: not UTF-8 text: {exc}") from exc


def _require_fields(item: object, fields: tuple[str, ...], where: str) -> dict:
    if not isinstance(item, dict):
        raise PipelineError(f"{where}: expected an object with {', '.join(fields)}, "
                            f"got {type(item).__name__}")
    missing = [f for f in fields if not isinstance(item.get(f), str) or not item[f].strip()]
    if missing:
        raise PipelineError(f"{where}: missing or empty field(s) {', '.join(missing)}")
    return item


# --- source: demo ---------------------------------------------------------------------------------

def load_demo(params: Params, out: Path) -> Loaded:
    from pipelines.common.synthetic import generate_pairs
    from pipelines.demo_data import build_demo_database

    cfg = params.ingest
    path = _database_file(out, DEMO_DB_ID)
    log.info("building the demo database (%d customers)", cfg.demo.n_customers)
    build_demo_database(path, cfg.demo.n_customers, params.seed)
    snapshot = introspect(path, DEMO_DB_ID, cfg.sample_values)
    log.info("generating %d question/SQL pairs", cfg.demo.n_pairs)
    pairs = generate_pairs(snapshot, str(path), cfg.demo.n_pairs, params.seed)
    examples = [
        _canonical_example(DEMO_DB_ID, pair["question"], pair["sql"], f"generated pair {i}", "sqlite")
        for i, pair in enumerate(pairs)
    ]
    return Loaded(examples, {DEMO_DB_ID: databases.relative_target(path, out)}, {DEMO_DB_ID: snapshot})


# --- source: spiderman (MySQL DDL + CSV per table) ---------------------------------------------------

@dataclass
class _ColumnSpec:
    name: str
    is_text: bool
    not_null: bool


def _spiderman_ddl(schema_file: Path) -> tuple[list[str], dict[str, list[_ColumnSpec]]]:
    """SQLite CREATE TABLE statements from a SpiderMan schema.sql, and each table's columns."""
    try:
        statements = [s for s in sqlglot.parse(schema_file.read_text(encoding="utf-8"), read="mysql") if s]
    except SqlglotError as exc:
        reason = str(exc).splitlines()[0]
        raise PipelineError(f"{schema_file}: cannot parse the MySQL schema: {reason}") from exc
    ddl: list[str] = []
    tables: dict[str, list[_ColumnSpec]] = {}
    for statement in statements:
        if not (isinstance(statement, exp.Create) and statement.kind == "TABLE"
                and isinstance(statement.this, exp.Schema)):
            raise PipelineError(f"{schema_file}: only CREATE TABLE statements are expected, found: "
                                f"{statement.sql('mysql')[:80]}")
        # Tables are qualified as `db_id`.`table`; SQLite has one database per file.
        for table in statement.find_all(exp.Table):
            table.set("db", None)
        # SQLite has no inline INDEX clause; indexes are not part of the schema contract.
        for index in list(statement.find_all(exp.IndexColumnConstraint)):
            index.pop()
        name = statement.this.this.name
        primary_key = {key.name.lower() for constraint in statement.this.find_all(exp.PrimaryKey)
                       for key in constraint.expressions}
        columns = []
        for column in statement.this.find_all(exp.ColumnDef):
            constraints = [c.args.get("kind") for c in column.args.get("constraints") or []]
            not_null = any(isinstance(k, exp.NotNullColumnConstraint) and not k.args.get("allow_null")
                           for k in constraints)
            inline_pk = any(isinstance(k, exp.PrimaryKeyColumnConstraint) for k in constraints)
            data_type = column.args.get("kind")
            is_text = data_type is None or data_type.is_type(*exp.DataType.TEXT_TYPES, exp.DataType.Type.CHAR)
            columns.append(_ColumnSpec(column.name, is_text,
                                       not_null or inline_pk or column.name.lower() in primary_key))
        tables[name] = columns
        ddl.append(statement.sql("sqlite"))
    return ddl, tables


def _build_spiderman_database(db_dir: Path, path: Path) -> dict:
    """SQLite database from <db_dir>/schema.sql and <db_dir>/data/<table>.csv; returns load facts."""
    schema_file = db_dir / "schema.sql"
    if not schema_file.is_file():
        raise PipelineError(f"{schema_file}: database file not found")
    ddl, tables = _spiderman_ddl(schema_file)
    by_lower = {name.lower(): name for name in tables}
    data_dir = db_dir / "data"
    csv_files = sorted(data_dir.glob("*.csv")) if data_dir.is_dir() else []
    loaded_tables: set[str] = set()
    rows_loaded = 0
    connection = sqlite3.connect(path)
    try:
        for statement in ddl:
            connection.execute(statement)
        for csv_file in csv_files:
            table = by_lower.get(csv_file.stem.lower())
            if table is None:
                raise PipelineError(f"{csv_file}: unknown table {csv_file.stem!r}: not in {schema_file} "
                                    f"(tables: {', '.join(tables)})")
            rows_loaded += _load_table_csv(connection, csv_file, table, tables[table])
            loaded_tables.add(table)
        connection.commit()
    finally:
        connection.close()
    return {"tables": len(tables), "rows": rows_loaded,
            "tables_without_data": sorted(set(tables) - loaded_tables)}


def _empty_value(column: _ColumnSpec) -> str | None:
    """Empty CSV field: '' only where NULL is impossible for text (NOT NULL text), NULL otherwise."""
    return "" if column.is_text and column.not_null else None


def _load_table_csv(connection: sqlite3.Connection, csv_file: Path, table: str,
                    columns: list[_ColumnSpec]) -> int:
    with csv_file.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle, strict=True)
        try:
            header = next(reader, None) or []
            specs = {c.name.lower(): c for c in columns}
            unknown = [h for h in header if h.lower() not in specs]
            if not header or unknown:
                raise PipelineError(f"{csv_file}: line 1: column(s) {', '.join(unknown) or '<none>'} "
                                    f"not in table {table!r}")
            ordered = [specs[h.lower()] for h in header]
            empty = [_empty_value(c) for c in ordered]
            rows = []
            for record in reader:
                if len(record) != len(header):
                    raise PipelineError(f"{csv_file}: line {reader.line_num}: {len(record)} fields, "
                                        f"the header has {len(header)}")
                rows.append(tuple(value if value != "" else empty[i] for i, value in enumerate(record)))
        except csv.Error as exc:
            raise PipelineError(f"{csv_file}: line {reader.line_num}: malformed CSV: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise PipelineError(f"{csv_file}: not UTF-8 text: {exc}") from exc
    placeholders = ", ".join("?" for _ in header)
    quoted = ", ".join('"' + c.name.replace('"', '""') + '"' for c in ordered)
    insert = f'INSERT INTO "{table}" ({quoted}) VALUES ({placeholders})'
    for row_number, row in enumerate(rows, start=2):
        try:
            connection.execute(insert, row)
        except sqlite3.Error as exc:
            raise PipelineError(f"{csv_file}: line {row_number}: cannot load row into {table!r}: "
                                f"{exc}") from exc
    return len(rows)


def load_spiderman(params: Params, out: Path) -> Loaded:
    cfg = params.ingest
    root = _dataset_root(cfg)
    queries_file = root / "train_queries.csv"
    databases_dir = root / "databases"
    rows = _read_csv_rows(queries_file, ("database", "question", "sql"))
    if not databases_dir.is_dir():
        raise PipelineError(f"{databases_dir}: databases folder not found")
    db_dirs = sorted(p for p in databases_dir.iterdir() if p.is_dir())
    known = {p.name for p in db_dirs}
    for line, row in rows:
        if row["database"] not in known:
            raise PipelineError(f"{queries_file}: line {line}: database {row['database']!r} not found: "
                                f"{databases_dir / row['database'] / 'schema.sql'} does not exist")
    targets: dict[str, str] = {}
    snapshots: dict[str, SchemaSnapshot] = {}
    facts: dict[str, dict] = {}
    for db_dir in tqdm(db_dirs, desc="databases", unit="db", mininterval=5):
        path = _database_file(out, db_dir.name)
        facts[db_dir.name] = _build_spiderman_database(db_dir, path)
        if facts[db_dir.name]["tables_without_data"]:
            log.warning("%s: no CSV for table(s) %s: loaded empty", db_dir.name,
                        ", ".join(facts[db_dir.name]["tables_without_data"]))
        snapshots[db_dir.name] = introspect(path, db_dir.name, cfg.sample_values)
        targets[db_dir.name] = databases.relative_target(path, out)
    log.info("loaded %d databases, %d rows", len(facts), sum(f["rows"] for f in facts.values()))
    examples = [
        _canonical_example(row["database"], row["question"], row["sql"], f"{queries_file}:{line}", "mysql")
        for line, row in tqdm(rows, desc="gold SQL to SQLite", unit="query", mininterval=10)
    ]
    return Loaded(examples, targets, snapshots, {"databases_loaded": facts})


# --- source: spider (official JSON layout) -------------------------------------------------------

def load_spider(params: Params, out: Path) -> Loaded:
    cfg = params.ingest
    root = _dataset_root(cfg)
    example_files = [root / "train_spider.json"]
    if (root / "dev.json").is_file():
        example_files.append(root / "dev.json")
    items: list[tuple[str, dict]] = []
    for path in example_files:
        data = _read_json(path)
        if not isinstance(data, list):
            raise PipelineError(f"{path}: expected a JSON list of examples")
        for position, item in enumerate(data):
            where = f"{path}: item {position}"
            items.append((where, _require_fields(item, ("question", "query", "db_id"), where)))
    tables_file = root / "tables.json"
    tables = _read_json(tables_file)
    if not isinstance(tables, list):
        raise PipelineError(f"{tables_file}: expected a JSON list of database descriptions")
    described = {_require_fields(description, ("db_id",), f"{tables_file}: item {i}")["db_id"]
                 for i, description in enumerate(tables)}
    needed = sorted({item["db_id"] for _, item in items})
    for where, item in items:
        if item["db_id"] not in described:
            raise PipelineError(f"{where}: db_id {item['db_id']!r} is not described in {tables_file}")
    sources = {db_id: root / "database" / db_id / f"{db_id}.sqlite" for db_id in needed}
    for db_id, source in sources.items():  # all present before copying anything
        if not source.is_file():
            raise PipelineError(f"{source}: database file not found (needed by db_id {db_id!r})")
    targets: dict[str, str] = {}
    snapshots: dict[str, SchemaSnapshot] = {}
    for db_id, source in tqdm(sources.items(), desc="databases", unit="db", mininterval=5):
        path = _database_file(out, db_id)
        shutil.copyfile(source, path)
        snapshots[db_id] = introspect(path, db_id, cfg.sample_values)
        targets[db_id] = databases.relative_target(path, out)
    columns = {db_id: _column_names(s) for db_id, s in snapshots.items()}
    examples = [_canonical_example(item["db_id"], item["question"], item["query"], where, "sqlite",
                                   columns[item["db_id"]])
                for where, item in items]
    return Loaded(examples, targets, snapshots)


# --- source: custom (JSONL/CSV examples + one SQLite file or database URL) -----------------------

def _read_custom_examples(path: Path) -> list[tuple[str, dict]]:
    if not path.is_file():
        raise PipelineError(f"{path}: examples file not found")
    if path.suffix.lower() == ".csv":
        return [(f"{path}:{line}", row) for line, row in _read_csv_rows(path, ("question", "sql"))]
    if path.suffix.lower() not in (".jsonl", ".json", ".ndjson"):
        raise PipelineError(f"{path}: unknown examples format {path.suffix!r} (use .jsonl or .csv)")
    items = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PipelineError(f"{path}: line {line_number}: invalid JSON: {exc.msg}") from exc
        where = f"{path}: line {line_number}"
        items.append((f"{path}:{line_number}", _require_fields(item, ("question", "sql"), where)))
    return items


def load_custom(params: Params, out: Path) -> Loaded:
    cfg = params.ingest.custom
    if not cfg.examples or not cfg.database:
        raise PipelineError("params.yaml: ingest.custom.examples and ingest.custom.database are required "
                            "for source 'custom'")
    db_id = cfg.db_id
    items = _read_custom_examples(Path(cfg.examples))
    for where, item in items:
        if item.get("db_id") not in (None, "", db_id):
            raise PipelineError(f"{where}: db_id {item['db_id']!r} is not the custom database "
                                f"{db_id!r} (ingest.custom.db_id)")
    if not items:
        raise PipelineError(f"{cfg.examples}: no examples")
    target = cfg.database
    sqlite_file = databases.sqlite_path(target)
    if sqlite_file is not None:
        if not sqlite_file.is_file():
            raise PipelineError(f"{sqlite_file}: database file not found (ingest.custom.database)")
        path = _database_file(out, db_id)
        shutil.copyfile(sqlite_file, path)
        recorded, live = databases.relative_target(path, out), str(path)
        dialect = "sqlite"
    else:
        databases.check_reachable(target)
        live = target
        # databases.json is a tracked artifact: it must not carry a secret.
        recorded = databases.without_password(target)
        if recorded != target:
            log.warning("%s: the password is not stored in databases.json; later stages need it from "
                        "PGPASSWORD or ~/.pgpass", databases.mask_url(target))
        dialect = databases.sqlglot_dialect(target)
    snapshot = introspect(live, db_id, params.ingest.sample_values)
    columns = _column_names(snapshot) if dialect == "sqlite" else None
    examples = [_canonical_example(db_id, item["question"], item["sql"], where, dialect, columns)
                for where, item in items]
    return Loaded(examples, {db_id: recorded}, {db_id: snapshot})


def _database_file(out: Path, db_id: str) -> Path:
    return out / INGESTED_DATABASES.relative_to(INGESTED) / f"{db_id}.sqlite"


def _dataset_root(cfg: IngestParams) -> Path:
    if not cfg.path:
        raise PipelineError(f"params.yaml: ingest.path is required for source {cfg.source!r}")
    root = Path(cfg.path)
    if not root.is_dir():
        raise PipelineError(f"{root}: dataset folder not found (ingest.path)")
    return root


# --- sampling, splits, gold execution --------------------------------------------------------------

def sample_examples(examples: list, max_examples: int | None, seed: int) -> list:
    """A seeded subset in the original order; all of them when max_examples is None or larger."""
    if max_examples is None or max_examples >= len(examples):
        return examples
    keep = set(random.Random(seed).sample(range(len(examples)), max_examples))
    return [e for i, e in enumerate(examples) if i in keep]


def _split_sizes(n: int, dev_fraction: float, test_fraction: float) -> tuple[int, int]:
    n_dev = round(n * dev_fraction)
    n_test = round(n * test_fraction)
    # A requested split never ends up empty when there is anything to put in it.
    if dev_fraction > 0 and n_dev == 0:
        n_dev = 1
    if test_fraction > 0 and n_test == 0:
        n_test = 1
    return n_dev, n_test


def assign_splits(db_ids: list[str], mode: str, dev_fraction: float, test_fraction: float,
                  seed: int) -> list[str]:
    """The split of each example (given by its db_id), by question or by whole database."""
    rng = random.Random(seed)
    if mode == "by_question":
        n = len(db_ids)
        n_dev, n_test = _split_sizes(n, dev_fraction, test_fraction)
        if n - n_dev - n_test < 1:
            raise PipelineError(f"params.yaml: ingest: {n} examples are too few for "
                                f"dev_fraction={dev_fraction} and test_fraction={test_fraction} "
                                f"(nothing left for train)")
        order = list(range(n))
        rng.shuffle(order)
        splits = [""] * n
        for rank, index in enumerate(order):
            splits[index] = "test" if rank < n_test else "dev" if rank < n_test + n_dev else "train"
        return splits
    distinct = sorted(set(db_ids))
    n_dev, n_test = _split_sizes(len(distinct), dev_fraction, test_fraction)
    if len(distinct) - n_dev - n_test < 1:
        needed = 1 + (dev_fraction > 0) + (test_fraction > 0)
        raise PipelineError(f"params.yaml: ingest.split_mode by_database needs at least {needed} databases "
                            f"with examples (train{', dev' if dev_fraction else ''}"
                            f"{', test' if test_fraction else ''} each get whole databases); "
                            f"found {len(distinct)}: {', '.join(distinct)}")
    rng.shuffle(distinct)
    db_split = {db: "test" if i < n_test else "dev" if i < n_test + n_dev else "train"
                for i, db in enumerate(distinct)}
    return [db_split[db] for db in db_ids]


def count_gold_executing(examples: list[Example], resolve) -> tuple[int, list[dict]]:
    """How many gold queries run on their database; the failures with their reason."""
    executing, failures = 0, []
    for example in tqdm(examples, desc="gold SQL", unit="query", mininterval=10):
        try:
            execute_readonly(resolve(example.db_id), example.sql, timeout_s=GOLD_TIMEOUT_S, max_rows=1)
            executing += 1
        except SQLError as exc:
            failures.append({"origin": example.origin, "db_id": example.db_id, "sql": example.sql,
                             "error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"})
    return executing, failures


def synthetic_train_examples(params: Params, loaded: Loaded, examples: list[Example], splits: list[str],
                             out: Path) -> list[Example]:
    """`ingest.synthetic_ratio` schema-driven pairs per human train pair of each train-side database
    (`synthetic.generate_pairs`), for the train split only. A pair is dropped when its question is a dev/test
    question (any database) or its SQL a dev/test query of the same database, so held-out questions are never
    trained on, and when it repeats a human question of its database (validate rejects repeats)."""
    from collections import Counter

    from pipelines.common.synthetic import generate_pairs

    def normal(question: str) -> str:
        # The same key as validate's repeat check: case and spacing do not make a new question.
        return " ".join(question.split()).casefold()

    held_out = [e for e, split in zip(examples, splits) if split != "train"]
    held_questions = {normal(e.question) for e in held_out}
    held_sql = {(e.db_id, e.sql) for e in held_out}
    human_questions = {(e.db_id, normal(e.question)) for e in examples}
    train_counts = Counter(e.db_id for e, split in zip(examples, splits) if split == "train")
    synthetic: list[Example] = []
    for db_id, n_human in tqdm(sorted(train_counts.items()), desc="synthetic pairs", unit="db", mininterval=10):
        wanted = round(params.ingest.synthetic_ratio * n_human)
        if wanted == 0:
            continue
        # Not params.seed itself: the demo source is generate_pairs(seed) already, so the same seed would
        # only re-draw its own pairs (all dropped as repeats).
        seed = zlib.crc32(f"synthetic:{db_id}".encode()) ^ params.seed
        try:
            pairs = generate_pairs(loaded.snapshots[db_id], _live_target(loaded.targets[db_id], out), wanted, seed)
        except PipelineError as exc:
            log.warning("%s: no synthetic pairs: %s", db_id, exc)
            continue
        kept = [p for p in pairs if normal(p["question"]) not in held_questions
                and (db_id, p["sql"]) not in held_sql and (db_id, normal(p["question"])) not in human_questions]
        for position, pair in enumerate(kept):
            synthetic.append(Example(db_id, pair["question"], pair["sql"], origin=f"synthetic:{db_id}:{position}",
                                     example_id=f"{db_id}-syn{position:05d}"))
    log.info("added %d synthetic train pairs (ratio %.2f) over %d databases", len(synthetic),
             params.ingest.synthetic_ratio, len(train_counts))
    return synthetic


# --- stage --------------------------------------------------------------------------------------

LOADERS = {"demo": load_demo, "spiderman": load_spiderman, "spider": load_spider, "custom": load_custom}


def main(params: Params) -> dict:
    cfg = params.ingest
    started = time.monotonic()
    with atomic_dir(INGESTED) as out:
        (out / INGESTED_DATABASES.relative_to(INGESTED)).mkdir()
        (out / INGESTED_SCHEMAS.relative_to(INGESTED)).mkdir()
        loaded = LOADERS[cfg.source](params, out)
        for position, example in enumerate(loaded.examples):
            example.example_id = f"{example.db_id}-{position:05d}"
        examples = sample_examples(loaded.examples, cfg.max_examples, params.seed)
        if not examples:
            raise PipelineError(f"ingest source {cfg.source!r}: no examples")
        splits = assign_splits([e.db_id for e in examples], cfg.split_mode, cfg.dev_fraction,
                               cfg.test_fraction, params.seed)
        log.info("executing %d gold queries", len(examples))
        executing, failures = count_gold_executing(
            examples, lambda db_id: _live_target(loaded.targets[db_id], out))
        human = len(examples)
        if cfg.synthetic_ratio > 0:
            synthetic = synthetic_train_examples(params, loaded, examples, splits, out)
            examples, splits = examples + synthetic, splits + ["train"] * len(synthetic)
            loaded.notes["synthetic_train_examples"] = len(synthetic)

        frame = pd.DataFrame({
            "example_id": [e.example_id for e in examples],
            "db_id": [e.db_id for e in examples],
            "question": [e.question for e in examples],
            "sql": [e.sql for e in examples],
            "split": splits,
            "source": [cfg.source] * human + ["synthetic"] * (len(examples) - human),
        })
        frame.to_parquet(out / INGESTED_EXAMPLES.relative_to(INGESTED), index=False)
        for db_id, snapshot in loaded.snapshots.items():
            snapshot.save(out / INGESTED_SCHEMAS.relative_to(INGESTED) / f"{db_id}.json")
        databases.write_index(loaded.targets, out / DATABASES_INDEX.relative_to(INGESTED))
        manifest = _manifest(params, frame, loaded, executing, failures, examples)
        write_json(out / INGEST_MANIFEST.relative_to(INGESTED), manifest)
    log.info("ingested %d examples over %d databases (%s) in %.1f s; %d of %d source gold queries execute "
             "(synthetic pairs: %d, each executed when generated)",
             len(frame), len(loaded.targets), ", ".join(f"{k} {v}" for k, v in manifest["splits"].items()),
             time.monotonic() - started, executing, human, len(frame) - human)
    return manifest


def _live_target(recorded: str, out: Path) -> str:
    """A target recorded relative to data/ingested, resolved inside the folder being built."""
    return recorded if databases.is_url(recorded) else str(out / recorded)


def _manifest(params: Params, frame: pd.DataFrame, loaded: Loaded, executing: int, failures: list[dict],
              examples: list[Example]) -> dict:
    cfg = params.ingest
    per_database = {
        db_id: {split: int(n) for split, n in group["split"].value_counts().sort_index().items()}
        for db_id, group in frame.groupby("db_id", sort=True)
    }
    return {
        "source": cfg.source,
        "path": cfg.path,
        "split_mode": cfg.split_mode,
        "seed": params.seed,
        "examples": len(frame),
        "examples_before_sampling": len(loaded.examples),
        "databases": len(loaded.targets),
        "splits": {s: int((frame["split"] == s).sum()) for s in SPLITS},
        "per_database": per_database,
        "databases_without_examples": sorted(set(loaded.targets) - set(per_database)),
        "gold_executes": executing,
        "gold_fails": failures,
        "gold_unparseable": [e.origin for e in examples if not e.canonical],
        **loaded.notes,
    }


if __name__ == "__main__":
    run_stage(main)
