"""Start an HTTP server as a child process, wait until it answers, always stop it (tests, benchmarks, scripts)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx


class ServiceStartError(RuntimeError):
    """The server exited or did not become healthy in time; the message ends with its log's tail."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(process: subprocess.Popen, grace_s: float = 30) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)  # the whole session: servers fork workers
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def http_service(argv: list[str], health_url: str, log_path: Path, *, env: Mapping[str, str] | None = None,
                 cwd: Path | None = None, startup_timeout_s: float = 300) -> Iterator[subprocess.Popen]:
    """Run `argv` in its own process session with output to `log_path`; yield once GET `health_url` is 200."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log_file:
        process = subprocess.Popen(argv, cwd=cwd, env=None if env is None else dict(env), stdout=log_file,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if process.poll() is not None:
                raise ServiceStartError(f"{argv[:4]} exited {process.returncode}:\n{log_path.read_text()[-4000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(health_url, timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise ServiceStartError(f"{health_url} not healthy within {startup_timeout_s:.0f} s:\n"
                                        f"{log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        yield process
    finally:
        _stop(process)
