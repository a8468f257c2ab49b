"""Distillation: the loss is the documented mix of soft targets and gold cross-entropy, the stage writes a
complete student with its comparison metrics and MLflow run, sequence-level targets come from the teacher."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import Seq2SeqTrainingArguments, T5Config, T5ForConditionalGeneration

from conftest import make_tiny_params
from pipelines import distill
from pipelines.common.errors import PipelineError
from pipelines.common.io import read_json
from pipelines.common.model_io import check_model_dir, load_for_generation

TINY = dict(vocab_size=50, d_model=16, d_ff=32, d_kv=8, num_heads=2, num_layers=1, num_decoder_layers=1,
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, dropout_rate=0.0)


def tiny_t5(seed: int) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(T5Config(**TINY)).eval()


def loss_of(student, teacher, inputs, alpha: float, temperature: float, tmp_path: Path) -> torch.Tensor:
    arguments = Seq2SeqTrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True)
    trainer = distill.DistillationTrainer(model=student, args=arguments, teacher=teacher,
                                          temperature=temperature, alpha=alpha)
    with torch.no_grad():
        return trainer.compute_loss(student, dict(inputs))


@pytest.fixture
def batch():
    labels = torch.tensor([[5, 6, 7, 1], [8, 9, 1, -100]])  # second target padded
    return {"input_ids": torch.tensor([[3, 4, 5, 1], [6, 7, 1, 0]]),
            "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]), "labels": labels}


def test_distillation_loss_is_soft_kl_plus_gold_cross_entropy(batch, tmp_path):
    student, teacher = tiny_t5(0), tiny_t5(1)
    temperature, alpha = 2.0, 0.3
    with torch.no_grad():
        student_out = student(**batch)
        teacher_logits = teacher(**batch).logits
    mask = batch["labels"] != -100
    p_teacher = F.softmax(teacher_logits[mask] / temperature, dim=-1)
    log_q_student = F.log_softmax(student_out.logits[mask] / temperature, dim=-1)
    # KL(teacher || student) per target token, averaged over the 7 real target tokens.
    kl = (p_teacher * (p_teacher.log() - log_q_student)).sum(-1).mean()
    expected = alpha * temperature**2 * kl + (1 - alpha) * student_out.loss

    got = loss_of(student, teacher, batch, alpha, temperature, tmp_path)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    # alpha = 0 is plain fine-tuning on the gold SQL.
    assert loss_of(student, teacher, batch, 0.0, temperature, tmp_path).item() == pytest.approx(
        student_out.loss.item(), rel=1e-6)
    # A student identical to its teacher has nothing left to learn from the soft targets.
    assert loss_of(student, copy.deepcopy(student), batch, 1.0, temperature, tmp_path).item() == pytest.approx(
        0.0, abs=1e-6)


def test_teacher_gets_no_gradient(batch, tmp_path):
    student, teacher = tiny_t5(0), tiny_t5(1)
    arguments = Seq2SeqTrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True)
    trainer = distill.DistillationTrainer(model=student, args=arguments, teacher=teacher, temperature=2.0, alpha=0.5)
    trainer.compute_loss(student.train(), dict(batch)).backward()
    assert not teacher.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert any(p.grad is not None for p in student.parameters())


def test_distill_stage_writes_student_and_comparison(exported_workspace, monkeypatch):
    import mlflow

    monkeypatch.chdir(exported_workspace)
    check_model_dir("models/student")
    student, _, _ = load_for_generation("models/student", device="cpu")
    tiny = make_tiny_params().distill.student
    assert (student.config.d_model, student.config.num_layers, student.config.num_heads) == (
        tiny.d_model, tiny.num_layers, tiny.num_heads)

    metrics = read_json("metrics/distill.json")
    for model in ("student", "teacher"):
        assert {"parameters", "weights_bytes", "dev_ex", "latency_ms_batch1_p50"} <= set(metrics[model])
        assert 0.0 <= metrics[model]["dev_ex"] <= 1.0
    assert metrics["student"]["parameters"] == student.num_parameters()
    assert metrics["ratios"]["parameters"] == pytest.approx(
        metrics["student"]["parameters"] / metrics["teacher"]["parameters"])
    assert metrics["steps"] > 0 and metrics["stopped_by"] in ("epochs", "early_stopping", "time_budget")
    assert Path("plots/distill_curve.csv").read_text().startswith("step,train_loss,dev_loss")
    assert not Path("checkpoints/student").exists()

    mlflow.set_tracking_uri(f"sqlite:///{exported_workspace / 'mlflow.db'}")
    run = mlflow.get_run(metrics["mlflow_run_id"])
    assert run.data.tags["stage"] == "distill"
    assert run.info.artifact_uri.startswith(str(exported_workspace)), "the copied store must log into the copy"
    assert "student_dev_ex" in run.data.metrics and "loss" in run.data.metrics
    assert run.data.params["distill.temperature"] == "2.0"


def test_sequence_level_adds_teacher_outputs_as_targets(trained_workspace, monkeypatch):
    from datasets import load_from_disk

    from pipelines.common.serialize import load_config

    monkeypatch.chdir(trained_workspace)
    teacher, tokenizer, serialization = load_for_generation("models/teacher", device="cpu")
    train = load_from_disk("data/tokenized")["train"].select(range(4))
    extended = distill.with_teacher_sequences(train, teacher, tokenizer, beams=2,
                                              serialization=load_config("data/tokenized"))
    added = extended.num_rows - train.num_rows
    assert 0 <= added <= train.num_rows
    assert extended.features == train.features
    gold = tokenizer.batch_decode(train["labels"], skip_special_tokens=True)
    for row in extended.select(range(train.num_rows, extended.num_rows)):
        original = train["example_id"].index(row["example_id"])
        target = tokenizer.decode(row["labels"], skip_special_tokens=True).strip()
        assert row["input_ids"] == train[original]["input_ids"]
        assert target != gold[original].strip()


def test_missing_teacher_is_reported(workspace):
    with pytest.raises(PipelineError, match=r"models/teacher: model directory not found"):
        distill.main(make_tiny_params())

