"""Bounded end-to-end run of the real Airflow: start api-server, scheduler and dag-processor on a
throwaway AIRFLOW_HOME, trigger nl2sql_retrain through the REST API (/api/v2, JWT from /auth/token),
wait for it to succeed, check that MLflow registered a model version, stop everything.

    python scripts/airflow_e2e.py                    # tiny demo workspace, triggered over REST
    python scripts/airflow_e2e.py --via data         # drop a file, let nl2sql_data_watch trigger the retrain
    python scripts/airflow_e2e.py --workspace DIR    # an existing DVC project instead of the tiny demo
    python scripts/airflow_e2e.py --postgres         # metadata DB in the local PostgreSQL

Exit status 0 only when the run succeeded (and, for the demo workspace, a model version exists)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from airflow_local import POSTGRES_URL, REPO, LocalAirflow, free_port, make_demo_workspace

RETRAIN = "nl2sql_retrain"
WATCH = "nl2sql_data_watch"


def tiny_params() -> dict:
    """The test suite's tiny configuration (tests/conftest.py), so the run takes minutes, not hours."""
    sys.path.insert(0, str(REPO))
    from tests.conftest import make_tiny_params

    return make_tiny_params().model_dump(mode="json", by_alias=True)


def registered_versions(tracking_uri: str, model_name: str) -> list[str]:
    """Every version of the model, marking the one the champion alias points at."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri)
    versions = client.search_model_versions(f"name = '{model_name}'")
    try:
        champion = client.get_model_version_by_alias(model_name, "champion").version
    except MlflowException:
        champion = None
    return [f"v{v.version}{' (champion)' if v.version == champion else ''} run={v.run_id}" for v in versions]


def wait_for_asset_triggered_run(client, timeout_s: float, alive_check) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive_check()
        query = {"run_type": "asset_triggered"}
        runs = client.call("GET", f"/dags/{RETRAIN}/dagRuns", params=query)["dag_runs"]
        if runs:
            return runs[0]["dag_run_id"]
        time.sleep(3)
    raise TimeoutError(f"no asset-triggered run of {RETRAIN} within {timeout_s:.0f} s")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workspace", type=Path, help="existing DVC project (default: a tiny demo one)")
    parser.add_argument("--via", choices=["rest", "data"], default="rest",
                        help="rest: trigger the retrain directly; data: through a data drop and the watcher")
    parser.add_argument("--postgres", nargs="?", const=POSTGRES_URL, default=None, metavar="URL")
    parser.add_argument("--timeout", type=float, default=1500, help="seconds for the whole pipeline run")
    parser.add_argument("--force", action="store_true", help="trigger with force=true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    timings: dict[str, float] = {}

    def mark(phase: str) -> None:
        timings[phase] = round(time.monotonic() - started - sum(timings.values()), 1)

    scratch = Path(tempfile.mkdtemp(prefix="nl2sql-airflow-e2e-"))
    params = tiny_params()
    model_name = params["promote"]["model_name"]
    workspace = args.workspace.resolve() if args.workspace else make_demo_workspace(scratch / "ws", params)
    tracking_uri = f"sqlite:///{workspace / 'mlflow.db'}"
    drop_folder = workspace / "data" / "incoming"
    airflow = LocalAirflow(
        home=scratch / "airflow_home", db_url=args.postgres, port=free_port(), log_server_port=free_port(),
        workspace=workspace,
        extra_env={
            "MLFLOW_TRACKING_URI": tracking_uri,
            "NL2SQL_DATA_DIR": str(drop_folder),
            "NL2SQL_DATA_SETTLE_S": "0",
            "TORCH_NUM_THREADS": "1",
            "OMP_NUM_THREADS": "1",
        },
    )
    print(f"[e2e] workspace {workspace}\n[e2e] AIRFLOW_HOME {airflow.home}", flush=True)
    mark("workspace")
    airflow.prepare()
    mark("db_migrate")
    state = "not started"
    try:
        airflow.start()
        airflow.wait_until_up(timeout_s=240)
        mark("api_up")
        client = airflow.client()
        client.wait_for_dag(RETRAIN, timeout_s=240, alive_check=airflow.check_alive)
        client.unpause(RETRAIN)
        mark("dag_parsed")
        if args.via == "rest":
            run_id = client.trigger(RETRAIN, {"force": args.force})
        else:
            client.wait_for_dag(WATCH, timeout_s=120, alive_check=airflow.check_alive)
            drop_folder.mkdir(parents=True, exist_ok=True)
            drop = {"question": "how many?", "sql": "SELECT 1"}
            (drop_folder / "drop-0001.jsonl").write_text(json.dumps(drop) + "\n")
            client.unpause(WATCH)
            watch_run = client.trigger(WATCH)
            watch_state = client.wait_for_run(
                WATCH, watch_run, timeout_s=300, alive_check=airflow.check_alive
            )
            if watch_state != "success":
                raise RuntimeError(f"{WATCH} run {watch_run} ended {watch_state}")
            run_id = wait_for_asset_triggered_run(client, timeout_s=180, alive_check=airflow.check_alive)
        print(f"[e2e] {RETRAIN} run {run_id}", flush=True)
        state = client.wait_for_run(RETRAIN, run_id, timeout_s=args.timeout, alive_check=airflow.check_alive)
        mark("pipeline_run")
        for ti in client.task_instances(RETRAIN, run_id):
            duration = ti["duration"] or 0
            print(f"[e2e]   {ti['task_id']:<15} {ti['state']:<8} {duration:7.1f} s  try {ti['try_number']}")
    finally:
        airflow.stop()
        mark("shutdown")

    ok = state == "success"
    if ok and not args.workspace:
        versions = registered_versions(tracking_uri, model_name)
        print(f"[e2e] MLflow registry {model_name}: {versions or 'no versions'}")
        ok = bool(versions)
    total = round(time.monotonic() - started, 1)
    print(f"[e2e] run state {state}; timings (s) {json.dumps(timings)}; total {total} s")
    print(f"[e2e] {'PASSED' if ok else 'FAILED'} (task logs under {airflow.home / 'logs'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
