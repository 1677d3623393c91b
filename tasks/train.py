"""Stage `train`: token shards -> a trained model (model.safetensors, config.json, loss.jsonl, loss.png).

One loop in the nanoGPT manner: AdamW (decay on matrices only), linear warmup then cosine
decay to min_lr, gradient accumulation up to `tokens_per_step`, clipping, and a step count as
well as a time budget. Precision: bf16 autocast on CUDA; elsewhere `precision: auto` times the
model's forward and backward in fp32 and in bf16 at start and keeps the clearly faster (fp32 on
CPUs without bf16 units, where bf16 is 30-40x slower; bf16 on this project's 2-core machine,
which turned out to have AVX512-BF16). `compile: true`
runs the model through torch.compile.

Resuming is exact. The batch of step s is a pure function of (seed, s): windows are drawn
from the memory-mapped train shards by a generator seeded with both, so nothing depends on
how many steps ran before in this process (the step is the whole loader state). Evaluation
uses fixed windows and no randomness. A checkpoint (weights, optimizer, RNG, step, elapsed
time, config, the loss log) goes to ctx.work every `checkpoint_every` steps; a new run with
the same key resumes from the latest one, and a `max_minutes` budget counts the time of
earlier attempts too.

Several processes: under `torchrun` (RANK / WORLD_SIZE / LOCAL_RANK set), each process takes
its slice of the same (seed, step) global batch and DistributedDataParallel averages the
gradients, so the global batch, and the loss up to float rounding, are those of one process.
Only rank 0 evaluates and writes checkpoints and the artifact. `nproc: N` makes the stage
launch `python -m torch.distributed.run --nproc_per_node N -m ember.tasks.train_ddp` itself.

Warm start: `warm_start: true` starts from the weights of the newest published release not
already trained on this run's tokens (see `plan_warm_start`), `warm_start: v0003` from that
release, when the release has this run's tokenizer and model shape, else from scratch (saying why).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import subprocess
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from safetensors.torch import load_file

from ember.model.checkpoint import load_checkpoint, read_config, save_checkpoint, save_model
from ember.model.transformer import PRESETS, ModelConfig, Transformer
from ember.storage.store import file_sha256
from ember.tasks.plots import loss_curve_png
from ember.tasks.stage import Stage, StageContext

# The release layout is the publish stage's (ember/tasks/publish.py, which imports this module).
RELEASES, LATEST_RELEASE, WEIGHTS, TOKENIZER = "releases", "latest", "model.safetensors", "tokenizer.json"
RELEASE_NAME = re.compile(r"v\d{4,}")


class ModelSection(BaseModel):
    """A preset by name, with any field overridden; vocab_size comes from the tokenizer."""

    model_config = ConfigDict(extra="forbid")

    preset: str = Field("cpu", description=f"one of {', '.join(PRESETS)}")
    dim: int | None = Field(None, gt=0, description="model width (default: the preset's)")
    n_layers: int | None = Field(None, gt=0)
    n_heads: int | None = Field(None, gt=0)
    n_kv_heads: int | None = Field(None, gt=0, description="k/v heads for grouped-query attention")
    hidden_dim: int | None = Field(None, gt=0, description="SwiGLU width")
    max_seq_len: int | None = Field(None, gt=0, description="context length")

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        if value not in PRESETS:
            raise ValueError(f"unknown preset {value!r}; choose one of {', '.join(PRESETS)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "ModelSection":
        self.build(vocab_size=256)  # raises on e.g. dim not divisible by n_heads, before any work
        return self

    def build(self, vocab_size: int) -> ModelConfig:
        overrides = self.model_dump(exclude={"preset"}, exclude_none=True)
        return ModelConfig(vocab_size=vocab_size, **{**PRESETS[self.preset], **overrides})


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: ModelSection = ModelSection()
    seed: int = Field(1337, ge=0, description="initial weights and the data order")
    batch_size: int = Field(16, gt=0, description="windows per micro-batch (per process)")
    seq_len: int | None = Field(None, gt=0, description="tokens per window; None = the model's max_seq_len")
    tokens_per_step: int | None = Field(
        None, gt=0, description="tokens per optimizer step (the global batch): micro-batches of batch_size windows "
        "are accumulated until they reach it, rounded up to whole micro-batches; None = one micro-batch")
    max_steps: int = Field(1000, gt=0, description="optimizer steps; the cosine schedule ends here")
    max_minutes: float | None = Field(None, gt=0,
                                      description="stop earlier at this time budget (counted across resumes)")
    lr: float = Field(2e-3, gt=0, description="peak learning rate")
    min_lr: float = Field(2e-4, ge=0, description="learning rate at the end of the cosine decay")
    warmup_steps: int = Field(50, ge=0)
    weight_decay: float = Field(0.1, ge=0, description="AdamW decay, on matrices only")
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0, description="max gradient norm; 0 = no clipping")
    eval_every: int = Field(100, gt=0, description="steps between validation passes (and one at the end)")
    eval_batches: int = Field(10, gt=0, description="validation batches of batch_size fixed windows")
    checkpoint_every: int = Field(50, gt=0, description="steps between checkpoints in the work folder")
    log_every: int = Field(10, gt=0, description="steps between loss.jsonl records")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="auto: cuda, then mps, then cpu")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="bf16 = bf16 autocast; auto = bf16 on CUDA, elsewhere whichever a short probe of the "
        "model's matmuls at start finds faster (logged)")
    compile: bool = Field(False, description="run the model through torch.compile (a C compiler is needed on CPU)")
    nproc: int = Field(1, ge=1, description="processes on this machine; >1 launches torchrun (DistributedDataParallel, "
                                           "gloo on CPU, nccl on CUDA) with the same global batch")
    warm_start: bool | str = Field(
        False, description="start from a release's weights when its tokenizer and model shape are this run's, else "
        "from scratch: a version (v0003), or true = the newest published release not already trained on this "
        "run's tokens (what the scheduled retrain uses)")

    @field_validator("warm_start")
    @classmethod
    def _release_name(cls, value: bool | str) -> bool | str:
        if isinstance(value, str) and not RELEASE_NAME.fullmatch(value):
            raise ValueError(f"{value!r} is not a release version such as v0003 (or true / false)")
        return value

    @model_validator(mode="after")
    def _lr_range(self) -> "TrainConfig":
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) is above lr ({self.lr})")
        context = self.model.build(vocab_size=256).max_seq_len
        if self.seq_len is not None and self.seq_len > context:
            raise ValueError(f"seq_len {self.seq_len} exceeds the model's max_seq_len {context}")
        if self.windows_per_step(self.seq_len or context) < self.nproc:
            raise ValueError(f"a step of {self.windows_per_step(self.seq_len or context)} windows cannot be shared "
                             f"by nproc = {self.nproc} processes; raise tokens_per_step or batch_size")
        return self

    def windows_per_step(self, seq_len: int) -> int:
        """The global batch in windows: whole micro-batches, at least one."""
        if self.tokens_per_step is None:
            return self.batch_size
        return math.ceil(self.tokens_per_step / (self.batch_size * seq_len)) * self.batch_size


# -- token shards --------------------------------------------------------------------------------


def read_meta(tokens_dir: Path) -> dict:
    path = Path(tokens_dir) / "meta.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; is {tokens_dir} a tokenize artifact?") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


class TokenStream:
    """The token shards of one split, memory-mapped, seen as windows of seq_len + 1 tokens.

    A window never crosses a shard boundary; windows are numbered across shards so that a
    window index picks one position uniformly over the whole split.
    """

    def __init__(self, folder: Path, dtype: str | None = None):
        self.folder = Path(folder)
        self.paths = sorted(self.folder.glob("*.arrow"))
        self.parts = [self._map(path, dtype) for path in self.paths]

    @staticmethod
    def _map(path: Path, dtype: str | None) -> np.ndarray:
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
        if reader.num_record_batches == 0:  # an empty split written as a table without rows
            return np.empty(0, dtype=reader.schema.field(0).type.to_pandas_dtype())
        if reader.num_record_batches != 1:
            raise ValueError(f"{path}: {reader.num_record_batches} record batches; a token shard has exactly one")
        column = reader.get_batch(0).column(0)
        if dtype is not None and column.type != pa.from_numpy_dtype(np.dtype(dtype)):
            raise ValueError(f"{path}: tokens are {column.type}, meta.json says {dtype}")
        return column.to_numpy(zero_copy_only=True)  # a view of the mapped file

    @property
    def num_tokens(self) -> int:
        return sum(len(p) for p in self.parts)

    def num_windows(self, seq_len: int) -> int:
        return sum(max(0, len(p) - seq_len) for p in self.parts)

    def windows(self, index: np.ndarray, seq_len: int) -> torch.Tensor:
        """Windows by global index: (n, seq_len + 1) int64."""
        counts = np.array([max(0, len(p) - seq_len) for p in self.parts])
        ends = np.cumsum(counts)
        part_of = np.searchsorted(ends, index, side="right")
        rows = [self.parts[p][s:s + seq_len + 1] for p, s in zip(part_of, index - (ends[part_of] - counts[part_of]))]
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def random_index(self, n: int, seq_len: int, seed: int, step: int) -> np.ndarray:
        """The window indices of step `step`'s batch: a function of (seed, step) alone."""
        return np.random.default_rng([seed, step]).integers(0, self.num_windows(seq_len), size=n)

    def random_windows(self, n: int, seq_len: int, seed: int, step: int) -> torch.Tensor:
        return self.windows(self.random_index(n, seq_len, seed, step), seq_len)

    def fixed_windows(self, n: int, seq_len: int) -> torch.Tensor | None:
        """n windows evenly spaced over the split, the same every time; None if it is too short."""
        total = self.num_windows(seq_len)
        if total == 0:
            return None
        return self.windows(np.linspace(0, total - 1, num=n).round().astype(np.int64), seq_len)


def bits_per_byte(loss: float | None, meta: dict, split: str = "val") -> float | None:
    """Nats per token -> bits per UTF-8 byte of the split's text."""
    tokens, n_bytes = meta.get(f"{split}_tokens", 0), meta.get(f"{split}_bytes", 0)
    if loss is None or not tokens or not n_bytes:
        return None
    return loss / math.log(2) * tokens / n_bytes


@torch.no_grad()
def eval_loss(model: torch.nn.Module, windows: torch.Tensor, batch_size: int,
              device: torch.device | str = "cpu", precision: str | None = None) -> float:
    """Mean cross-entropy (nats per token) over fixed windows (n, T + 1)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size].to(device)
        with autocast(torch.device(device), precision):
            _, loss = model(batch[:, :-1], batch[:, 1:])
        total += loss.item() * len(batch)
        count += len(batch)
    model.train(was_training)
    return total / count


# -- device, precision, optimizer --------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def autocast(device: torch.device, precision: str | None = None):
    """bf16 autocast when `precision` is bf16; None = the default for the device (bf16 on CUDA)."""
    if precision is None:
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


_PROBES: dict[tuple, dict[str, float]] = {}


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
        _synchronize(device)
        started = time.perf_counter()
        with autocast(device, precision):
            _, loss = model(batch[:rows, :-1], batch[:rows, 1:])
        loss.backward()
        _synchronize(device)
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


def resolve_precision(requested: str, model: Transformer, windows: int, seq_len: int,
                      device: torch.device) -> tuple[str, str]:
    """The precision to train in, and why."""
    if requested != "auto":
        return requested, "set in the config"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: CUDA with bf16 support"
        return "fp32", "auto: this CUDA device has no bf16"
    t = probe_precision(model, windows, seq_len, device)
    # Only a clear win in every round counts, so that timing noise does not flip the choice.
    choice = "bf16" if all(b < 0.8 * f for f, b in zip(t["fp32"], t["bf16"])) else "fp32"
    rounds = lambda xs: "/".join(f"{x * 1e3:.1f}" for x in xs)  # noqa: E731
    return choice, (f"auto: a training pass took {rounds(t['fp32'])} ms in fp32, {rounds(t['bf16'])} ms "
                    f"under bf16 autocast on {device.type}")


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW that decays matrices (linear weights, the embedding) and not norm gains.

    The fused kernel wherever torch has one for the device (CUDA, CPU, MPS). On this project's
    2-core CPU with torch 2.13 it does the cpu preset's optimizer step in about a fifth of the
    time of the default multi-tensor ("foreach") one (4 ms vs 21 ms, one thread); either way
    that is about 1% of a training step.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    kwargs = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2)}
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, ValueError):  # no fused kernel for this device or dtype
        return torch.optim.AdamW(groups, **kwargs)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over warmup_steps, then cosine from lr down to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.max_steps <= cfg.warmup_steps:
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / (cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


# -- several processes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun launch; rank 0 of 1 when it runs alone."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Dist":
        return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                   int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, n: int) -> slice:
        """This rank's part of n items: contiguous, sizes differing by at most one."""
        return slice(n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size)

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def rank0_says(self, flag: bool, device: torch.device) -> bool:
        """Rank 0's decision, on every rank (a stop at the time budget must be taken by all)."""
        if self.world_size == 1:
            return flag
        t = torch.tensor([float(flag and self.is_main)], device=device)
        torch.distributed.all_reduce(t)
        return t.item() > 0


# Lines the DDP worker of rank 0 prints for the stage to turn into ctx.report calls.
REPORT_PREFIX = "@ember-train "


def launch_ddp(cfg: TrainConfig, ctx: StageContext) -> dict:
    """Run training in `cfg.nproc` processes under torchrun; its output goes to the log, its
    reports to ctx.report, and rank 0 writes the artifact into ctx.out."""
    config_path = ctx.work / "ddp-config.json"
    config_path.write_text(cfg.model_dump_json(indent=2) + "\n")
    # The cores this process may use, shared out: N processes of all threads each would fight.
    threads = max(1, torch.get_num_threads() // cfg.nproc)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg.nproc}",
               "-m", "ember.tasks.train_ddp", "--config", str(config_path), "--out", str(ctx.out),
               "--work", str(ctx.work), "--store-root", str(ctx.store_root),
               *[f"--input={name}={path}" for name, path in sorted(ctx.inputs.items())]]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    ctx.log.info("launching %d training processes (%d torch threads each): %s", cfg.nproc, threads,
                 " ".join(command[:6]))
    metrics, errors, tail = None, [], deque(maxlen=40)
    # Same process group as this one: killing the run (SIGKILL to the group) also ends torchrun's workers.
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            message = _report_message(line)
            if message is None:
                tail.append(line)
                ctx.log.info("%s", line)
            elif message["kind"] == "metrics":
                metrics = message["metrics"]
            elif message["kind"] == "error":
                errors.append(message["error"])
            else:
                getattr(ctx.report, message["kind"])(*message["args"])
        returncode = proc.wait()
    finally:
        if proc.poll() is None:  # this process failed or was interrupted: torchrun passes SIGTERM on
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if returncode != 0 or metrics is None:
        raise RuntimeError(f"distributed training ({cfg.nproc} processes) failed with exit code {returncode}"
                           + "".join(f"\n{e}" for e in dict.fromkeys(errors))
                           + "\nits last lines:\n" + "\n".join(tail))
    config_path.unlink(missing_ok=True)
    return metrics


def _report_message(line: str) -> dict | None:
    if not line.startswith(REPORT_PREFIX):
        return None
    try:
        message = json.loads(line[len(REPORT_PREFIX):])
    except json.JSONDecodeError:
        return None
    ok = message.get("kind") in ("progress", "table", "markdown", "metrics", "error")
    return message if ok else None


# -- warm start -----------------------------------------------------------------------------------------

def latest_release(store_root: Path | str) -> Path | None:
    """The release folder `releases/latest` points to, if it holds weights."""
    latest = Path(store_root) / RELEASES / LATEST_RELEASE
    return latest.resolve() if (latest / WEIGHTS).is_file() else None


def _release_tokens(release: Path) -> str | None:
    """The tokenize ref a release was trained on (release.json's lineage), if it says."""
    try:
        record = json.loads((release / "release.json").read_text())
        return (record.get("lineage") or {}).get("tokenize") or (record.get("refs") or {}).get("tokenize")
    except (OSError, AttributeError, json.JSONDecodeError):
        return None


def pick_release(store_root: Path | str, tokens_ref: str | None) -> Path | None:
    """For `warm_start: true`: the newest release up to `latest` not trained on these very tokens."""
    latest = latest_release(store_root)
    if latest is None:
        return None
    candidates = sorted((p for p in latest.parent.iterdir()
                         if RELEASE_NAME.fullmatch(p.name) and p.name <= latest.name and (p / WEIGHTS).is_file()),
                        key=lambda p: p.name, reverse=True)
    for release in candidates:
        if tokens_ref is None or _release_tokens(release) != tokens_ref:
            return release
    return None


def plan_warm_start(cfg: TrainConfig, store_root: Path | str, tokens_ref: str | None) -> tuple[TrainConfig, str | None]:
    """The config and identity a run trains with: `warm_start: true` resolved to one release.

    The release's version goes into the config and its weights' digest into the identity, so both
    join the train stage's key. A release already trained on these very tokens has nothing new to
    learn from them: a retrain over an unchanged corpus resolves to the release its current model
    started from (or, with none, to a cold start, as a build) and so finds that artifact in the
    store instead of training again every night. A new corpus resolves to the newest release.
    """
    if cfg.warm_start is False:
        return cfg, None
    if isinstance(cfg.warm_start, str):
        release = Path(store_root) / RELEASES / cfg.warm_start
        if not (release / WEIGHTS).is_file():
            raise ValueError(f"train.warm_start: {release} has no {WEIGHTS}; `ember releases` lists the releases")
    else:
        release = pick_release(store_root, tokens_ref)
        if release is None:
            return cfg.model_copy(update={"warm_start": False}), None
    try:
        digest = json.loads((release / "release.json").read_text())["files"][WEIGHTS]["sha256"]
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        digest = file_sha256(release / WEIGHTS)
    return cfg.model_copy(update={"warm_start": release.name}), f"{release.name} sha256:{digest}"


def warm_start_weights(ctx: StageContext, model_cfg: ModelConfig,
                       warm_start: bool | str) -> tuple[dict | None, str, str | None]:
    """(state dict, what happened, release version) for a warm start; a None state dict says why not."""
    if isinstance(warm_start, str):
        release = Path(ctx.store_root) / RELEASES / warm_start
    else:  # called without the flow's plan: resolve it here the same way
        manifest = Path(ctx.inputs["tokenize"]) / "manifest.json"
        tokens_ref = json.loads(manifest.read_text()).get("ref") if manifest.is_file() else None
        release = pick_release(ctx.store_root, tokens_ref)
    if release is None or not (release / WEIGHTS).is_file():
        return None, f"no release to start from in {Path(ctx.store_root) / RELEASES}", None
    tokenizer_dir = ctx.inputs.get("train_tokenizer")
    if tokenizer_dir is None or not (Path(tokenizer_dir) / TOKENIZER).is_file():
        return None, "the train stage has no train_tokenizer input to compare the release's tokenizer with", None
    if not (release / TOKENIZER).is_file():
        return None, f"release {release.name} has no {TOKENIZER}", None
    if (release / TOKENIZER).read_bytes() != (Path(tokenizer_dir) / TOKENIZER).read_bytes():
        return None, f"release {release.name}'s tokenizer differs from this run's", None
    try:
        release_cfg, _ = read_config(release)
    except (FileNotFoundError, ValueError) as err:
        return None, f"release {release.name}: {err}", None
    ours, theirs = asdict(model_cfg), asdict(release_cfg)
    differing = [f"{k} {theirs.get(k)} vs {v}" for k, v in ours.items() if theirs.get(k) != v]
    if differing:
        return None, f"release {release.name}'s model shape differs ({', '.join(differing)})", None
    return load_file(release / WEIGHTS), f"started from the weights of release {release.name}", release.name


# -- training ---------------------------------------------------------------------------------------------


def run(cfg: TrainConfig, ctx: StageContext) -> dict:
    if cfg.nproc > 1 and Dist.from_env().world_size == 1:
        return launch_ddp(cfg, ctx)
    return train_model(cfg, ctx, Dist.from_env())


def train_model(cfg: TrainConfig, ctx: StageContext, dist: Dist = Dist(), device: torch.device | None = None) -> dict:
    """The training loop; with `dist.world_size` > 1 the process group must already exist
    (ember.tasks.train_ddp sets it up) and only rank 0 reports and writes files."""
    tokens_dir = ctx.inputs["tokenize"]
    meta = read_meta(tokens_dir)
    model_cfg = cfg.model.build(vocab_size=int(meta["vocab_size"]))
    seq_len = cfg.seq_len or model_cfg.max_seq_len  # at most max_seq_len: the config checks it
    device = device or pick_device(cfg.device)
    main = dist.is_main
    log = ctx.log

    train = TokenStream(Path(tokens_dir) / "train", meta.get("dtype"))
    if train.num_windows(seq_len) == 0:
        raise ValueError(f"{train.folder}: {train.num_tokens} train tokens in {len(train.paths)} shard(s), "
                         f"fewer than seq_len + 1 = {seq_len + 1} in every shard; "
                         "tokenize more text or lower train.seq_len")
    val = TokenStream(Path(tokens_dir) / "val", meta.get("dtype"))
    val_windows = val.fixed_windows(cfg.eval_batches * cfg.batch_size, seq_len)
    if val_windows is None and main:
        log.warning("%s: no validation shard holds %d tokens; skipping validation", val.folder, seq_len + 1)
    n_windows = cfg.windows_per_step(seq_len)
    if n_windows < dist.world_size:
        raise ValueError(f"a step of {n_windows} windows cannot be shared by {dist.world_size} processes; "
                         "raise train.tokens_per_step or train.batch_size")
    tokens_per_step = n_windows * seq_len
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # matmuls outside autocast (fp32 precision) too
        torch.backends.cudnn.allow_tf32 = True

    torch.manual_seed(cfg.seed)
    model = Transformer(model_cfg).to(device)
    optimizer = build_optimizer(model, cfg, device)
    n_params = model.num_params()

    step, elapsed_before, records, resumed_from, warm = 0, 0.0, [], None, None
    state = load_checkpoint(ctx.work, model, optimizer)
    if state is not None:
        step, elapsed_before, records = state["step"], state["elapsed_s"], state["extra"].get("records", [])
        resumed_from, warm = step, state["extra"].get("warm_start")
        if main:
            log.info("resuming from step %d (%s, %.0f s trained before)", step, state["path"].name, elapsed_before)
    elif cfg.warm_start:
        weights, why, warm = warm_start_weights(ctx, model_cfg, cfg.warm_start)
        if weights is not None:
            model.load_state_dict(weights, strict=True)
            if main:
                log.info("warm start: %s", why)
        elif main:
            log.warning("warm start not possible: %s; training from scratch", why)

    # Precision: a resumed run keeps the one it started with, so that it equals an uninterrupted run.
    saved = state["extra"].get("precision") if state is not None else None
    if cfg.precision == "auto" and saved is not None:
        precision, why = saved, "resumed: kept from the start of this run"
    else:
        precision, why = resolve_precision(cfg.precision, model, cfg.batch_size, seq_len, device)
        if dist.world_size > 1 and device.type != "cuda":  # each rank probed alone: rank 0's answer holds
            precision = "bf16" if dist.rank0_says(precision == "bf16", device) else "fp32"
    if main:
        log.info("precision %s (%s)", precision, why)
        if state is None:
            log.info("training %s parameters (%s preset) on %s%s, %d windows x %d tokens = %d tokens per step "
                     "(micro-batches of %d)", f"{n_params:,}", cfg.model.preset, device,
                     f" x {dist.world_size} processes" if dist.world_size > 1 else "",
                     n_windows, seq_len, tokens_per_step, cfg.batch_size)

    ddp = None
    forward = model
    if dist.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        forward = ddp
    if cfg.compile:
        forward = torch.compile(forward)

    started = time.monotonic()

    def elapsed() -> float:
        return elapsed_before + time.monotonic() - started

    def over_budget() -> bool:
        return cfg.max_minutes is not None and elapsed() >= cfg.max_minutes * 60

    def val_point() -> dict:
        if val_windows is None:
            return {}
        loss = eval_loss(model, val_windows, cfg.batch_size, device, precision)
        return {"val_loss": loss, "val_bpb": bits_per_byte(loss, meta)}

    def checkpoint(at: int, seconds: float) -> None:
        folder = save_checkpoint(ctx.work, at, model, optimizer, seconds,
                                 {"records": records, "precision": precision, "warm_start": warm},
                                 config=cfg.model_dump(mode="json"))
        # How the run is going, beside the weights it would resume from and in the Prefect UI
        # (the final table, with the same key, replaces this one when training ends).
        partial = folder / ".loss.partial.png"  # renamed only once whole
        if loss_curve_png(records, partial, f"{cfg.model.preset} preset, step {at} of {cfg.max_steps}"):
            os.replace(partial, folder / "loss.png")
        ctx.report.table("train-loss", _loss_rows(_thin(records, 12)),
                         description=f"Training loss by step (step {at} of {cfg.max_steps})")

    model.train()
    last_saved = step
    loss_value = records[-1]["loss"] if records and records[-1]["step"] == step else float("nan")
    window_start, window_steps = time.monotonic(), 0
    loss_sum = None
    stop = dist.rank0_says(over_budget(), device)
    while step < cfg.max_steps and not stop:
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # This process's slice of the step's global batch, the same whatever the number of processes.
        index = train.random_index(n_windows, seq_len, cfg.seed, step)[dist.share(n_windows)]
        batch = train.windows(index, seq_len)
        batch = batch.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else batch.to(device)
        micro_batches = batch.split(cfg.batch_size)
        loss_sum = torch.zeros((), device=device)
        for i, micro in enumerate(micro_batches):
            # Each window weighs 1 / n_windows in the step's loss; DDP averages over the processes.
            weight = len(micro) * dist.world_size / n_windows
            # DDP: all-reduce the gradients once, at the last micro-batch (not under compile,
            # whose graph of the DDP module does not see no_sync).
            last = i == len(micro_batches) - 1
            sync = ddp.no_sync() if ddp is not None and not last and not cfg.compile else contextlib.nullcontext()
            with sync:
                try:
                    with autocast(device, precision):
                        _, loss = forward(micro[:, :-1], micro[:, 1:])
                    (loss * weight).backward()
                except Exception as err:
                    if cfg.compile and step == (resumed_from or 0) and i == 0:
                        raise RuntimeError(f"train.compile: torch.compile failed on {device.type} "
                                           f"({type(err).__name__}: {str(err).strip().splitlines()[0][:300]}); "
                                           "set train.compile: false to train without it") from err
                    raise
            loss_sum += loss.detach() * weight
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_steps += 1
        if dist.world_size > 1:  # the global loss, and rank 0's word on the time budget, in one all-reduce
            packed = torch.stack([loss_sum, torch.tensor(float(main and over_budget()), device=device)])
            torch.distributed.all_reduce(packed)
            loss_sum, stop = packed[0] / dist.world_size, packed[1].item() > 0
        else:
            stop = over_budget()

        evaluating = step % cfg.eval_every == 0 and step < cfg.max_steps
        if step == 1 or step % cfg.log_every == 0 or evaluating or stop:
            loss_value = loss_sum.item()  # only here: .item() waits for the device
            now = time.monotonic()
            record = {"step": step, "loss": loss_value, "lr": lr,
                      "tokens_per_s": window_steps * tokens_per_step / max(now - window_start, 1e-9)}
            record.update(val_point() if evaluating and main else {})
            records.append(record)
            window_start, window_steps = time.monotonic(), 0
        if step % cfg.checkpoint_every == 0 and step < cfg.max_steps and main:
            checkpoint(step, elapsed())
            last_saved = step
        if main:
            ctx.report.progress(step, cfg.max_steps, "train")
    if stop and step < cfg.max_steps and main:
        log.info("time budget of %g min reached at step %d of %d", cfg.max_minutes, step, cfg.max_steps)
    if loss_sum is not None:
        loss_value = loss_sum.item()  # the last step's, logged or not

    seconds = elapsed()
    metrics = {
        "steps": step,
        "tokens": step * tokens_per_step,
        "tokens_per_step": tokens_per_step,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(step * tokens_per_step / seconds, 1) if seconds > 0 else None,
        "loss": loss_value,
        "params": n_params,
        "resumed_from": resumed_from,
        "warm_start": warm,
        "device": device.type,
        "precision": precision,
        "compile": cfg.compile,
        "processes": dist.world_size,
    }
    if not main:  # rank 0 evaluates and writes; the others wait for it to finish
        dist.barrier()
        return metrics
    final = val_point()
    if not records or records[-1]["step"] != step:
        records.append({"step": step, "loss": loss_value, "lr": lr_at(max(step - 1, 0), cfg), "tokens_per_s": None})
    records[-1].update(final)
    if step != last_saved:
        checkpoint(step, seconds)
    metrics.update(val_loss=final.get("val_loss"), val_bpb=final.get("val_bpb"))
    write_artifact(cfg, ctx, model, meta, metrics, records)
    dist.barrier()
    return metrics


def write_artifact(cfg: TrainConfig, ctx: StageContext, model: Transformer, meta: dict, metrics: dict,
                   records: list[dict]) -> None:
    """The model, its loss log and curve into ctx.out, and the reports."""
    n_params, step, seconds = metrics["params"], metrics["steps"], metrics["seconds"]
    save_model(model, ctx.out, extra={
        "tokenizer": {k: meta.get(k, v) for k, v in (("bos_id", 1), ("eos_id", 2), ("pad_id", 0))},
        "train": {k: metrics[k] for k in ("steps", "tokens", "seconds", "loss", "val_loss", "val_bpb")},
        "train_config": cfg.model_dump(mode="json"),
    })
    with open(ctx.out / "loss.jsonl", "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    loss_curve_png(records, ctx.out / "loss.png", f"{cfg.model.preset} preset, {n_params:,} parameters")

    ctx.report.table("train-loss", _loss_rows(_thin(records, 60)), description="Training loss by step")
    val_text = (f"val loss **{metrics['val_loss']:.4f}**, {metrics['val_bpb']:.3f} bits per byte"
                if metrics["val_loss"] is not None and metrics["val_bpb"] is not None
                else "no validation (the val split is empty or too short)")
    resumed_from = metrics["resumed_from"]
    ctx.report.markdown("train-summary", "\n".join([
        f"### Training: {cfg.model.preset} preset, {n_params:,} parameters",
        f"- {step} steps ({step - (resumed_from or 0)} in this run"
        + (f", resumed from step {resumed_from}" if resumed_from is not None else "") + ")"
        + (f", warm-started from release {metrics['warm_start']}" if metrics["warm_start"] else ""),
        f"- {metrics['tokens']:,} tokens in {seconds:.0f} s on {metrics['device']}"
        + (f" x {metrics['processes']} processes" if metrics["processes"] > 1 else "")
        + f", {metrics['precision']}" + (", compiled" if metrics["compile"] else "")
        + (f", {metrics['tokens_per_s']:,.0f} tokens/s" if metrics["tokens_per_s"] else ""),
        f"- final train loss {metrics['loss']:.4f}; {val_text}",
    ]), description="Training summary")


def _loss_rows(records: list[dict]) -> list[dict]:
    """loss.jsonl records as the rows of the step / loss / val loss / tokens/s table."""
    return [{"step": r["step"], "loss": round(r["loss"], 4),
             "val loss": round(r["val_loss"], 4) if r.get("val_loss") is not None else "",
             "tokens/s": round(r["tokens_per_s"]) if r.get("tokens_per_s") else ""} for r in records]


def _thin(rows: list[dict], keep: int) -> list[dict]:
    """At most `keep` rows, evenly spaced, always with the last one."""
    if len(rows) <= keep:
        return rows
    picked = np.linspace(0, len(rows) - 1, num=keep).round().astype(int)
    return [rows[i] for i in sorted(set(picked))]



# Logging, evaluation and checkpoint intervals change neither the data nor the weights (the
# batches depend on the step alone, evaluation draws no random numbers), so they stay out of the
# key; nor do the number of processes and torch.compile, which change how the same global batch
# is computed (float rounding, as a different thread count does), not what is computed.
STAGE = Stage(name="train", version=2, run=run,
              unkeyed=("log_every", "eval_every", "checkpoint_every", "nproc", "compile"))
