"""Export speed benchmark: PyTorch eager vs ONNX Runtime fp32 vs ONNX Runtime int8, same inputs, one run.

    python bench/export_speed.py [--size teacher|student | --model-dir models/teacher] [--threads 1]
                                 [--out bench/results/export_speed.json]

What it measures (printed with the results):
- the model: `--model-dir` (a PyTorch save_pretrained T5 with tokenizer + serialization.json), or by default a
  throwaway randomly initialized T5 of params.yaml's `train.t5` size (`--size student`: `distill.student`)
  and `tokenize.vocab_size` vocabulary: speed depends on the architecture, not on what the weights learned;
- exported with the export stage's own code (optimum-onnx, decoder with past key values, int8 dynamic
  quantization), loaded with `pipelines.common.onnx_model.load_onnx` (the session options and the decoding
  loop evaluation and serving use); PyTorch decodes with transformers' `generate`;
- for reference, the int8 graphs decoded by optimum's `ORTModelForSeq2SeqLM.generate` (transformers'
  generic loop over ONNX Runtime): the library path, which our own loop replaces;
- greedy generation with exactly `--new-tokens` output tokens per example (end-of-sequence suppressed, so every
  backend does the same number of decoder steps) from `--source-tokens` random input tokens;
- latency p50/p95 (wall) and median CPU time over `--latency-runs` single examples (batch 1), throughput in
  examples/s at batch 16, backends timed round-robin on the same inputs,
  after warm-up runs; file sizes of the weights / graphs. Ratios are printed against the targets
  (int8 >= 3x faster than eager at batch 1; int8 files >= 3x smaller than the fp32 PyTorch weights).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines import export  # noqa: E402
from pipelines.common.onnx_model import load_onnx, session_options  # noqa: E402
from pipelines.common.params import load_params  # noqa: E402

THROUGHPUT_BATCH = 16
SPEEDUP_TARGET = 3.0
SIZE_TARGET = 3.0


def throwaway_model(directory: Path, params_file: Path, size: str) -> str:
    """A random T5 of the teacher's or the student's configured size, saved with a tokenizer and
    serialization.json so it is exported exactly like a trained one. Returns a description for the report."""
    from transformers import T5Config, T5ForConditionalGeneration

    from pipelines.common.serialize import SerializationConfig, save_config
    from pipelines.tokenize import train_unigram_tokenizer

    params = load_params(params_file)
    corpus = ["question: how many customers are there? | schema: customers: id (number, pk), name (text)",
              "select count(*) from customers where city = 'paris'"] * 4
    tokenizer = train_unigram_tokenizer(corpus, vocab_size=params.tokenize.vocab_size,
                                        max_length=params.tokenize.max_source_length)
    t5 = params.train.t5 if size == "teacher" else params.distill.student
    config = T5Config(**t5.model_dump(), vocab_size=params.tokenize.vocab_size,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    save_config(directory, SerializationConfig(serialization=params.tokenize.serialization,
                                               max_source_length=params.tokenize.max_source_length,
                                               max_target_length=params.tokenize.max_target_length,
                                               model_base="scratch"))
    key = "train.t5" if size == "teacher" else "distill.student"
    return (f"throwaway random-init T5 of {params_file} {key} size (d_model={t5.d_model}, d_ff={t5.d_ff}, "
            f"heads={t5.num_heads}, layers={t5.num_layers}+{t5.num_decoder_layers}, "
            f"vocab={params.tokenize.vocab_size})")


def export_both(model_dir: Path, work: Path) -> tuple[Path, Path]:
    raw = work / "raw"
    export.export_fp32(model_dir, raw, work / "fp32")
    export.quantize_graphs(raw, work / "int8-graphs")
    export.assemble(work / "int8-graphs", raw, work / "int8")
    return work / "fp32", work / "int8"


def optimum_model(directory: Path, threads: int):
    """The same int8 graphs behind optimum's ORTModelForSeq2SeqLM (transformers' generate loop)."""
    from optimum.onnxruntime import ORTModelForSeq2SeqLM

    model = ORTModelForSeq2SeqLM.from_pretrained(directory, session_options=session_options(threads),
                                                 use_cache=True, use_merged=False, local_files_only=True)
    # optimum sizes the empty first-step cache with d_model // num_heads; T5 sets the head size apart (d_kv).
    model.decoder.embed_size_per_head = model.config.d_kv
    return model


def timed_generate(model, input_ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) for one greedy generation of exactly `new_tokens`."""
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), num_beams=1,
                                do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if output.shape[1] != new_tokens + 1:  # + the decoder start token
        raise RuntimeError(f"generated {output.shape[1] - 1} tokens, expected {new_tokens}")
    return wall, cpu


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(models: dict, singles: list[torch.Tensor], batch: torch.Tensor, new_tokens: int,
            throughput_runs: int) -> dict:
    """Backends are timed round-robin on each input, so a load change on a shared machine hits all of
    them alike; CPU time is reported next to wall time because it is far less sensitive to such load."""
    for model in models.values():
        timed_generate(model, singles[0], new_tokens)
        timed_generate(model, batch, new_tokens)
    wall = {name: [] for name in models}
    cpu = {name: [] for name in models}
    for input_ids in singles:
        for name, model in models.items():
            seconds, cpu_seconds = timed_generate(model, input_ids, new_tokens)
            wall[name].append(seconds * 1000)
            cpu[name].append(cpu_seconds * 1000)
    batch_seconds = dict.fromkeys(models, 0.0)
    for _ in range(throughput_runs):
        for name, model in models.items():
            batch_seconds[name] += timed_generate(model, batch, new_tokens)[0]
    return {name: {
        "latency_ms_p50": round(statistics.median(wall[name]), 2),
        "latency_ms_p95": round(percentile(wall[name], 0.95), 2),
        "cpu_ms_p50": round(statistics.median(cpu[name]), 2),
        "throughput_examples_per_s": round(throughput_runs * batch.shape[0] / batch_seconds[name], 2),
    } for name in models}


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, help="PyTorch model to benchmark (default: throwaway, see above)")
    parser.add_argument("--size", choices=("teacher", "student"), default="teacher",
                        help="size of the throwaway model: params.yaml train.t5 or distill.student")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for PyTorch and ONNX Runtime alike")
    parser.add_argument("--source-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--latency-runs", type=int, default=20)
    parser.add_argument("--throughput-runs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/export_speed.json",
                        help="where the results are also written as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers import T5ForConditionalGeneration

    with tempfile.TemporaryDirectory(prefix="export-speed-") as tmp:
        work = Path(tmp)
        if args.model_dir is None:
            model_dir = work / "pytorch"
            described = throwaway_model(model_dir, args.params, args.size)
        else:
            model_dir = args.model_dir
            described = f"{model_dir} (its trained weights)"
        print(f"exporting {described} ...", flush=True)
        fp32_dir, int8_dir = export_both(model_dir, work)

        pytorch = T5ForConditionalGeneration.from_pretrained(model_dir).eval()
        generator = torch.Generator().manual_seed(0)
        # Ids above the special tokens (pad 0, eos 1, unk 2); content does not change the work done.
        vocab = pytorch.config.vocab_size

        def random_ids(rows: int) -> torch.Tensor:
            return torch.randint(3, vocab, (rows, args.source_tokens), generator=generator)

        singles = [random_ids(1) for _ in range(args.latency_runs)]
        batch = random_ids(THROUGHPUT_BATCH)
        models = {"pytorch_eager": pytorch,
                  "onnx_fp32": load_onnx(fp32_dir, device="cpu", intra_op_threads=args.threads),
                  "onnx_int8": load_onnx(int8_dir, device="cpu", intra_op_threads=args.threads),
                  "int8_optimum": optimum_model(int8_dir, args.threads)}
        print(f"measuring {', '.join(models)} ...", flush=True)
        results = measure(models, singles, batch, args.new_tokens, args.throughput_runs)
        sizes = {"pytorch_eager": export.weights_bytes(model_dir), "onnx_fp32": export.graph_bytes(fp32_dir),
                 "onnx_int8": export.graph_bytes(int8_dir), "int8_optimum": export.graph_bytes(int8_dir)}
        for name, size in sizes.items():
            results[name]["bytes"] = size

    eager, int8 = results["pytorch_eager"], results["onnx_int8"]
    report = {
        "measured": {
            "model": described, "parameters": pytorch.num_parameters(), "device": "cpu", "threads": args.threads,
            "decoding": "greedy", "source_tokens": args.source_tokens, "new_tokens": args.new_tokens,
            "latency_runs_batch1": args.latency_runs, "throughput_batch": THROUGHPUT_BATCH,
            "throughput_runs": args.throughput_runs, "torch": torch.__version__,
        },
        "results": results,
        "ratios": {
            "int8_speedup_vs_eager_batch1_p50": round(eager["latency_ms_p50"] / int8["latency_ms_p50"], 2),
            "int8_cpu_time_speedup_vs_eager_batch1_p50": round(eager["cpu_ms_p50"] / int8["cpu_ms_p50"], 2),
            "fp32_speedup_vs_eager_batch1_p50": round(
                eager["latency_ms_p50"] / results["onnx_fp32"]["latency_ms_p50"], 2),
            "int8_speedup_vs_optimum_generate_batch1_p50": round(
                results["int8_optimum"]["latency_ms_p50"] / int8["latency_ms_p50"], 2),
            "int8_throughput_vs_eager_batch16": round(
                int8["throughput_examples_per_s"] / eager["throughput_examples_per_s"], 2),
            "pytorch_fp32_bytes_over_int8_bytes": round(eager["bytes"] / int8["bytes"], 2),
            "onnx_fp32_bytes_over_int8_bytes": round(results["onnx_fp32"]["bytes"] / int8["bytes"], 2),
        },
    }
    print_report(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {args.out}")
    return report


def print_report(report: dict) -> None:
    m = report["measured"]
    print(f"\nmodel: {m['model']}, {m['parameters'] / 1e6:.2f}M parameters")
    print(f"greedy, {m['source_tokens']} input tokens -> exactly {m['new_tokens']} output tokens, CPU, "
          f"{m['threads']} thread(s); latency over {m['latency_runs_batch1']} single examples, throughput "
          f"at batch {m['throughput_batch']} x {m['throughput_runs']} runs\n")
    print(f"{'backend':<15}{'p50 ms':>10}{'p95 ms':>10}{'cpu p50 ms':>12}{'ex/s @16':>10}{'MB':>9}")
    for name, r in report["results"].items():
        print(f"{name:<15}{r['latency_ms_p50']:>10.1f}{r['latency_ms_p95']:>10.1f}{r['cpu_ms_p50']:>12.1f}"
              f"{r['throughput_examples_per_s']:>10.1f}{r['bytes'] / 1e6:>9.2f}")
    r = report["ratios"]
    speed, size = r["int8_speedup_vs_eager_batch1_p50"], r["pytorch_fp32_bytes_over_int8_bytes"]
    print(f"\nint8 vs eager, batch-1 p50: {speed:.2f}x faster in wall time (target >= {SPEEDUP_TARGET}x: "
          f"{'met' if speed >= SPEEDUP_TARGET else 'NOT met'}), "
          f"{r['int8_cpu_time_speedup_vs_eager_batch1_p50']:.2f}x in CPU time")
    print(f"int8 with our decoding loop vs the same graphs under optimum's generate, batch-1 p50: "
          f"{r['int8_speedup_vs_optimum_generate_batch1_p50']:.2f}x")
    print(f"fp32 ONNX vs eager, batch-1 p50: {r['fp32_speedup_vs_eager_batch1_p50']:.2f}x; "
          f"int8 vs eager throughput at batch 16: {r['int8_throughput_vs_eager_batch16']:.2f}x")
    print(f"PyTorch fp32 weights / int8 ONNX files: {size:.2f}x smaller (target >= {SIZE_TARGET}x: "
          f"{'met' if size >= SIZE_TARGET else 'NOT met'}); fp32 ONNX / int8 ONNX: "
          f"{r['onnx_fp32_bytes_over_int8_bytes']:.2f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
