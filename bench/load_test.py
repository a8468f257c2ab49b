"""Load test of the NL-to-SQL service: adaptive batching on vs off, side by side.

For each mode it starts `bentoml serve serving.service:NL2SQL` on a free loopback port (NL2SQL_BATCHING=1
or 0), waits for /readyz, warms up, then runs `--concurrency` clients that POST /sql in a closed loop for
`--duration` seconds, stops the server and prints p50/p99 latency, throughput and errors. Bounded and
loopback-only: it never talks to another host and always stops by itself.

    python bench/load_test.py --model models/onnx/int8 --duration 60 --concurrency 16

The model and databases come from the same settings as the service (--model / NL2SQL_MODEL,
--databases / NL2SQL_DATABASES, --params / NL2SQL_PARAMS, MLFLOW_TRACKING_URI for models:/ URIs).
Questions are the `--split` questions of data/validated/examples.parquet for databases the service knows,
or --questions (a text file, one question per line, all for --db-id). Exit status 1 when any request failed."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from pipelines.common.services import ServiceStartError, free_port, http_service

REPO = Path(__file__).resolve().parents[1]
REQUEST_TIMEOUT_S = 60.0


@dataclass
class ModeResult:
    mode: str
    latencies_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    mean_batch_size: float | None = None

    @property
    def requests(self) -> int:
        return len(self.latencies_ms) + sum(self.errors.values())

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def load_requests(args: argparse.Namespace) -> list[dict]:
    """Request bodies for POST /sql: (question, db_id) pairs the service can answer."""
    if args.questions:
        lines = [line.strip() for line in Path(args.questions).read_text().splitlines() if line.strip()]
        return [{"question": q, "db_id": args.db_id} for q in lines]
    import pandas as pd

    examples = pd.read_parquet(args.examples)
    known = set(json.loads(Path(args.databases).read_text()))
    selected = examples[(examples["split"] == args.split) & (examples["db_id"].isin(known))]
    if selected.empty:
        sys.exit(f"{args.examples}: no {args.split} questions for the databases in {args.databases}")
    return [{"question": q, "db_id": d} for q, d in zip(selected["question"], selected["db_id"], strict=True)]


@contextlib.contextmanager
def running_service(args: argparse.Namespace, batching: bool, log_path: Path):
    """A `bentoml serve` subprocess on a free loopback port; yields its base URL, always stopped after."""
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "NL2SQL_BATCHING": "1" if batching else "0",
        "NL2SQL_MODEL": args.model,
        "NL2SQL_DATABASES": str(Path(args.databases).resolve()),
        "NL2SQL_PARAMS": str(Path(args.params).resolve()),
    }
    base = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "bentoml", "serve", "serving.service:NL2SQL", "--host", "127.0.0.1",
            "--port", str(port), "--working-dir", str(REPO)]
    try:
        with http_service(argv, f"{base}/readyz", log_path, env=env, startup_timeout_s=args.startup_timeout):
            yield base
    except ServiceStartError as exc:
        sys.exit(f"the service did not start: {exc}")


def _batch_histogram(text: str) -> tuple[float, float]:
    """(sum, count) of BentoML's adaptive batch size histogram; (0, 0) when batching is off."""
    def total(suffix: str) -> float:
        pattern = rf"^bentoml_service_adaptive_batch_size_{suffix}\{{[^}}]*\}}\s+(\S+)"
        return sum(float(v) for v in re.findall(pattern, text, re.M))

    return total("sum"), total("count")


async def run_load(base: str, bodies: list[dict], mode: str, duration_s: float, concurrency: int,
                   warmup: int) -> ModeResult:
    result = ModeResult(mode)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        for body in bodies[:warmup]:  # first calls pay one-time costs (graph optimization, caches)
            await client.post("/sql", json=body)
        sum_before, count_before = _batch_histogram((await client.get("/metrics")).text)
        stop_at = time.monotonic() + duration_s

        async def worker(seed: int) -> None:
            rng = random.Random(seed)
            while time.monotonic() < stop_at:
                body = rng.choice(bodies)
                started = time.perf_counter()
                try:
                    response = await client.post("/sql", json=body)
                except httpx.HTTPError as exc:
                    key = type(exc).__name__
                    result.errors[key] = result.errors.get(key, 0) + 1
                    continue
                if response.status_code == 200:
                    result.latencies_ms.append((time.perf_counter() - started) * 1000)
                else:
                    key = f"HTTP {response.status_code}"
                    result.errors[key] = result.errors.get(key, 0) + 1

        began = time.monotonic()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        result.elapsed_s = time.monotonic() - began
        sum_after, count_after = _batch_histogram((await client.get("/metrics")).text)
        if count_after > count_before:
            result.mean_batch_size = (sum_after - sum_before) / (count_after - count_before)
    return result


def print_table(results: list[ModeResult], concurrency: int, duration_s: float) -> None:
    print(f"\n{concurrency} concurrent clients, {duration_s:g} s per mode, POST /sql")
    header = f"{'':22}" + "".join(f"{r.mode:>16}" for r in results)
    print(header)
    print("-" * len(header))
    rows = [
        ("requests ok", lambda r: f"{len(r.latencies_ms)}"),
        ("errors", lambda r: f"{sum(r.errors.values())}"),
        ("throughput (req/s)", lambda r: f"{len(r.latencies_ms) / r.elapsed_s:.1f}" if r.elapsed_s else "-"),
        ("p50 latency (ms)", lambda r: f"{r.percentile(50):.0f}"),
        ("p99 latency (ms)", lambda r: f"{r.percentile(99):.0f}"),
        ("mean latency (ms)", lambda r: f"{statistics.fmean(r.latencies_ms):.0f}" if r.latencies_ms else "-"),
        ("mean batch size", lambda r: f"{r.mean_batch_size:.2f}" if r.mean_batch_size else "-"),
    ]
    for label, cell in rows:
        print(f"{label:22}" + "".join(f"{cell(r):>16}" for r in results))
    for r in results:
        if r.errors:
            print(f"{r.mode}: errors {r.errors}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load per mode (default 60)")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument("--modes", choices=["both", "on", "off"], default="both", help="adaptive batching modes")
    parser.add_argument("--model", default=os.environ.get("NL2SQL_MODEL", "models/onnx/int8"),
                        help="local export directory or models:/ URI (default $NL2SQL_MODEL or models/onnx/int8)")
    parser.add_argument("--databases", default=os.environ.get("NL2SQL_DATABASES", "data/ingested/databases.json"))
    parser.add_argument("--params", default=os.environ.get("NL2SQL_PARAMS", "params.yaml"))
    parser.add_argument("--examples", default="data/validated/examples.parquet")
    parser.add_argument("--split", default="test")
    parser.add_argument("--questions", help="text file, one question per line (instead of --examples)")
    parser.add_argument("--db-id", default=None, help="database of --questions")
    parser.add_argument("--warmup", type=int, default=8, help="requests before measuring (default 8)")
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--log-dir", default="reports/bench", help="server logs go here")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.duration > 3600:
        parser.error("--duration must be in (0, 3600] seconds")
    if not 1 <= args.concurrency <= 256:
        parser.error("--concurrency must be in [1, 256]")
    if args.questions and not args.db_id:
        parser.error("--questions needs --db-id")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bodies = load_requests(args)
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    modes = {"both": [True, False], "on": [True], "off": [False]}[args.modes]
    results = []
    for batching in modes:
        mode = "batching on" if batching else "batching off"
        print(f"[{mode}] starting service ({args.model}) ...", flush=True)
        with running_service(args, batching, log_dir / f"server-{'on' if batching else 'off'}.log") as base:
            print(f"[{mode}] {args.concurrency} clients for {args.duration:g} s ...", flush=True)
            results.append(asyncio.run(run_load(base, bodies, mode, args.duration, args.concurrency, args.warmup)))
    print_table(results, args.concurrency, args.duration)
    if args.json:
        Path(args.json).write_text(json.dumps([
            {"mode": r.mode, "requests_ok": len(r.latencies_ms), "errors": r.errors,
             "throughput_rps": len(r.latencies_ms) / r.elapsed_s if r.elapsed_s else None,
             "p50_ms": r.percentile(50), "p99_ms": r.percentile(99), "mean_batch_size": r.mean_batch_size,
             "concurrency": args.concurrency, "duration_s": args.duration} for r in results], indent=2) + "\n")
    return 1 if any(r.errors for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
