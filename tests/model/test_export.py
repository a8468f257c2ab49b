"""Export stage and ONNX loading on the tiny pipeline: fp32 + int8 written and loadable, parity enforced,
nothing half-written on failure, clear errors for missing/incomplete inputs, no double quantization."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_params, relocate_mlflow_store
from pipelines import export
from pipelines.common.errors import PipelineError
from pipelines.common.generate import generate
from pipelines.common.io import read_json
from pipelines.common.model_io import load_for_generation
from pipelines.common.onnx_model import (DECODER_FILE, GRAPH_FILES, MODEL_FILES, WEIGHTS_FILE, choose_provider,
                                         is_quantized, load_onnx)


@pytest.fixture
def trained_copy(trained_workspace, tmp_path, monkeypatch) -> Path:
    """A writable copy of trained_workspace as the current directory."""
    root = tmp_path / "ws"
    shutil.copytree(trained_workspace, root)
    relocate_mlflow_store(root / "mlflow.db", trained_workspace, root)
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    return root


def test_export_writes_fp32_and_int8_that_match_pytorch(exported_workspace, monkeypatch):
    monkeypatch.chdir(exported_workspace)
    metrics = read_json("metrics/export.json")
    assert metrics["source"] == "student"
    assert metrics["parity"] == {"examples": 4, "mismatches": 0}
    # int8 weights take about a quarter of fp32's; at this toy size the graphs themselves weigh more.
    weights = {variant: (Path("models/onnx") / variant / WEIGHTS_FILE).stat().st_size for variant in ("fp32", "int8")}
    assert 0 < weights["int8"] < weights["fp32"] / 3
    assert metrics["int8"]["bytes"] == sum((Path("models/onnx/int8") / name).stat().st_size for name in MODEL_FILES)
    assert metrics["fp32"]["n_scored"] + metrics["fp32"]["n_gold_error"] == metrics["dev_examples"]
    assert not list(Path("models").glob(".onnx*")), "no staging directory may be left behind"

    for variant in ("fp32", "int8"):
        directory = Path("models/onnx") / variant
        assert {*MODEL_FILES, "serialization.json", "tokenizer.json"} <= {p.name for p in directory.iterdir()}
        assert not list(directory.glob("decoder_model_merged.onnx")), "optimum's merged decoder is not shipped"
        for graph in GRAPH_FILES:
            assert is_quantized(directory / graph) == (variant == "int8")

    # Independent of the stage's own check: fp32 ONNX greedy == PyTorch greedy on a batch of mixed lengths.
    pytorch, tokenizer, config = load_for_generation("models/student", device="cpu")
    onnx_fp32 = load_onnx("models/onnx/fp32", device="cpu")
    questions = ["question: how many customers are there? | schema: customers: id (number, pk)",
                 "question: list the names | schema: customers: id (number, pk), name (text)"]
    expected = generate(pytorch, tokenizer, questions, max_new_tokens=24)
    assert generate(onnx_fp32, tokenizer, questions, max_new_tokens=24) == expected
    onnx_int8 = load_onnx("models/onnx/int8", device="cpu")
    assert len(generate(onnx_int8, tokenizer, questions, max_new_tokens=24)) == 2


def test_parity_failure_raises_and_writes_nothing(trained_copy, monkeypatch):
    """The ONNX graphs come from a different (re-initialized) model than the PyTorch reference."""
    from transformers import T5ForConditionalGeneration

    real_export = export.export_onnx

    def export_mismatched_model(model_dir: Path, output: Path) -> None:
        other = trained_copy / "other-model"
        shutil.copytree(model_dir, other)
        torch.manual_seed(1234)
        config = T5ForConditionalGeneration.from_pretrained(other).config
        T5ForConditionalGeneration(config).save_pretrained(other)
        real_export(other, output)

    monkeypatch.setattr(export, "export_onnx", export_mismatched_model)
    params = make_tiny_params(export={"source": "teacher", "parity_examples": 4})
    with pytest.raises(PipelineError, match=r"differs from PyTorch on \d+ of 4 dev examples.*: pytorch .* vs onnx "):
        export.main(params)
    assert not Path("models/onnx").exists()
    assert not list(Path("models").glob(".onnx*"))
    assert not Path("metrics/export.json").exists()


def test_missing_or_incomplete_source_model(trained_copy):
    params = make_tiny_params()  # export.source: student, which distill has not written here
    with pytest.raises(PipelineError, match=r"models/student: not found .*run the distill stage"):
        export.main(params)
    Path("models/student").mkdir()
    shutil.copy("models/teacher/config.json", "models/student/config.json")
    with pytest.raises(PipelineError, match=r"models/student: incomplete model directory, missing weights"):
        export.main(params)
    assert not Path("models/onnx").exists()


def test_load_onnx_reports_missing_and_incomplete_directories(exported_workspace, tmp_path):
    with pytest.raises(PipelineError, match=r"nowhere: ONNX model directory not found"):
        load_onnx(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    shutil.copytree(exported_workspace / "models/onnx/fp32", broken)
    (broken / DECODER_FILE).unlink()
    (broken / "serialization.json").unlink()
    with pytest.raises(PipelineError, match=r"incomplete ONNX export, missing serialization.json, decoder_model.onnx"):
        load_onnx(broken)
    (broken / "serialization.json").write_text("{}")
    (broken / DECODER_FILE).write_bytes(b"not an onnx graph")
    with pytest.raises(PipelineError, match=r"broken: cannot load ONNX model"):
        load_onnx(broken)
    shutil.copy2(exported_workspace / "models/onnx/fp32" / DECODER_FILE, broken / DECODER_FILE)
    load_onnx(broken)
    weights = (broken / WEIGHTS_FILE).read_bytes()
    (broken / WEIGHTS_FILE).write_bytes(weights[: len(weights) // 2])  # an interrupted copy
    with pytest.raises(PipelineError, match=r"broken: cannot load ONNX model"):
        load_onnx(broken)


def test_load_onnx_refuses_files_that_do_not_belong_together(eval_onnx, exported_workspace, tmp_path):
    import json

    def copy(name: str) -> Path:
        target = tmp_path / name
        shutil.copytree(eval_onnx, target)
        return target

    for key, value in (("vocab_size", 999), ("num_heads", 3), ("d_kv", 5)):
        wrong = copy(f"config-{key}")
        config = json.loads((wrong / "config.json").read_text())
        (wrong / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(PipelineError, match=r"config-.*: output .* has fixed dimensions .* config.json says"):
            load_onnx(wrong)
    mixed = copy("mixed-weights")  # the weights file of another export of the same graphs' names
    shutil.copy2(exported_workspace / "models/onnx/fp32" / WEIGHTS_FILE, mixed / WEIGHTS_FILE)
    with pytest.raises(PipelineError, match=r"weights.onnx_data: not the weights these graphs were exported with"):
        load_onnx(mixed)
    settings = copy("generation-settings")
    generation = json.loads((settings / "generation_config.json").read_text())
    (settings / "generation_config.json").write_text(json.dumps({**generation, "no_repeat_ngram_size": 3}))
    with pytest.raises(PipelineError, match=r"generation_config.json sets no_repeat_ngram_size"):
        load_onnx(settings)


def test_onnx_generate_arguments(eval_onnx):
    model = load_onnx(eval_onnx, device="cpu")
    ids = torch.tensor([[5, 6, 7, 1]])
    expected = model.generate(ids, torch.ones_like(ids), max_new_tokens=4)
    # Integer ids and a 0/1 mask of any dtype, as tokenizers and callers produce them.
    assert torch.equal(model.generate(ids.int(), torch.ones_like(ids, dtype=torch.bool), max_new_tokens=4), expected)
    for bad in (dict(max_new_tokens=0, num_beams=2), dict(max_new_tokens=4, num_beams=2, num_return_sequences=3),
                dict(max_new_tokens=4, num_return_sequences=2)):
        with pytest.raises(ValueError, match="sequences <= beams"):
            model.generate(ids, torch.ones_like(ids), **bad)


def test_quantizing_a_quantized_model_is_refused(exported_workspace, tmp_path):
    with pytest.raises(PipelineError, match=r"int8: .*already quantized"):
        export.quantize_graphs(exported_workspace / "models/onnx/int8", tmp_path / "twice")
    assert not (tmp_path / "twice").exists()


def test_execution_provider_choice():
    import onnxruntime as ort

    gpu = "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()
    assert choose_provider("cpu") == "CPUExecutionProvider"
    assert choose_provider("auto") == ("CUDAExecutionProvider" if gpu else "CPUExecutionProvider")
    if not gpu:
        with pytest.raises(PipelineError, match="device 'cuda' requested for ONNX Runtime but it is unavailable"):
            choose_provider("cuda")
