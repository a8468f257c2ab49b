"""Loading any saved model for generation: an ONNX export (models/onnx/fp32|int8) or a PyTorch
`save_pretrained` directory (models/teacher, models/student), with its tokenizer and serialization config."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pipelines.common.errors import PipelineError
from pipelines.common.paths import SERIALIZATION_FILE

log = logging.getLogger(__name__)

_PYTORCH_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                    "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "spiece.model")


def is_onnx_dir(path: str | Path) -> bool:
    return any(Path(path).glob("*.onnx"))


def check_model_dir(path: str | Path) -> Path:
    """`path` as a Path when it holds a loadable model (ONNX or PyTorch), else a PipelineError naming what
    is missing. Cheap: nothing is loaded, so callers can check before any long work."""
    path = Path(path)
    if not path.is_dir():
        raise PipelineError(f"{path}: model directory not found")
    if is_onnx_dir(path):
        from pipelines.common.onnx_model import check_export_dir

        return check_export_dir(path)
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any((path / name).is_file() for name in _PYTORCH_WEIGHTS):
        missing.append("weights (model.safetensors or pytorch_model.bin)")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        missing.append("tokenizer (tokenizer.json)")
    if not (path / SERIALIZATION_FILE).is_file():
        missing.append(SERIALIZATION_FILE)
    if missing:
        raise PipelineError(f"{path}: incomplete model directory, missing {', '.join(missing)} "
                            "(expected a save_pretrained model + tokenizer + serialization.json, "
                            "or an ONNX export)")
    return path


def load_for_generation(path: str | Path, device: Literal["auto", "cpu", "cuda"] = "auto"):
    """(model, tokenizer, SerializationConfig) for `path`: ONNX Runtime when it holds *.onnx files, else a
    PyTorch AutoModelForSeq2SeqLM in eval mode on CUDA when available (or as `device` says)."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from pipelines.common.serialize import load_config

    path = check_model_dir(path)
    config = load_config(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{path}: cannot load tokenizer: {str(exc).splitlines()[0]}") from exc
    if is_onnx_dir(path):
        from pipelines.common.onnx_model import load_onnx

        return load_onnx(path, device), tokenizer, config
    from pipelines.common.device import choose_device

    choice = choose_device(device, bf16=False, key="model")
    try:
        model = AutoModelForSeq2SeqLM.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{path}: cannot load model: {str(exc).splitlines()[0]}") from exc
    model.to(choice.device).eval()
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        raise PipelineError(f"{path}: tokenizer has {len(tokenizer)} tokens but the model only "
                            f"{model.get_input_embeddings().num_embeddings} embeddings (mismatched files)")
    log.info("loaded PyTorch model %s on %s", path, choice.name)
    return model, tokenizer, config
