"""Promote stage: register the exported ONNX model as a new version of `promote.model_name` in the
MLflow registry and decide which alias it takes.

Gate: the new version takes `champion` when its `promote.metric` >= the current champion's value minus
`promote.margin` (the first version always does); otherwise it takes `challenger` and the reason is
recorded as a tag. Versions are never deleted. The decision is written to metrics/promote.json."""

from __future__ import annotations

import hashlib
import logging
import math
import subprocess
from pathlib import Path

import mlflow
import yaml
from mlflow import MlflowClient

from pipelines.common import paths
from pipelines.common.cli import run_stage
from pipelines.common.errors import PipelineError
from pipelines.common.io import read_json, write_json
from pipelines.common.params import PARAMS_FILE, Params
from pipelines.common.tracking import (
    CHALLENGER,
    CHAMPION,
    SERVING_MANIFEST,
    configure,
    ensure_registered_model,
    flatten,
    start_run,
    version_by_alias,
)

log = logging.getLogger(__name__)

EVAL_METRICS = paths.METRICS / "eval.json"
PROMOTE_METRICS = paths.METRICS / "promote.json"
DVC_LOCK = Path("dvc.lock")
# The ONNX variant the service loads, by preference; evaluate.model names the one that was measured.
VARIANT_BY_EVALUATED_MODEL = {"onnx-int8": "int8", "onnx-fp32": "fp32"}


def _served_variant(params: Params) -> str:
    """The export directory (under models/onnx) that was evaluated, hence the one worth serving."""
    preferred = VARIANT_BY_EVALUATED_MODEL.get(params.evaluate.model, "int8")
    for variant in (preferred, "int8", "fp32"):
        if (paths.ONNX / variant / paths.SERIALIZATION_FILE).is_file():
            return variant
    raise PipelineError(
        f"{paths.ONNX}: no exported model found (expected {paths.ONNX_INT8} or {paths.ONNX_FP32} "
        f"with {paths.SERIALIZATION_FILE}); run the export stage first"
    )


def _read_metric(params: Params) -> tuple[dict[str, float], float]:
    metrics = read_json(EVAL_METRICS)
    if not isinstance(metrics, dict):
        raise PipelineError(f"{EVAL_METRICS}: expected a JSON object of metric name -> value")
    name = params.promote.metric
    value = metrics.get(name)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise PipelineError(
            f"{EVAL_METRICS}: key {name!r} (params.yaml promote.metric) is missing or not a finite number; "
            f"numeric keys present: {sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))}"
        )
    numeric = {
        k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    return numeric, float(value)


def _git_commit() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def _dvc_hashes() -> dict[str, str]:
    """md5 of every data/ and models/ output recorded in dvc.lock: which data built this model."""
    if not DVC_LOCK.is_file():
        return {}
    try:
        lock = yaml.safe_load(DVC_LOCK.read_text()) or {}
    except yaml.YAMLError as exc:
        raise PipelineError(f"{DVC_LOCK}: not valid YAML: {exc}") from exc
    hashes = {}
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            path, md5 = out.get("path", ""), out.get("md5")
            if md5 and path.startswith(("data/", "models/")):
                hashes["dvc_md5." + path.strip("/").replace("/", ".")] = md5
    return hashes


def _params_sha256() -> str:
    return hashlib.sha256(PARAMS_FILE.read_bytes()).hexdigest() if PARAMS_FILE.is_file() else "defaults"


def _decide(
    client: MlflowClient, params: Params, new_value: float
) -> tuple[str, str, str | None]:
    """(alias, reason, previous champion version) for a new version scoring `new_value`."""
    name, metric, margin = params.promote.model_name, params.promote.metric, params.promote.margin
    champion = version_by_alias(client, name, CHAMPION)
    if champion is None:
        return CHAMPION, f"first version of {name}: no champion yet", None
    champion_value = client.get_run(champion.run_id).data.metrics.get(metric) if champion.run_id else None
    if champion_value is None:
        return (
            CHAMPION,
            f"champion v{champion.version} has no {metric} recorded; replaced",
            champion.version,
        )
    if new_value >= champion_value - margin:
        return (
            CHAMPION,
            f"{metric} {new_value:.4f} >= champion v{champion.version} {champion_value:.4f} - margin {margin}",
            champion.version,
        )
    return (
        CHALLENGER,
        f"{metric} {new_value:.4f} < champion v{champion.version} {champion_value:.4f} - margin {margin}",
        champion.version,
    )


def main(params: Params) -> dict:
    # Every input check before the (slow) upload.
    variant = _served_variant(params)
    metrics, value = _read_metric(params)
    name, metric = params.promote.model_name, params.promote.metric

    configure(params.tracking)
    client = MlflowClient()
    tags = {
        "git_commit": _git_commit(),
        "params_sha256": _params_sha256(),
        "served_variant": variant,
        **_dvc_hashes(),
    }
    with start_run(f"promote-{name}") as run:
        mlflow.set_tags(tags)
        mlflow.log_params(flatten(params.model_dump(by_alias=True)))
        mlflow.log_metrics(metrics)
        # One artifact tree = one registered version: every ONNX variant (each with its tokenizer and
        # serialization config), the evaluation metrics, and the manifest telling the service what to load.
        mlflow.log_dict({"model_dir": f"onnx/{variant}", "metric": metric}, f"model/{SERVING_MANIFEST}")
        log.info("uploading %s to %s", paths.ONNX, run.info.artifact_uri)
        mlflow.log_artifacts(str(paths.ONNX), artifact_path="model/onnx")
        mlflow.log_artifact(str(EVAL_METRICS), artifact_path="model/metrics")
        source = f"{run.info.artifact_uri.rstrip('/')}/model"

        ensure_registered_model(client, name)
        alias, reason, previous = _decide(client, params, value)
        version = client.create_model_version(
            name, source=source, run_id=run.info.run_id, tags={**tags, metric: str(value)}
        )
        client.set_model_version_tag(name, version.version, "promotion_alias", alias)
        client.set_model_version_tag(name, version.version, "promotion_reason", reason)
        client.set_registered_model_alias(name, alias, version.version)
        mlflow.set_tags({"registered_version": version.version, "promotion_alias": alias})

    result = {
        "model_name": name,
        "version": int(version.version),
        "alias": alias,
        "reason": reason,
        "metric": metric,
        "value": value,
        "previous_champion": int(previous) if previous is not None else None,
        "run_id": run.info.run_id,
    }
    write_json(PROMOTE_METRICS, result)
    log.info("%s version %s -> @%s (%s)", name, version.version, alias, reason)
    return result


if __name__ == "__main__":
    run_stage(main)
