"""Model files: published weights (safetensors + config.json) and training checkpoints for resume.

A published model is `model.safetensors` (fp32, the tied embedding stored once because the
output projection reuses `tok_embeddings.weight` rather than holding a copy) and `config.json`
= `{"model": ModelConfig fields, **extra}`.

A training checkpoint is a folder `ckpt-<step>/` with the weights as safetensors and
`state.pt` (optimizer state, RNG states, step, elapsed seconds, the training config, whatever
the trainer adds; the data loader needs no state of its own because the trainer draws each
step's batch from (seed, step) alone), written as `ckpt-<step>.tmp/` and renamed, so a folder
named `ckpt-<step>` is always complete. `LATEST` then names it (os.replace), and older
checkpoints are deleted last: after a crash at any point there is one complete checkpoint to
resume from. `state.pt` is a torch pickle, but it only ever holds tensors, numbers, strings,
lists and dicts, so it loads with `torch.load(weights_only=True)`, which refuses arbitrary
objects.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypedDict

import torch
from safetensors.torch import load_file, save_file

from ember.model.transformer import ModelConfig, Transformer

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
LATEST = "LATEST"
STATE = "state.pt"


def _state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    # safetensors wants contiguous, unshared CPU tensors; clone() gives each its own storage.
    return {name: t.detach().to("cpu").contiguous().clone() for name, t in model.state_dict().items()}


def save_model(model: Transformer, folder: Path | str, extra: dict[str, Any] | None = None) -> Path:
    """Write `model.safetensors` and `config.json` into `folder`; returns the weights path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(_state_dict(model), folder / WEIGHTS, metadata={"format": "pt"})
    config = {"model": asdict(model.config), **(extra or {})}
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return folder / WEIGHTS


def read_config(folder: Path | str) -> tuple[ModelConfig, dict[str, Any]]:
    """The ModelConfig and the whole config.json of a model folder."""
    path = Path(folder) / CONFIG
    try:
        config: dict[str, Any] = json.loads(path.read_text())
        return ModelConfig(**config["model"]), config
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no config.json; is {folder} a model folder?") from None
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a model config ({err})") from None


def load_model(folder: Path | str, device: str | torch.device = "cpu") -> Transformer:
    """The model saved by `save_model`, in eval mode, on `device`."""
    cfg, _ = read_config(folder)
    model = Transformer(cfg)
    model.load_state_dict(load_file(Path(folder) / WEIGHTS), strict=True)
    return model.to(device).eval()


# -- training checkpoints -------------------------------------------------------------------------


def _rng_states() -> dict[str, torch.Tensor | list[torch.Tensor]]:
    states: dict[str, torch.Tensor | list[torch.Tensor]] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(
    work: Path | str,
    step: int,
    model: Transformer,
    optimizer: torch.optim.Optimizer,
    elapsed_s: float,
    extra: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
) -> Path:
    """Write `work/ckpt-<step>` atomically, point LATEST at it, delete older checkpoints.

    `model` is the plain module (not a DDP or torch.compile wrapper, whose parameter names
    carry a prefix); `config` is the training config as JSON-able values.
    """
    work = Path(work)
    final = work / f"ckpt-{step:08d}"
    tmp = work / f"ckpt-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_state_dict(model), tmp / WEIGHTS)
    state = {
        "step": step,
        "elapsed_s": elapsed_s,
        "optimizer": optimizer.state_dict(),
        "rng": _rng_states(),
        "config": config or {},
        "extra": extra or {},
    }
    torch.save(state, tmp / STATE)
    if final.exists():  # the same step saved before a crash: the new one replaces it
        shutil.rmtree(final)
    os.rename(tmp, final)
    latest_tmp = work / f"{LATEST}.tmp"
    latest_tmp.write_text(final.name + "\n")
    os.replace(latest_tmp, work / LATEST)
    for old in work.glob("ckpt-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(work: Path | str) -> Path | None:
    """The folder LATEST names, or (a crash before LATEST was first written) the newest complete one."""
    work = Path(work)
    try:
        named = work / (work / LATEST).read_text().strip()
        if named.is_dir():
            return named
    except FileNotFoundError:
        pass
    complete = sorted(p for p in work.glob("ckpt-*") if p.is_dir() and not p.name.endswith(".tmp"))
    return complete[-1] if complete else None


class Resumed(TypedDict):
    """What `load_checkpoint` restored: the step and training seconds so far, and what the trainer saved."""

    step: int
    elapsed_s: float
    config: dict[str, Any]  # the training config, as JSON-able values
    extra: dict[str, Any]
    path: Path  # the checkpoint folder


def load_checkpoint(work: Path | str, model: Transformer, optimizer: torch.optim.Optimizer) -> Resumed | None:
    """Restore model, optimizer and RNG states from the latest checkpoint in `work`.

    Returns {"step", "elapsed_s", "config", "extra", "path"}, or None when there is no checkpoint.
    """
    folder = latest_checkpoint(work)
    if folder is None:
        return None
    device = next(model.parameters()).device
    model.load_state_dict(load_file(folder / WEIGHTS, device=str(device)), strict=True)
    state = torch.load(folder / STATE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    _set_rng_states(state["rng"])
    return {
        "step": state["step"],
        "elapsed_s": state["elapsed_s"],
        "config": state.get("config", {}),
        "extra": state["extra"],
        "path": folder,
    }
