# Two commands do everything on a fresh clone:
#   make run    set up the environment, then run the whole pipeline (dvc repro) on the embedded demo data
#   make test   set up the environment, then run the whole test suite
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch: taken from a local wheel folder when the machine has one.
WHEELS ?= /opt/wheels
PIP_FLAGS := $(if $(wildcard $(WHEELS)/*.whl),--find-links $(WHEELS),)

# dvc.yaml's commands say `python`: the project's environment comes first on PATH.
export PATH := $(abspath $(BIN)):$(PATH)
export DVC_NO_ANALYTICS := 1
export TOKENIZERS_PARALLELISM := false
export GX_ANALYTICS_ENABLED := false
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR := false

.PHONY: setup run test test-fast lock clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements/lock.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (the pinned torch wheel needs CPython 3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(PIP_FLAGS) -r requirements/lock.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	$(BIN)/python -m pip check
	touch $@

run: setup
	$(BIN)/dvc repro
	$(BIN)/dvc metrics show

# The whole suite (about 7 minutes on 2 cores); `make test-fast` skips the tests marked slow (about 2).
test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

# Re-pin every dependency from requirements/requirements.in in a throwaway environment.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --upgrade pip
	.lock-venv/bin/python -m pip install --quiet $(PIP_FLAGS) -r requirements/requirements.in
	{ head -2 requirements/lock.txt; .lock-venv/bin/python -m pip freeze; } > requirements/lock.txt.new
	mv requirements/lock.txt.new requirements/lock.txt && rm -rf .lock-venv

clean:
	rm -rf data/ingested data/validated data/tokenized models/* metrics plots reports checkpoints mlflow.db mlartifacts

# --- services ----------------------------------------------------------------------------------
.PHONY: serve bento airflow-up airflow-up-postgres airflow-e2e compose-config bench

serve: setup           ## BentoML on :3000, serving models:/nl2sql@champion (NL2SQL_MODEL=models/onnx/int8 for a local export)
	$(BIN)/bentoml serve serving.service:NL2SQL --port 3000

bento: setup           ## package the service (code + params) as a bento; `bentoml containerize` needs Docker
	$(BIN)/bentoml build -f serving/bentofile.yaml .

airflow-up: setup      ## Airflow here (SQLite metadata in .airflow/): api-server + scheduler + dag-processor; prints UI + login
	scripts/airflow_up.sh

airflow-up-postgres: setup  ## the same with the metadata DB in the local PostgreSQL
	scripts/airflow_up.sh --postgres

airflow-e2e: setup     ## bounded real run: trigger nl2sql_retrain over the REST API on a tiny workspace, wait, stop
	$(BIN)/python scripts/airflow_e2e.py

compose-config:        ## static check of the compose stack (needs the docker compose plugin)
	docker compose --env-file .env.example config --quiet
