"""Choosing where training runs: CUDA when present, CPU otherwise, bf16 where the hardware supports it.
Called before any data or model is loaded, so a wrong `device` setting fails in a second, not after setup."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch

from pipelines.common.errors import PipelineError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceChoice:
    device: Literal["cpu", "cuda"]
    bf16: bool
    name: str  # human-readable, for logs and metrics (e.g. "cuda:0 NVIDIA H200", "cpu (16 threads)")


def cuda_bf16_supported() -> bool:
    """True on GPUs with native bf16 (Ampere and later, e.g. Hopper)."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def choose_device(
    requested: Literal["auto", "cpu", "cuda"], bf16: Literal["auto"] | bool = "auto", key: str = "train"
) -> DeviceChoice:
    """Resolve `<key>.device` / `<key>.bf16` from params to a concrete device and precision."""
    has_cuda = torch.cuda.is_available()
    if requested == "cuda" and not has_cuda:
        raise PipelineError(
            f"params.yaml: {key}.device is 'cuda' but no CUDA GPU is visible to torch "
            f"(torch {torch.__version__}, cuda build: {torch.version.cuda or 'no'}); use 'auto' or 'cpu'"
        )
    device: Literal["cpu", "cuda"] = "cuda" if requested == "cuda" or (requested == "auto" and has_cuda) else "cpu"
    if bf16 == "auto":
        use_bf16 = device == "cuda" and cuda_bf16_supported()
    else:
        use_bf16 = bool(bf16)
        if use_bf16 and device == "cuda" and not cuda_bf16_supported():
            raise PipelineError(
                f"params.yaml: {key}.bf16 is true but {torch.cuda.get_device_name(0)} has no bf16 support; "
                "use 'auto' or false"
            )
    if device == "cuda":
        name = f"cuda:{torch.cuda.current_device()} {torch.cuda.get_device_name()}"
    else:
        name = f"cpu ({torch.get_num_threads()} threads)"
    log.info("device: %s, bf16: %s", name, use_bf16)
    return DeviceChoice(device=device, bf16=use_bf16, name=name)
