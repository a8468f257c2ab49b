"""Promote stage against a real MLflow registry: the embedded SQLite store, and an `mlflow server`
backed by the local PostgreSQL. The export directory is a small stand-in file tree: promote only
uploads files, so what they contain does not matter here (tests/integration/test_serving.py serves a
real export)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipelines import promote
from pipelines.common.errors import PipelineError
from pipelines.common.tracking import CHALLENGER, CHAMPION, download_version, version_by_alias
from tests.conftest import make_tiny_params



def _fake_export(root: Path) -> None:
    for variant in ("fp32", "int8"):
        model_dir = root / "models" / "onnx" / variant
        model_dir.mkdir(parents=True, exist_ok=True)
        (model_dir / "serialization.json").write_text(json.dumps({"variant": variant}))
        (model_dir / "encoder_model.onnx").write_bytes(variant.encode() * 16)


def _write_eval(root: Path, value: float) -> None:
    (root / "metrics").mkdir(exist_ok=True)
    (root / "metrics" / "eval.json").write_text(
        json.dumps({"ex_execution_guided": value, "ex_greedy": value / 2, "n_examples": 8, "split": "test"})
    )


def _params(margin: float = 0.0):
    return make_tiny_params(promote={"margin": margin})


def _promote_sequence_and_check(root: Path) -> None:
    """v1 (first) -> champion; v2 worse -> challenger with reason; v3 better -> champion; none deleted."""
    params = _params(margin=0.05)
    _fake_export(root)

    _write_eval(root, 0.50)
    first = promote.main(params)
    assert (first["version"], first["alias"]) == (1, CHAMPION)
    assert "first version" in first["reason"]
    assert json.loads((root / "metrics" / "promote.json").read_text())["version"] == 1

    _write_eval(root, 0.47)  # within the margin: still takes champion
    within = promote.main(params)
    assert (within["version"], within["alias"], within["previous_champion"]) == (2, CHAMPION, 1)

    _write_eval(root, 0.30)
    worse = promote.main(params)
    assert (worse["version"], worse["alias"]) == (3, CHALLENGER)
    assert "0.3000 < champion v2 0.4700" in worse["reason"]

    client = MlflowClient()
    name = params.promote.model_name
    assert str(version_by_alias(client, name, CHAMPION).version) == "2"
    challenger = version_by_alias(client, name, CHALLENGER)
    assert str(challenger.version) == "3"
    assert challenger.tags["promotion_reason"] == worse["reason"]
    assert challenger.tags["ex_execution_guided"] == "0.3"
    assert challenger.tags["git_commit"]
    assert challenger.tags["served_variant"] == "int8"
    assert len(client.search_model_versions(f"name='{name}'")) == 3

    # What the service does with an alias: only the served variant comes down, intact.
    served = download_version(client, version_by_alias(client, name, CHAMPION), root / "cache")
    assert served.name == "int8" and json.loads((served / "serialization.json").read_text()) == {"variant": "int8"}
    assert not (served.parent / "fp32").exists()


def test_promote_gate_with_sqlite_store(workspace):
    _promote_sequence_and_check(workspace)


def test_promote_records_dvc_hashes_and_params(workspace):
    _fake_export(workspace)
    _write_eval(workspace, 0.5)
    (workspace / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  ingest:\n    cmd: python -m pipelines.ingest\n    outs:\n"
        "    - path: data/ingested\n      md5: 0123456789abcdef.dir\n      size: 10\n      nfiles: 2\n"
    )
    result = promote.main(_params())
    client = MlflowClient()
    version = client.get_model_version("nl2sql", str(result["version"]))
    assert version.tags["dvc_md5.data.ingested"] == "0123456789abcdef.dir"
    run = client.get_run(result["run_id"])
    assert run.data.params["promote.metric"] == "ex_execution_guided"
    assert run.data.metrics["ex_execution_guided"] == 0.5


def test_missing_metric_is_reported_before_upload(workspace):
    _fake_export(workspace)
    (workspace / "metrics").mkdir()
    (workspace / "metrics" / "eval.json").write_text(json.dumps({"ex_greedy": 0.4}))
    with pytest.raises(PipelineError, match=r"metrics/eval.json: key 'ex_execution_guided'"):
        promote.main(_params())
    assert not (workspace / "mlflow.db").exists() or not MlflowClient().search_registered_models()


def test_missing_export_is_reported(workspace):
    _write_eval(workspace, 0.5)
    with pytest.raises(PipelineError, match=r"models/onnx: no exported model found"):
        promote.main(_params())


@pytest.mark.slow
def test_promoted_pipeline_export_loads_back_for_generation(exported_workspace, workspace):
    """The real export stage's output survives the round trip registry -> download -> generate."""
    import shutil

    from pipelines.common.generate import generate
    from pipelines.common.model_io import load_for_generation
    from pipelines.common.tracking import parse_model_uri, resolve_version

    shutil.copytree(exported_workspace / "models" / "onnx", workspace / "models" / "onnx")
    _write_eval(workspace, 0.5)
    result = promote.main(_params())
    client = MlflowClient()
    version = resolve_version(client, parse_model_uri("models:/nl2sql@champion"))
    assert int(version.version) == result["version"]
    served = download_version(client, version, workspace / "cache")
    assert served.name == "int8"
    model, tokenizer, config = load_for_generation(served)
    [[sql]] = generate(model, tokenizer, ["question: how many customers? | schema: customers: id (number, pk)"],
                       max_new_tokens=8, max_source_length=config.max_source_length)
    assert isinstance(sql, str)


@pytest.mark.postgres
@pytest.mark.slow  # 20 s on an idle machine, about a minute on the shared one (server start + migrations)
def test_promote_gate_with_postgres_backed_server(mlflow_postgres_server, workspace):
    _promote_sequence_and_check(workspace)
    # The versions really live in PostgreSQL behind the server, not in a local file store.
    assert not (workspace / "mlflow.db").exists()
