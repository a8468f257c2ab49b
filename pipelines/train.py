"""Stage train: fine-tune (or train from scratch) the T5 teacher on data/tokenized with the HF Seq2SeqTrainer.

Periodic dev evaluation with early stopping on dev loss, checkpoints in checkpoints/teacher (resumed
automatically after an interruption), a wall-clock budget, MLflow tracking. Writes models/teacher/
(model + tokenizer + serialization.json), metrics/train.json and plots/train_curve.csv."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import shutil
import time
from pathlib import Path

import mlflow
from transformers import (
    AutoConfig,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    EarlyStoppingCallback,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    T5Config,
    T5ForConditionalGeneration,
    TrainerCallback,
    set_seed,
)

from pipelines.common import tracking
from pipelines.common.cli import run_stage
from pipelines.common.databases import mask_url
from pipelines.common.device import choose_device
from pipelines.common.errors import PipelineError
from pipelines.common.io import atomic_dir, read_json, write_json, write_text
from pipelines.common.params import Params
from pipelines.common.paths import CHECKPOINTS, METRICS, PLOTS, TEACHER, TOKENIZED, TOKENIZER
from pipelines.common.serialize import load_config, save_config

log = logging.getLogger(__name__)

CHECKPOINT_DIR = CHECKPOINTS / "teacher"
RUN_STATE = "run_state.json"  # in the checkpoint dir: what the checkpoints belong to, and their MLflow run


# --- callbacks shared with distill ----------------------------------------------------------------


class TimeBudgetCallback(TrainerCallback):
    """Stops training cleanly (evaluate, save, return) once `minutes` of wall-clock time are spent.
    The budget counts from the start of this process's training, so a resumed run gets a fresh budget."""

    def __init__(self, minutes: float | None, evaluate: bool):
        self.seconds = None if minutes is None else minutes * 60
        self.evaluate = evaluate
        self.started = 0.0
        self.fired = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if self.seconds is not None and not self.fired and time.monotonic() - self.started >= self.seconds:
            log.info("wall-clock budget of %.1f min spent at step %d; stopping", self.seconds / 60, state.global_step)
            self.fired = True
            control.should_training_stop = True
            control.should_save = True
            control.should_evaluate = self.evaluate
        return control


class MlflowMetricsCallback(TrainerCallback):
    """Every Trainer log record (loss, learning_rate, grad_norm, eval_loss, ...) as MLflow metrics by step;
    also sums evaluation time so throughput can be reported for training alone."""

    def __init__(self):
        self.eval_seconds = 0.0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            tracking.log_step_metrics(logs, state.global_step)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.eval_seconds += float((metrics or {}).get("eval_runtime", 0.0))


def loss_curve_csv(log_history: list[dict]) -> str:
    """plots/train_curve.csv from the Trainer's log history: one row per logged step, blanks where unmeasured."""
    rows: dict[int, dict] = {}
    for record in log_history:
        step = int(record.get("step", 0))
        if "loss" in record:
            rows.setdefault(step, {})["train_loss"] = record["loss"]
        if "eval_loss" in record:
            rows.setdefault(step, {})["dev_loss"] = record["eval_loss"]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["step", "train_loss", "dev_loss"], lineterminator="\n")
    writer.writeheader()
    for step in sorted(rows):
        writer.writerow({"step": step, **{k: f"{v:.6f}" for k, v in rows[step].items()}})
    return out.getvalue()


def training_arguments(params: Params, output_dir: Path, choice, has_dev: bool, *, batch_size: int,
                       learning_rate: float, epochs: float, **extra) -> Seq2SeqTrainingArguments:
    """Trainer settings shared by the teacher and the student: schedule, periodic dev evaluation with early
    stopping on dev loss, checkpoints, seeding and device come from the `train` section."""
    mechanics = params.train
    return Seq2SeqTrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size * 2,
        learning_rate=learning_rate,
        weight_decay=mechanics.weight_decay,
        warmup_ratio=mechanics.warmup_ratio,
        lr_scheduler_type=mechanics.lr_scheduler,
        optim=mechanics.optimizer,
        num_train_epochs=epochs,
        group_by_length=True,  # batches of similar length: far less padding on long schemas
        eval_strategy="steps" if has_dev else "no",
        eval_steps=mechanics.eval_steps,
        save_strategy="steps",
        save_steps=mechanics.eval_steps,
        save_total_limit=mechanics.save_total_limit,
        load_best_model_at_end=has_dev,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        logging_steps=max(1, mechanics.eval_steps // 5),
        logging_first_step=True,
        seed=params.seed,
        data_seed=params.seed,
        bf16=choice.bf16,
        use_cpu=choice.device == "cpu",
        report_to="none",  # MLflow is logged by MlflowMetricsCallback into the run the stage owns
        dataloader_num_workers=0,
        disable_tqdm=False,
        save_safetensors=True,
        **extra,
    )


def stop_reason(budget: TimeBudgetCallback, state) -> str:
    """Why a Trainer run ended: its wall-clock budget, early stopping, or all its epochs done."""
    if budget.fired:
        return "time_budget"
    if state.global_step < state.max_steps:
        return "early_stopping"
    return "epochs"


def examples_in_steps(first_step: int, last_step: int, n_examples: int, batch_size: int) -> int:
    """Training examples processed by optimizer steps first_step+1..last_step (the last batch of an epoch is short)."""
    steps_per_epoch = math.ceil(n_examples / batch_size)
    last_batch = n_examples - (steps_per_epoch - 1) * batch_size
    total = 0
    for step in range(first_step + 1, last_step + 1):
        total += last_batch if step % steps_per_epoch == 0 else batch_size
    return total


# --- inputs and model ---------------------------------------------------------------------------


def load_inputs(params: Params):
    from datasets import load_from_disk

    if not (TOKENIZER / "tokenizer_config.json").is_file():
        raise PipelineError(f"{TOKENIZER}: tokenizer not found (run the tokenize stage first)")
    if not (TOKENIZED / "dataset_dict.json").is_file():
        raise PipelineError(f"{TOKENIZED}: tokenized dataset not found (run the tokenize stage first)")
    config = load_config(TOKENIZED)
    if config.model_base != params.model.base:
        raise PipelineError(
            f"{TOKENIZED}/serialization.json: tokenized for model.base {config.model_base!r} but params.yaml "
            f"has model.base {params.model.base!r}; re-run the tokenize stage"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    dataset = load_from_disk(str(TOKENIZED))
    for split in ("train", "dev"):
        if split not in dataset:
            raise PipelineError(f"{TOKENIZED}: no {split!r} split")
    if dataset["train"].num_rows == 0:
        raise PipelineError(f"{TOKENIZED}: the train split is empty")
    return tokenizer, dataset, config


def build_model(params: Params, tokenizer) -> T5ForConditionalGeneration:
    """A fresh T5 sized by train.t5 (scratch) or the base checkpoint, checked against the tokenizer."""
    if params.model.base == "scratch":
        config = T5Config(
            **params.train.t5.model_dump(),
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
        return T5ForConditionalGeneration(config)
    base = params.model.base
    try:
        config = AutoConfig.from_pretrained(base, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise PipelineError(
            f"params.yaml: model.base {base!r} is neither a local checkpoint directory nor in the local "
            f"Hugging Face cache (no network here): {str(exc).splitlines()[0]}"
        ) from exc
    if config.model_type not in ("t5", "mt5"):
        raise PipelineError(f"model.base {base!r}: a {config.model_type!r} checkpoint, expected a T5 one")
    problems = []
    # tokenizer.vocab_size excludes tokens added by tokenize (fresh rows are appended below for those).
    if tokenizer.vocab_size > config.vocab_size:
        problems.append(f"tokenizer has {tokenizer.vocab_size} base tokens, the model embeds {config.vocab_size}")
    for name in ("pad_token_id", "eos_token_id"):
        if getattr(tokenizer, name) != getattr(config, name):
            problems.append(f"{name}: tokenizer {getattr(tokenizer, name)} != model {getattr(config, name)}")
    if problems:
        raise PipelineError(
            f"{TOKENIZER} does not match model.base {base!r} ({'; '.join(problems)}); "
            "re-run the tokenize stage with the same model.base"
        )
    model = T5ForConditionalGeneration.from_pretrained(base, local_files_only=True)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        log.info("resizing embeddings %d -> %d for added tokens", model.get_input_embeddings().num_embeddings,
                 len(tokenizer))
        model.resize_token_embeddings(len(tokenizer))
    return model


def run_fingerprint(params: Params, dataset) -> str:
    """What the checkpoints depend on; the time budget and device may change between a crash and a resume."""
    train = params.train.model_dump(exclude={"max_train_minutes", "device", "bf16"})
    key = {"seed": params.seed, "base": params.model.base, "train": train,
           "data": {split: dataset[split]._fingerprint for split in dataset}}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def last_complete_checkpoint(directory: Path) -> str | None:
    """The newest checkpoint-<step> whose save finished (a kill during a save leaves a partial folder that
    the Trainer's own get_last_checkpoint would pick and then fail to load)."""
    candidates = sorted(
        (p for p in directory.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
        reverse=True,
    )
    for checkpoint in candidates:
        if all((checkpoint / name).is_file() for name in ("trainer_state.json", "model.safetensors", "optimizer.pt")):
            return str(checkpoint)
        log.warning("ignoring incomplete checkpoint %s", checkpoint)
    return None


def prepare_checkpoints(fingerprint: str, checkpoint_dir: Path = CHECKPOINT_DIR) -> tuple[str | None, str | None]:
    """(last checkpoint to resume from, its MLflow run id); stale checkpoints of other params are removed.
    `checkpoint_dir`: distill keeps the student's checkpoints apart from the teacher's."""
    state_file = checkpoint_dir / RUN_STATE
    if not state_file.is_file():
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
        return None, None
    state = read_json(state_file)
    if state.get("fingerprint") != fingerprint:
        log.warning("%s holds checkpoints of different params or data; starting over", checkpoint_dir)
        shutil.rmtree(checkpoint_dir)
        return None, None
    last = last_complete_checkpoint(checkpoint_dir)
    if last:
        log.info("resuming from %s", last)
    return last, state.get("mlflow_run_id")


# --- stage -----------------------------------------------------------------------------------------


def main(params: Params) -> None:
    choice = choose_device(params.train.device, params.train.bf16)
    tokenizer, dataset, serialization = load_inputs(params)
    tracking_uri = tracking.configure(params.tracking)
    set_seed(params.seed)
    model = build_model(params, tokenizer)
    model.generation_config.max_length = serialization.max_target_length
    n_parameters = sum(p.numel() for p in model.parameters())
    has_dev = dataset["dev"].num_rows > 0
    if not has_dev:
        log.warning("%s: dev split is empty; no periodic evaluation or early stopping", TOKENIZED)
    log.info("T5 with %.2fM parameters; %d train / %d dev examples", n_parameters / 1e6,
             dataset["train"].num_rows, dataset["dev"].num_rows)

    fingerprint = run_fingerprint(params, dataset)
    resume_from, resume_run_id = prepare_checkpoints(fingerprint)
    cfg = params.train
    arguments = training_arguments(params, CHECKPOINT_DIR, choice, has_dev, batch_size=cfg.batch_size,
                                   learning_rate=cfg.learning_rate, epochs=cfg.epochs,
                                   label_smoothing_factor=cfg.label_smoothing)
    budget = TimeBudgetCallback(cfg.max_train_minutes, evaluate=has_dev)
    metrics_callback = MlflowMetricsCallback()
    callbacks = [budget, metrics_callback]
    if has_dev:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
    trainer = Seq2SeqTrainer(
        model=model,
        args=arguments,
        train_dataset=dataset["train"],
        eval_dataset=dataset["dev"] if has_dev else None,
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100),
        processing_class=tokenizer,
        callbacks=callbacks,
    )

    with tracking.start_run("train-teacher", resume_run_id=resume_run_id) as run:
        write_json(CHECKPOINT_DIR / RUN_STATE, {"fingerprint": fingerprint, "mlflow_run_id": run.info.run_id})
        if run.info.run_id != resume_run_id:  # a new run (a resumed one has its params already)
            mlflow.log_params(tracking.flatten({
                "seed": params.seed, "model": params.model.model_dump(), "tokenize": params.tokenize.model_dump(),
                "train": cfg.model_dump(), "n_parameters": n_parameters, "device": choice.name, "bf16": choice.bf16,
                "train_examples": dataset["train"].num_rows, "dev_examples": dataset["dev"].num_rows,
            }))
        resumed_from_step = trainer_state_step(resume_from)
        result = trainer.train(resume_from_checkpoint=resume_from)
        state = trainer.state
        # Throughput of training alone: the periodic evaluations inside train() are subtracted.
        train_seconds = max(result.metrics["train_runtime"] - metrics_callback.eval_seconds, 1e-9)
        # With load_best_model_at_end the saved model is the best evaluated one: its dev loss is best_metric.
        # Only a run too short to reach its first evaluation needs one more pass over dev.
        dev_loss = state.best_metric
        if has_dev and dev_loss is None:
            dev_loss = trainer.evaluate()["eval_loss"]

        with atomic_dir(TEACHER) as tmp:
            trainer.save_model(str(tmp))
            tokenizer.save_pretrained(str(tmp))
            save_config(tmp, serialization)

        seen = examples_in_steps(resumed_from_step, state.global_step, dataset["train"].num_rows,
                                 cfg.batch_size * max(1, arguments.n_gpu))
        train_losses = [r["loss"] for r in state.log_history if "loss" in r]
        stopped_by = stop_reason(budget, state)
        metrics = {
            "mlflow_run_id": run.info.run_id,
            "mlflow_tracking_uri": mask_url(tracking_uri),
            "device": choice.name,
            "bf16": choice.bf16,
            "n_parameters": n_parameters,
            "train_examples": dataset["train"].num_rows,
            "dev_examples": dataset["dev"].num_rows,
            "steps": state.global_step,
            "max_steps": state.max_steps,
            "epochs": round(float(state.epoch or 0.0), 4),
            "resumed_from_step": resumed_from_step,
            "stopped_by": stopped_by,
            "final_train_loss": train_losses[-1] if train_losses else None,
            "final_dev_loss": dev_loss,
            "best_dev_loss": state.best_metric,
            "examples_per_s": round(seen / train_seconds, 2),
            "train_time_s": round(train_seconds, 2),
            "wall_time_s": round(result.metrics["train_runtime"], 2),
        }
        write_json(METRICS / "train.json", metrics)
        write_text(PLOTS / "train_curve.csv", loss_curve_csv(state.log_history))
        summary = ("final_train_loss", "final_dev_loss", "best_dev_loss", "examples_per_s", "train_time_s", "steps")
        mlflow.log_metrics({k: float(metrics[k]) for k in summary if metrics[k] is not None})
        mlflow.set_tags({"stage": "train", "stopped_by": stopped_by})
        tracking.log_model_dir(TEACHER, "teacher")
        mlflow.log_artifact(str(METRICS / "train.json"))
        mlflow.log_artifact(str(PLOTS / "train_curve.csv"))
    # The teacher is saved: the checkpoints only served a possible resume.
    shutil.rmtree(CHECKPOINT_DIR, ignore_errors=True)
    log.info("teacher saved to %s: %d steps (%s), dev loss %s, %.1f examples/s on %s", TEACHER, state.global_step,
             stopped_by, metrics["final_dev_loss"], metrics["examples_per_s"], choice.name)


def trainer_state_step(checkpoint: str | None) -> int:
    if checkpoint is None:
        return 0
    return int(json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"])


if __name__ == "__main__":
    run_stage(main)
