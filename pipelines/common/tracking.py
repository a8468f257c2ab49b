"""MLflow helpers: where runs are tracked, and (below) the model registry used by promote and serving."""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from pipelines.common.errors import PipelineError
from pipelines.common.params import TrackingParams

log = logging.getLogger(__name__)


def configure(tracking: TrackingParams) -> str:
    """Point MLflow at the tracking store (MLFLOW_TRACKING_URI wins over params) and select the experiment."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking.uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(tracking.experiment)
    return uri


# ---------------------------------------------------------------------------------------------------
# Training runs (train and distill: params, per-step metrics, model directories as artifacts)
# ---------------------------------------------------------------------------------------------------

# MLflow rejects longer param values; longer ones (none today) are cut rather than failing the run.
_MAX_PARAM_CHARS = 6000


def flatten(mapping: dict, prefix: str = "") -> dict[str, str]:
    """{"train": {"t5": {"d_model": 256}}} -> {"train.t5.d_model": "256"} (MLflow params are flat strings)."""
    flat: dict[str, str] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:_MAX_PARAM_CHARS]
    return flat


def start_run(run_name: str, resume_run_id: str | None = None) -> mlflow.ActiveRun:
    """Start a run in the configured experiment, or re-open `resume_run_id` (training resumed after an
    interruption keeps logging into the run it started, so its curves stay in one place)."""
    if resume_run_id:
        try:
            run = MlflowClient().get_run(resume_run_id)
        except MlflowException:
            run = None
        if run is not None and run.info.lifecycle_stage == "active":
            log.info("MLflow: resuming run %s", resume_run_id)
            return mlflow.start_run(run_id=resume_run_id)
        log.warning("MLflow run %s not found in %s; starting a new run", resume_run_id, mlflow.get_tracking_uri())
    return mlflow.start_run(run_name=run_name)


def log_step_metrics(logs: dict, step: int) -> None:
    """Log the numeric entries of a Trainer log record (loss, learning_rate, grad_norm, eval_loss...)."""
    metrics = {
        key: float(value)
        for key, value in logs.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("epoch", "total_flos")
    }
    if metrics:
        mlflow.log_metrics(metrics, step=step)


def log_model_dir(directory: str | Path, artifact_path: str) -> None:
    """Upload a saved model directory (weights + tokenizer + serialization.json) to the active run."""
    mlflow.log_artifacts(str(directory), artifact_path=artifact_path)


# ---------------------------------------------------------------------------------------------------
# Model registry (promote writes versions and aliases; serving resolves an alias to a local copy)
# ---------------------------------------------------------------------------------------------------

# Written at the root of every registered version: which sub-directory the service loads.
SERVING_MANIFEST = "serving.json"
CHAMPION = "champion"
CHALLENGER = "challenger"

_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))$")


@dataclass(frozen=True)
class RegistryRef:
    """A parsed `models:/name@alias` or `models:/name/<version>` URI."""

    name: str
    alias: str | None = None
    version: str | None = None


def parse_model_uri(uri: str) -> RegistryRef | None:
    """The registry reference in `uri`, or None when `uri` is not a `models:/` URI (a local directory)."""
    if not uri.startswith("models:/"):
        return None
    match = _MODEL_URI.match(uri)
    if match is None:
        raise PipelineError(f"{uri}: expected models:/<name>@<alias> or models:/<name>/<version>")
    return RegistryRef(match["name"], match["alias"], match["version"])


def ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_registered_model(name, description="NL-to-SQL seq2seq model exported to ONNX")


def version_by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version holding `alias`, or None when the model or the alias does not exist yet."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def resolve_version(client: MlflowClient, ref: RegistryRef) -> ModelVersion:
    if ref.version is not None:
        return client.get_model_version(ref.name, ref.version)
    found = version_by_alias(client, ref.name, ref.alias)
    if found is None:
        raise PipelineError(f"models:/{ref.name}@{ref.alias}: no version of {ref.name} holds alias {ref.alias}")
    return found


def download_version(client: MlflowClient, version: ModelVersion, cache_dir: str | Path) -> Path:
    """Download the served directory of a registered version into `cache_dir/<name>/<version>/` (once)
    and return it. Only the sub-directory named by the version's serving manifest is fetched."""
    target = Path(cache_dir) / version.name / str(version.version)
    done_marker = target / ".complete"
    if done_marker.is_file():
        return target / json.loads(done_marker.read_text())["model_dir"]
    source = client.get_model_version_download_uri(version.name, version.version).rstrip("/")
    target.mkdir(parents=True, exist_ok=True)
    manifest_path = mlflow.artifacts.download_artifacts(
        artifact_uri=f"{source}/{SERVING_MANIFEST}", dst_path=str(target)
    )
    model_dir = json.loads(Path(manifest_path).read_text())["model_dir"]
    log.info("downloading %s version %s (%s) to %s", version.name, version.version, model_dir, target)
    mlflow.artifacts.download_artifacts(artifact_uri=f"{source}/{model_dir}", dst_path=str(target / Path(model_dir).parent))
    # Written last so an interrupted download is retried instead of served half-present.
    done_marker.write_text(json.dumps({"model_dir": model_dir}))
    return target / model_dir
