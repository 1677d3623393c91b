"""The training loop, in the nanoGPT manner: setup, one loop, the artifact at the end.

AdamW (decay on matrices only), linear warmup then cosine decay to min_lr, gradient accumulation
up to `tokens_per_step`, clipping, and a step count as well as a time budget. Evaluation and
checkpoints happen inside the loop; rank 0 of a torchrun launch (`Dist`) does them alone.

Resuming is exact. The batch of step s is a pure function of (seed, s): windows are drawn from
the memory-mapped train shards by a generator seeded with both, so nothing depends on how many
steps ran before in this process (the step is the whole loader state). Evaluation uses fixed
windows and no randomness. A checkpoint (weights, optimizer, RNG, step, elapsed time, config,
the loss log) goes to ctx.work every `checkpoint_every` steps; a new run with the same key resumes
from the latest one, and a `max_minutes` budget counts the time of earlier attempts too.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from ember.model.checkpoint import WEIGHTS, load_checkpoint, read_config, save_checkpoint, save_model
from ember.model.device import autocast, pick_device
from ember.model.scoring import eval_loss
from ember.model.tokenizer import TOKENIZER_JSON
from ember.model.transformer import ModelConfig, Transformer, configure_optimizer
from ember.storage.tokens import TokenStream, bits_per_byte, read_meta
from ember.tasks.stage import StageContext
from ember.tasks.train.config import TrainConfig
from ember.tasks.train.plots import loss_curve_png
from ember.tasks.train.precision import resolve_precision


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over warmup_steps, then cosine from lr down to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.max_steps <= cfg.warmup_steps:
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / (cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun launch; rank 0 of 1 when it runs alone."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Dist:
        return cls(
            int(os.environ.get("RANK", "0")),
            int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")),
        )

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


# -- warm start --------------------------------------------------------------------------------


def warm_start_weights(
    ctx: StageContext, model_cfg: ModelConfig
) -> tuple[dict[str, torch.Tensor] | None, str, str | None]:
    """(state dict, what happened, release version) for a warm start from the release the flow
    handed over (`ctx.resources["warm_start"]`); a None state dict says why not."""
    release = ctx.resources.get("warm_start")
    if release is None or not (Path(release) / WEIGHTS).is_file():
        return None, "no release to start from (none published, or none the flow could use)", None
    release = Path(release)
    tokenizer_dir = ctx.inputs.get("train_tokenizer")
    if tokenizer_dir is None or not (Path(tokenizer_dir) / TOKENIZER_JSON).is_file():
        return None, "the train stage has no train_tokenizer input to compare the release's tokenizer with", None
    if not (release / TOKENIZER_JSON).is_file():
        return None, f"release {release.name} has no {TOKENIZER_JSON}", None
    if (release / TOKENIZER_JSON).read_bytes() != (Path(tokenizer_dir) / TOKENIZER_JSON).read_bytes():
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


# -- training --------------------------------------------------------------------------------


def train_model(
    cfg: TrainConfig, ctx: StageContext, dist: Dist = Dist(), device: torch.device | None = None
) -> dict[str, Any]:
    """The training loop; with `dist.world_size` > 1 the process group must already exist
    (ember.tasks.train.ddp sets it up) and only rank 0 reports and writes files."""
    tokens_dir = ctx.inputs["tokenize"]
    meta = read_meta(tokens_dir)
    model_cfg = cfg.model.build(vocab_size=int(meta["vocab_size"]))
    seq_len = cfg.seq_len or model_cfg.max_seq_len  # at most max_seq_len: the config checks it
    device = device or pick_device(cfg.device)
    main = dist.is_main
    log = ctx.log

    train = TokenStream(Path(tokens_dir) / "train", meta.get("dtype"))
    if train.num_windows(seq_len) == 0:
        raise ValueError(
            f"{train.folder}: {train.num_tokens} train tokens in {len(train.paths)} shard(s), "
            f"fewer than seq_len + 1 = {seq_len + 1} in every shard; "
            "tokenize more text or lower train.seq_len"
        )
    val = TokenStream(Path(tokens_dir) / "val", meta.get("dtype"))
    val_windows = val.fixed_windows(cfg.eval_batches * cfg.batch_size, seq_len)
    if val_windows is None and main:
        log.warning("%s: no validation shard holds %d tokens; skipping validation", val.folder, seq_len + 1)
    n_windows = cfg.windows_per_step(seq_len)
    if n_windows < dist.world_size:
        raise ValueError(
            f"a step of {n_windows} windows cannot be shared by {dist.world_size} processes; "
            "raise train.tokens_per_step or train.batch_size"
        )
    tokens_per_step = n_windows * seq_len
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # matmuls outside autocast (fp32 precision) too
        torch.backends.cudnn.allow_tf32 = True

    torch.manual_seed(cfg.seed)
    model = Transformer(model_cfg).to(device)
    optimizer = configure_optimizer(model, cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2))
    n_params = model.num_params()

    step, elapsed_before = 0, 0.0
    records: list[dict[str, Any]] = []  # loss.jsonl: one JSON record per logged step
    resumed_from: int | None = None
    warm: str | None = None  # the release warm-started from
    state = load_checkpoint(ctx.work, model, optimizer)
    if state is not None:
        step, elapsed_before, records = state["step"], state["elapsed_s"], state["extra"].get("records", [])
        resumed_from, warm = step, state["extra"].get("warm_start")
        if main:
            log.info("resuming from step %d (%s, %.0f s trained before)", step, state["path"].name, elapsed_before)
    elif cfg.warm_start:
        weights, why, warm = warm_start_weights(ctx, model_cfg)
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
            log.info(
                "training %s parameters (%s preset) on %s%s, %d windows x %d tokens = %d tokens per step "
                "(micro-batches of %d)",
                f"{n_params:,}",
                cfg.model.preset,
                device,
                f" x {dist.world_size} processes" if dist.world_size > 1 else "",
                n_windows,
                seq_len,
                tokens_per_step,
                cfg.batch_size,
            )

    ddp = None
    # The model, or its DDP / torch.compile wrapper: called as the model is.
    forward: Callable[..., tuple[torch.Tensor, torch.Tensor | None]] = model
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

    def val_point() -> dict[str, float | None]:
        if val_windows is None:
            return {}
        loss = eval_loss(model, val_windows, cfg.batch_size, device, precision)
        return {"val_loss": loss, "val_bpb": bits_per_byte(loss, meta)}

    def checkpoint(at: int, seconds: float) -> None:
        folder = save_checkpoint(
            ctx.work,
            at,
            model,
            optimizer,
            seconds,
            {"records": records, "precision": precision, "warm_start": warm},
            config=cfg.model_dump(mode="json"),
        )
        # How the run is going, beside the weights it would resume from.
        partial = folder / ".loss.partial.png"  # renamed only once whole
        if loss_curve_png(records, partial, f"{cfg.model.preset} preset, step {at} of {cfg.max_steps}"):
            os.replace(partial, folder / "loss.png")

    model.train()
    last_saved = step
    loss_value = records[-1]["loss"] if records and records[-1]["step"] == step else float("nan")
    window_start, window_steps = time.monotonic(), 0
    loss_sum: torch.Tensor | None = None
    stop = dist.rank0_says(over_budget(), device)
    while step < cfg.max_steps and not stop:
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # This process's slice of the step's global batch, the same whatever the number of processes.
        index = train.random_index(n_windows, seq_len, cfg.seed, step)[dist.share(n_windows)]
        batch = torch.from_numpy(train.windows(index, seq_len))
        batch = batch.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else batch.to(device)
        micro_batches = torch.split(batch, cfg.batch_size)
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
                    assert loss is not None  # given targets, the model returns the loss
                    # torch leaves Tensor.backward unannotated
                    (loss * weight).backward()  # type: ignore[no-untyped-call]
                except Exception as err:
                    if cfg.compile and step == (resumed_from or 0) and i == 0:
                        raise RuntimeError(
                            f"train.compile: torch.compile failed on {device.type} "
                            f"({type(err).__name__}: {str(err).strip().splitlines()[0][:300]}); "
                            "set train.compile: false to train without it"
                        ) from err
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
            record: dict[str, Any] = {
                "step": step,
                "loss": loss_value,
                "lr": lr,
                "tokens_per_s": window_steps * tokens_per_step / max(now - window_start, 1e-9),
            }
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


def write_artifact(
    cfg: TrainConfig,
    ctx: StageContext,
    model: Transformer,
    meta: dict[str, Any],
    metrics: dict[str, Any],
    records: list[dict[str, Any]],
) -> None:
    """The model, its loss log and curve into ctx.out, and the reports."""
    n_params, step, seconds = metrics["params"], metrics["steps"], metrics["seconds"]
    save_model(
        model,
        ctx.out,
        extra={
            "tokenizer": {k: meta.get(k, v) for k, v in (("bos_id", 1), ("eos_id", 2), ("pad_id", 0))},
            "train": {k: metrics[k] for k in ("steps", "tokens", "seconds", "loss", "val_loss", "val_bpb")},
            "train_config": cfg.model_dump(mode="json"),
        },
    )
    with open(ctx.out / "loss.jsonl", "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    plot = loss_curve_png(records, ctx.out / "loss.png", f"{cfg.model.preset} preset, {n_params:,} parameters")

    val_text = (
        f"val loss **{metrics['val_loss']:.4f}**, {metrics['val_bpb']:.3f} bits per byte"
        if metrics["val_loss"] is not None and metrics["val_bpb"] is not None
        else "no validation (the val split is empty or too short)"
    )
    resumed_from = metrics["resumed_from"]
    ctx.report.markdown(
        "train-summary",
        "\n".join(
            [
                f"### Training: {cfg.model.preset} preset, {n_params:,} parameters",
                f"- {step} steps ({step - (resumed_from or 0)} in this run"
                + (f", resumed from step {resumed_from}" if resumed_from is not None else "")
                + ")"
                + (f", warm-started from release {metrics['warm_start']}" if metrics["warm_start"] else ""),
                f"- {metrics['tokens']:,} tokens in {seconds:.0f} s on {metrics['device']}"
                + (f" x {metrics['processes']} processes" if metrics["processes"] > 1 else "")
                + f", {metrics['precision']}"
                + (", compiled" if metrics["compile"] else "")
                + (f", {metrics['tokens_per_s']:,.0f} tokens/s" if metrics["tokens_per_s"] else ""),
                f"- final train loss {metrics['loss']:.4f}; {val_text}",
                *(["", "![loss curve](loss.png)"] if plot else []),  # the stage's card embeds the artifact's file
            ]
        ),
        description="Training summary",
    )
    ctx.report.table("train-loss", _loss_rows(_thin(records, 60)), description="Training loss by step")


def _loss_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """loss.jsonl records as the rows of the step / loss / val loss / tokens/s table."""
    return [
        {
            "step": r["step"],
            "loss": round(r["loss"], 4),
            "val loss": round(r["val_loss"], 4) if r.get("val_loss") is not None else "",
            "tokens/s": round(r["tokens_per_s"]) if r.get("tokens_per_s") else "",
        }
        for r in records
    ]


def _thin(rows: list[dict[str, Any]], keep: int) -> list[dict[str, Any]]:
    """At most `keep` rows, evenly spaced, always with the last one."""
    if len(rows) <= keep:
        return rows
    picked = np.linspace(0, len(rows) - 1, num=keep).round().astype(int)
    return [rows[i] for i in sorted(set(picked))]
