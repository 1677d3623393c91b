"""Training and generation speed of Ember's transformer against Hugging Face `LlamaForCausalLM`.

The same shapes on both sides: a `LlamaConfig` built from Ember's `ModelConfig` (tied
embeddings, same vocabulary, no biases, SDPA attention), random tokens, the same batch, the
same fused AdamW (decay on matrices only, as Ember's train stage), gradient clipping and the
same torch thread count. Training runs in rounds: one step of each side per round, the order
rotating, so load from other processes on a shared machine falls on all alike; medians.
Each step is timed by the wall clock and by the process's CPU time (which time-slicing by other
processes leaves alone; on a quiet machine it is threads x wall).

Precision. Ember trains as its train stage would here: `--precision auto` is the stage's
`precision: auto` (bf16 on CUDA; on CPU a short probe picks bf16 autocast only where it measures
faster). transformers runs in fp32, what it does on CPU unless told otherwise; when Ember picked
bf16, transformers under bf16 autocast (its Trainer's `bf16=True`) and Ember in fp32 run too, so
each precision is also compared like for like. Reported:

- the machine's matmul GFLOP/s (fp32 on CPU, bf16 on CUDA) on the model's own shapes (every
  projection's forward product and its two backward products), with the same threads; the best
  of them is "peak", and is re-measured in every round;
- Ember's and transformers' model FLOPs utilization (MFU) against the median of that peak, with
      training FLOPs per token = 6 * N + 6 * n_layers * seq * dim
  where N is the parameter count with the tied embedding once (every parameter but the norm
  gains sits in a matmul, the embedding through the output projection); 6 = 2 forward + 4
  backward FLOPs per weight per token. The second term is causal attention (QK^T and AV:
  2 products x 2 FLOPs x seq x dim per layer and token forward, x3 with backward, halved for the
  causal mask; PaLM's appendix B counts 12 * n_layers * seq * dim, without the halving: ours is
  the stricter figure);
- generation, batch 1, greedy, `--new-tokens` after an 8-token prompt: Ember with its KV cache,
  its weights in `use_decoding_layout` as the demo and the evaluate stage load them;
  `transformers`' `generate()` (KV cache, greedy) on the very same weights (`export_hf` writes
  them, `from_pretrained` reads them back, and the logits are checked to agree first); on CPU,
  for reference, the same `generate()` after `use_decoding_layout` restrides its weights too
  (no fusion: its projections are not Ember's modules), which shows how much of the gap is the
  memory layout; and Ember recomputing the whole sequence for every token (no cache; timed once).

On CUDA (when present) the same script runs unchanged: bf16 autocast, fused AdamW, SDPA picks
flash attention for bf16 causal attention, `--compile` compiles both models for training, and
`--preset small` is the seed guide's 110M shape (137.8M at vocab 32000, 119.6M at 8192).

    .venv/bin/python benchmarks/train_bench.py [--preset cpu-base] [--vocab 8192] [--batch 4] \
        [--seq 256] [--threads 2] [--steps 3] [--repeat 3] [--new-tokens 256] [--compile] \
        [--skip-training] [--skip-generation] [--skip-uncached]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar, cast

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402

from ember.model.checkpoint import save_model  # noqa: E402
from ember.model.decoding import use_decoding_layout  # noqa: E402
from ember.model.device import autocast  # noqa: E402
from ember.model.export import export_hf  # noqa: E402
from ember.model.generate import generate  # noqa: E402
from ember.model.transformer import PRESETS, ModelConfig, Transformer, configure_optimizer  # noqa: E402
from ember.tasks.train import resolve_precision  # noqa: E402

PROMPT = [2, 464, 1174, 286, 318, 257, 1332, 13]  # EOS then a few ids, as evaluate's prompts start


# -- the two models ------------------------------------------------------------------------------


def llama_config(cfg: ModelConfig):
    """The `LlamaConfig` of Ember's shapes."""
    from transformers import LlamaConfig

    # transformers 5 declares LlamaConfig as a dataclass of its fields only, yet its __init__
    # takes further keywords (rope_theta and attn_implementation, 4.x's names, are converted).
    return LlamaConfig(  # type: ignore[call-arg]
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
        use_cache=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def hf_model(cfg: ModelConfig, device: torch.device):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    # transformers wraps `to` in functools.wraps, whose typeshed type does not bind `self`.
    model = LlamaForCausalLM(llama_config(cfg)).to(device)  # type: ignore[arg-type]
    assert model.lm_head.weight is model.model.embed_tokens.weight, "HF model's embeddings are not tied"
    return model


def adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    """Ember's optimizer for either model (decay on matrices, the fused kernel), as its train stage makes it."""
    return configure_optimizer(model, weight_decay=0.1, lr=1e-4, betas=(0.9, 0.95))


def ember_loss(model, x, y):
    return model(x, y)[1]


def hf_loss(model, x, y):
    # HF shifts labels inside; give it x and the same targets by passing logits' own labels.
    logits = model(input_ids=x, use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))


# -- timing --------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step(model, opt, loss_fn, x, y, device, precision: str) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one optimizer step."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    with autocast(device, precision):
        loss = loss_fn(model, x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def matmul_gflops(
    m: int, k: int, n: int, device: torch.device, dtype: torch.dtype, seconds: float = 0.3
) -> tuple[float, float]:
    """(GFLOP/s by wall time, GFLOP per CPU-second) of (m, k) @ (k, n): the best of a few tries."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    torch.mm(a, b)
    best_wall = best_cpu = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or best_wall == 0.0:
        sync(device)
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(3):
            torch.mm(a, b)
        sync(device)
        flops = 3 * 2 * m * k * n / 1e9
        best_wall = max(best_wall, flops / (time.perf_counter() - wall))
        best_cpu = max(best_cpu, flops / max(time.process_time() - cpu, 1e-9))
    return best_wall, best_cpu


def model_matmul_shapes(cfg: ModelConfig, tokens: int) -> list[tuple[int, int, int]]:
    """(m, k, n) of every projection's forward product and its two backward products."""
    d, h, kv = cfg.dim, cfg.hidden_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = set()
    for k, n in {(d, d), (d, kv), (d, h), (h, d), (d, cfg.vocab_size)}:
        shapes |= {(tokens, k, n), (tokens, n, k), (k, tokens, n)}  # forward, grad input, grad weight
    return sorted(shapes)


def train_flops_per_token(cfg: ModelConfig, n_params: int, seq: int) -> float:
    return 6 * n_params + 6 * cfg.n_layers * seq * cfg.dim


# -- generation ----------------------------------------------------------------------------------


@torch.inference_mode()
def ember_uncached(model: Transformer, prompt: list[int], new_tokens: int) -> list[int]:
    ids = list(prompt)
    device = model.tok_embeddings.weight.device
    for _ in range(new_tokens):
        logits, _ = model(torch.tensor([ids], device=device))
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) :]


T = TypeVar("T")


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


# -- main ----------------------------------------------------------------------------------------


def fmt(x: float, digits: int = 1) -> str:
    return f"{x:,.{digits}f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu-base", choices=list(PRESETS))
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256, help="training sequence length")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per side (times --repeat)")
    parser.add_argument(
        "--repeat", type=int, default=3, help="generation runs per side; training rounds are --steps x --repeat"
    )
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="Ember's training precision, as the train stage's `precision` (auto: a probe decides)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-generation", action="store_true")
    parser.add_argument("--skip-uncached", action="store_true", help="leave out the slow no-cache run")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = ModelConfig(vocab_size=args.vocab, **PRESETS[args.preset])
    if args.seq > cfg.max_seq_len:
        parser.error(f"--seq {args.seq} exceeds the preset's max_seq_len {cfg.max_seq_len}")
    torch.manual_seed(0)
    ember = Transformer(cfg).to(device)
    n_params = ember.num_params()
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"# train_bench {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}")
    print(
        f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, "
        f"device {device}{' ' + torch.cuda.get_device_name() if device.type == 'cuda' else ''}, "
        f"torch {torch.__version__}, {args.threads} threads, load average {load[0]:.2f} at start"
    )
    print(
        f"model: preset {args.preset}, vocab {cfg.vocab_size}, dim {cfg.dim}, {cfg.n_layers} layers, "
        f"{cfg.n_heads} heads ({cfg.n_kv_heads} kv), hidden {cfg.hidden_dim}: {n_params:,} parameters"
    )

    if not args.skip_training:
        run_training(args, cfg, ember, n_params, device)
    if not args.skip_generation:
        run_generation(args, cfg, ember, device)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"\nload average at the end: {load[0]:.2f} (1 min), {load[1]:.2f} (5 min)")


def run_training(args, cfg: ModelConfig, ember: Transformer, n_params: int, device: torch.device) -> None:
    # Ember trains in the precision its train stage would pick here (`--precision auto`: bf16
    # on CUDA; on CPU whichever a short probe measures faster). transformers is measured in
    # fp32, what it does on CPU unless told otherwise (its Trainer's default), and, when Ember
    # picked bf16, also under bf16 autocast (Trainer's `bf16=True`), with Ember in fp32 beside
    # it: so each precision is compared like for like as well.
    precision, why = resolve_precision(args.precision, ember, args.batch, args.seq, device)
    hf = hf_model(cfg, device)
    assert sum(p.numel() for p in hf.parameters()) == n_params, "the two models' parameter counts differ"
    # name -> (model, loss function, precision); every model starts from its own copy of the weights
    sides: dict[str, tuple[torch.nn.Module, Callable[..., torch.Tensor], str]] = {
        f"ember {precision}": (ember, ember_loss, precision)
    }
    if device.type == "cpu":
        sides["transformers fp32"] = (hf, hf_loss, "fp32")
        if precision == "bf16":
            sides["ember fp32"] = (copy.deepcopy(ember), ember_loss, "fp32")
            sides["transformers bf16"] = (copy.deepcopy(hf), hf_loss, "bf16")
    else:  # a GPU: both in Ember's precision (bf16 wherever the device has it)
        sides[f"transformers {precision}"] = (hf, hf_loss, precision)
    baseline = "transformers fp32" if device.type == "cpu" else f"transformers {precision}"
    for model, _, _ in sides.values():
        model.train()
    if args.compile:
        # cast: compile() returns an OptimizedModule, a module, which torch types as a plain callable.
        sides = {name: (cast(torch.nn.Module, torch.compile(m)), fn, p) for name, (m, fn, p) in sides.items()}
    opts = {name: adamw(m) for name, (m, _, _) in sides.items()}
    g = torch.Generator().manual_seed(0)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g)
        return x[:, :-1].to(device), x[:, 1:].to(device)

    tokens = args.batch * args.seq
    dtypes = {p: torch.bfloat16 if p == "bf16" else torch.float32 for _, _, p in sides.values()}
    shapes = model_matmul_shapes(cfg, tokens)
    sweeps = {p: {shape: matmul_gflops(*shape, device, dtype) for shape in shapes} for p, dtype in dtypes.items()}
    peak_shapes = {p: max(sweep, key=lambda s: sweep[s][1]) for p, sweep in sweeps.items()}
    for name, (model, loss_fn, p) in sides.items():  # warm-up: allocations, optimizer state, compile
        for _ in range(2 if args.compile else 1):
            train_step(model, opts[name], loss_fn, *batch(), device, p)

    # Rounds of: the peak matmul shape of each precision, then one step of each side (the order
    # rotating), so a burst of load from other processes falls on all alike.
    rounds = []
    names = list(sides)
    for r in range(args.repeat * args.steps):
        row = {f"matmul {p}": matmul_gflops(*peak_shapes[p], device, dtypes[p], seconds=0.1) for p in dtypes}
        for name in names[r % len(names) :] + names[: r % len(names)]:
            model, loss_fn, p = sides[name]
            row[name] = train_step(model, opts[name], loss_fn, *batch(), device, p)
        rounds.append(row)
    del opts

    flops_step = train_flops_per_token(cfg, n_params, args.seq) * tokens
    print(
        f"\n## Training: batch {args.batch} x seq {args.seq} = {tokens} tokens per step, fused AdamW, "
        f"grad clipping{', compiled' if args.compile else ''}; {len(rounds)} rounds, one step of each side per "
        f"round (rotating order), medians"
    )
    print(f"Ember's precision: {precision} ({why})")
    for p, sweep in sweeps.items():
        lo, hi = min(v[0] for v in sweep.values()), max(v[0] for v in sweep.values())
        print(
            f"matmul {p} at the model's {len(shapes)} shapes (forward and both backward products of each "
            f"projection, same threads): {lo:.0f}-{hi:.0f} GFLOP/s; the best, {peak_shapes[p]} (m, k, n), "
            f"re-measured in every round: median {statistics.median(r[f'matmul {p}'][0] for r in rounds):.0f} "
            f"GFLOP/s ({statistics.median(r[f'matmul {p}'][1] for r in rounds):.0f} GFLOP per CPU-second)"
        )
    print(
        f"training FLOPs per token = 6 * N + 6 * n_layers * seq * dim = 6 * {n_params:,} + 6 * {cfg.n_layers} * "
        f"{args.seq} * {cfg.dim} = {flops_step / tokens / 1e6:.1f} MFLOP"
    )
    print(
        "MFU = FLOPs per step / median s per step / median matmul FLOP/s of the side's precision in the same "
        "rounds; 'by CPU time' uses the process's CPU seconds, which time-slicing by other processes leaves "
        "alone"
    )
    med = {}
    for name, (_, _, p) in sides.items():
        wall = statistics.median(r[name][0] for r in rounds)
        cpu = statistics.median(r[name][1] for r in rounds)
        # Medians first, then the ratio: a median of per-round ratios would not match the
        # tokens/s column when the load swings between rounds.
        mfu = flops_step / wall / 1e9 / statistics.median(r[f"matmul {p}"][0] for r in rounds)
        mfu_cpu = flops_step / cpu / 1e9 / statistics.median(r[f"matmul {p}"][1] for r in rounds)
        med[name] = (wall, cpu, mfu, mfu_cpu)
    on_cpu = device.type == "cpu"
    print(
        f"\n| side | s/step (median) | tokens/s | MFU | CPU s/step | MFU by CPU time | vs {baseline} "
        f"(wall / CPU time) | vs transformers in the same precision (wall) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, (wall, cpu, mfu, mfu_cpu) in med.items():
        base, same = med[baseline], med[f"transformers {sides[name][2]}"]
        # the host's CPU time says nothing about GPU work
        ratio = f"{base[0] / wall:.2f}x / {base[1] / cpu:.2f}x" if on_cpu else f"{base[0] / wall:.2f}x / -"
        cpu_cols = f"{cpu:.3f} | {mfu_cpu:.1%}" if on_cpu else "- | -"
        print(
            f"| {name} | {wall:.3f} | {fmt(tokens / wall)} | {mfu:.1%} | {cpu_cols} | {ratio} | {same[0] / wall:.2f}x |"
        )
    print(
        "\nper-round wall seconds ("
        + " / ".join(names)
        + "): "
        + ", ".join("/".join(f"{r[name][0]:.2f}" for name in names) for r in rounds)
    )
    del sides, hf


def run_generation(args, cfg: ModelConfig, ember: Transformer, device: torch.device) -> None:
    from transformers import AutoModelForCausalLM

    if len(PROMPT) + args.new_tokens > cfg.max_seq_len:
        raise SystemExit(f"--new-tokens {args.new_tokens} + prompt do not fit the context {cfg.max_seq_len}")
    ember.eval()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        save_model(ember, tmp / "model", extra={"tokenizer": {"bos_id": 1, "eos_id": 2, "pad_id": 0}})
        write_dummy_tokenizer(tmp / "tok", cfg.vocab_size)
        export_hf(tmp / "model", tmp / "tok", tmp / "hf")
        hf = AutoModelForCausalLM.from_pretrained(tmp / "hf", dtype=torch.float32)
        hf = hf.to(device).eval()  # type: ignore[arg-type]  # functools.wraps again, as in hf_model
    prompt = torch.tensor([PROMPT], device=device)
    with torch.inference_mode():
        ours, theirs = ember(prompt, prompt)[0], hf(prompt).logits
    diff = (ours - theirs).abs().max().item()
    assert diff < 1e-3, f"exported model's logits differ from Ember's by {diff}"
    use_decoding_layout(ember)  # as the demo and the evaluate stage load a model for generation

    def run_ember(n=args.new_tokens):
        with autocast(device):  # the device's default: bf16 on CUDA, fp32 elsewhere
            return list(generate(ember, PROMPT, n, temperature=0))

    def hf_generate(model, n: int) -> list[int]:
        with torch.inference_mode(), autocast(device):
            out = model.generate(
                prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0
            )
        return out[0, len(PROMPT) :].tolist()

    def run_uncached(n=args.new_tokens):
        with autocast(device):
            return ember_uncached(ember, PROMPT, n)

    runs: dict[str, Callable[..., list[int]]] = {
        "ember (KV cache)": run_ember,
        "transformers generate() (KV cache)": lambda n=args.new_tokens: hf_generate(hf, n),
    }
    if device.type == "cpu":  # on a GPU the layout changes nothing: the row would repeat the one above
        hf_relaid = use_decoding_layout(copy.deepcopy(hf))
        runs["transformers generate(), Ember's decoding layout (reference)"] = lambda n=args.new_tokens: hf_generate(
            hf_relaid, n
        )
    for fn in runs.values():  # warm-up: first calls, allocations
        fn(16)
    times: dict[str, list[float]] = {name: [] for name in runs}
    outputs: dict[str, list[int]] = {}
    order = list(runs)
    for r in range(args.repeat):
        for name in order[r % len(order) :] + order[: r % len(order)]:
            seconds, outputs[name] = timed(runs[name])
            times[name].append(seconds)
    if not args.skip_uncached:  # once: it is slow, and its gap to the cached run is wide
        seconds, outputs["ember (no cache)"] = timed(run_uncached)
        times["ember (no cache)"] = [seconds]
    for name, out in outputs.items():
        assert len(out) == args.new_tokens, f"{name} generated {len(out)} tokens"
    same = outputs["ember (KV cache)"] == outputs["transformers generate() (KV cache)"]
    same_uncached = outputs.get("ember (no cache)", outputs["ember (KV cache)"]) == outputs["ember (KV cache)"]
    print(
        f"\n## Generation: batch 1, greedy, {len(PROMPT)}-token prompt + {args.new_tokens} new tokens, "
        f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}; {args.repeat} runs each in rotating order "
        f"(the no-cache run once), medians. The HF model is `export_hf` of Ember's weights: logits agree "
        f"to {diff:.1e}; greedy tokens {'identical' if same else 'differ'} between the two"
        f"{'' if same_uncached else '; the no-cache run differs from the cached one'}"
    )
    print("\n| run | s (median) | tokens/s | vs transformers | vs ember no cache |")
    print("|---|---:|---:|---:|---:|")
    hf_s = statistics.median(times["transformers generate() (KV cache)"])
    nocache_s = statistics.median(times["ember (no cache)"]) if "ember (no cache)" in times else None
    for name, ts in times.items():
        sec = statistics.median(ts)
        vs_nocache = f"{nocache_s / sec:.2f}x" if nocache_s else "-"
        print(f"| {name} | {sec:.3f} | {fmt(args.new_tokens / sec)} | {hf_s / sec:.2f}x | {vs_nocache} |")
    print(
        "\nper-run seconds: " + "; ".join(f"{name}: {' '.join(f'{t:.2f}' for t in ts)}" for name, ts in times.items())
    )


def write_dummy_tokenizer(folder: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer folder with Ember's special tokens, for export_hf's copy step
    (the benchmark feeds ids, never text)."""
    from tokenizers import pre_tokenizers, trainers

    from ember.model.tokenizer import SPECIAL_TOKENS
    from ember.tasks.train_tokenizer import build_tokenizer, write_transformers_files

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(["a tiny text for a tokenizer the benchmark never uses"], trainer=trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    write_transformers_files(folder)


if __name__ == "__main__":
    main()
