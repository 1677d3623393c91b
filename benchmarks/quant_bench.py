"""Generation speed and size of fp32, dynamic int8 and weight-only int8 models.

Batch 1, greedy, KV cache (`ember.model.generate`), a fixed number of new tokens after a
warm-up, the same torch thread count for every model. Two shapes: the sample run's "cpu"
preset at vocab 4096 (random weights, or a trained checkpoint with `--model DIR`) and a larger
one of 31.5M parameters (dim 512, 8 layers, 8 heads, hidden 1536, vocab 8192, random
weights). Prints tokens/s with ratios against fp32, the file and Linear-weight sizes, where
one decoding step spends its time (the Linear layers, the tied fp32 output projection over the
vocabulary, and the rest: attention, norms, rotary, Python), timed in place with forward hooks,
and the prefill time of 1-128 positions, where weight-only int8's two code paths cross.
Generation is also timed for the three models in `use_decoding_layout`, as the demo and the
evaluate stage load them (the step breakdown is of the plain layout: the fused products of the
decoding layout bypass the hooked Linear modules).

    .venv/bin/python benchmarks/quant_bench.py [--threads 2] [--new-tokens 256] [--repeat 3] [--model DIR]

Random weights are fine for speed: every model generates exactly --new-tokens tokens (no EOS
stop), and the work per token does not depend on the values.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import tempfile
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

import torch

from ember.model.checkpoint import load_model, save_model  # noqa: E402
from ember.model.decoding import use_decoding_layout  # noqa: E402
from ember.model.generate import generate  # noqa: E402
from ember.model.quantize import (  # noqa: E402
    INT8_WEIGHTS,
    WO_INT8_WEIGHTS,
    Int8WeightOnlyLinear,
    linear_weight_bytes,
    quantize_int8,
    quantize_per_channel,
    quantize_weight_only_int8,
    save_int8,
    save_weight_only_int8,
)
from ember.model.transformer import PRESETS, ModelConfig, Transformer  # noqa: E402

SHAPES = {
    "cpu": dict(vocab_size=4096, **PRESETS["cpu"]),
    "larger": dict(vocab_size=8192, dim=512, n_layers=8, n_heads=8, hidden_dim=1536, max_seq_len=512),
}
PROMPT = [2, 464, 1174, 286]  # EOS then a few ids, as evaluate's prompts start


class _DequantPath:
    """Weight-only int8 with the CPU packed kernel switched off: every call dequantizes."""

    def __enter__(self):
        self.saved = Int8WeightOnlyLinear.packed_max_rows
        Int8WeightOnlyLinear.packed_max_rows = 0

    def __exit__(self, *exc):
        Int8WeightOnlyLinear.packed_max_rows = self.saved


def tokens_per_s(model, new_tokens: int, context=nullcontext) -> float:
    with context():
        started = time.perf_counter()
        n = sum(1 for _ in generate(model, PROMPT, new_tokens, temperature=0))
        seconds = time.perf_counter() - started
    assert n == new_tokens, f"generated {n} tokens, expected {new_tokens}"
    return n / seconds


def _median_us(fn, n: int = 200) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - started) / n * 1e6)
    return statistics.median(times)


def _is_linear(module: torch.nn.Module) -> bool:
    # Here, not at the top: ember.model.quantize has imported it by now, with torch.ao's
    # deprecation warnings silenced (and does not re-export it).
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    # nn.Linear, torch.ao's dynamic quantized Linear (not an nn.Linear subclass), ours
    return isinstance(module, (torch.nn.Linear, DynamicLinear, Int8WeightOnlyLinear))


@torch.inference_mode()
def step_breakdown(model: Transformer, context=nullcontext, steps: int = 100) -> dict:
    """Microseconds per decoding step (one token at position 64), and where they go, timed in place
    with forward hooks: the Linear layers, the output projection (from the end of the final norm
    to the end of the forward), and the rest. Timing pieces alone would flatter them: a weight
    used 200 times in a row sits in cache, while in a real step each weight is read once."""
    cache = model.new_kv_cache(1)
    model(torch.tensor([list(range(64))]), kv_cache=cache, start_pos=0)  # a partly filled context
    token = torch.tensor([[7]])

    def one_step():
        model(token, kv_cache=cache, start_pos=64)

    with context():
        for _ in range(10):
            one_step()
        started = time.perf_counter()
        for _ in range(steps):
            one_step()
        plain = (time.perf_counter() - started) / steps * 1e6

        spent = {"linears": 0.0, "head": 0.0}
        marks: dict = {}

        def before(module, args):
            marks[module] = time.perf_counter()

        def after_linear(module, args, out):
            spent["linears"] += time.perf_counter() - marks[module]

        def after_norm(module, args, out):
            marks["norm"] = time.perf_counter()

        def after_model(module, args, out):
            spent["head"] += time.perf_counter() - marks["norm"]

        handles = [model.norm.register_forward_hook(after_norm), model.register_forward_hook(after_model)]
        for module in model.modules():
            if _is_linear(module):
                handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after_linear)]
        one_step()
        spent.update(linears=0.0, head=0.0)  # forget the warm-up step
        started = time.perf_counter()
        for _ in range(steps):
            one_step()
        hooked = (time.perf_counter() - started) / steps * 1e6
        for handle in handles:
            handle.remove()
    linears, head = spent["linears"] / steps * 1e6, spent["head"] / steps * 1e6
    return {"step": plain, "hooked": hooked, "linears": linears, "head": head, "rest": hooked - linears - head}


@torch.inference_mode()
def int8_head_us(model: Transformer) -> float:
    """What the output projection would cost as a weight-only int8 matmul (the packed CPU kernel)."""
    q, scale = quantize_per_channel(model.tok_embeddings.weight)
    scale = scale.to(torch.bfloat16)
    h = torch.randn(1, model.config.dim)
    return _median_us(lambda: torch._weight_int8pack_mm(h.to(torch.bfloat16), q, scale).float())


@torch.inference_mode()
def forward_ms(model, rows: int, context=nullcontext) -> float:
    """Median milliseconds of one forward over `rows` positions at once (a prompt's prefill)."""
    idx = torch.randint(0, model.config.vocab_size, (1, rows))
    with context():
        for _ in range(3):
            model(idx)
        times = []
        for _ in range(7):
            started = time.perf_counter()
            model(idx)
            times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


class _PackedPath(_DequantPath):
    """Weight-only int8 with the CPU packed kernel for any number of rows."""

    def __enter__(self):
        self.saved = Int8WeightOnlyLinear.packed_max_rows
        Int8WeightOnlyLinear.packed_max_rows = 1 << 30


def file_sizes(model: Transformer, dynamic, weight_only) -> dict[str, int]:
    with tempfile.TemporaryDirectory() as tmp:
        save_model(model, tmp)
        save_int8(dynamic, tmp)
        save_weight_only_int8(weight_only, tmp)
        return {
            name: (Path(tmp) / f).stat().st_size
            for name, f in (("fp32", "model.safetensors"), ("int8", INT8_WEIGHTS), ("int8-wo", WO_INT8_WEIGHTS))
        }


def bench_shape(label: str, model: Transformer, args) -> None:
    model = model.eval()
    dynamic = quantize_int8(model)
    weight_only = quantize_weight_only_int8(model)
    runs = [
        ("fp32", model, nullcontext),
        ("int8 (dynamic)", dynamic, nullcontext),
        ("int8-wo (weight-only)", weight_only, nullcontext),
        ("int8-wo, dequant path only", weight_only, _DequantPath),
    ]
    # The same three models as the demo and the evaluate stage load them (use_decoding_layout):
    # fp32 gains most; the int8 models keep their kernels and gain a column-major output projection.
    relaid = [
        (f"{name}, decoding layout", use_decoding_layout(copy.deepcopy(m)), nullcontext) for name, m, _ in runs[:3]
    ]
    cfg = model.config
    print(
        f"\n## {label}: dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads ({cfg.n_kv_heads} kv), "
        f"hidden {cfg.hidden_dim}, vocab {cfg.vocab_size}, context {cfg.max_seq_len}; "
        f"{model.num_params():,} parameters\n"
    )

    timed_runs = runs + relaid
    for _, m, ctx in timed_runs:  # warm-up: allocator, kernels' first calls, caches
        tokens_per_s(m, 32, ctx)
    speeds: dict[str, list[float]] = {name: [] for name, _, _ in timed_runs}
    for rep in range(args.repeat):
        order = timed_runs[rep % len(timed_runs) :] + timed_runs[: rep % len(timed_runs)]  # drift hits all alike
        for name, m, ctx in order:
            speeds[name].append(tokens_per_s(m, args.new_tokens, ctx))
    base = statistics.median(speeds["fp32"])
    served = statistics.median(speeds["fp32, decoding layout"])
    print(
        f"Generation: batch 1, greedy, {args.new_tokens} new tokens after a {len(PROMPT)}-token prompt, "
        f"{torch.get_num_threads()} threads, median of {args.repeat}:\n"
    )
    print("| model | tokens/s | per pass | vs fp32 | vs fp32, decoding layout |")
    print("|---|---:|---|---:|---:|")
    for name, values in speeds.items():
        med = statistics.median(values)
        print(
            f"| {name} | {med:.1f} | {', '.join(f'{v:.0f}' for v in values)} | {med / base:.2f}x | "
            f"{med / served:.2f}x |"
        )

    files = file_sizes(model, dynamic, weight_only)
    linear = {
        "fp32": linear_weight_bytes(model),
        "int8": linear_weight_bytes(dynamic),
        "int8-wo": linear_weight_bytes(weight_only),
    }
    print("\n| model | file bytes | vs fp32 | Linear weight bytes | vs fp32 |")
    print("|---|---:|---:|---:|---:|")
    for name in files:
        print(
            f"| {name} | {files[name]:,} | {files[name] / files['fp32']:.3f} | {linear[name]:,} | "
            f"{linear[name] / linear['fp32']:.3f} |"
        )

    print("\nOne decoding step (one token at position 64), microseconds, pieces timed in place by forward hooks:\n")
    print(
        "| model | step | step with hooks | Linear layers | output projection (fp32, tied) | "
        "rest (attention, norms, rope, Python, hooks) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    breakdowns = {}
    for name, m, ctx in runs:
        b = breakdowns[name] = step_breakdown(m, ctx)
        share = {k: f"{b[k]:.0f} ({100 * b[k] / b['hooked']:.0f}%)" for k in ("linears", "head", "rest")}
        print(
            f"| {name} | {b['step']:.0f} | {b['hooked']:.0f} | {share['linears']} | {share['head']} | {share['rest']} |"
        )
    print(
        "\nOne forward over T positions at once (a prompt's prefill), milliseconds: where weight-only int8's "
        f"two paths cross (it switches at {Int8WeightOnlyLinear.packed_max_rows} rows):\n"
    )
    print("| T | fp32 | int8 (dynamic) | int8-wo, packed kernel | int8-wo, dequantizing |")
    print("|---:|---:|---:|---:|---:|")
    for rows in (1, 8, 16, 24, 32, 48, 64, 128):
        if rows <= cfg.max_seq_len:
            packed, dequant = forward_ms(weight_only, rows, _PackedPath), forward_ms(weight_only, rows, _DequantPath)
            print(
                f"| {rows} | {forward_ms(model, rows):.2f} | {forward_ms(dynamic, rows):.2f} | "
                f"{packed:.2f} | {dequant:.2f} |"
            )

    head8 = int8_head_us(model)
    print(
        f"\nThe output projection alone as a packed int8 matmul: {head8:.0f} us (in cache; in place it "
        f"took {breakdowns['fp32']['head']:.0f} us in fp32)."
    )
    for name in ("int8 (dynamic)", "int8-wo (weight-only)"):
        b, f = breakdowns[name], breakdowns["fp32"]
        print(
            f"{name}: step {f['step'] / b['step']:.2f}x faster than fp32; with an int8 output projection "
            f"about {f['hooked'] / (b['hooked'] - b['head'] + head8):.2f}x (an estimate)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads for all")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3, help="passes (medians are reported)")
    parser.add_argument("--model", type=Path, help="a trained model folder (train artifact) for the cpu row")
    parser.add_argument("--only", choices=list(SHAPES), help="one shape only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(
        f"# quant_bench, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start"
    )
    for label, shape in SHAPES.items():
        if args.only and label != args.only:
            continue
        if label == "cpu" and args.model:
            model, label = load_model(args.model), f"cpu preset, trained checkpoint {args.model}"
        else:
            torch.manual_seed(0)
            model = Transformer(ModelConfig(**shape))
            label = f"{label} (random weights)"
        bench_shape(label, model, args)
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
