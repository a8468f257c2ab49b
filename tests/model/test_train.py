"""Stage train with a tiny T5: outputs, MLflow tracking, from_pretrained, resume after a kill, bad input."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from conftest import REPO, make_tiny_params, write_tiny_tokenize_inputs

from pipelines import tokenize, train
from pipelines.common.errors import PipelineError
from pipelines.common.paths import CHECKPOINTS, METRICS, PLOTS, TEACHER, TOKENIZED, TOKENIZER
from pipelines.common.serialize import load_config

torch.set_num_threads(1)


def tokenized_workspace(workspace: Path, n_dev: int = 8, **overrides):
    params = make_tiny_params(**overrides)
    write_tiny_tokenize_inputs(workspace, n_dev=n_dev)
    tokenize.main(params)
    return params


def test_scratch_training_writes_all_outputs_and_tracks_in_mlflow(workspace):
    params = tokenized_workspace(workspace, train={"eval_steps": 2, "epochs": 2, "lr_scheduler": "cosine"})
    train.main(params)

    metrics = json.loads((METRICS / "train.json").read_text())
    assert metrics["steps"] == 12 and metrics["stopped_by"] in ("epochs", "early_stopping")
    assert metrics["device"].startswith("cuda" if torch.cuda.is_available() else "cpu")
    assert metrics["examples_per_s"] > 0 and metrics["final_dev_loss"] > 0 and metrics["final_train_loss"] > 0
    with open(PLOTS / "train_curve.csv") as handle:
        curve = list(csv.DictReader(handle))
    # eval_steps=2 logs the train loss every step and the dev loss every 2 steps.
    assert [int(r["step"]) for r in curve] == list(range(1, 13))
    assert [int(r["step"]) for r in curve if r["dev_loss"]] == [2, 4, 6, 8, 10, 12]
    assert all(float(r["train_loss"]) > 0 for r in curve)
    assert {"config.json", "model.safetensors", "tokenizer.json", "serialization.json"} <= {
        p.name for p in TEACHER.iterdir()
    }
    assert load_config(TEACHER) == load_config(TOKENIZED)
    assert not (CHECKPOINTS / "teacher").exists()  # checkpoints only live until the teacher is saved

    run = mlflow.MlflowClient().get_run(metrics["mlflow_run_id"])
    assert run.data.params["train.lr_scheduler"] == "cosine"
    assert run.data.params["train.t5.d_model"] == "32"
    assert run.data.metrics["final_dev_loss"] == pytest.approx(metrics["final_dev_loss"])
    loss_history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")
    assert len(loss_history) >= 6 and loss_history[0].step == 1
    assert mlflow.MlflowClient().get_metric_history(run.info.run_id, "learning_rate")
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "teacher")}
    assert "teacher/model.safetensors" in artifacts and "teacher/serialization.json" in artifacts


def test_from_pretrained_local_tiny_checkpoint_without_dev_split(workspace):
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    # A "pretrained" checkpoint: a tiny T5 saved locally with its tokenizer, the layout of a hub download.
    tokenized_workspace(workspace)
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    base = workspace / "tiny-t5"
    config = T5Config(vocab_size=len(tokenizer) + 8, d_model=24, d_ff=48, d_kv=8, num_heads=3, num_layers=1,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(base)
    tokenizer.save_pretrained(base)

    # No dev split: training runs without periodic evaluation or early stopping.
    params = tokenized_workspace(workspace, n_dev=0, model={"base": str(base)})
    train.main(params)
    teacher = T5ForConditionalGeneration.from_pretrained(TEACHER)
    assert (teacher.config.d_model, teacher.config.num_heads, teacher.config.vocab_size) == (24, 3, len(tokenizer) + 8)
    metrics = json.loads((METRICS / "train.json").read_text())
    assert metrics["n_parameters"] == teacher.num_parameters()
    assert (metrics["dev_examples"], metrics["final_dev_loss"], metrics["stopped_by"]) == (0, None, "epochs")


def test_tokenizer_model_mismatch_is_a_clear_error(workspace):
    from transformers import T5Config, T5ForConditionalGeneration

    base = workspace / "small-vocab-t5"
    T5ForConditionalGeneration(T5Config(vocab_size=50, d_model=16, d_ff=32, d_kv=8, num_heads=2, num_layers=1,
                                        decoder_start_token_id=0)).save_pretrained(base)
    # Tokenize with the scratch tokenizer, then point model.base at a checkpoint whose vocabulary is too small.
    tokenized_workspace(workspace)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(TOKENIZER)).save_pretrained(base)
    params = tokenized_workspace(workspace, model={"base": str(base)})
    with pytest.raises(PipelineError, match=r"models/tokenizer does not match model.base .*the model embeds 50"):
        train.main(params)
    # Tokenized for one base, trained with another: caught from serialization.json before loading anything.
    with pytest.raises(PipelineError, match=r"tokenized for model.base .* re-run the tokenize stage"):
        train.main(make_tiny_params())
    assert not TEACHER.exists()


def test_unknown_base_and_missing_inputs_are_clear_errors(workspace, monkeypatch):
    with pytest.raises(PipelineError, match="tokenizer not found"):
        train.main(make_tiny_params())
    params = tokenized_workspace(workspace)
    (TOKENIZED / "serialization.json").write_text(
        (TOKENIZED / "serialization.json").read_text().replace('"scratch"', '"no-such-org/t5"')
    )
    with pytest.raises(PipelineError, match="model.base 'no-such-org/t5' is neither a local checkpoint"):
        train.main(make_tiny_params(model={"base": "no-such-org/t5"}))
    assert params.model.base == "scratch"


def test_cuda_without_gpu_fails_before_any_work(workspace, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    started = time.monotonic()
    # No inputs exist at all: the device check must come first.
    with pytest.raises(PipelineError, match="train.device is 'cuda' but no CUDA GPU"):
        train.main(make_tiny_params(train={"device": "cuda"}))
    assert time.monotonic() - started < 1


def test_device_choice(monkeypatch):
    from pipelines.common.device import choose_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert (choose_device("auto").device, choose_device("auto").bf16) == ("cpu", False)
    assert choose_device("cpu", bf16=True).bf16 is True  # explicit bf16 on CPU is allowed (CPU autocast)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA H200")
    choice = choose_device("auto")
    assert (choice.device, choice.bf16, choice.name) == ("cuda", True, "cuda:0 NVIDIA H200")
    assert choose_device("cpu").device == "cpu"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert choose_device("cuda").bf16 is False
    with pytest.raises(PipelineError, match="train.bf16 is true but NVIDIA H200 has no bf16 support"):
        choose_device("cuda", bf16=True)


def test_empty_train_split_is_a_clear_error(workspace):
    from datasets import Dataset, load_from_disk

    tokenized_workspace(workspace)
    dataset = load_from_disk(str(TOKENIZED))
    features = dataset["train"].features
    dataset["train"] = Dataset.from_dict({name: [] for name in features}, features=features)
    dataset.save_to_disk(str(workspace / "empty"), num_shards={split: 1 for split in dataset})
    (TOKENIZED / "serialization.json").rename(workspace / "empty" / "serialization.json")
    shutil.rmtree(TOKENIZED)
    (workspace / "empty").rename(TOKENIZED)
    with pytest.raises(PipelineError, match="data/tokenized: the train split is empty"):
        train.main(make_tiny_params())


@pytest.mark.slow  # a subprocess start (imports, MLflow store) plus two trainings: ~25 s CPU, more when loaded
def test_resume_after_kill_continues_from_last_checkpoint(workspace):
    # Long enough (240 steps) that the kill lands mid-run; a checkpoint every 5 steps.
    params = tokenized_workspace(workspace, train={"epochs": 40, "eval_steps": 5, "max_train_minutes": 5.0,
                                                   "early_stopping_patience": 1000})
    (workspace / "params.yaml").write_text(yaml.safe_dump(params.model_dump(by_alias=True, mode="json")))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "pipelines.train"], cwd=workspace, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    checkpoint_dir = CHECKPOINTS / "teacher"
    try:
        deadline = time.monotonic() + 120
        while not list(checkpoint_dir.glob("checkpoint-*/trainer_state.json")):
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.2)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    assert not TEACHER.exists()
    first_run_id = json.loads((checkpoint_dir / train.RUN_STATE).read_text())["mlflow_run_id"]
    saved_steps = sorted(int(p.parent.name.split("-")[1]) for p in checkpoint_dir.glob("checkpoint-*/trainer_state.json"))

    # Same params except a short budget (not part of the resume fingerprint): resume, train a little, stop.
    train.main(params.model_copy(update={"train": params.train.model_copy(update={"max_train_minutes": 0.05})}))
    metrics = json.loads((METRICS / "train.json").read_text())
    assert metrics["resumed_from_step"] in saved_steps and metrics["resumed_from_step"] >= 5
    assert metrics["steps"] > metrics["resumed_from_step"]
    assert metrics["stopped_by"] == "time_budget"
    assert metrics["mlflow_run_id"] == first_run_id  # logging continued in the interrupted run
    with open(PLOTS / "train_curve.csv") as handle:
        steps = [int(r["step"]) for r in csv.DictReader(handle)]
    assert steps[0] == 1  # the curve includes the steps trained before the kill


@pytest.mark.slow
@pytest.mark.postgres
def test_tracking_against_mlflow_server_backed_by_postgres(workspace, mlflow_postgres_server):
    import psycopg2

    uri, database = mlflow_postgres_server
    params = tokenized_workspace(workspace)
    train.main(params)
    metrics = json.loads((METRICS / "train.json").read_text())
    assert metrics["mlflow_tracking_uri"] == uri
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(metrics["mlflow_run_id"])
    assert client.get_experiment(run.info.experiment_id).name == params.tracking.experiment
    assert run.info.status == "FINISHED"
    assert client.get_metric_history(run.info.run_id, "loss")
    assert "teacher/model.safetensors" in {a.path for a in client.list_artifacts(run.info.run_id, "teacher")}
    # The run really lives in PostgreSQL.
    with psycopg2.connect(host="127.0.0.1", user="postgres", dbname=database) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM runs WHERE run_uuid = %s", (run.info.run_id,))
        assert cur.fetchone()[0] == 1


@pytest.mark.slow  # ingest + validate (Great Expectations) + tokenize + train once per session
def test_trained_workspace_fixture_runs_ingest_to_train(trained_workspace):
    metrics = json.loads((trained_workspace / "metrics" / "train.json").read_text())
    assert metrics["steps"] > 0 and metrics["train_examples"] > 0
    assert (trained_workspace / "models" / "teacher" / "model.safetensors").is_file()
    assert load_config(trained_workspace / "models" / "teacher").model_base == "scratch"
