"""The Airflow DAGs in dags/: they parse fast and light, have the promised shape, render the right
DVC commands, and really run — the watcher with `dag.test()` against a migrated metadata DB, the
whole tiny pipeline end to end (slow) with a model version registered in MLflow at the end."""

from __future__ import annotations

import http.server
import importlib.util
import json
import logging
import os
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import jinja2
import pytest
import yaml

from tests.conftest import REPO, make_tiny_params

DAG_FILE = REPO / "dags" / "nl2sql_retrain.py"
STAGES = ["ingest", "validate", "tokenize", "train", "distill", "export", "evaluate", "promote"]


@pytest.fixture(scope="module")
def airflow_db(tmp_path_factory) -> str:
    """A private AIRFLOW_HOME with a migrated SQLite metadata DB, set before airflow is imported.
    If another test module imported airflow first, the DB it is configured with is migrated instead."""
    home = tmp_path_factory.mktemp("airflow_home")
    if "airflow" not in sys.modules:
        os.environ["AIRFLOW_HOME"] = str(home)
        os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{home / 'airflow.db'}"
        os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
        # dag.test() stores the DAG from the configured bundle: that must be this repository's dags/.
        os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(DAG_FILE.parent)
    from airflow.configuration import conf

    url = conf.get("database", "sql_alchemy_conn")
    env = {**os.environ, "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": url}
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True,
                   stdout=subprocess.DEVNULL, timeout=300)
    return url


def load_dags(monkeypatch, **env: str) -> dict:
    """Parse dags/ with the given NL2SQL_* environment, the way the dag-processor does."""
    for key in [k for k in os.environ if k.startswith("NL2SQL_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAG_FILE))
    assert bag.import_errors == {}
    return bag.dags


def render(template: str, force: bool, run_type: str) -> str:
    context = {"params": {"force": force}, "dag_run": SimpleNamespace(run_type=run_type)}
    return jinja2.Template(template).render(**context)


def test_dag_files_parse_without_heavy_imports():
    """The dag-processor re-parses dags/ every few seconds: no ML stack, no pipeline code at top level."""
    probe = (
        "import sys, json; from airflow.dag_processing.dagbag import DagBag; "
        f"bag = DagBag(dag_folder={str(REPO / 'dags')!r}); "
        "heavy = [m for m in ('torch', 'transformers', 'mlflow', 'dvc', 'pipelines', 'onnxruntime', "
        "'bentoml', 'great_expectations') if m in sys.modules]; "
        "print(json.dumps({'errors': bag.import_errors, 'dags': sorted(bag.dags), 'heavy': heavy}))"
    )
    env = {**os.environ, "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"errors": {}, "dags": ["nl2sql_data_watch", "nl2sql_retrain"], "heavy": []}


def test_retrain_dag_shape(monkeypatch, airflow_db):
    dag = load_dags(monkeypatch)["nl2sql_retrain"]
    assert dag.max_active_runs == 1 and dag.catchup is False
    assert set(dag.params) >= {"force", "reload_service"} and dag.params["force"] is False
    # One task per DVC stage in dvc.yaml order, then the service reload, as a single chain.
    order = [*STAGES, "reload_service"]
    assert sorted(dag.task_ids) == sorted(order)
    for upstream, downstream in zip(order, order[1:]):
        assert dag.get_task(upstream).downstream_task_ids == {downstream}
    assert list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]) == STAGES
    for task in dag.tasks:
        assert task.retries >= 1, task.task_id
        assert task.retry_exponential_backoff, task.task_id
        assert task.execution_timeout and task.execution_timeout <= timedelta(hours=6), task.task_id
        assert task.on_failure_callback, task.task_id
    # Time or data: the weekly cron and the training-data asset.
    assert dag.timetable.timetable.expression == "0 0 * * 0"
    assert dag.timetable.asset_condition.name == "nl2sql_training_data"


def test_stage_commands_use_dvc_with_force_only_when_asked(monkeypatch, tmp_path, airflow_db):
    python = tmp_path / "venv" / "bin" / "python"
    dag = load_dags(monkeypatch, NL2SQL_WORKSPACE=str(tmp_path), NL2SQL_PYTHON=str(python))["nl2sql_retrain"]
    train, ingest = dag.get_task("train"), dag.get_task("ingest")
    assert train.cwd == str(tmp_path)
    assert train.env["PATH"].startswith(f"{python.parent}{os.pathsep}")
    assert render(train.bash_command, False, "scheduled").strip().endswith(
        f"{python} -m dvc repro --single-item train"
    )
    assert "--force train" in render(train.bash_command, True, "manual")
    # A new data drop is not a DVC dependency of ingest, so data-triggered runs force ingest only.
    assert "--force ingest" in render(ingest.bash_command, False, "asset_triggered")
    assert "--force" not in render(train.bash_command, False, "asset_triggered")
    assert "--force" not in render(ingest.bash_command, False, "scheduled")


def test_schedule_comes_from_the_environment(monkeypatch, airflow_db):
    dags = load_dags(monkeypatch, NL2SQL_RETRAIN_SCHEDULE="30 2 * * *", NL2SQL_DATA_WATCH_SCHEDULE="none")
    assert dags["nl2sql_retrain"].timetable.timetable.expression == "30 2 * * *"
    assert dags["nl2sql_data_watch"].schedule is None
    data_only = load_dags(monkeypatch, NL2SQL_RETRAIN_SCHEDULE="none")["nl2sql_retrain"]
    assert not hasattr(data_only.timetable, "timetable")  # asset-triggered only, no cron part
    assert data_only.timetable.asset_condition.name == "nl2sql_training_data"


def test_failure_callback_names_stage_and_reproduction(monkeypatch, tmp_path, caplog, airflow_db):
    dag = load_dags(monkeypatch, NL2SQL_WORKSPACE=str(tmp_path))["nl2sql_retrain"]
    task = dag.get_task("train")
    ti = SimpleNamespace(task_id="train", dag_id=dag.dag_id, try_number=3, run_id="manual__1")
    with caplog.at_level(logging.ERROR, logger="nl2sql.airflow"):
        task.on_failure_callback[0]({"ti": ti, "task": task, "exception": RuntimeError("exit code 2")})
    message = caplog.records[-1].getMessage()
    assert "'train'" in message and "try 3 of 3" in message and "exit code 2" in message
    assert f"cd {tmp_path} && " in message and "dvc repro --single-item train" in message


class ReloadHandler(http.server.BaseHTTPRequestHandler):
    requests: list[tuple[str, str | None]] = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        type(self).requests.append((self.path, self.headers.get("X-Admin-Token")))
        body = json.dumps({"model_version": "3", "previous_version": "2", "changed": True}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_reload_task_posts_to_every_replica_or_skips(monkeypatch, airflow_db):
    from airflow.sdk.exceptions import AirflowSkipException

    replicas = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), ReloadHandler) for _ in range(2)]
    for server in replicas:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        urls = [f"http://127.0.0.1:{server.server_port}" for server in replicas]
        env = {"NL2SQL_SERVICE_URL": f"{urls[0]}/, {urls[1]}", "NL2SQL_ADMIN_TOKEN": "s3cret"}
        reload_task = load_dags(monkeypatch, **env)["nl2sql_retrain"].get_task("reload_service")
        answers = reload_task.python_callable(params={"reload_service": True})
        expected = {"model_version": "3", "previous_version": "2", "changed": True}
        assert answers == dict.fromkeys(urls, expected)
        assert ReloadHandler.requests == [("/reload", "s3cret"), ("/reload", "s3cret")]
        with pytest.raises(AirflowSkipException, match="reload_service=false"):
            reload_task.python_callable(params={"reload_service": False})
    finally:
        for server in replicas:
            server.shutdown()
    unconfigured = load_dags(monkeypatch)["nl2sql_retrain"].get_task("reload_service")
    with pytest.raises(AirflowSkipException, match="NL2SQL_SERVICE_URL is not set"):
        unconfigured.python_callable(params={"reload_service": True})


def test_fingerprint_sees_new_and_changed_files_but_not_hidden_ones(monkeypatch, tmp_path, airflow_db):
    spec = importlib.util.spec_from_file_location("nl2sql_retrain_dags", DAG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    drop = tmp_path / "drop"
    drop.mkdir()
    empty, count, _ = module.fingerprint_folder(drop, settle_s=0, now=1e12)
    assert count == 0
    (drop / ".partial.csv").write_text("half")
    assert module.fingerprint_folder(drop, 0, 1e12)[0] == empty
    (drop / "batch1.jsonl").write_text('{"question": "q", "sql": "SELECT 1"}\n')
    first, count, unsettled = module.fingerprint_folder(drop, 0, 1e12)
    assert first != empty and count == 1 and not unsettled
    (drop / "batch1.jsonl").write_text('{"question": "q2", "sql": "SELECT 2"}\n')
    assert module.fingerprint_folder(drop, 0, 1e12)[0] != first
    assert module.fingerprint_folder(drop, settle_s=3600, now=(drop / "batch1.jsonl").stat().st_mtime)[2]


def test_watch_dag_emits_an_asset_event_only_when_data_changed(monkeypatch, tmp_path, airflow_db):
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session

    drop = tmp_path / "incoming"
    drop.mkdir()
    (drop / "batch1.jsonl").write_text('{"question": "q", "sql": "SELECT 1"}\n')
    dag = load_dags(monkeypatch, NL2SQL_DATA_DIR=str(drop), NL2SQL_DATA_SETTLE_S="0")["nl2sql_data_watch"]

    def run_and_count_events() -> tuple[str, int]:
        run = dag.test()
        state = run.get_task_instance("detect_new_data").state
        with create_session() as session:
            uri = drop.as_uri()
            events = session.query(AssetEvent).filter(AssetEvent.asset.has(uri=uri)).count()
        return state, events

    assert run_and_count_events() == ("success", 1)
    assert run_and_count_events() == ("skipped", 1)  # unchanged: no second event


def make_demo_workspace(dest: Path) -> Path:
    sys.path.insert(0, str(REPO / "scripts"))
    from airflow_local import make_demo_workspace as make

    params = make_tiny_params().model_dump(mode="json", by_alias=True)
    return make(dest, params)


@pytest.mark.slow
@pytest.mark.timeout(1500)  # 7 min measured on a busy 2-core machine; the default 600 s is too tight
def test_retrain_dag_runs_the_tiny_pipeline_and_registers_a_model(monkeypatch, workspace, airflow_db):
    missing = [stage for stage in STAGES if not (REPO / "pipelines" / f"{stage}.py").is_file()]
    if missing:
        pytest.skip(f"pipeline stages not written yet: {missing}")
    project = make_demo_workspace(workspace / "project")
    tracking_uri = os.environ["MLFLOW_TRACKING_URI"]
    env = {"NL2SQL_WORKSPACE": str(project), "NL2SQL_PYTHON": sys.executable}
    dag = load_dags(monkeypatch, **env)["nl2sql_retrain"]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for task in dag.tasks:  # a broken stage should fail the test now, not after the backoff delays
        task.retries = 0

    run = dag.test(run_conf={"force": False, "reload_service": False})
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert states == {**dict.fromkeys(STAGES, "success"), "reload_service": "skipped"}, states
    assert (project / "dvc.lock").is_file()

    from mlflow import MlflowClient

    versions = MlflowClient(tracking_uri=tracking_uri).search_model_versions("name = 'nl2sql'")
    assert versions, f"no version of model 'nl2sql' in {tracking_uri}"
