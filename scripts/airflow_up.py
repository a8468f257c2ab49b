"""Start Airflow 3 for this project and keep it running until Ctrl-C.

    python scripts/airflow_up.py                 # SQLite metadata DB in .airflow/
    python scripts/airflow_up.py --postgres      # PostgreSQL at 127.0.0.1:5432/airflow (created if missing)
    python scripts/airflow_up.py --port 8081 --workspace /path/to/dvc/project

AIRFLOW_HOME is the repository's .airflow/ (gitignored): config, metadata DB, logs, the generated
login. The DAGs come from dags/; their tasks run `dvc repro` in --workspace with this python."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from airflow_local import DEFAULT_HOME, POSTGRES_URL, REPO, LocalAirflow


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--home", type=Path, default=DEFAULT_HOME, help="AIRFLOW_HOME (default .airflow/)")
    parser.add_argument("--postgres", nargs="?", const=POSTGRES_URL, default=None, metavar="URL",
                        help=f"use PostgreSQL for the metadata DB (default URL {POSTGRES_URL})")
    parser.add_argument("--port", type=int, default=8080, help="API server / UI port")
    parser.add_argument("--log-server-port", type=int, default=8793, help="scheduler's task-log server port")
    parser.add_argument("--workspace", type=Path, default=REPO, help="DVC project the tasks run in")
    return parser.parse_args(argv)


def interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    airflow = LocalAirflow(home=args.home.resolve(), db_url=args.postgres, port=args.port,
                           log_server_port=args.log_server_port, workspace=args.workspace.resolve())
    airflow.prepare()
    airflow.start()
    # SIGTERM (e.g. from a process manager) stops the components like Ctrl-C does.
    signal.signal(signal.SIGTERM, interrupt)
    try:
        airflow.wait_until_up(timeout_s=180)
        print(
            f"\nAirflow is up: {airflow.url}\n"
            f"  login: admin / {airflow.password}   (stored in {airflow.home / 'passwords.json'})\n"
            f"  DAGs:  {REPO / 'dags'}  ->  tasks run in {airflow.workspace}\n"
            f"  logs:  {airflow.home / 'logs'}\n"
            "Ctrl-C stops the api-server, scheduler and dag-processor.",
            flush=True,
        )
        while True:
            airflow.check_alive()
            time.sleep(5)
    except KeyboardInterrupt:
        print("\n[airflow] stopping")
        return 0
    except (RuntimeError, TimeoutError) as exc:
        print(f"[airflow] {exc}", file=sys.stderr)
        return 1
    finally:
        airflow.stop()


if __name__ == "__main__":
    sys.exit(main())
