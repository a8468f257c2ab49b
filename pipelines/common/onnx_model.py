"""Loading an exported ONNX model (models/onnx/fp32 or int8) with the right execution provider.

An export directory holds the optimum-onnx layout: `encoder_model.onnx`, `decoder_model_merged.onnx`
(one decoder graph with and without past key values), `config.json`, `generation_config.json`, the
tokenizer and `serialization.json`. Evaluation, export parity, the benchmark and serving all load it here."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pipelines.common.errors import PipelineError
from pipelines.common.paths import SERIALIZATION_FILE

log = logging.getLogger(__name__)

ENCODER_FILE = "encoder_model.onnx"
DECODER_FILE = "decoder_model_merged.onnx"
GRAPH_FILES = (ENCODER_FILE, DECODER_FILE)
# Everything a consumer of the directory needs besides the graphs.
REQUIRED_FILES = ("config.json", "tokenizer_config.json", SERIALIZATION_FILE, *GRAPH_FILES)
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")  # fast tokenizer, or a sentencepiece T5 one

# Operators that only a quantized graph contains (dynamic int8 quantization inserts these).
QUANTIZED_OPS = frozenset({"DynamicQuantizeLinear", "MatMulInteger", "QuantizeLinear", "DequantizeLinear",
                           "QLinearMatMul", "ConvInteger", "QLinearConv", "DynamicQuantizeMatMul"})


def check_export_dir(path: str | Path) -> Path:
    """Raise a PipelineError naming what is missing unless `path` is a complete export directory."""
    path = Path(path)
    if not path.is_dir():
        raise PipelineError(f"{path}: ONNX model directory not found (run `python -m pipelines.export` first)")
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        missing.append(" or ".join(TOKENIZER_FILES))
    if missing:
        raise PipelineError(f"{path}: incomplete ONNX export, missing {', '.join(missing)} "
                            "(re-run `python -m pipelines.export`)")
    return path


def choose_provider(device: Literal["auto", "cpu", "cuda"] = "auto") -> str:
    """CUDAExecutionProvider when onnxruntime-gpu is installed and a GPU is visible, else CPU;
    asking for cuda without both is an error rather than a silent fallback."""
    import onnxruntime as ort
    import torch

    if device not in ("auto", "cpu", "cuda"):
        raise PipelineError(f"device {device!r}: expected auto, cpu or cuda")
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()
    if device == "cuda" and not has_cuda:
        raise PipelineError(
            f"device 'cuda' requested for ONNX Runtime but it is unavailable (onnxruntime {ort.__version__} providers: "
            f"{', '.join(ort.get_available_providers())}; torch sees a GPU: {torch.cuda.is_available()}); "
            "install onnxruntime-gpu on a CUDA machine or use 'auto' / 'cpu'"
        )
    return "CUDAExecutionProvider" if has_cuda and device != "cpu" else "CPUExecutionProvider"


def session_options(intra_op_threads: int | None = None):
    """One session per graph runs one request at a time: parallelism inside operators (intra-op) pays,
    across operators (inter-op) only adds contention. Threads default to torch's setting, so ONNX and
    PyTorch are compared (and deployed) with the same CPU budget."""
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = intra_op_threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    return options


def load_onnx(path: str | Path, device: Literal["auto", "cpu", "cuda"] = "auto",
              intra_op_threads: int | None = None):
    """An `ORTModelForSeq2SeqLM` for the export at `path`, usable with `model.generate(...)` like a
    PyTorch model (inputs go on `model.device`)."""
    from optimum.onnxruntime import ORTModelForSeq2SeqLM

    path = check_export_dir(path)
    provider = choose_provider(device)
    try:
        model = ORTModelForSeq2SeqLM.from_pretrained(
            path, provider=provider, session_options=session_options(intra_op_threads),
            use_cache=True, use_merged=True, local_files_only=True,
        )
    except Exception as exc:  # onnxruntime reports corrupt graphs with its own exception types
        raise PipelineError(f"{path}: cannot load ONNX model: {str(exc).splitlines()[0]}") from exc
    # optimum sizes the empty first-step past key/values as d_model // num_heads; T5 configs may choose
    # d_kv independently, and ONNX Runtime then rejects the input shape. The graph's true head size is d_kv.
    head_size = getattr(model.config, "d_kv", None)
    if head_size is not None:
        model.decoder.embed_size_per_head = head_size
    log.info("loaded ONNX model %s on %s", path, provider)
    return model


def is_quantized(graph_file: str | Path) -> bool:
    """True when the ONNX graph (including subgraphs of If nodes) already contains quantized operators."""
    import onnx

    model = onnx.load(str(graph_file), load_external_data=False)
    pending = [model.graph]
    while pending:
        graph = pending.pop()
        for node in graph.node:
            if node.op_type in QUANTIZED_OPS:
                return True
            pending.extend(attr.g for attr in node.attribute if attr.type == onnx.AttributeProto.GRAPH)
    return False
