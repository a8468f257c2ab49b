"""An exported ONNX model (models/onnx/fp32 or int8) in ONNX Runtime: loaded on the right execution
provider, decoded with the key/value cache.

An export directory holds optimum-onnx's graphs: `encoder_model.onnx`, `decoder_model.onnx` (first step)
and `decoder_with_past_model.onnx` (later steps), their weights in `weights.onnx_data` (each tensor once),
`config.json`, `generation_config.json`, the tokenizer and `serialization.json`. Evaluation, export parity,
the benchmark and serving all load it here, and decode with `OnnxSeq2Seq.generate`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pipelines.common.errors import PipelineError
from pipelines.common.paths import SERIALIZATION_FILE
from pipelines.common.search import beam_search, greedy_search

log = logging.getLogger(__name__)

ENCODER_FILE = "encoder_model.onnx"
DECODER_FILE = "decoder_model.onnx"  # the first step: computes the cross-attention key/values too
DECODER_WITH_PAST_FILE = "decoder_with_past_model.onnx"  # every later step, from the key/value cache
GRAPH_FILES = (ENCODER_FILE, DECODER_FILE, DECODER_WITH_PAST_FILE)
# The graphs' large initializers, each stored once (ONNX external data): the two decoders share all
# their weights, and the token embedding is in all three.
WEIGHTS_FILE = "weights.onnx_data"
MODEL_FILES = (*GRAPH_FILES, WEIGHTS_FILE)
# Everything a consumer of the directory needs besides the graphs.
REQUIRED_FILES = ("config.json", "tokenizer_config.json", SERIALIZATION_FILE, *MODEL_FILES)
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
    # The int8 decoder reads its LM head as DequantizeLinear(Transpose(int8 token embedding)): the
    # embedding is tied, and optimum stores it once. By default ONNX Runtime keeps every DequantizeLinear
    # for its QDQ fusions, so that vocabulary x d_model matrix was dequantized on every step (about 40% of
    # an int8 step at batch 1). Our graphs are dynamically quantized (no QDQ node units), so turning the
    # QDQ handling off only lets constant folding dequantize it once, at load: identical logits.
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    return options


WEIGHTS_DIGEST_KEY = "weights_sha256"  # graph metadata: the sha256 of the weights file written with it
# generation_config.json keys this decoder follows; others (repetition penalties, forced tokens, ...) would
# make transformers' generate on the PyTorch model decode differently, so they are refused at load.
FOLLOWED_GENERATION_SETTINGS = {"decoder_start_token_id", "eos_token_id", "pad_token_id", "bos_token_id",
                                "length_penalty"}
# Set on every model, and overridden by every call (pipelines.common.generate passes them explicitly).
OVERRIDDEN_GENERATION_SETTINGS = {"max_length", "max_new_tokens", "num_beams", "num_return_sequences", "do_sample",
                                  "early_stopping", "transformers_version", "_from_model_config"}


def file_digest(path: Path) -> str:
    import hashlib

    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def decoding_settings(path: Path, config) -> dict:
    """Token ids and length penalty as transformers' generate would take them for this model (its
    generation_config.json, else config.json); a PipelineError for settings this decoder does not follow."""
    from transformers import GenerationConfig

    generation = (GenerationConfig.from_pretrained(path, local_files_only=True)
                  if (path / "generation_config.json").is_file() else GenerationConfig.from_model_config(config))
    unsupported = sorted(set(generation.to_diff_dict()) - FOLLOWED_GENERATION_SETTINGS - OVERRIDDEN_GENERATION_SETTINGS)
    if unsupported:
        raise PipelineError(f"{path}/generation_config.json sets {', '.join(unsupported)}, which the ONNX decoder "
                            "does not implement (PyTorch and ONNX output would differ); remove them")
    settings = {"length_penalty": generation.length_penalty}
    for key in ("decoder_start_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(generation, key, None)
        value = getattr(config, key, None) if value is None else value
        if isinstance(value, list) and len(value) == 1:  # generate accepts a list of end-of-sequence ids
            value = value[0]
        if not isinstance(value, int):
            raise PipelineError(f"{path}: {key} is {value!r} in generation_config.json / config.json; "
                                "expected one token id")
        settings[key] = value
    return settings


class OnnxSeq2Seq:
    """An exported T5 in ONNX Runtime: the encoder runs once per batch, then one decoder graph per new
    token (the first step without a cache, the others from the key/value cache), and `generate` decodes
    with `pipelines.common.search` (the same greedy and beam search as Hugging Face `generate`, without
    its per-step Python overhead; `bench/export_speed.py` measures both).

    Two decoder graphs rather than optimum's merged one: its If node cost about a quarter of a decoder
    step at batch 1, and with the weights file the two graphs' weights are stored once anyway.
    Tensors stay torch tensors on `device`, bound to the sessions by pointer (IO binding), so the cache
    never leaves the device between steps, on CPU and CUDA alike."""

    def __init__(self, path: Path, provider: str, options) -> None:
        import numpy as np
        import onnxruntime as ort
        import torch
        from transformers import AutoConfig

        self.path = path
        self.config = AutoConfig.from_pretrained(path, local_files_only=True)
        self.search_options = decoding_settings(path, self.config)
        self.device = torch.device("cuda" if provider == "CUDAExecutionProvider" else "cpu")
        self.encoder, self.first_step, self.next_step = (
            ort.InferenceSession(str(path / name), options, providers=[provider]) for name in GRAPH_FILES)
        layers = range(self.config.num_decoder_layers)
        self.self_attention = [f"{layer}.decoder.{kind}" for layer in layers for kind in ("key", "value")]
        self.cross_attention = [f"{layer}.encoder.{kind}" for layer in layers for kind in ("key", "value")]
        self._check_graphs()
        # What IO binding needs on every run, computed once: where the tensors live and their element types.
        self._device_args = (self.device.type, self.device.index or 0)
        self._element_types = {torch.float32: np.float32, torch.int64: np.int64}

    def _check_graphs(self) -> None:
        """The three graphs are T5 graphs of the size config.json states, and weights.onnx_data is the one
        written with them (a mismatch would otherwise only show at the first request, or not at all)."""
        config, path = self.config, self.path
        past = {f"past_key_values.{name}" for name in self.self_attention + self.cross_attention}
        kv_shape = [config.num_heads, config.d_kv]
        expected = {  # graph file -> (session, input names, {output name: the fixed dimensions it must have})
            ENCODER_FILE: (self.encoder, {"input_ids", "attention_mask"}, {"last_hidden_state": [config.d_model]}),
            DECODER_FILE: (self.first_step, {"input_ids", "encoder_attention_mask", "encoder_hidden_states"},
                           {"logits": [config.vocab_size],
                            **{f"present.{n}": kv_shape for n in self.self_attention + self.cross_attention}}),
            DECODER_WITH_PAST_FILE: (self.next_step, {"input_ids", "encoder_attention_mask", *past},
                                     {"logits": [config.vocab_size], **{f"present.{n}": kv_shape
                                                                        for n in self.self_attention}}),
        }
        for name, (session, inputs, outputs) in expected.items():
            found_inputs = {i.name for i in session.get_inputs()}
            found_outputs = {o.name: o.shape for o in session.get_outputs()}
            if found_inputs != inputs or set(found_outputs) != set(outputs):
                raise PipelineError(
                    f"{path / name}: not the T5 graph config.json describes ({config.num_decoder_layers} decoder "
                    f"layers); inputs/outputs differ by "
                    f"{sorted((found_inputs ^ inputs) | (set(found_outputs) ^ set(outputs)))}")
            for output, dims in outputs.items():
                shape = found_outputs[output]
                fixed = [shape[-1]] if len(dims) == 1 else [shape[1], shape[3]]
                if fixed != dims:
                    raise PipelineError(f"{path / name}: output {output} has fixed dimensions {fixed}, config.json "
                                        f"says {dims} (graphs and config.json from different models?)")
        recorded = {session.get_modelmeta().custom_metadata_map.get(WEIGHTS_DIGEST_KEY)
                    for session, _, _ in expected.values()}
        actual = file_digest(path / WEIGHTS_FILE)
        if recorded != {actual}:
            raise PipelineError(f"{path / WEIGHTS_FILE}: not the weights these graphs were exported with "
                                f"(sha256 {actual[:12]}..., the graphs expect "
                                f"{', '.join(sorted(str(r)[:12] + '...' for r in recorded))}); re-run the export")

    def _run(self, session, inputs: dict, outputs: dict) -> None:
        """Run `session` reading `inputs` and writing into the preallocated `outputs` (name -> tensor)."""
        import torch

        elements = self._element_types
        binding = session.io_binding()
        for name, tensor in inputs.items():
            binding.bind_input(name, *self._device_args, elements[tensor.dtype], tuple(tensor.shape), tensor.data_ptr())
        for name, tensor in outputs.items():
            binding.bind_output(name, *self._device_args, elements[tensor.dtype], tuple(tensor.shape), tensor.data_ptr())
        if self.device.type == "cuda":  # torch and ONNX Runtime work on different CUDA streams
            torch.cuda.synchronize(self.device)
            session.run_with_iobinding(binding)
            binding.synchronize_outputs()
        else:
            session.run_with_iobinding(binding)

    def encode(self, input_ids, attention_mask):
        import torch

        hidden = torch.empty((*input_ids.shape, self.config.d_model), device=self.device)
        self._run(self.encoder, {"input_ids": input_ids, "attention_mask": attention_mask},
                  {"last_hidden_state": hidden})
        return hidden

    def decoder_step(self, hidden, attention_mask):
        """A step function for `pipelines.common.search` over encoder states `hidden` ([rows, source, d_model])."""
        import torch

        rows, source = attention_mask.shape
        heads, head_size = self.config.num_heads, self.config.d_kv

        def buffer(length: int) -> torch.Tensor:
            return torch.empty((rows, heads, length, head_size), device=self.device)

        # Computed by the first step, read by all later ones (one set per input: beams never reorder them).
        cross = {f"past_key_values.{name}": buffer(source) for name in self.cross_attention}
        cache: dict[str, torch.Tensor] = {}

        def step(tokens, reorder):
            logits = torch.empty((rows, 1, self.config.vocab_size), device=self.device)
            inputs = {"input_ids": tokens.view(rows, 1).contiguous(), "encoder_attention_mask": attention_mask}
            if not cache:
                length = 1
                inputs["encoder_hidden_states"] = hidden
                outputs = {f"present.{name}": cross[f"past_key_values.{name}"] for name in self.cross_attention}
                session = self.first_step
            else:
                length = next(iter(cache.values())).shape[2] + 1
                past = cache if reorder is None else {n: t.index_select(0, reorder) for n, t in cache.items()}
                inputs.update(past, **cross)
                outputs = {}
                session = self.next_step
            present = {name: buffer(length) for name in self.self_attention}
            outputs.update({"logits": logits, **{f"present.{name}": t for name, t in present.items()}})
            self._run(session, inputs, outputs)
            cache.clear()
            cache.update({f"past_key_values.{name}": t for name, t in present.items()})
            return logits[:, 0]

        return step

    def generate(self, input_ids, attention_mask, *, max_new_tokens: int, num_beams: int = 1,
                 num_return_sequences: int = 1, min_new_tokens: int = 0, logits_processor=(),
                 do_sample: bool = False, early_stopping: bool = False):
        """Token ids like `T5ForConditionalGeneration.generate` with these options (the ones this project
        decodes with): `[rows * num_return_sequences, 1 + generated]`, decoder start token first."""
        import torch

        if do_sample or early_stopping:
            raise ValueError("OnnxSeq2Seq.generate decodes deterministically with early_stopping=False only")
        if max_new_tokens < 1 or num_beams < 1 or not 1 <= num_return_sequences <= num_beams:
            raise ValueError(f"max_new_tokens={max_new_tokens}, num_beams={num_beams}, num_return_sequences="
                             f"{num_return_sequences}: expected at least 1 token and 1 <= sequences <= beams")
        settings = self.search_options
        options = dict(start_token_id=settings["decoder_start_token_id"], eos_token_id=settings["eos_token_id"],
                       pad_token_id=settings["pad_token_id"], max_new_tokens=max_new_tokens,
                       min_new_tokens=min_new_tokens, processors=list(logits_processor), device=self.device)
        # Any integer ids or 0/1 mask a tokenizer gives; the graphs take int64.
        input_ids = input_ids.to(self.device, torch.long).contiguous()
        attention_mask = attention_mask.to(self.device, torch.long).contiguous()
        with torch.inference_mode():
            hidden = self.encode(input_ids, attention_mask)
            if num_beams == 1:
                return greedy_search(self.decoder_step(hidden, attention_mask), len(input_ids), **options)
            # Every beam of an input reads that input's encoder states (rows input-major, as in generate).
            hidden = hidden.repeat_interleave(num_beams, dim=0)
            attention_mask = attention_mask.repeat_interleave(num_beams, dim=0)
            return beam_search(self.decoder_step(hidden, attention_mask), len(input_ids), num_beams=num_beams,
                               num_return_sequences=num_return_sequences,
                               length_penalty=settings["length_penalty"], **options)


def load_onnx(path: str | Path, device: Literal["auto", "cpu", "cuda"] = "auto",
              intra_op_threads: int | None = None) -> OnnxSeq2Seq:
    """The export at `path` in ONNX Runtime on the chosen execution provider."""
    path = check_export_dir(path)
    provider = choose_provider(device)
    try:
        model = OnnxSeq2Seq(path, provider, session_options(intra_op_threads))
    except PipelineError:
        raise
    except Exception as exc:  # onnxruntime reports corrupt graphs with its own exception types
        raise PipelineError(f"{path}: cannot load ONNX model: {str(exc).splitlines()[0]}") from exc
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
