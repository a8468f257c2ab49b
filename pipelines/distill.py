"""Stage distill: models/teacher -> models/student, a smaller T5 (`distill.student`, same tokenizer) trained
by knowledge distillation with the same Seq2SeqTrainer machinery as train (progress, checkpoints in
checkpoints/student resumed after an interruption, dev evaluation, early stopping, wall-clock budget, MLflow).

Loss per target token: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy(gold), where
X_T = softmax(logits / T) (Hinton et al. 2015; T^2 keeps the soft-target gradients on the scale of the hard
ones). The teacher runs in eval mode without gradients. With `sequence_level`, the teacher's top beam for
each training input is added as an extra target where it differs from the gold SQL (Kim & Rush 2016).

Writes models/student/ (model + tokenizer + serialization.json) and metrics/distill.json comparing student
and teacher: parameters, weight file size, greedy dev execution accuracy, batch-1 greedy latency. The
trainer mechanics it shares with train (weight decay, warmup, scheduler, eval/save interval, early-stopping
patience, kept checkpoints, device, bf16) are read from the `train` section."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import statistics
import time
from pathlib import Path

import mlflow
import torch
import torch.nn.functional as F
from transformers import (
    DataCollatorForSeq2Seq,
    EarlyStoppingCallback,
    Seq2SeqTrainer,
    T5Config,
    T5ForConditionalGeneration,
    set_seed,
)

from pipelines.common import tracking
from pipelines.common.cli import run_stage
from pipelines.common.databases import mask_url
from pipelines.common.device import choose_device
from pipelines.common.devset import execution_accuracy, load_split
from pipelines.common.errors import PipelineError
from pipelines.common.generate import generate
from pipelines.common.io import atomic_dir, write_json, write_text
from pipelines.common.model_io import check_model_dir, load_for_generation
from pipelines.common.params import Params
from pipelines.common.paths import CHECKPOINTS, METRICS, PLOTS, STUDENT, TEACHER
from pipelines.common.serialize import save_config, serialize_target
from pipelines.train import (
    RUN_STATE,
    MlflowMetricsCallback,
    TimeBudgetCallback,
    load_inputs,
    loss_curve_csv,
    prepare_checkpoints,
    stop_reason,
    trainer_state_step,
    training_arguments,
)

log = logging.getLogger(__name__)

CHECKPOINT_DIR = CHECKPOINTS / "student"
DISTILL_METRICS = METRICS / "distill.json"
DISTILL_CURVE = PLOTS / "distill_curve.csv"
# Dev examples timed one at a time for the latency comparison (the median is reported).
LATENCY_EXAMPLES = 16


class DistillationTrainer(Seq2SeqTrainer):
    """Seq2SeqTrainer whose loss mixes the teacher's soft targets with the gold cross-entropy."""

    def __init__(self, *args, teacher: torch.nn.Module, temperature: float, alpha: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.to(self.args.device).eval()
        self.teacher.requires_grad_(False)
        self.temperature = temperature
        self.alpha = alpha
        # The loss below is already a per-token mean; the Trainer must not rescale it by the token count.
        self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        with torch.no_grad():
            teacher_logits = self.teacher(**inputs).logits
        target_tokens = inputs["labels"] != -100  # padding positions carry no target
        t = self.temperature
        student_log_probs = F.log_softmax(outputs.logits[target_tokens].float() / t, dim=-1)
        teacher_log_probs = F.log_softmax(teacher_logits[target_tokens].float() / t, dim=-1)
        # kl_div(input=log q_student, target=log p_teacher) = KL(p_teacher || q_student), averaged per token.
        soft = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="batchmean") * t * t
        loss = self.alpha * soft + (1 - self.alpha) * outputs.loss
        return (loss, outputs) if return_outputs else loss


def build_student(params: Params, teacher_config) -> T5ForConditionalGeneration:
    """A fresh T5 sized by distill.student, sharing the teacher's vocabulary and special tokens."""
    config = T5Config(
        **params.distill.student.model_dump(),
        vocab_size=teacher_config.vocab_size,
        pad_token_id=teacher_config.pad_token_id,
        eos_token_id=teacher_config.eos_token_id,
        decoder_start_token_id=teacher_config.decoder_start_token_id,
    )
    return T5ForConditionalGeneration(config)


def with_teacher_sequences(train, teacher, tokenizer, beams: int, serialization):
    """The train split plus, for each input whose teacher top beam differs from the gold SQL, that beam as
    an extra target (sequence-level distillation)."""
    from datasets import concatenate_datasets

    inputs = tokenizer.batch_decode(train["input_ids"], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    gold = tokenizer.batch_decode(train["labels"], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    log.info("sequence-level distillation: teacher beam search (beams=%d) on %d train inputs", beams, len(inputs))
    beams_out = generate(teacher, tokenizer, inputs, num_beams=beams, max_new_tokens=serialization.max_target_length,
                         max_source_length=serialization.max_source_length, progress=True)
    # generate() tidies its output; serialize_target spells it again as the training targets are spelled.
    teacher_sql = [serialize_target(out[0], serialization.serialization) for out in beams_out]
    differs = [i for i, (out, ref) in enumerate(zip(teacher_sql, gold)) if out != ref.strip()]
    log.info("teacher output differs from gold on %d/%d train inputs; added as extra targets", len(differs), len(gold))
    if not differs:
        return train
    labels = tokenizer(text_target=[teacher_sql[i] for i in differs], max_length=serialization.max_target_length,
                       truncation=True).input_ids
    extra = train.select(differs).remove_columns("labels").add_column("labels", labels)
    return concatenate_datasets([train, extra.cast(train.features)])


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_files(model_dir: Path) -> list[Path]:
    return sorted(p for pattern in ("*.safetensors", "*.bin") for p in model_dir.glob(pattern))


def run_fingerprint(params: Params, dataset) -> str:
    """What the student's checkpoints depend on (not the time budget or the device)."""
    key = {
        "seed": params.seed,
        "distill": params.distill.model_dump(exclude={"max_train_minutes"}),
        "trainer": params.train.model_dump(include={"weight_decay", "warmup_ratio", "lr_scheduler", "eval_steps"}),
        "teacher": [file_sha256(p) for p in weights_files(TEACHER)],
        "data": {split: dataset[split]._fingerprint for split in dataset},
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def median_latency_ms(model, tokenizer, inputs: list[str], lengths: dict) -> float:
    """Median wall time of greedy generation for one input at a time (batch 1), after one warm-up call."""
    generate(model, tokenizer, inputs[:1], **lengths)
    timings = []
    for text in inputs:
        started = time.perf_counter()
        generate(model, tokenizer, [text], progress=False, **lengths)
        timings.append((time.perf_counter() - started) * 1000)
    return statistics.median(timings)


def compare(student, teacher, tokenizer, serialization, params: Params) -> dict:
    """Student vs teacher on the dev split: size, greedy execution accuracy, batch-1 latency
    (generation length and SQL limits as in the evaluate section)."""
    dev = load_split(tokenizer, "dev")
    scoring = dict(timeout_s=params.evaluate.sql_timeout_s, max_rows=params.evaluate.max_rows)
    lengths = dict(max_new_tokens=params.evaluate.max_new_tokens, max_source_length=serialization.max_source_length)
    result = {}
    for name, model, model_dir in (("teacher", teacher, TEACHER), ("student", student, STUDENT)):
        model.eval()
        log.info("%s: greedy generation on %d dev examples", name, len(dev))
        predictions = [c[0] for c in generate(model, tokenizer, dev.inputs, num_beams=1, **lengths)]
        result[name] = {
            "parameters": model.num_parameters(),
            "weights_bytes": sum(p.stat().st_size for p in weights_files(model_dir)),
            **{f"dev_{k}": v for k, v in execution_accuracy(predictions, dev, **scoring).items()},
            "latency_ms_batch1_p50": round(median_latency_ms(model, tokenizer, dev.inputs[:LATENCY_EXAMPLES],
                                                             lengths), 2),
        }
    teacher_ex = result["teacher"]["dev_ex"]
    result["ratios"] = {
        "parameters": result["student"]["parameters"] / result["teacher"]["parameters"],
        "weights_bytes": result["student"]["weights_bytes"] / result["teacher"]["weights_bytes"],
        "dev_ex": result["student"]["dev_ex"] / teacher_ex if teacher_ex else None,
        "latency": result["student"]["latency_ms_batch1_p50"] / result["teacher"]["latency_ms_batch1_p50"],
    }
    return result


def main(params: Params) -> dict:
    cfg = params.distill
    choice = choose_device(params.train.device, params.train.bf16)
    check_model_dir(TEACHER)
    tokenizer, dataset, serialization = load_inputs(params)
    teacher, _, teacher_serialization = load_for_generation(TEACHER, device=choice.device)
    if teacher_serialization != serialization:
        raise PipelineError(f"{TEACHER}/serialization.json differs from the tokenized data's; re-run train")
    set_seed(params.seed)
    student = build_student(params, teacher.config)
    student.generation_config.max_length = serialization.max_target_length
    has_dev = dataset["dev"].num_rows > 0
    log.info("student T5 %.2fM parameters (teacher %.2fM); %d train / %d dev examples",
             student.num_parameters() / 1e6, teacher.num_parameters() / 1e6,
             dataset["train"].num_rows, dataset["dev"].num_rows)

    train_set = dataset["train"]
    if cfg.sequence_level:
        train_set = with_teacher_sequences(train_set, teacher, tokenizer, cfg.sequence_level_beams, serialization)

    fingerprint = run_fingerprint(params, dataset)
    resume_from, resume_run_id = prepare_checkpoints(fingerprint, CHECKPOINT_DIR)
    arguments = training_arguments(
        params, CHECKPOINT_DIR, choice, has_dev, batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
        epochs=cfg.epochs, prediction_loss_only=True,  # dev loss is all early stopping needs; no logits kept
    )
    budget = TimeBudgetCallback(cfg.max_train_minutes, evaluate=has_dev)
    callbacks = [budget, MlflowMetricsCallback()]
    if has_dev:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=params.train.early_stopping_patience))
    trainer = DistillationTrainer(
        model=student,
        args=arguments,
        train_dataset=train_set,
        eval_dataset=dataset["dev"] if has_dev else None,
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=student, label_pad_token_id=-100),
        processing_class=tokenizer,
        callbacks=callbacks,
        teacher=teacher,
        temperature=cfg.temperature,
        alpha=cfg.alpha,
    )

    tracking_uri = tracking.configure(params.tracking)
    with tracking.start_run("distill-student", resume_run_id=resume_run_id) as run:
        write_json(CHECKPOINT_DIR / RUN_STATE, {"fingerprint": fingerprint, "mlflow_run_id": run.info.run_id})
        if resume_from is None:
            mlflow.log_params(tracking.flatten({
                "seed": params.seed, "distill": cfg.model_dump(), "device": choice.name, "bf16": choice.bf16,
                "student_parameters": student.num_parameters(), "teacher_parameters": teacher.num_parameters(),
                "train_examples": train_set.num_rows, "dev_examples": dataset["dev"].num_rows,
            }))
        resumed_from_step = trainer_state_step(resume_from)
        result = trainer.train(resume_from_checkpoint=resume_from)
        state = trainer.state
        dev_loss = trainer.evaluate().get("eval_loss") if has_dev else None

        with atomic_dir(STUDENT) as tmp:
            trainer.save_model(str(tmp))
            tokenizer.save_pretrained(str(tmp))
            save_config(tmp, serialization)

        comparison = compare(trainer.model, teacher, tokenizer, serialization, params) if has_dev else {}
        stopped_by = stop_reason(budget, state)
        metrics = {
            "mlflow_run_id": run.info.run_id,
            "mlflow_tracking_uri": mask_url(tracking_uri),
            "device": choice.name,
            "steps": state.global_step,
            "max_steps": state.max_steps,
            "resumed_from_step": resumed_from_step,
            "stopped_by": stopped_by,
            "train_examples": train_set.num_rows,
            "final_dev_loss": dev_loss,
            "best_dev_loss": state.best_metric,
            "wall_time_s": round(result.metrics["train_runtime"], 2),
            **comparison,
        }
        write_json(DISTILL_METRICS, metrics)
        write_text(DISTILL_CURVE, loss_curve_csv(state.log_history))
        mlflow.log_metrics({f"{group}_{name}": float(value) for group, values in comparison.items()
                            for name, value in values.items() if isinstance(value, (int, float))}
                           | {"final_steps": float(state.global_step)})
        mlflow.set_tags({"stage": "distill", "stopped_by": stopped_by})
        tracking.log_model_dir(STUDENT, "student")
        mlflow.log_artifact(str(DISTILL_METRICS))
    shutil.rmtree(CHECKPOINT_DIR, ignore_errors=True)
    if comparison:
        log.info("student: %.1f%% of teacher parameters, dev EX %.4f vs teacher %.4f, latency %.1f vs %.1f ms",
                 100 * comparison["ratios"]["parameters"], comparison["student"]["dev_ex"],
                 comparison["teacher"]["dev_ex"], comparison["student"]["latency_ms_batch1_p50"],
                 comparison["teacher"]["latency_ms_batch1_p50"])
    return metrics


if __name__ == "__main__":
    run_stage(main)
