"""The evaluate stage (DVC and CLI modes) and the predict CLI on a tiny fitted model and SQLite database."""

from __future__ import annotations

import csv
import json
import shutil

import mlflow
import pytest
from conftest import EVAL_PAIRS, make_tiny_params

from pipelines import evaluate, predict
from pipelines.common.errors import PipelineError

EVAL_OPTIONS = {"model": "student", "split": "test", "num_beams": 3, "max_new_tokens": 32,
                "max_examples": None}


@pytest.fixture
def eval_copy(eval_workspace, workspace):
    """A writable copy of the tiny evaluation workspace as the current directory."""
    for folder in ("data", "models"):
        shutil.copytree(eval_workspace / folder, workspace / folder)
    return workspace


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_dvc_mode_writes_metrics_predictions_plot_and_logs_to_the_training_run(eval_copy):
    params = make_tiny_params(evaluate=EVAL_OPTIONS)
    mlflow.set_tracking_uri(f"sqlite:///{eval_copy / 'mlflow.db'}")
    mlflow.set_experiment(params.tracking.experiment)
    with mlflow.start_run(run_name="train") as train_run:
        pass
    (eval_copy / "metrics").mkdir()
    (eval_copy / "metrics" / "train.json").write_text(json.dumps({"mlflow_run_id": train_run.info.run_id}))

    summary = evaluate.main(params)

    metrics = json.loads((eval_copy / "metrics" / "eval.json").read_text())
    assert metrics == json.loads(json.dumps(summary))
    # The broken gold query is excluded from every rate and counted apart.
    n = len(EVAL_PAIRS)
    assert (metrics["n"], metrics["n_total"], metrics["n_gold_failed"]) == (n, n + 1, 1)
    assert metrics["ex_greedy"] >= 0.8 and metrics["valid_sql_greedy"] >= 0.8
    # Execution-guided only replaces a top beam that fails to run, so it can never score below beam.
    assert metrics["ex_execution_guided"] >= metrics["ex_beam"]
    assert metrics["valid_sql"] == metrics["valid_sql_execution_guided"] >= metrics["valid_sql_beam"]
    assert 0 <= metrics["exact_match"] <= 1
    assert 0 < metrics["latency_ms_p50"] <= metrics["latency_ms_p95"]
    assert sum(metrics[f"n_{level}"] for level in ("easy", "medium", "hard", "extra")) == metrics["n"]

    records = read_jsonl(eval_copy / "reports" / "predictions.jsonl")
    assert len(records) == len(EVAL_PAIRS) + 1
    broken = next(r for r in records if r["example_id"] == "eval-broken")
    assert broken["gold_error"] and broken["greedy"]["verdict"] == "gold_error"
    first = next(r for r in records if r["example_id"] == "eval-0")
    assert first["question"] == EVAL_PAIRS[0][0] and first["gold"] == EVAL_PAIRS[0][1]
    assert first["hardness"] == "easy" and len(first["beams"]) == 3
    assert first["greedy"]["sql"] == "select count(*) from customers"
    assert first["greedy"]["verdict"] == "correct" and first["greedy"]["exact_match"] is True

    with open(eval_copy / "plots" / "ex_by_hardness.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["hardness"] for r in rows] == [lvl for lvl in ("easy", "medium", "hard", "extra")
                                             if metrics[f"n_{lvl}"]]
    assert all(float(r["ex"]) == metrics[f"ex_{r['hardness']}"] for r in rows)

    run = mlflow.MlflowClient().get_run(train_run.info.run_id)
    assert run.data.metrics["ex_execution_guided"] == metrics["ex_execution_guided"]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(train_run.info.run_id, "evaluation")}
    expected = {"evaluation/ex_by_hardness.png", "evaluation/predictions.jsonl", "evaluation/eval.json"}
    assert expected <= artifacts


def test_dvc_mode_errors_before_any_work(eval_copy):
    with pytest.raises(PipelineError, match="models/teacher: model directory not found"):
        evaluate.main(make_tiny_params(evaluate={**EVAL_OPTIONS, "model": "teacher"}))
    with pytest.raises(PipelineError, match="no examples in split 'dev'"):
        evaluate.main(make_tiny_params(evaluate={**EVAL_OPTIONS, "split": "dev"}))
    assert not (eval_copy / "metrics" / "eval.json").exists()


def test_cli_mode_on_an_ingested_folder(eval_workspace, tmp_path):
    out = tmp_path / "report"
    summary = evaluate.evaluate_cli([
        "--model", str(eval_workspace / "models" / "student"),
        "--dataset", f"ingested:{eval_workspace / 'data' / 'ingested'}",
        "--out", str(out), "--split", "all", "--max-examples", "3", "--params", str(tmp_path / "absent.yaml"),
    ])
    assert summary["n_total"] == 3 and summary["split"] == "all"
    assert json.loads((out / "eval.json").read_text())["n"] == 3
    assert len(read_jsonl(out / "predictions.jsonl")) == 3
    assert (out / "ex_by_hardness.csv").read_text().startswith("hardness,ex,n\n")


@pytest.mark.parametrize("dataset, message", [
    ("spiderman", "expected SOURCE:PATH"),
    ("kaggle:/tmp", "unknown source 'kaggle'"),
    ("spiderman:/no/such/folder", "dataset folder /no/such/folder not found"),
])
def test_cli_mode_dataset_errors(eval_workspace, tmp_path, dataset, message):
    model = str(eval_workspace / "models" / "student")
    argv = ["--model", model, "--dataset", dataset, "--out", str(tmp_path)]
    with pytest.raises(PipelineError, match=message):
        evaluate.evaluate_cli(argv)


def test_cli_mode_model_errors_exit_2(eval_workspace, tmp_path, caplog):
    incomplete = tmp_path / "model"
    incomplete.mkdir()
    argv = ["--model", str(incomplete), "--dataset", f"ingested:{eval_workspace / 'data' / 'ingested'}",
            "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exited:
        evaluate.cli_main(argv)
    assert exited.value.code == 2
    assert "incomplete model directory" in caplog.text
    assert not (tmp_path / "out").exists()


@pytest.mark.shared_data
def test_cli_mode_ingests_a_spiderman_subset(shared_datasets, eval_workspace, tmp_path):
    """Two SpiderMan databases copied to tmp, ingested by the ingest stage's code, then scored."""
    source = shared_datasets / "spiderman"
    subset = tmp_path / "spiderman"
    keep = ("aircraft", "body_builder")
    for db_id in keep:
        shutil.copytree(source / "databases" / db_id, subset / "databases" / db_id)
    with open(source / "train_queries.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        rows = [r for r in reader if r["database"] in keep]
        fields = reader.fieldnames
    with open(subset / "train_queries.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "report"
    summary = evaluate.evaluate_cli([
        "--model", str(eval_workspace / "models" / "student"), "--dataset", f"spiderman:{subset}",
        "--out", str(out), "--split", "all", "--max-examples", "4", "--params", str(tmp_path / "absent.yaml"),
    ])
    assert summary["n_total"] == 4 and summary["n"] >= 3
    records = read_jsonl(out / "predictions.jsonl")
    assert {r["db_id"] for r in records} <= set(keep)
    # A model fitted on another database is not expected to be right, only to be scored.
    assert all(r["execution_guided"]["verdict"] in ("correct", "wrong", "pred_error") for r in records
               if not r["gold_error"])


def test_predict_cli_prints_sql_and_rows(eval_workspace, capsys):
    model = str(eval_workspace / "models" / "student")
    database = str(eval_workspace / "data" / "ingested" / "databases" / "shop.sqlite")
    assert predict.main(["--model", model, "--database", database, "--num-beams", "3",
                         "--execute", "how many customers are there?"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "select count(*) from customers"
    assert lines[1:] == ["count(*)", "3", "(1 row)"]

    assert predict.main(["--model", model, "--database", database, "--max-rows", "2",
                         "--execute", "list the names of all customers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "select name from customers"
    assert lines[-1] == "(2 rows, truncated at the limit of 2)"


def test_predict_cli_errors(eval_workspace, tmp_path):
    model = str(eval_workspace / "models" / "student")
    with pytest.raises(PipelineError, match="SQLite database file not found"):
        predict.main(["--model", model, "--database", str(tmp_path / "missing.sqlite"), "question"])
    with pytest.raises(PipelineError, match="model directory not found"):
        predict.main(["--model", str(tmp_path / "nomodel"), "--database", str(tmp_path), "question"])
    with pytest.raises(PipelineError, match="question is empty"):
        predict.main(["--model", model, "--database", str(tmp_path), "  "])


@pytest.fixture
def pg_shop():
    """A throwaway PostgreSQL database holding the tiny shop tables (dropped afterwards)."""
    import uuid

    sa = pytest.importorskip("sqlalchemy")
    name = f"nl2sql_predict_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine("postgresql+psycopg2://postgres@127.0.0.1:5432/postgres",
                             isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(f"CREATE DATABASE {name}")
    except sa.exc.OperationalError as exc:
        pytest.skip(f"local PostgreSQL not reachable: {exc}")
    url = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        connection.exec_driver_sql("""
            CREATE TABLE customers (customer_id INTEGER PRIMARY KEY, name TEXT NOT NULL, city TEXT);
            INSERT INTO customers VALUES (1, 'Alice', 'Paris'), (2, 'Bob', 'Lyon'), (3, 'Chloe', 'Paris');
            CREATE TABLE orders (order_id INTEGER PRIMARY KEY,
                                 customer_id INTEGER REFERENCES customers(customer_id), amount REAL);
            INSERT INTO orders VALUES (1, 1, 10.5), (2, 1, 3.0), (3, 3, 7.25);
        """)
    engine.dispose()
    yield url
    with admin.connect() as connection:
        connection.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.dispose()


@pytest.mark.postgres
def test_predict_cli_on_postgresql(eval_workspace, pg_shop, capsys):
    model = str(eval_workspace / "models" / "student")
    assert predict.main(["--model", model, "--database", pg_shop, "--execute",
                         "which customers live in paris?"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "select name from customers where city = 'Paris'"
    assert sorted(lines[2:4]) == ["Alice", "Chloe"] and lines[-1] == "(2 rows)"


@pytest.mark.slow
def test_dvc_mode_on_the_trained_pipeline_workspace(trained_workspace, workspace):
    """Evaluate the teacher the real ingest -> validate -> tokenize -> train stages produced."""
    for folder in ("data", "models", "metrics"):
        shutil.copytree(trained_workspace / folder, workspace / folder)
    params = make_tiny_params(evaluate={"model": "teacher", "num_beams": 2, "max_examples": 4})
    summary = evaluate.main(params)
    assert summary["n_total"] == 4 and summary["n"] + summary["n_gold_failed"] == 4
    assert len(read_jsonl(workspace / "reports" / "predictions.jsonl")) == 4
    # This workspace's tracking store does not know the training run: the metrics go to a new run.
    mlflow.set_tracking_uri(f"sqlite:///{workspace / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=[params.tracking.experiment], output_format="list")
    assert [r.data.metrics["ex_execution_guided"] for r in runs] == [summary["ex_execution_guided"]]


def test_summary_reports_what_copying_the_retrieved_sql_would_score():
    def record(verdict: str, retrieved: str | None) -> dict:
        decoded = {"sql": "select 1", "verdict": verdict, "error": None, "exact_match": False}
        extra = {"retrieved": {"sql": "select 1", "verdict": retrieved}} if retrieved else {}
        return {"gold_error": None, "hardness": "easy", "latency_ms": 1.0, "greedy": decoded, "beam": decoded,
                "execution_guided": decoded, **extra}

    with_bank = evaluate.summarize([record("correct", "wrong"), record("wrong", "correct"),
                                    record("wrong", "correct"), record("correct", None)])
    assert (with_bank["ex_execution_guided"], with_bank["ex_retrieved_copy"]) == (0.5, 0.5)
    assert "ex_retrieved_copy" not in evaluate.summarize([record("correct", None)])


def test_summary_reports_how_many_answers_were_a_known_examples_sql():
    def record(origin: str) -> dict:
        decoded = {"sql": "select 1", "verdict": "correct", "error": None, "exact_match": False}
        return {"gold_error": None, "hardness": "easy", "latency_ms": 1.0, "greedy": decoded, "beam": decoded,
                "execution_guided": {**decoded, "origin": origin}}

    summary = evaluate.summarize([record("example"), record("model"), record("model"), record("model")])
    assert summary["answered_from_examples"] == 0.25
