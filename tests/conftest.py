"""Fixtures shared by every test layer.

`tiny_params` is the whole pipeline configured to run in seconds; `workspace` is an empty temporary
directory made the current directory, so stages write their artifacts there and never into the repo."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from pipelines.common.params import Params

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = Path(os.environ.get("NL2SQL_SHARED_DATASETS", REPO.parent / "shared" / "datasets"))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    if not (SHARED_DATASETS / "spiderman" / "train_queries.csv").is_file():
        pytest.skip(f"shared benchmark data not found at {SHARED_DATASETS} (set NL2SQL_SHARED_DATASETS)")
    return SHARED_DATASETS


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def make_tiny_params(**overrides) -> Params:
    """The full pipeline at toy scale: a small demo set and a T5 of a few hundred thousand weights."""
    tiny_t5 = dict(d_model=32, d_ff=64, d_kv=8, num_heads=2, num_layers=1, num_decoder_layers=1)
    raw = {
        "ingest": {"source": "demo", "demo": {"n_pairs": 240, "n_customers": 40}},
        # The accuracy levers params.yaml switches on, so every stage and the service are tested with them.
        "tokenize": {"vocab_size": 400, "max_source_length": 256, "max_target_length": 96,
                     "serialization": {"schema_linking": True, "retrieval_k": 1, "split_punctuation": True}},
        "train": {"t5": tiny_t5, "epochs": 1, "max_train_minutes": 0.5, "eval_steps": 10, "batch_size": 8},
        "distill": {"student": tiny_t5, "epochs": 1, "max_train_minutes": 0.3, "batch_size": 8},
        "export": {"parity_examples": 4},
        "evaluate": {"num_beams": 2, "max_new_tokens": 48, "max_examples": 8},
    }
    for key, value in overrides.items():
        raw.setdefault(key, {}).update(value)
    return Params.model_validate(raw)


@pytest.fixture
def tiny_params() -> Params:
    return make_tiny_params()


@pytest.fixture
def mlflow_postgres_server(workspace, monkeypatch):
    """An `mlflow server` on a free loopback port backed by a fresh database in the local PostgreSQL;
    MLFLOW_TRACKING_URI points at it. Yields (url, database name); the server and database go after."""
    import uuid

    import psycopg2

    from pipelines.common.services import ServiceStartError, free_port, http_service

    try:
        admin = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", connect_timeout=5)
    except psycopg2.OperationalError as exc:
        pytest.skip(f"local PostgreSQL not reachable: {exc}")
    admin.autocommit = True
    database = f"mlflow_test_{uuid.uuid4().hex[:12]}"
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{database}"')
    url = f"http://127.0.0.1:{free_port()}"
    argv = [sys.executable, "-m", "mlflow", "server", "--workers", "1",
            "--backend-store-uri", f"postgresql://postgres@127.0.0.1:5432/{database}",
            "--artifacts-destination", str(workspace / "mlartifacts"),
            "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1]]
    try:
        # Schema migrations on a busy 2-core machine take a while.
        with http_service(argv, f"{url}/health", workspace / "mlflow-server.log", startup_timeout_s=180):
            monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
            yield url, database
    except ServiceStartError as exc:
        pytest.fail(f"mlflow server did not start: {exc}")
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        admin.close()


# --- tokenize / train (issue 3) --------------------------------------------------------------------

TINY_SCHEMAS = {
    "shop": {
        "db_id": "shop", "dialect": "sqlite",
        "tables": [
            {"name": "customers", "columns": [
                {"name": "customer_id", "type": "INTEGER", "primary_key": True, "nullable": False,
                 "samples": ["1", "2", "3"]},
                {"name": "name", "type": "TEXT", "samples": ["Alice", "Bob", "O'Hara"]},
                {"name": "city", "type": "VARCHAR(40)", "samples": ["Paris", "Lyon"]}]},
            {"name": "orders", "columns": [
                {"name": "order_id", "type": "INTEGER", "primary_key": True, "nullable": False},
                {"name": "customer_id", "type": "INTEGER"},
                {"name": "amount", "type": "REAL", "samples": ["9.5", "120.0"]},
                {"name": "ordered_on", "type": "DATE", "samples": ["2024-01-02"]}]}],
        "foreign_keys": [{"table": "orders", "column": "customer_id", "ref_table": "customers",
                          "ref_column": "customer_id"}],
    },
    "school": {
        "db_id": "school", "dialect": "sqlite",
        "tables": [
            {"name": "students", "columns": [
                {"name": "student_id", "type": "INTEGER", "primary_key": True},
                {"name": "full_name", "type": "TEXT", "samples": ["Ann Lee"]},
                {"name": "grade", "type": "INTEGER", "samples": ["9", "10"]}]},
            {"name": "courses", "columns": [
                {"name": "course_id", "type": "INTEGER", "primary_key": True},
                {"name": "title", "type": "TEXT", "samples": ["Algebra"]}]}],
        "foreign_keys": [],
    },
}

# Question/SQL templates that between them use every SQL character the tokenizer must represent.
_TINY_PAIRS = [
    ("shop", "How many customers live in {city}?", "SELECT COUNT(*) FROM customers WHERE city = '{city}'"),
    ("shop", "List orders above {n}.", "SELECT order_id FROM orders WHERE amount > {n}"),
    ("shop", "Orders of at most {n} dollars", "SELECT * FROM orders WHERE amount <= {n}"),
    ("shop", "Orders of at least {n}", "SELECT order_id, amount FROM orders WHERE amount >= {n}"),
    ("shop", "Customers not in {city}", "SELECT name FROM customers WHERE city != '{city}'"),
    ("shop", "Customers whose name contains {letter}",
     "SELECT name FROM customers WHERE name LIKE '%{letter}%'"),
    ("shop", "Total amount per customer below {n}",
     "SELECT T1.name, SUM(T2.amount) FROM customers AS T1 JOIN orders AS T2 ON T1.customer_id = "
     "T2.customer_id GROUP BY T1.name HAVING SUM(T2.amount) < {n}"),
    ("school", "Students in grade {n}", "SELECT full_name FROM students WHERE grade = {n}"),
    ("school", "Course titles quoted \"{letter}\"", "SELECT title FROM courses WHERE title = '\"{letter}\"'"),
    ("school", "Average grade minus {n}", "SELECT AVG(grade) - {n} FROM students"),
]


def write_tiny_tokenize_inputs(root: Path, n_train: int = 48, n_dev: int = 8, n_test: int = 8) -> None:
    """data/ingested/schemas/*.json, databases/*.sqlite (tables holding their sample values) + databases.json,
    and data/validated/examples.parquet, in the documented shape."""
    import json
    import sqlite3

    import pandas as pd

    schemas = root / "data" / "ingested" / "schemas"
    schemas.mkdir(parents=True, exist_ok=True)
    (root / "data" / "ingested" / "databases").mkdir(exist_ok=True)
    for db_id, snapshot in TINY_SCHEMAS.items():
        (schemas / f"{db_id}.json").write_text(json.dumps(snapshot))
        database = root / "data" / "ingested" / "databases" / f"{db_id}.sqlite"
        database.unlink(missing_ok=True)  # called again on the same workspace by some tests
        with sqlite3.connect(database) as connection:
            for table in snapshot["tables"]:
                names = [c["name"] for c in table["columns"]]
                connection.execute(f"CREATE TABLE {table['name']} ({', '.join(names)})")
                for column in table["columns"]:
                    for value in column.get("samples", []):
                        connection.execute(f"INSERT INTO {table['name']} ({column['name']}) VALUES (?)", (value,))
        connection.close()
    (root / "data" / "ingested" / "databases.json").write_text(
        json.dumps({db_id: f"databases/{db_id}.sqlite" for db_id in TINY_SCHEMAS}))
    cities, letters = ["Paris", "Lyon", "Nice", "Oslo"], "abcdefghij"
    rows = []
    for i in range(n_train + n_dev + n_test):
        db_id, question, sql = _TINY_PAIRS[i % len(_TINY_PAIRS)]
        values = {"city": cities[i % 4], "n": 7 * i + 3, "letter": letters[i % 10]}
        split = "train" if i < n_train else "dev" if i < n_train + n_dev else "test"
        rows.append({"example_id": f"tiny-{i:04d}", "db_id": db_id, "question": question.format(**values),
                     "sql": sql.format(**values), "split": split, "source": "tiny"})
    validated = root / "data" / "validated"
    validated.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(validated / "examples.parquet", index=False)


@pytest.fixture(scope="session")
def trained_workspace(tmp_path_factory) -> Path:
    """A workspace where ingest -> validate -> tokenize -> train ran once with make_tiny_params()
    (data/, models/tokenizer, models/teacher, metrics/, plots/, mlflow.db). Treat it as read-only."""
    from pipelines import ingest, tokenize, train, validate

    root = tmp_path_factory.mktemp("trained")
    params = make_tiny_params()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        for stage in (ingest, validate, tokenize, train):
            stage.main(params)
    return root


# --- evaluate / generate / predict (issue 3) -------------------------------------------------------

# (question, gold SQL) over the tiny `shop` database below; the tiny model is fitted on exactly these.
EVAL_PAIRS = [
    ("how many customers are there?", "SELECT count(*) FROM customers"),
    ("list the names of all customers", "SELECT name FROM customers"),
    ("which customers live in paris?", "SELECT name FROM customers WHERE city = 'Paris'"),
    ("what is the total amount of all orders?", "SELECT sum(amount) FROM orders"),
    ("list the cities of customers", "SELECT DISTINCT city FROM customers"),
    ("show the largest order amount", "SELECT max(amount) FROM orders"),
]


def build_eval_workspace(root: Path, train_steps: int = 300) -> Path:
    """data/ingested + data/validated for one SQLite database, and models/student: a T5 of ~100k weights
    fitted on EVAL_PAIRS (so it answers most of them right), saved like the train stage saves models."""
    import json
    import sqlite3

    import pandas as pd
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from pipelines.common.params import SerializationParams
    from pipelines.common.schema import introspect
    from pipelines.common.serialize import SerializationConfig, save_config, serialize, serialize_target
    from pipelines.tokenize import train_unigram_tokenizer

    databases = root / "data" / "ingested" / "databases"
    databases.mkdir(parents=True)
    with sqlite3.connect(databases / "shop.sqlite") as connection:
        connection.executescript("""
            CREATE TABLE customers (customer_id INTEGER PRIMARY KEY, name TEXT NOT NULL, city TEXT);
            INSERT INTO customers VALUES (1, 'Alice', 'Paris'), (2, 'Bob', 'Lyon'), (3, 'Chloe', 'Paris');
            CREATE TABLE orders (order_id INTEGER PRIMARY KEY,
                                 customer_id INTEGER REFERENCES customers(customer_id), amount REAL);
            INSERT INTO orders VALUES (1, 1, 10.5), (2, 1, 3.0), (3, 3, 7.25);
        """)
    connection.close()
    schema = introspect(databases / "shop.sqlite", "shop", sample_values=2)
    schema.save(root / "data" / "ingested" / "schemas" / "shop.json")
    (root / "data" / "ingested" / "databases.json").write_text(json.dumps({"shop": "databases/shop.sqlite"}))
    rows = [{"example_id": f"eval-{i}", "db_id": "shop", "question": q, "sql": s, "split": "test",
             "source": "tiny"} for i, (q, s) in enumerate(EVAL_PAIRS)]
    # A gold query that does not execute: evaluation must exclude it and count it apart.
    rows.append({"example_id": "eval-broken", "db_id": "shop", "question": "how many suppliers are there?",
                 "sql": "SELECT count(*) FROM suppliers", "split": "test", "source": "tiny"})
    frame = pd.DataFrame(rows)
    for folder in ("ingested", "validated"):
        (root / "data" / folder).mkdir(parents=True, exist_ok=True)
        frame.to_parquet(root / "data" / folder / "examples.parquet", index=False)

    cfg = SerializationParams()
    config = SerializationConfig(serialization=cfg, max_source_length=128, max_target_length=32,
                                 model_base="scratch")
    sources = [serialize(q, schema, cfg) for q, _ in EVAL_PAIRS]
    targets = [serialize_target(s, cfg) for _, s in EVAL_PAIRS]
    tokenizer = train_unigram_tokenizer(sources + targets, vocab_size=150, max_length=128)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(
        vocab_size=len(tokenizer), d_model=32, d_ff=64, d_kv=8, num_heads=2, num_layers=1,
        num_decoder_layers=1, dropout_rate=0.0, decoder_start_token_id=tokenizer.pad_token_id,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    batch = tokenizer(sources, return_tensors="pt", padding=True, return_token_type_ids=False)
    labels = tokenizer(targets, return_tensors="pt", padding=True).input_ids
    labels[labels == tokenizer.pad_token_id] = -100
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(train_steps):
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    student = root / "models" / "student"
    model.save_pretrained(student)
    tokenizer.save_pretrained(student)
    save_config(student, config)
    return root


@pytest.fixture(scope="session")
def eval_workspace(tmp_path_factory) -> Path:
    """A tiny evaluation workspace (see build_eval_workspace); treat it as read-only."""
    import torch

    torch.set_num_threads(1)
    return build_eval_workspace(tmp_path_factory.mktemp("eval"))


@pytest.fixture(scope="session")
def eval_onnx(eval_workspace, tmp_path_factory) -> Path:
    """The eval workspace's student exported to ONNX fp32 by the export stage's own code (a directory
    `load_onnx` loads)."""
    from pipelines import export

    work = tmp_path_factory.mktemp("eval-onnx")
    export.export_fp32(eval_workspace / "models" / "student", work / "raw", work / "fp32")
    return work / "fp32"


# --- distill / export (issue 4) --------------------------------------------------------------------


def relocate_mlflow_store(database: Path, old_root: Path, new_root: Path) -> None:
    """A copied sqlite tracking store still points its experiments and runs at the original workspace's
    artifact folders (absolute paths); point them at the copy so new runs never write into the original."""
    import sqlite3

    with sqlite3.connect(database) as connection:
        for table, column in (("experiments", "artifact_location"), ("runs", "artifact_uri")):
            connection.execute(f"UPDATE {table} SET {column} = replace({column}, ?, ?)",
                               (str(old_root), str(new_root)))


@pytest.fixture(scope="session")
def exported_workspace(trained_workspace, tmp_path_factory) -> Path:
    """A copy of `trained_workspace` where distill and export also ran with make_tiny_params():
    adds models/student, models/onnx/{fp32,int8}, metrics/distill.json, metrics/export.json. Read-only."""
    import shutil

    from pipelines import distill, export

    root = tmp_path_factory.mktemp("exported") / "workspace"
    shutil.copytree(trained_workspace, root)
    relocate_mlflow_store(root / "mlflow.db", trained_workspace, root)
    params = make_tiny_params()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        distill.main(params)
        export.main(params)
    return root
