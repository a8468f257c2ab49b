"""Shared pieces of scripts/airflow_up.py and scripts/airflow_e2e.py: a self-contained Airflow 3
installation for this project (AIRFLOW_HOME, metadata DB, login, the three components) and a small
client for its REST API (/api/v2 with a JWT from /auth/token).

Configuration goes through AIRFLOW__SECTION__KEY environment variables rather than edits of
airflow.cfg, so every component started from here sees the same settings."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
DEFAULT_HOME = REPO / ".airflow"
POSTGRES_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/airflow"
ADMIN_USER = "admin"
COMPONENTS = ("api-server", "scheduler", "dag-processor")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load_or_create_secrets(home: Path) -> dict[str, str]:
    """Secrets every component must share (JWT signing key, API secret key) and the admin password,
    generated once per AIRFLOW_HOME and kept there, readable only by the owner."""
    path = home / "nl2sql_secrets.json"
    if path.is_file():
        return json.loads(path.read_text())
    values = {
        "jwt_secret": secrets.token_urlsafe(32),
        "api_secret_key": secrets.token_urlsafe(32),
        "admin_password": secrets.token_urlsafe(12),
    }
    home.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values, indent=2) + "\n")
    path.chmod(0o600)
    return values


def ensure_postgres_database(url: str) -> None:
    """Create the metadata database on the server if it does not exist yet."""
    import psycopg2
    from psycopg2 import sql
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    connection = psycopg2.connect(
        host=parsed.host, port=parsed.port or 5432, user=parsed.username, password=parsed.password,
        dbname="postgres",
    )
    # CREATE DATABASE cannot run in a transaction; psycopg2's `with connection` would open one.
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (parsed.database,))
            if cursor.fetchone() is None:
                cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(parsed.database)))
    finally:
        connection.close()


@dataclass
class LocalAirflow:
    """One Airflow installation: its home, metadata DB, ports and the pipeline workspace it drives."""

    home: Path = DEFAULT_HOME
    db_url: str | None = None  # None: SQLite file in home
    port: int = 8080
    log_server_port: int = 8793
    workspace: Path = REPO
    python: str = sys.executable
    extra_env: dict[str, str] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def secrets(self) -> dict[str, str]:
        return load_or_create_secrets(self.home)

    @property
    def password(self) -> str:
        return self.secrets["admin_password"]

    def env(self) -> dict[str, str]:
        db_url = self.db_url or f"sqlite:///{self.home / 'airflow.db'}"
        values = {
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            # One run of the pipeline at a time; DVC locks the workspace anyway.
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": db_url,
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.home / "passwords.json"),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API_AUTH__JWT_SECRET": self.secrets["jwt_secret"],
            "AIRFLOW__API__SECRET_KEY": self.secrets["api_secret_key"],
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(self.log_server_port),
            # New or edited DAG files are picked up within seconds instead of minutes.
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "10",
            "NL2SQL_WORKSPACE": str(self.workspace),
            "NL2SQL_PYTHON": self.python,
            "TOKENIZERS_PARALLELISM": "false",
        }
        if db_url.startswith("postgresql"):
            # Airflow's derived async URL needs asyncpg; psycopg 3 (installed) does sync and async.
            async_url = "postgresql+psycopg://" + db_url.split("://", 1)[1]
            values["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC"] = async_url
        return {**os.environ, **values, **self.extra_env}

    def airflow(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run([self.python, "-m", "airflow", *args], env=self.env(), check=True, **kwargs)

    def prepare(self) -> None:
        """Home folder, login and an up-to-date metadata database."""
        self.home.mkdir(parents=True, exist_ok=True)
        passwords = self.home / "passwords.json"
        known = json.loads(passwords.read_text()) if passwords.is_file() else {}
        if known.get(ADMIN_USER) != self.password:
            passwords.write_text(json.dumps({**known, ADMIN_USER: self.password}) + "\n")
            passwords.chmod(0o600)
        if self.db_url and self.db_url.startswith("postgresql"):
            ensure_postgres_database(self.db_url)
        print(f"[airflow] migrating the metadata database ({self.db_url or 'SQLite in ' + str(self.home)})")
        self.airflow("db", "migrate", stdout=subprocess.DEVNULL)

    def start(self) -> None:
        log_dir = self.home / "logs" / "components"
        log_dir.mkdir(parents=True, exist_ok=True)
        for component in COMPONENTS:
            args = [component, "--port", str(self.port)] if component == "api-server" else [component]
            log_file = open(log_dir / f"{component}.log", "ab")
            self.processes[component] = subprocess.Popen(
                [self.python, "-m", "airflow", *args],
                env=self.env(), stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
            )
            print(f"[airflow] started {component} (pid {self.processes[component].pid}, log {log_file.name})")

    def check_alive(self) -> None:
        for component, process in self.processes.items():
            if process.poll() is not None:
                log = self.home / "logs" / "components" / f"{component}.log"
                raise RuntimeError(f"airflow {component} exited with {process.returncode}; see {log}")

    def stop(self, grace_s: float = 20) -> None:
        """SIGTERM each component's process group, then SIGKILL whatever is left after grace_s."""
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for component, process in self.processes.items():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            print(f"[airflow] stopped {component}")
        self.processes.clear()

    def wait_until_up(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                if httpx.get(f"{self.url}/api/v2/monitor/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(2)
        raise TimeoutError(f"the API server did not answer on {self.url} within {timeout_s:.0f} s")

    def client(self) -> AirflowClient:
        return AirflowClient(self.url, ADMIN_USER, self.password)


class AirflowClient:
    """The few /api/v2 calls the scripts need, authenticated with a JWT from /auth/token."""

    def __init__(self, base_url: str, username: str, password: str):
        response = httpx.post(
            f"{base_url}/auth/token", json={"username": username, "password": password}, timeout=30
        )
        if response.status_code >= 400:
            raise RuntimeError(f"POST /auth/token answered {response.status_code}: {response.text}")
        token = response.json()["access_token"]
        self.http = httpx.Client(
            base_url=f"{base_url}/api/v2", headers={"Authorization": f"Bearer {token}"}, timeout=30
        )

    def call(self, method: str, path: str, **kwargs) -> dict:
        response = self.http.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise RuntimeError(f"{method} /api/v2{path} answered {response.status_code}: {response.text}")
        return response.json()

    def wait_for_dag(self, dag_id: str, timeout_s: float, alive_check=None) -> dict:
        """Wait until the dag-processor has parsed and stored the DAG; fail on an import error."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if alive_check:
                alive_check()
            errors = self.call("GET", "/importErrors")["import_errors"]
            if errors:
                raise RuntimeError(f"DAG import errors: {json.dumps(errors, indent=2)}")
            response = self.http.get(f"/dags/{dag_id}")
            if response.status_code == 200:
                return response.json()
            time.sleep(3)
        raise TimeoutError(f"DAG {dag_id} was not parsed within {timeout_s:.0f} s")

    def unpause(self, dag_id: str) -> None:
        self.call("PATCH", f"/dags/{dag_id}", json={"is_paused": False})

    def trigger(self, dag_id: str, conf: dict | None = None) -> str:
        run = self.call("POST", f"/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf or {}})
        return run["dag_run_id"]

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        return self.call("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]

    def wait_for_run(self, dag_id: str, run_id: str, timeout_s: float, alive_check=None) -> str:
        """Poll the run to a final state, printing each task's state as it changes."""
        deadline = time.monotonic() + timeout_s
        seen: dict[str, str] = {}
        while time.monotonic() < deadline:
            if alive_check:
                alive_check()
            for ti in self.task_instances(dag_id, run_id):
                if ti["state"] and seen.get(ti["task_id"]) != ti["state"]:
                    seen[ti["task_id"]] = ti["state"]
                    print(f"[run] {ti['task_id']}: {ti['state']}", flush=True)
            state = self.call("GET", f"/dags/{dag_id}/dagRuns/{run_id}")["state"]
            if state in {"success", "failed"}:
                return state
            time.sleep(5)
        raise TimeoutError(f"run {run_id} of {dag_id} did not finish within {timeout_s:.0f} s")


def make_demo_workspace(dest: Path, params: dict, source: Path = REPO) -> Path:
    """A throwaway DVC project with the repository's stages and the given params.yaml, so a run
    never writes into the real checkout."""
    import yaml

    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source / "pipelines", dest / "pipelines", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(source / "dvc.yaml", dest / "dvc.yaml")
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=dest, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], cwd=dest, check=True)
    return dest
