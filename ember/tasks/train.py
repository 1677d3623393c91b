"""Stage `train`: token shards -> a trained model (model.safetensors, config.json, loss.jsonl).

One loop in the nanoGPT manner: AdamW, linear warmup then cosine decay to min_lr, gradient
accumulation and clipping, fp32 on CPU (bf16 is 30-40x slower there) and bf16 autocast on CUDA.

Resuming is exact. The batch of step s is a pure function of (seed, s): windows are drawn
from the memory-mapped train shards by a generator seeded with both, so nothing depends on
how many steps ran before in this process. Evaluation uses fixed windows and no randomness.
A checkpoint (weights, optimizer, step, elapsed time, the loss log) goes to ctx.work every
`checkpoint_every` steps; a new run with the same key resumes from the latest one, and a
`max_minutes` budget counts the time of earlier attempts too.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ember.model.checkpoint import load_checkpoint, save_checkpoint, save_model
from ember.model.transformer import PRESETS, ModelConfig, Transformer
from ember.tasks.plots import loss_curve_png
from ember.tasks.stage import Stage, StageContext


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
    batch_size: int = Field(16, gt=0, description="windows per micro-batch")
    seq_len: int | None = Field(None, gt=0, description="tokens per window; None = the model's max_seq_len")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
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

    @model_validator(mode="after")
    def _lr_range(self) -> "TrainConfig":
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) is above lr ({self.lr})")
        context = self.model.build(vocab_size=256).max_seq_len
        if self.seq_len is not None and self.seq_len > context:
            raise ValueError(f"seq_len {self.seq_len} exceeds the model's max_seq_len {context}")
        return self


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

    def random_windows(self, n: int, seq_len: int, seed: int, step: int) -> torch.Tensor:
        rng = np.random.default_rng([seed, step])
        return self.windows(rng.integers(0, self.num_windows(seq_len), size=n), seq_len)

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
              device: torch.device | str = "cpu") -> float:
    """Mean cross-entropy (nats per token) over fixed windows (n, T + 1)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size].to(device)
        with _autocast(torch.device(device)):
            _, loss = model(batch[:, :-1], batch[:, 1:])
        total += loss.item() * len(batch)
        count += len(batch)
    model.train(was_training)
    return total / count


# -- training --------------------------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over warmup_steps, then cosine from lr down to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.max_steps <= cfg.warmup_steps:
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / (cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def run(cfg: TrainConfig, ctx: StageContext) -> dict:
    tokens_dir = ctx.inputs["tokenize"]
    meta = read_meta(tokens_dir)
    model_cfg = cfg.model.build(vocab_size=int(meta["vocab_size"]))
    seq_len = cfg.seq_len or model_cfg.max_seq_len  # at most max_seq_len: the config checks it
    device = pick_device(cfg.device)

    train = TokenStream(Path(tokens_dir) / "train", meta.get("dtype"))
    if train.num_windows(seq_len) == 0:
        raise ValueError(f"{train.folder}: {train.num_tokens} train tokens in {len(train.paths)} shard(s), "
                         f"fewer than seq_len + 1 = {seq_len + 1} in every shard; "
                         "tokenize more text or lower train.seq_len")
    val = TokenStream(Path(tokens_dir) / "val", meta.get("dtype"))
    val_windows = val.fixed_windows(cfg.eval_batches * cfg.batch_size, seq_len)
    if val_windows is None:
        ctx.log.warning("%s: no validation shard holds %d tokens; skipping validation", val.folder, seq_len + 1)

    torch.manual_seed(cfg.seed)
    model = Transformer(model_cfg).to(device)
    optimizer = model.configure_optimizer(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2))
    n_params = model.num_params()
    tokens_per_step = cfg.batch_size * cfg.grad_accum * seq_len

    step, elapsed_before, records, resumed_from = 0, 0.0, [], None
    state = load_checkpoint(ctx.work, model, optimizer)
    if state is not None:
        step, elapsed_before, records = state["step"], state["elapsed_s"], state["extra"].get("records", [])
        resumed_from = step
        ctx.log.info("resuming from step %d (%s, %.0f s trained before)", step, state["path"].name, elapsed_before)
    else:
        ctx.log.info("training %s parameters (%s preset) on %s, %d tokens per step",
                     f"{n_params:,}", cfg.model.preset, device, tokens_per_step)

    started = time.monotonic()
    def elapsed() -> float:
        return elapsed_before + time.monotonic() - started

    def val_point() -> dict:
        if val_windows is None:
            return {}
        val = eval_loss(model, val_windows, cfg.batch_size, device)
        return {"val_loss": val, "val_bpb": bits_per_byte(val, meta)}

    model.train()
    last_saved = step
    loss_value = records[-1]["loss"] if records and records[-1]["step"] == step else float("nan")
    window_start, window_steps = time.monotonic(), 0
    while step < cfg.max_steps:
        if cfg.max_minutes is not None and elapsed() >= cfg.max_minutes * 60:
            ctx.log.info("time budget of %.1f min reached at step %d of %d", cfg.max_minutes, step, cfg.max_steps)
            break
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = train.random_windows(cfg.batch_size * cfg.grad_accum, seq_len, cfg.seed, step).to(device)
        loss_sum = 0.0
        for micro in batch.split(cfg.batch_size):
            with _autocast(device):
                _, loss = model(micro[:, :-1], micro[:, 1:])
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.item()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_steps += 1
        loss_value = loss_sum / cfg.grad_accum

        evaluating = step % cfg.eval_every == 0 and step < cfg.max_steps
        if step == 1 or step % cfg.log_every == 0 or evaluating:
            now = time.monotonic()
            record = {"step": step, "loss": loss_value, "lr": lr,
                      "tokens_per_s": window_steps * tokens_per_step / max(now - window_start, 1e-9)}
            record.update(val_point() if evaluating else {})
            records.append(record)
            window_start, window_steps = time.monotonic(), 0
        if step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
            save_checkpoint(ctx.work, step, model, optimizer, elapsed(), {"records": records})
            last_saved = step
        ctx.report.progress(step, cfg.max_steps, "train")

    seconds = elapsed()
    final = val_point()
    if not records or records[-1]["step"] != step:
        records.append({"step": step, "loss": loss_value, "lr": lr_at(max(step - 1, 0), cfg), "tokens_per_s": None})
    records[-1].update(final)
    if step != last_saved:
        save_checkpoint(ctx.work, step, model, optimizer, seconds, {"records": records})

    trained_steps = step - (resumed_from or 0)
    metrics = {
        "steps": step,
        "tokens": step * tokens_per_step,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(step * tokens_per_step / seconds, 1) if seconds > 0 else None,
        "loss": loss_value,
        "val_loss": final.get("val_loss"),
        "val_bpb": final.get("val_bpb"),
        "params": n_params,
        "resumed_from": resumed_from,
        "device": device.type,
    }
    save_model(model.to("cpu"), ctx.out, extra={
        "tokenizer": {k: meta.get(k, v) for k, v in (("bos_id", 1), ("eos_id", 2), ("pad_id", 0))},
        "train": {k: metrics[k] for k in ("steps", "tokens", "seconds", "loss", "val_loss", "val_bpb")},
        "train_config": cfg.model_dump(mode="json"),
    })
    with open(ctx.out / "loss.jsonl", "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    loss_curve_png(records, ctx.out / "loss.png", f"{cfg.model.preset} preset, {n_params:,} parameters")

    ctx.report.table("train-loss", [
        {"step": r["step"], "loss": round(r["loss"], 4),
         "val loss": round(r["val_loss"], 4) if r.get("val_loss") is not None else "",
         "tokens/s": round(r["tokens_per_s"]) if r.get("tokens_per_s") else ""}
        for r in _thin(records, 60)
    ], description="Training loss by step")
    val_text = (f"val loss **{metrics['val_loss']:.4f}**, {metrics['val_bpb']:.3f} bits per byte"
                if metrics["val_loss"] is not None and metrics["val_bpb"] is not None
                else "no validation (the val split is empty or too short)")
    ctx.report.markdown("train-summary", "\n".join([
        f"### Training: {cfg.model.preset} preset, {n_params:,} parameters",
        f"- {step} steps ({trained_steps} in this run"
        + (f", resumed from step {resumed_from}" if resumed_from is not None else "") + ")",
        f"- {metrics['tokens']:,} tokens in {seconds:.0f} s on {device.type}"
        + (f", {metrics['tokens_per_s']:,.0f} tokens/s" if metrics["tokens_per_s"] else ""),
        f"- final train loss {loss_value:.4f}; {val_text}",
    ]), description="Training summary")
    return metrics


def _thin(rows: list[dict], keep: int) -> list[dict]:
    """At most `keep` rows, evenly spaced, always with the last one."""
    if len(rows) <= keep:
        return rows
    picked = np.linspace(0, len(rows) - 1, num=keep).round().astype(int)
    return [rows[i] for i in sorted(set(picked))]


# Logging, evaluation and checkpoint intervals change neither the data nor the weights (the
# batches depend on the step alone, evaluation draws no random numbers), so they stay out of the key.
STAGE = Stage(name="train", version=1, run=run, unkeyed=("log_every", "eval_every", "checkpoint_every"))
