"""Where a model runs and in which precision: the device pick and bf16 autocast."""

from __future__ import annotations

import contextlib

import torch


def pick_device(name: str) -> torch.device:
    """`auto`: CUDA, then MPS, then CPU; any other name as it is."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def autocast(device: torch.device, precision: str | None = None) -> contextlib.AbstractContextManager[None, None]:
    """bf16 autocast when `precision` is bf16; None = the default for the device (bf16 on CUDA)."""
    if precision is None:
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timings must not stop before the work does)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
