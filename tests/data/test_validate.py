"""The validate stage on tiny hand-built ingests: two SQLite databases and a dozen examples, written
in the ingest artifact layout (docs/architecture.md) inside the temporary workspace."""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path

import pandas as pd
import pytest

from pipelines import validate
from pipelines.common.errors import PipelineError
from pipelines.common.paths import (
    DATABASES_INDEX,
    INGEST_MANIFEST,
    INGESTED,
    INGESTED_EXAMPLES,
    QUARANTINE,
    VALIDATED,
    VALIDATED_EXAMPLES,
    VALIDATION_REPORT,
)
from tests.conftest import make_tiny_params

CLEAN_ROWS = [
    # example_id, db_id, question, sql, split
    ("shop-0", "shop", "How many customers are there?", "SELECT COUNT(*) FROM customers", "train"),
    ("shop-1", "shop", "List the names of all customers.", "SELECT name FROM customers", "train"),
    ("shop-2", "shop", "Which customers live in Oslo?",
     "SELECT name FROM customers WHERE city = 'Oslo'", "train"),
    ("shop-3", "shop", "What is the total of all orders?", "SELECT SUM(total) FROM orders", "train"),
    ("shop-4", "shop", "How many orders did each customer place?",
     "SELECT c.name, COUNT(*) FROM customers AS c JOIN orders AS o ON o.customer_id = c.id GROUP BY c.name",
     "train"),
    ("shop-5", "shop", "Which cities have customers?", "SELECT DISTINCT city FROM customers", "train"),
    ("zoo-0", "zoo", "How many animals are in the zoo?", "SELECT COUNT(*) FROM animals", "test"),
    ("zoo-1", "zoo", "Name every animal older than 5 years.",
     "SELECT name FROM animals WHERE age > 5", "test"),
    ("zoo-2", "zoo", "What species are kept?", "SELECT DISTINCT species FROM animals", "test"),
    ("zoo-3", "zoo", "What is the average age of the animals?", "SELECT AVG(age) FROM animals", "test"),
]


def _build_databases(root: Path) -> dict[str, str]:
    (root / "databases").mkdir(parents=True, exist_ok=True)
    scripts = {
        "shop": """
            CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT NOT NULL, city TEXT NOT NULL);
            CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER REFERENCES customers (id),
                                 total REAL);
            INSERT INTO customers VALUES (1, 'Ada', 'Oslo'), (2, 'Bo', 'Lima'), (3, 'Cy', 'Oslo');
            INSERT INTO orders VALUES (1, 1, 9.5), (2, 1, 3.0), (3, 2, 7.25);""",
        "zoo": """
            CREATE TABLE animals (id INTEGER PRIMARY KEY, name TEXT, species TEXT, age INTEGER);
            INSERT INTO animals VALUES (1, 'Rex', 'lion', 7), (2, 'Mo', 'otter', 2),
                                       (3, 'Zed', 'zebra', 9);""",
    }
    for db_id, script in scripts.items():
        with sqlite3.connect(root / "databases" / f"{db_id}.sqlite") as connection:
            connection.executescript(script)
    return {db_id: f"databases/{db_id}.sqlite" for db_id in scripts}


def write_ingest(rows: list[tuple], split_mode: str = "by_question") -> None:
    """The ingest artifacts validate reads, for `rows` of (example_id, db_id, question, sql, split)."""
    index = _build_databases(INGESTED)
    frame = pd.DataFrame(rows, columns=["example_id", "db_id", "question", "sql", "split"])
    frame["source"] = "test"
    frame.to_parquet(INGESTED_EXAMPLES, index=False)
    DATABASES_INDEX.write_text(json.dumps(index))
    INGEST_MANIFEST.write_text(json.dumps({"source": "test", "split_mode": split_mode,
                                           "counts": frame["split"].value_counts().to_dict()}))


def corrupted_rows() -> list[tuple]:
    """The clean rows plus three bad ones: SQL that does not parse, a repeated question (differing
    only in case and spacing), a one-character question."""
    return CLEAN_ROWS + [
        ("bad-parse", "shop", "Show customers sorted by name.",
         "SELECT name FROM customers ORDER BY", "train"),
        ("bad-dup", "shop", "how many   customers are there?", "SELECT COUNT(id) FROM customers", "train"),
        ("bad-short", "zoo", "?", "SELECT name FROM animals", "test"),
    ]


def params(on_failure: str = "fail"):
    return make_tiny_params(validate={"on_failure": on_failure})


def test_clean_dataset_passes_with_data_docs(workspace):
    write_ingest(CLEAN_ROWS, split_mode="by_database")

    metrics = validate.main(params())

    assert metrics["total"] == metrics["passed"] == len(CLEAN_ROWS)
    assert metrics["failed"] == metrics["quarantined"] == 0
    assert set(metrics["failures"].values()) == {0}
    assert "no_split_leakage" in metrics["failures"] and "sql_executes" in metrics["failures"]
    validated = pd.read_parquet(VALIDATED_EXAMPLES)
    assert list(validated.columns) == ["example_id", "db_id", "question", "sql", "split", "source"]
    assert validated["example_id"].tolist() == [r[0] for r in CLEAN_ROWS]
    quarantine = pd.read_parquet(QUARANTINE)
    assert quarantine.empty and "failed_expectations" in quarantine.columns
    index_html = VALIDATION_REPORT / "index.html"
    assert index_html.is_file() and "nl2sql_examples" in index_html.read_text()
    assert list((VALIDATION_REPORT / "validations").rglob("*.html")), "no validation result page rendered"
    assert "**passed**" in (VALIDATION_REPORT / "summary.md").read_text()
    assert json.loads(Path("metrics/validation.json").read_text()) == metrics


def test_fail_mode_names_exactly_the_bad_rows_and_writes_no_validated_data(workspace):
    write_ingest(corrupted_rows())
    # An earlier successful run's output must not survive a failed one.
    VALIDATED.mkdir(parents=True)
    (VALIDATED / "examples.parquet").write_text("stale")

    with pytest.raises(PipelineError) as caught:
        validate.main(params("fail"))

    message = str(caught.value)
    assert f"3 of {len(CLEAN_ROWS) + 3} rows fail" in message
    failing_checks = {line.split()[0] for line in message.splitlines() if line.startswith("  ") and not
                      line.startswith("    ")}
    assert failing_checks == {"sql_parses", "unique_db_question", "question_length"}
    row_lines = [line for line in message.splitlines() if line.startswith("    row ")]
    named_rows = sorted(line.split("example_id=")[1].split()[0] for line in row_lines)
    assert named_rows == ["bad-dup", "bad-parse", "bad-short"]
    assert "same question as example_id=shop-0" in message
    assert not VALIDATED.exists()
    metrics = json.loads(Path("metrics/validation.json").read_text())
    assert {k: v for k, v in metrics["failures"].items() if v} == {
        "sql_parses": 1, "unique_db_question": 1, "question_length": 1}
    assert metrics["failed"] == 3 and metrics["quarantined"] == 0 and metrics["success"] is False
    assert "## sql_parses: failing rows: 1" in (VALIDATION_REPORT / "summary.md").read_text()
    assert (VALIDATION_REPORT / "index.html").is_file()


def test_quarantine_mode_sets_exactly_the_bad_rows_aside(workspace):
    write_ingest(corrupted_rows())

    metrics = validate.main(params("quarantine"))

    counts = (metrics["total"], metrics["passed"], metrics["quarantined"])
    assert counts == (len(CLEAN_ROWS) + 3, len(CLEAN_ROWS), 3)
    quarantine = pd.read_parquet(QUARANTINE).set_index("example_id")
    assert quarantine["failed_expectations"].to_dict() == {
        "bad-parse": "sql_parses", "bad-dup": "unique_db_question", "bad-short": "question_length"}
    assert "sql_parses: " in quarantine.at["bad-parse", "failure_detail"]
    validated = pd.read_parquet(VALIDATED_EXAMPLES)
    assert validated["example_id"].tolist() == [r[0] for r in CLEAN_ROWS]


def test_by_database_split_leakage_is_caught(workspace):
    leaking = CLEAN_ROWS + [("zoo-leak", "zoo", "Which animal is the oldest?",
                             "SELECT name FROM animals ORDER BY age DESC LIMIT 1", "train")]
    write_ingest(leaking, split_mode="by_database")

    with pytest.raises(PipelineError, match=r"no_split_leakage .*: 1 row") as caught:
        validate.main(params("fail"))
    # zoo has 4 rows on test and 1 on train: the train row is the leak.
    assert "example_id=zoo-leak" in str(caught.value)
    assert "database zoo is on test (4 rows), train (1 rows); kept on test" in str(caught.value)


def test_split_leakage_is_not_checked_in_by_question_mode(workspace):
    write_ingest(CLEAN_ROWS + [("zoo-5", "zoo", "Which animal is the oldest?",
                                "SELECT name FROM animals ORDER BY age DESC LIMIT 1", "train")])

    metrics = validate.main(params("fail"))

    assert metrics["passed"] == len(CLEAN_ROWS) + 1 and "no_split_leakage" not in metrics["failures"]


def test_unknown_database_unsafe_and_non_executing_sql_and_nulls_each_fail_one_check(workspace):
    write_ingest(CLEAN_ROWS + [
        ("bad-table", "shop", "How many suppliers are there?", "SELECT COUNT(*) FROM suppliers", "train"),
        ("bad-write", "shop", "Remove all orders.", "DELETE FROM orders", "train"),
        ("bad-db", "library", "How many books are there?", "SELECT COUNT(*) FROM books", "train"),
        ("bad-null", "zoo", "Which animals are lions?", None, "test"),
        ("bad-noq", "zoo", None, "SELECT name FROM animals", "test"),
        ("bad-nodb", None, "Which animals are zebras?", "SELECT name FROM animals", "test"),
        ("bad-split", "zoo", "Which animals are otters?",
         "SELECT name FROM animals WHERE species = 'otter'", "val"),
    ])

    metrics = validate.main(params("quarantine"))

    quarantine = pd.read_parquet(QUARANTINE).set_index("example_id")
    assert quarantine["failed_expectations"].to_dict() == {
        "bad-table": "sql_executes", "bad-write": "sql_executes", "bad-db": "db_id_known",
        "bad-null": "sql_not_null", "bad-noq": "question_not_null", "bad-nodb": "db_id_not_null",
        "bad-split": "split_known"}
    assert "no such table: suppliers" in quarantine.at["bad-table", "failure_detail"]
    assert "only SELECT" in quarantine.at["bad-write", "failure_detail"]
    assert metrics["passed"] == len(CLEAN_ROWS)
    # The read-only connection really kept the DELETE from running.
    with sqlite3.connect(INGESTED / "databases" / "shop.sqlite") as connection:
        assert connection.execute("SELECT COUNT(*) FROM orders").fetchone() == (3,)


def test_slow_gold_query_fails_sql_executes_within_the_timeout(workspace, caplog):
    slow = ("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100000000) "
            "SELECT COUNT(*) FROM n")
    caplog.set_level(logging.INFO, logger=validate.__name__)
    write_ingest(CLEAN_ROWS + [("bad-slow", "zoo", "Count to a hundred million.", slow, "test")])

    with pytest.raises(PipelineError, match=r"sql_executes .*: 1 row") as caught:
        validate.main(make_tiny_params(validate={"on_failure": "fail", "sql_timeout_s": 0.2}))
    assert "example_id=bad-slow" in str(caught.value) and "time limit" in str(caught.value)
    assert "1 gold queries ran out of time; retrying them one at a time" in caplog.text


def test_missing_column_is_reported_before_any_work(workspace):
    write_ingest(CLEAN_ROWS)
    pd.read_parquet(INGESTED_EXAMPLES).drop(columns=["sql"]).to_parquet(INGESTED_EXAMPLES, index=False)

    with pytest.raises(PipelineError, match=r"examples.parquet: missing required column\(s\) sql \(found: "):
        validate.main(params())
    assert not VALIDATION_REPORT.exists()


def test_missing_database_file_is_reported_before_any_work(workspace):
    write_ingest(CLEAN_ROWS)
    (INGESTED / "databases" / "zoo.sqlite").unlink()

    with pytest.raises(PipelineError, match=r"zoo.sqlite: SQLite database file not found"):
        validate.main(params())
    assert not VALIDATION_REPORT.exists()


@pytest.mark.slow
def test_spiderman_ingest_sample_validates(workspace, shared_datasets):
    """The real ingest of a SpiderMan sample, validated as the pipeline would (minutes: ingest loads
    every database). Known SpiderMan problems may be quarantined; nothing else should be."""
    from pipelines import ingest

    tiny = make_tiny_params(
        ingest={"source": "spiderman", "path": str(shared_datasets / "spiderman"),
                "split_mode": "by_database", "max_examples": 400},
        validate={"on_failure": "quarantine"})
    ingest.main(tiny)

    metrics = validate.main(tiny)

    assert metrics["total"] == 400 and metrics["passed"] + metrics["quarantined"] == 400
    assert metrics["failures"]["no_split_leakage"] == 0 and metrics["failures"]["sql_parses"] == 0
    assert metrics["quarantined"] <= 8, metrics["failures"]
    assert len(pd.read_parquet(VALIDATED_EXAMPLES)) == metrics["passed"]
    assert (VALIDATION_REPORT / "index.html").is_file()


def test_an_expectation_gx_cannot_evaluate_is_an_error_not_a_pass(workspace):
    expectations = validate._build_expectations(3, 500, ["shop"], "by_question")
    # question_chars holding text instead of a count: the between-expectation raises inside GX.
    frame = pd.DataFrame({"example_id": ["a"], "db_id": ["shop"], "question": ["How many?"],
                          "sql": ["SELECT 1"], "split": ["train"], "source": ["test"],
                          "question_chars": ["nine"], "unique_db_question": [True], "sql_parses": [True],
                          "sql_executes": [True]})

    with pytest.raises(PipelineError, match=r"check question_length could not be evaluated on column "
                                            r"question_chars: .*must either be None or of the same type"):
        validate._run_suite(frame, expectations, workspace / "site", run_name="test")
