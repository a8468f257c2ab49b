# Two commands do everything on a fresh clone:
#   make run    set up the environment, then run the whole pipeline (dvc repro) on the embedded demo data
#   make test   set up the environment, then run the test suite
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch: taken from a local wheel folder when the machine has one.
WHEELS ?= /opt/wheels
PIP_FLAGS := $(if $(wildcard $(WHEELS)/*.whl),--find-links $(WHEELS),)

export DVC_NO_ANALYTICS := 1
export TOKENIZERS_PARALLELISM := false
export GX_ANALYTICS_ENABLED := false
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR := false

.PHONY: setup run test test-all lock clean

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

test: setup
	$(BIN)/python -m pytest -m "not slow"

test-all: setup
	$(BIN)/python -m pytest

# Re-pin every dependency from requirements/requirements.in in a throwaway environment.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --upgrade pip
	.lock-venv/bin/python -m pip install --quiet $(PIP_FLAGS) -r requirements/requirements.in
	{ head -2 requirements/lock.txt; .lock-venv/bin/python -m pip freeze; } > requirements/lock.txt.new
	mv requirements/lock.txt.new requirements/lock.txt && rm -rf .lock-venv

clean:
	rm -rf data/ingested data/validated data/tokenized models/* metrics plots reports checkpoints mlflow.db mlartifacts
