#!/usr/bin/env bash
# Start Airflow for this project (see scripts/airflow_up.py --help); uses the project's virtualenv.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${NL2SQL_PYTHON:-$repo/.venv/bin/python}"
exec "$python" "$repo/scripts/airflow_up.py" "$@"
