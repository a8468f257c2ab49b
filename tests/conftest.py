"""Fixtures shared by every test layer.

`tiny_params` is the whole pipeline configured to run in seconds; `workspace` is an empty temporary
directory made the current directory, so stages write their artifacts there and never into the repo."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipelines.common.params import Params

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = Path(os.environ.get("NL2SQL_SHARED_DATASETS", REPO.parent / "shared" / "datasets"))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    if not (SHARED_DATASETS / "spiderman" / "train_queries.csv").is_file():
        pytest.skip(f"shared benchmark data not found at {SHARED_DATASETS} (set NL2SQL_SHARED_DATASETS)")
    return SHARED_DATASETS


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def make_tiny_params(**overrides) -> Params:
    """The full pipeline at toy scale: a small demo set and a T5 of a few hundred thousand weights."""
    tiny_t5 = dict(d_model=32, d_ff=64, d_kv=8, num_heads=2, num_layers=1, num_decoder_layers=1)
    raw = {
        "ingest": {"source": "demo", "demo": {"n_pairs": 240, "n_customers": 40}},
        "tokenize": {"vocab_size": 400, "max_source_length": 256, "max_target_length": 96},
        "train": {"t5": tiny_t5, "epochs": 1, "max_train_minutes": 0.5, "eval_steps": 10, "batch_size": 8},
        "distill": {"student": tiny_t5, "epochs": 1, "max_train_minutes": 0.3, "batch_size": 8},
        "export": {"parity_examples": 4},
        "evaluate": {"num_beams": 2, "max_new_tokens": 48, "max_examples": 8},
    }
    for key, value in overrides.items():
        raw.setdefault(key, {}).update(value)
    return Params.model_validate(raw)


@pytest.fixture
def tiny_params() -> Params:
    return make_tiny_params()
