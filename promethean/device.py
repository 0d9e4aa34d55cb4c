"""Device and dtype choice: cuda, then mps, then cpu, unless the user says otherwise."""

from __future__ import annotations

import torch

from promethean.errors import PrometheanError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str | None = None) -> torch.device:
    """The requested device, or the best available one; an unavailable request is an error."""
    if name is None or name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PrometheanError(f"'{name}' is not a device; use cpu, cuda, cuda:N, mps or auto.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PrometheanError("device 'cuda' was requested but no CUDA GPU is available.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise PrometheanError(
            f"device '{name}' was requested but only {torch.cuda.device_count()} CUDA GPU(s) exist."
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise PrometheanError("device 'mps' was requested but Apple MPS is not available.")
    if device.type not in ("cpu", "cuda", "mps"):
        raise PrometheanError(f"device type '{device.type}' is not supported; use cpu, cuda or mps.")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name not in DTYPES:
        raise PrometheanError(f"unknown dtype '{name}'; use one of {', '.join(DTYPES)}.")
    dtype = DTYPES[name]
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise PrometheanError("this GPU does not support bf16; use --dtype fp16 or fp32.")
    return dtype
