"""Airflow 3 orchestration of the nl2sql pipeline.

Two DAGs:

* ``nl2sql_retrain`` — one task per DVC stage (``dvc repro --single-item <stage>``, so a stage whose
  inputs did not change is skipped from the DVC cache and the grid shows exactly where a run is and
  what failed), then a task that tells the serving process to load the new champion (POST /reload).
  It runs on a cron schedule *or* whenever the training-data asset is updated (``AssetOrTimeSchedule``).
* ``nl2sql_data_watch`` — a small, frequent watcher: it fingerprints the data drop folder and, when the
  fingerprint changed since its last look, emits an event on the training-data asset, which starts a
  retrain. Runs triggered that way force the ingest stage, because ingest's DVC dependencies are the
  code and params.yaml, not the files in the drop folder.

Everything is configured by environment variables read at parse time (no metadata-DB access while
parsing, nothing heavy imported at top level; the tasks run in the pipeline's own virtualenv):

================================  ==============================================================
NL2SQL_WORKSPACE                  the DVC project the stages run in (default: this repository)
NL2SQL_PYTHON                     python of the pipeline's virtualenv (default: <workspace>/.venv/bin/python
                                  if it exists, else the python running Airflow)
NL2SQL_RETRAIN_SCHEDULE           cron expression or preset for retraining (default ``@weekly``;
                                  ``none``: only data-triggered and manual runs)
NL2SQL_DATA_DIR                   the drop folder the watcher fingerprints (default
                                  <workspace>/data/incoming); point params.yaml's ``ingest.path`` or
                                  ``ingest.custom.examples`` into it
NL2SQL_DATA_WATCH_SCHEDULE        cron for the watcher (default every 10 minutes; ``none``: off)
NL2SQL_DATA_SETTLE_S              ignore files modified less than this many seconds ago (default 60),
                                  so a drop still being copied does not start a retrain
NL2SQL_SERVICE_URL                base URL of the BentoML service, or a comma-separated list of
                                  replicas (each is told); unset: the reload task is skipped
NL2SQL_ADMIN_TOKEN                the service's admin token (sent as X-Admin-Token), if it has one
NL2SQL_DVC_REMOTE_SYNC            ``1``: ``--pull`` before and ``dvc push`` after each stage, for workers
                                  that do not share one workspace (Celery/Kubernetes on many machines)
================================  ==============================================================
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from datetime import timedelta
from pathlib import Path

from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import DAG, Asset, AssetOrTimeSchedule, CronTriggerTimetable, Param, chain, task

log = logging.getLogger("nl2sql.airflow")

REPO = Path(__file__).resolve().parents[1]
WORKSPACE = Path(os.environ.get("NL2SQL_WORKSPACE", str(REPO))).resolve()
DEFAULT_PYTHON = WORKSPACE / ".venv" / "bin" / "python"
# Fallback: the interpreter running Airflow, which has the pipeline's packages when both share one venv.
PYTHON = os.environ.get("NL2SQL_PYTHON") or str(DEFAULT_PYTHON if DEFAULT_PYTHON.exists() else sys.executable)
DATA_DIR = Path(os.environ.get("NL2SQL_DATA_DIR", str(WORKSPACE / "data" / "incoming"))).resolve()
SERVICE_URLS = [
    url.strip().rstrip("/") for url in os.environ.get("NL2SQL_SERVICE_URL", "").split(",") if url.strip()
]
DVC_REMOTE_SYNC = os.environ.get("NL2SQL_DVC_REMOTE_SYNC", "0") == "1"


def _schedule_from_env(name: str, default: str) -> str | None:
    value = os.environ.get(name, default).strip()
    return None if value.lower() in {"", "none", "off"} else value


RETRAIN_CRON = _schedule_from_env("NL2SQL_RETRAIN_SCHEDULE", "@weekly")
WATCH_CRON = _schedule_from_env("NL2SQL_DATA_WATCH_SCHEDULE", "*/10 * * * *")

# The asset is the drop folder itself: the watcher is its producer, the retrain DAG its consumer.
TRAINING_DATA = Asset(name="nl2sql_training_data", uri=DATA_DIR.as_uri(), group="nl2sql")

# DVC stages in dvc.yaml order, each with a wall-clock limit. Training limits sit well above the
# params' max_train_minutes budgets: a task that outlives them is hung, not slow.
STAGE_TIMEOUTS = {
    "ingest": timedelta(minutes=30),
    "validate": timedelta(minutes=30),
    "tokenize": timedelta(minutes=30),
    "train": timedelta(hours=6),
    "distill": timedelta(hours=3),
    "export": timedelta(hours=1),
    "evaluate": timedelta(hours=2),
    "promote": timedelta(minutes=15),
}


def log_task_failure(context) -> None:
    """Name the stage, the run and the command that reproduces the failure outside Airflow."""
    ti = context["ti"]
    task_obj = context["task"]
    stage = ti.task_id
    log.error(
        "nl2sql: task %r of DAG %r failed (try %s of %s) in run %r: %s. "
        "Reproduce outside Airflow: cd %s && %s -m dvc repro --single-item %s",
        stage,
        ti.dag_id,
        ti.try_number,
        task_obj.retries + 1,
        ti.run_id,
        str(context.get("exception") or "see the task log above").rstrip("."),
        WORKSPACE,
        PYTHON,
        stage,
    )


DEFAULT_ARGS = {
    "owner": "nl2sql",
    "retries": 2,
    "retry_delay": timedelta(seconds=30),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=10),
    "on_failure_callback": log_task_failure,
}


def stage_command(stage: str) -> str:
    """`dvc repro` of one stage; --force on a manual run with force=true, and for ingest when a new
    data drop (an asset event) started the run."""
    force_if = "params.force"
    if stage == "ingest":
        force_if += " or dag_run.run_type == 'asset_triggered'"
    dvc = f"{shlex.quote(PYTHON)} -m dvc"
    pull = " --pull" if DVC_REMOTE_SYNC else ""
    command = (
        f"set -euo pipefail\n"
        f"{dvc} repro --single-item{pull} {{% if {force_if} %}}--force {{% endif %}}{stage}\n"
    )
    if DVC_REMOTE_SYNC:
        command += f"{dvc} push {stage}\n"
    return command


def stage_env() -> dict[str, str]:
    """The stage commands in dvc.yaml call `python`: put the pipeline's virtualenv first on PATH."""
    return {
        "PATH": f"{Path(PYTHON).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


with DAG(
    dag_id="nl2sql_retrain",
    description="Retrain, distill, export, evaluate and promote the NL-to-SQL model through DVC",
    schedule=(
        AssetOrTimeSchedule(
            timetable=CronTriggerTimetable(RETRAIN_CRON, timezone="UTC"), assets=TRAINING_DATA
        )
        if RETRAIN_CRON
        else TRAINING_DATA
    ),
    # No start_date: with catchup off the first scheduled run is the next cron time, not an
    # immediate run for the last missed one when the DAG is first unpaused.
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    params={
        "force": Param(
            False, type="boolean", description="Re-run every stage even if DVC finds it unchanged"
        ),
        "reload_service": Param(True, type="boolean", description="POST /reload to the service at the end"),
    },
    tags=["nl2sql", "training"],
    doc_md=__doc__,
) as retrain_dag:
    stage_tasks = [
        BashOperator(
            task_id=stage,
            bash_command=stage_command(stage),
            cwd=str(WORKSPACE),
            env=stage_env(),
            append_env=True,
            # DVC's own exit codes are failures; never turn one into a skip.
            skip_on_exit_code=None,
            execution_timeout=timeout,
            doc_md=f"`dvc repro --single-item {stage}` in `{WORKSPACE}`",
        )
        for stage, timeout in STAGE_TIMEOUTS.items()
    ]

    @task(task_id="reload_service", execution_timeout=timedelta(minutes=5), retries=3)
    def reload_service(params=None) -> dict:
        """Ask every serving replica to load the current champion; skipped when none is configured."""
        from airflow.sdk.exceptions import AirflowSkipException

        if not SERVICE_URLS:
            raise AirflowSkipException("NL2SQL_SERVICE_URL is not set: no service to reload")
        if not params["reload_service"]:
            raise AirflowSkipException("reload_service=false for this run")

        import httpx

        # The same variable the service reads: its /reload requires the token when one is set.
        headers = {}
        if token := os.environ.get("NL2SQL_ADMIN_TOKEN"):
            headers["X-Admin-Token"] = token
        answers = {}
        for url in SERVICE_URLS:
            response = httpx.post(f"{url}/reload", json={}, headers=headers, timeout=120)
            if response.status_code >= 400:
                raise RuntimeError(
                    f"POST {url}/reload answered {response.status_code}: {response.text[:500]}"
                )
            log.info("%s reloaded: %s", url, response.text[:500])
            answers[url] = response.json()
        return answers

    chain(*stage_tasks, reload_service())


def fingerprint_folder(folder: Path, settle_s: float, now: float) -> tuple[str, int, bool]:
    """(digest of every visible file's relative path, size and mtime; file count; whether some file
    is still too fresh to trust). Hidden files and folders (.git, partial uploads) are ignored."""
    import hashlib

    digest = hashlib.sha256()
    count = 0
    unsettled = False
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        stat = path.stat()
        unsettled = unsettled or now - stat.st_mtime < settle_s
        digest.update(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        count += 1
    return digest.hexdigest(), count, unsettled


FINGERPRINT_VARIABLE = "nl2sql_training_data_fingerprint"

with DAG(
    dag_id="nl2sql_data_watch",
    description="Emit a training-data asset event when the drop folder changes",
    schedule=CronTriggerTimetable(WATCH_CRON, timezone="UTC") if WATCH_CRON else None,
    catchup=False,
    max_active_runs=1,
    default_args={**DEFAULT_ARGS, "retries": 1},
    tags=["nl2sql", "data"],
) as watch_dag:

    @task(task_id="detect_new_data", outlets=[TRAINING_DATA], execution_timeout=timedelta(minutes=5))
    def detect_new_data(outlet_events=None) -> dict:
        """Skipped (so no asset event) unless the folder's fingerprint differs from the last one seen."""
        import time

        from airflow.sdk import Variable
        from airflow.sdk.exceptions import AirflowSkipException

        if not DATA_DIR.is_dir():
            raise AirflowSkipException(f"{DATA_DIR}: data drop folder does not exist (set NL2SQL_DATA_DIR)")
        settle_s = float(os.environ.get("NL2SQL_DATA_SETTLE_S", "60"))
        fingerprint, files, unsettled = fingerprint_folder(DATA_DIR, settle_s, time.time())
        if unsettled:
            raise AirflowSkipException(f"{DATA_DIR}: files changed in the last {settle_s:.0f} s; next look")
        previous = Variable.get(FINGERPRINT_VARIABLE, default=None)
        if fingerprint == previous:
            raise AirflowSkipException(f"{DATA_DIR}: unchanged ({files} files)")
        Variable.set(FINGERPRINT_VARIABLE, fingerprint, description=f"last seen state of {DATA_DIR}")
        summary = {"folder": str(DATA_DIR), "files": files, "fingerprint": fingerprint}
        outlet_events[TRAINING_DATA].extra = summary
        log.info("new training data in %s (%d files): event on %s", DATA_DIR, files, TRAINING_DATA.name)
        return summary

    detect_new_data()
