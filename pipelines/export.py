"""Stage export: models/student (or models/teacher) -> models/onnx/fp32 and models/onnx/int8.

1. optimum-onnx exports the encoder, the first-step decoder and the decoder with past key values (dynamic
   batch and sequence axes); their large weights go to one external data file, each tensor once (the
   decoders share all theirs, and the tied token embedding is in all three graphs).
2. Parity: greedy SQL from the fp32 ONNX model must equal PyTorch greedy on the first
   `export.parity_examples` dev examples, else the stage fails and nothing is written to models/onnx.
3. int8: dynamic quantization (weights int8 per channel, activations quantized at run time) of each graph,
   stored the same way. Its dev execution accuracy must stay within `export.int8_max_ex_drop` of fp32,
   else a loud warning (also recorded in metrics/export.json): int8 is still written, evaluation decides.

Checks run on CPU on purpose: parity is a property of the conversion, and int8 dynamic quantization is a
CPU deployment format (its integer kernels are CPU ones)."""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

from pipelines.common.cli import run_stage
from pipelines.common.devset import LabelledSplit, execution_accuracy, load_split
from pipelines.common.errors import PipelineError
from pipelines.common.generate import generate
from pipelines.common.io import atomic_dir, write_json
from pipelines.common.model_io import check_model_dir, is_onnx_dir, load_for_generation
from pipelines.common.onnx_model import (
    GRAPH_FILES,
    MODEL_FILES,
    WEIGHTS_DIGEST_KEY,
    WEIGHTS_FILE,
    file_digest,
    is_quantized,
    load_onnx,
)
from pipelines.common.params import Params
from pipelines.common.paths import METRICS, ONNX, SERIALIZATION_FILE, STUDENT, TEACHER

log = logging.getLogger(__name__)

EXPORT_METRICS = METRICS / "export.json"
TASK = "text2text-generation-with-past"
# Initializers at least this large go to the shared weights file.
EXTERNAL_MIN_BYTES = 1024
# Mismatches quoted in the parity error (the rest are counted), each SQL cut to this many characters.
MAX_QUOTED_MISMATCHES = 3
MAX_QUOTED_CHARS = 120


def source_dir(params: Params) -> Path:
    """The PyTorch model to export, checked complete before any work."""
    path = STUDENT if params.export.source == "student" else TEACHER
    stage = "distill" if path == STUDENT else "train"
    if not path.is_dir():
        raise PipelineError(f"{path}: not found (params.yaml export.source is {params.export.source!r}; "
                            f"run the {stage} stage first)")
    check_model_dir(path)
    if is_onnx_dir(path):
        raise PipelineError(f"{path}: holds ONNX files, expected a PyTorch save_pretrained model")
    return path


@contextlib.contextmanager
def quiet_converters() -> Iterator[None]:
    """The tracer and onnxruntime's quantizer log per-node notes (root logger, warnings) that bury the
    stage's own lines; keep only errors while they run."""
    root = logging.getLogger()
    previous = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(previous)


def export_onnx(model_dir: Path, output: Path) -> None:
    """optimum-onnx export of encoder + decoder + decoder-with-past + config + tokenizer. optimum's
    post-processing stores the tied embedding / LM-head weights once per graph (a vocab x d_model matrix
    less in each decoder); the merged decoder it also writes is not used (see OnnxSeq2Seq)."""
    from optimum.exporters.onnx import main_export

    log.info("exporting %s to ONNX (%s)", model_dir, TASK)
    with quiet_converters():
        main_export(str(model_dir), output=output, task=TASK, device="cpu", do_validation=False,
                    local_files_only=True)
    missing = [name for name in GRAPH_FILES if not (output / name).is_file()]
    if missing:
        raise RuntimeError(f"optimum export of {model_dir} did not write {', '.join(missing)}")


def assemble(graphs: Path, metadata: Path, target: Path) -> None:
    """Write the served layout into `target`: the graphs of `graphs` with their weights file, and every
    non-graph file (config, generation config, tokenizer, serialization.json) of `metadata`."""
    target.mkdir(parents=True)
    for name in GRAPH_FILES:
        shutil.copy2(graphs / name, target / name)
    store_weights_once(target, GRAPH_FILES)
    for path in metadata.iterdir():
        if path.is_file() and path.suffix != ".onnx":
            shutil.copy2(path, target / path.name)


def store_weights_once(directory: Path, graph_files: tuple[str, ...]) -> None:
    """Move the large initializers of `graph_files` into one external data file (WEIGHTS_FILE), each
    distinct tensor once. T5 ties its token embedding: optimum's encoder and decoder graphs each hold a
    copy (identical bytes, in fp32 and after int8 quantization alike), which is a quarter of a small
    model's weights. ONNX Runtime reads external data by (file, offset, length), so both graphs point at
    the same bytes."""
    import hashlib

    import onnx
    from onnx.external_data_helper import set_external_data

    graphs = {name: onnx.load(str(directory / name)) for name in graph_files}
    stored: dict[tuple, tuple[int, int]] = {}
    with open(directory / WEIGHTS_FILE, "wb") as weights:
        for graph in graphs.values():
            for tensor in graph.graph.initializer:
                if len(tensor.raw_data) < EXTERNAL_MIN_BYTES:  # scales, zero points, shapes stay inline
                    continue
                key = (tensor.data_type, tuple(tensor.dims), hashlib.sha256(tensor.raw_data).digest())
                if key not in stored:
                    stored[key] = (weights.tell(), len(tensor.raw_data))
                    weights.write(tensor.raw_data)
                offset, length = stored[key]
                set_external_data(tensor, location=WEIGHTS_FILE, offset=offset, length=length)
                tensor.ClearField("raw_data")
    # Recorded in every graph, checked when loading: a weights file of another export is refused.
    digest = file_digest(directory / WEIGHTS_FILE)
    for name, graph in graphs.items():
        kept = [entry for entry in graph.metadata_props if entry.key != WEIGHTS_DIGEST_KEY]
        del graph.metadata_props[:]
        graph.metadata_props.extend(kept)
        graph.metadata_props.add(key=WEIGHTS_DIGEST_KEY, value=digest)
        onnx.save(graph, str(directory / name))


def export_fp32(model_dir: Path, raw: Path, target: Path) -> None:
    """optimum's graphs of `model_dir` into `raw` (kept: int8 quantizes them) and the served fp32 layout,
    with the model's serialization.json, into `target`."""
    export_onnx(model_dir, raw)
    (raw / SERIALIZATION_FILE).write_bytes((model_dir / SERIALIZATION_FILE).read_bytes())
    assemble(raw, raw, target)


def quantize_graphs(source: Path, target: Path) -> None:
    """int8 dynamic quantization of each graph of `source` into `target`.
    An already quantized model is refused: quantizing twice only loses accuracy."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graphs = sorted(source.glob("*.onnx"))
    already = [path.name for path in graphs if is_quantized(path)]
    if already:
        raise PipelineError(f"{source}: {', '.join(already)} already quantized (int8); "
                            "quantize the fp32 export instead")
    missing = [name for name in GRAPH_FILES if not (source / name).is_file()]
    if missing:
        raise PipelineError(f"{source}: missing {', '.join(missing)} (quantization needs optimum's three graphs)")
    target.mkdir(parents=True, exist_ok=True)
    for name in GRAPH_FILES:
        log.info("quantizing %s (int8, dynamic, per channel)", name)
        # Per-channel int8 weights keep T5's wide-ranged projections accurate; activations are
        # quantized per call, so no calibration data is needed.
        with quiet_converters():
            quantize_dynamic(source / name, target / name, weight_type=QuantType.QInt8, per_channel=True)


def greedy(model, tokenizer, inputs: list[str], max_new_tokens: int, max_source_length: int) -> list[str]:
    outputs = generate(model, tokenizer, inputs, num_beams=1, max_new_tokens=max_new_tokens,
                       max_source_length=max_source_length)
    return [candidates[0] for candidates in outputs]


def parity_mismatches(split: LabelledSplit, reference: list[str], candidate: list[str]) -> list[str]:
    def cut(sql: str) -> str:
        return repr(sql if len(sql) <= MAX_QUOTED_CHARS else sql[:MAX_QUOTED_CHARS] + "...")

    return [f"{example_id}: pytorch {cut(ref)} vs onnx {cut(got)}"
            for example_id, ref, got in zip(split.example_ids, reference, candidate) if ref != got]


def graph_bytes(directory: Path) -> int:
    """Bytes of the served model files: graphs and their weights file."""
    return sum((directory / name).stat().st_size for name in MODEL_FILES)


def weights_bytes(model_dir: Path) -> int:
    return sum(path.stat().st_size for pattern in ("*.safetensors", "*.bin") for path in model_dir.glob(pattern))


def main(params: Params) -> dict:
    cfg = params.export
    model_dir = source_dir(params)
    started = time.monotonic()
    model, tokenizer, serialization = load_for_generation(model_dir, device="cpu")
    dev = load_split(tokenizer, "dev")
    parity_set, rest = dev.head(cfg.parity_examples), dev.tail(cfg.parity_examples)
    # Generation length and SQL limits as evaluation uses them, so "EX" means the same number there.
    lengths = dict(max_new_tokens=params.evaluate.max_new_tokens, max_source_length=serialization.max_source_length)
    scoring = dict(timeout_s=params.evaluate.sql_timeout_s, max_rows=params.evaluate.max_rows)

    log.info("PyTorch greedy on %d dev examples (parity reference)", len(parity_set))
    reference = greedy(model, tokenizer, parity_set.inputs, **lengths)
    metrics: dict = {"source": params.export.source, "source_dir": str(model_dir),
                     "parameters": model.num_parameters(), "pytorch_weights_bytes": weights_bytes(model_dir),
                     "dev_examples": len(dev), "warnings": []}
    del model

    with atomic_dir(ONNX) as staging:
        raw = staging / ".optimum-export"
        export_fp32(model_dir, raw, staging / "fp32")

        fp32 = load_onnx(staging / "fp32", device="cpu")
        fp32_parity = greedy(fp32, tokenizer, parity_set.inputs, **lengths)
        mismatches = parity_mismatches(parity_set, reference, fp32_parity)
        if mismatches:
            raise PipelineError(
                f"{model_dir}: ONNX fp32 greedy output differs from PyTorch on {len(mismatches)} of "
                f"{len(parity_set)} dev examples (export.parity_examples); nothing written to {ONNX}. First: "
                + "; ".join(mismatches[:MAX_QUOTED_MISMATCHES]))
        log.info("parity: ONNX fp32 == PyTorch greedy on %d/%d dev examples", len(parity_set), len(parity_set))
        metrics["parity"] = {"examples": len(parity_set), "mismatches": 0}
        fp32_predictions = fp32_parity + greedy(fp32, tokenizer, rest.inputs, **lengths)
        del fp32
        metrics["fp32"] = {"bytes": graph_bytes(staging / "fp32"),
                           **execution_accuracy(fp32_predictions, dev, **scoring)}
        log.info("ONNX fp32 dev EX %.4f (%d scored)", metrics["fp32"]["ex"], metrics["fp32"]["n_scored"])

        if cfg.quantize:
            quantized = staging / ".quantized"
            quantize_graphs(raw, quantized)
            assemble(quantized, raw, staging / "int8")
            shutil.rmtree(quantized)
            int8 = load_onnx(staging / "int8", device="cpu")
            int8_predictions = greedy(int8, tokenizer, dev.inputs, **lengths)
            del int8
            metrics["int8"] = {"bytes": graph_bytes(staging / "int8"),
                               **execution_accuracy(int8_predictions, dev, **scoring),
                               "agreement_with_fp32": sum(a == b for a, b in zip(int8_predictions, fp32_predictions))
                               / len(dev)}
            drop = metrics["fp32"]["ex"] - metrics["int8"]["ex"]
            metrics["int8"]["ex_drop"] = drop
            metrics["int8"]["size_ratio_vs_pytorch"] = metrics["pytorch_weights_bytes"] / metrics["int8"]["bytes"]
            log.info("ONNX int8 dev EX %.4f (drop %.4f), %.1f MB", metrics["int8"]["ex"], drop,
                     metrics["int8"]["bytes"] / 1e6)
            if drop > cfg.int8_max_ex_drop:
                warning = (f"int8 dev EX {metrics['int8']['ex']:.4f} is {drop:.4f} below fp32 "
                           f"{metrics['fp32']['ex']:.4f}, more than export.int8_max_ex_drop={cfg.int8_max_ex_drop}")
                metrics["warnings"].append(warning)
                log.warning("!" * 80)
                log.warning("WARNING: %s", warning)
                log.warning("!" * 80)
        shutil.rmtree(raw)

    metrics["seconds"] = round(time.monotonic() - started, 1)
    write_json(EXPORT_METRICS, metrics)
    log.info("wrote %s and %s", ONNX, EXPORT_METRICS)
    return metrics


if __name__ == "__main__":
    run_stage(main)
