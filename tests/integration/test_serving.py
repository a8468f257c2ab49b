"""The BentoML service over real HTTP: a `bentoml serve` subprocess on a free loopback port, serving
`models:/nl2sql@champion` from an SQLite MLflow registry filled by the promote stage with a tiny real
ONNX model (tests/integration/_tiny_model.py)."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from pipelines import promote
from pipelines.common.services import ServiceStartError, free_port, http_service
from tests.conftest import REPO, make_tiny_params
from tests.integration._tiny_model import CUSTOMERS, build_database, build_onnx_model

# Building the model and starting the server take about a minute on the shared 2-core machine;
# each test is then well under a second.
pytestmark = pytest.mark.slow

READY_TIMEOUT_S = 240  # the server imports torch, transformers, optimum and mlflow on a shared machine
ADMIN_TOKEN = "test-admin-token"
RELOAD_INTERVAL_S = 10


def _params():
    return make_tiny_params(serving={"reload_interval_s": RELOAD_INTERVAL_S, "num_beams": 2,
                                     "max_question_chars": 200, "max_rows": 3, "example_candidates": 1})


def _promote(root: Path, value: float) -> dict:
    (root / "metrics").mkdir(exist_ok=True)
    (root / "metrics" / "eval.json").write_text(json.dumps({"ex_execution_guided": value}))
    previous_uri = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    try:
        with contextlib.chdir(root):
            return promote.main(_params())
    finally:
        if previous_uri is None:
            del os.environ["MLFLOW_TRACKING_URI"]
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_uri


@pytest.fixture(scope="module")
def served_workspace(tmp_path_factory):
    """Database + databases.json + schema, a promoted tiny model (v1 = champion), params.yaml."""
    root = tmp_path_factory.mktemp("serving")
    ingested = root / "data" / "ingested"
    schema = build_database(ingested / "databases" / "shop.sqlite")
    schema.save(ingested / "schemas" / "shop.json")
    (ingested / "databases.json").write_text(json.dumps({"shop": "databases/shop.sqlite"}))
    build_onnx_model(schema, root / "build", root / "models" / "onnx" / "fp32")
    (root / "params.yaml").write_text(yaml.safe_dump(_params().model_dump(by_alias=True)))
    assert _promote(root, 0.5)["version"] == 1
    return root


@pytest.fixture(scope="module")
def server(served_workspace):
    root = served_workspace
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "NL2SQL_PARAMS": str(root / "params.yaml"),
        "NL2SQL_DATABASES": str(root / "data" / "ingested" / "databases.json"),
        "NL2SQL_MODEL_CACHE": str(root / "cache"),
        "NL2SQL_MODEL": "models:/nl2sql@champion",
        "NL2SQL_ADMIN_TOKEN": ADMIN_TOKEN,
        "OMP_NUM_THREADS": "1",
    }
    base = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "bentoml", "serve", "serving.service:NL2SQL", "--host", "127.0.0.1",
            "--port", str(port), "--working-dir", str(REPO)]
    try:
        with http_service(argv, f"{base}/readyz", root / "server.log", env=env, cwd=root,
                          startup_timeout_s=READY_TIMEOUT_S), httpx.Client(base_url=base, timeout=60) as client:
            yield client
    except ServiceStartError as exc:
        pytest.fail(f"bentoml serve did not start: {exc}")


def _customers_left(root: Path) -> int:
    with sqlite3.connect(root / "data" / "ingested" / "databases" / "shop.sqlite") as connection:
        return connection.execute("SELECT count(*) FROM customers").fetchone()[0]


def _assert_clean_error(response: httpx.Response, status: int, needle: str) -> None:
    assert response.status_code == status, response.text
    assert needle.lower() in response.text.lower(), response.text
    assert "Traceback" not in response.text


def test_sql_for_known_database(server):
    response = server.post("/sql", json={"question": "list customer names", "db_id": "shop"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["sql"] == "select name from customers"
    assert body["model_version"] == "1"
    assert body["latency_ms"] > 0 and body["execution_guided"] is True
    assert body["origin"] == "model"  # this version has no retrieval examples


def test_sql_for_inline_schema(server, served_workspace):
    schema = json.loads((served_workspace / "data" / "ingested" / "schemas" / "shop.json").read_text())
    schema["db_id"] = "not_known_to_the_service"
    response = server.post("/sql", json={"question": "what are the customer names?", "schema": schema})
    assert response.status_code == 200, response.text
    assert response.json()["sql"] == "select name from customers"
    assert response.json()["execution_guided"] is False


def test_query_runs_readonly_with_row_limit(server):
    response = server.post("/query", json={"question": "names of customers", "db_id": "shop"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["columns"] == ["name"]
    # serving.max_rows is 3 in this workspace, the table has 5 rows.
    assert body["rows"] == [[name] for _, name, _ in CUSTOMERS[:3]]
    assert body["truncated"] is True and body["row_count"] == 3


@pytest.mark.parametrize(
    ("route", "payload", "needle"),
    [
        ("/sql", {"question": "", "db_id": "shop"}, "question"),
        ("/sql", {"question": "   ", "db_id": "shop"}, "question"),
        ("/sql", {"question": "x" * 201, "db_id": "shop"}, "200"),
        ("/sql", {"db_id": "shop"}, "question"),
        ("/sql", {"question": "list customer names"}, "exactly one of db_id or schema"),
        ("/query", {"question": "list customer names"}, "db_id"),
        ("/sql", {"question": "list customer names; DROP TABLE customers", "db_id": "shop"}, "SQL syntax"),
        ("/query", {"question": "names /* and */ of customers", "db_id": "shop"}, "SQL syntax"),
        ("/query", {"question": "Robert'); DELETE FROM customers; --", "db_id": "shop"}, "SQL syntax"),
        ("/sql", {"question": "names", "db_id": "shop", "extra": 1}, "extra"),
    ],
)
def test_bad_requests_are_400(server, served_workspace, route, payload, needle):
    _assert_clean_error(server.post(route, json=payload), 400, needle)
    assert _customers_left(served_workspace) == len(CUSTOMERS)


def test_malformed_json_is_400(server):
    response = server.post("/sql", content=b'{"question": "list customer names", "db_id": ',
                           headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500, response.text
    assert "Traceback" not in response.text


def test_batch_endpoint_validates_its_items(server):
    response = server.post("/generate_batch", json={"items": [{"question": "names", "schema_json": "{}"}]})
    _assert_clean_error(response, 400, "not a schema snapshot")


def test_reload_needs_the_admin_token(server):
    _assert_clean_error(server.post("/reload"), 403, "authorization")
    _assert_clean_error(server.post("/reload", headers={"X-Admin-Token": "wrong"}), 403, "authorization")


def test_unknown_db_id_is_404(server):
    _assert_clean_error(server.post("/query", json={"question": "list customer names", "db_id": "nope"}),
                        404, "unknown db_id 'nope'")


@pytest.mark.parametrize("route", ["/sql", "/query"])
def test_generated_write_is_refused_and_never_run(server, served_workspace, route):
    # The tiny model answers "erase" questions with DELETE FROM customers.
    response = server.post(route, json={"question": "erase every customer", "db_id": "shop"})
    _assert_clean_error(response, 422, "not a single SELECT")
    assert _customers_left(served_workspace) == len(CUSTOMERS)


def test_bentoml_probes_and_openapi(server):
    assert server.get("/healthz").status_code == 200
    assert server.get("/readyz").status_code == 200
    assert "bentoml_service_request" in server.get("/metrics").text
    spec = json.dumps(server.get("/docs.json").json())
    for description in ("The question in natural language", "An inline schema snapshot",
                        "The database to answer from", "Time spent in the service"):
        assert description in spec


def test_new_champion_is_served_without_restart(server, served_workspace):
    assert server.post("/sql", json={"question": "names of customers", "db_id": "shop"}).json()["model_version"] == "1"

    # Worse metric: challenger only, the service keeps serving the champion.
    assert _promote(served_workspace, 0.1)["alias"] == "challenger"
    admin = {"X-Admin-Token": ADMIN_TOKEN}
    reload = server.post("/reload", headers=admin)
    assert reload.status_code == 200, reload.text
    assert reload.json() == {"model_version": "1", "previous_version": "1", "changed": False}

    # Admin endpoint: a new champion is swapped in at once.
    assert _promote(served_workspace, 0.9)["alias"] == "champion"
    reload = server.post("/reload", headers=admin).json()
    assert reload["model_version"] == "3"
    # The background check may have won the race in the few ms since the alias moved; either way
    # the new version is served as soon as /reload returns.
    assert reload["changed"] or reload["previous_version"] == "3"
    assert server.post("/sql", json={"question": "names of customers", "db_id": "shop"}).json()["model_version"] == "3"

    # Background check every serving.reload_interval_s: no call to /reload needed. This version knows an
    # example, whose SQL answers a question like it before the model's beams.
    config_path = served_workspace / "models" / "onnx" / "fp32" / "serialization.json"
    config = json.loads(config_path.read_text())
    config["serialization"]["retrieval_k"] = 1
    config["examples"] = [{"db_id": "shop", "question": "How many customers live in Paris?",
                           "sql": "select count ( * ) from customers where city = 'Paris'"}]
    config_path.write_text(json.dumps(config))
    assert _promote(served_workspace, 0.95)["version"] == 4
    deadline = time.monotonic() + RELOAD_INTERVAL_S + 60
    while True:
        version = server.post("/sql", json={"question": "names of customers", "db_id": "shop"}).json()["model_version"]
        if version == "4" or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert version == "4"
    body = server.post("/sql", json={"question": "how many customers are in paris?", "db_id": "shop"}).json()
    assert (body["sql"], body["origin"]) == ("select count(*) from customers where city = 'Paris'", "example")
