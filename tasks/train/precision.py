"""Which precision the trainer runs in: measured on the machine at hand, never assumed.

Whether bf16 pays depends on the CPU (none on AVX2-only CPUs, where it runs 30-40x slower;
AVX512-BF16 or AMX make it faster) and on the batch: `probe_precision` times the model's own
training pass in both, and `resolve_precision` keeps bf16 only when it clearly wins.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import torch

from ember.model.device import autocast, synchronize
from ember.model.transformer import Transformer

# (model config, windows, seq_len, device, threads) -> seconds per round, by precision
_PROBES: dict[tuple[object, ...], dict[str, list[float]]] = {}


def probe_precision(model: Transformer, windows: int, seq_len: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per training pass (forward and backward) of `model` on a micro-batch of random
    tokens (`windows` x `seq_len`), in fp32 and under bf16 autocast, in rounds: fp32 then bf16.

    The model's own step at the real shapes rather than bare matmuls: whether bf16 pays
    depends on the CPU's bf16 units (none on AVX2-only CPUs, where it runs 30-40x slower;
    AVX512-BF16 or AMX make it faster) and on the batch (autocast casts every weight once per
    forward, which small batches do not amortize). First one window each, after a warm-up:
    bf16 3x slower there ends the probe (cheaply, on CPUs without bf16 units: one round). Else
    the whole micro-batch, after a warm-up at that size too, in two rounds, each timing fp32
    and bf16 back to back, so that a burst of load from other processes shows as a round that
    disagrees. Costs about 6 training steps. Gradients are cleared after; the global RNG is not
    touched. Cached per process by shape, device and thread count.
    """
    key = (tuple(asdict(model.config).items()), windows, seq_len, str(device), torch.get_num_threads())
    if key in _PROBES:
        return _PROBES[key]
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(0, model.config.vocab_size, (windows, seq_len + 1), generator=generator).to(device)

    def seconds(precision: str, rows: int) -> float:
        synchronize(device)
        started = time.perf_counter()
        with autocast(device, precision):
            _, loss = model(batch[:rows, :-1], batch[:rows, 1:])
        loss.backward()
        synchronize(device)
        return time.perf_counter() - started

    try:
        seconds("fp32", 1), seconds("bf16", 1)  # warm-up: kernels, caches, lazy initialisation
        times = {"fp32": [seconds("fp32", 1)], "bf16": [seconds("bf16", 1)]}
        if times["bf16"][0] < 3 * times["fp32"][0]:
            seconds("fp32", windows), seconds("bf16", windows)  # warm-up at these shapes (allocations)
            times = {"fp32": [], "bf16": []}
            for _ in range(2):
                for precision in times:
                    times[precision].append(seconds(precision, windows))
    finally:
        model.zero_grad(set_to_none=True)
    _PROBES[key] = times
    return times


def resolve_precision(
    requested: str, model: Transformer, windows: int, seq_len: int, device: torch.device
) -> tuple[str, str]:
    """The precision to train in, and why."""
    if requested != "auto":
        return requested, "set in the config"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: CUDA with bf16 support"
        return "fp32", "auto: this CUDA device has no bf16"
    t = probe_precision(model, windows, seq_len, device)
    # Only a clear win in every round counts, so that timing noise does not flip the choice.
    choice = "bf16" if all(b < 0.8 * f for f, b in zip(t["fp32"], t["bf16"], strict=True)) else "fp32"

    def rounds(xs: list[float]) -> str:
        return "/".join(f"{x * 1e3:.1f}" for x in xs)

    return choice, (
        f"auto: a training pass took {rounds(t['fp32'])} ms in fp32, {rounds(t['bf16'])} ms "
        f"under bf16 autocast on {device.type}"
    )
