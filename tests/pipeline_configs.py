"""A tiny pipeline config for end-to-end tests: tiny Shakespeare, a 512-token BPE, a tiny model."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import yaml

from helpers import CORPORA

TINY: dict[str, Any] = {  # the YAML config, as parsed
    "name": "tiny",
    "download": {
        "sources": [{"name": "shakespeare", "path": str(CORPORA / "tinyshakespeare" / "input.txt")}],
        "chunk_chars": 2000,
    },
    "train_tokenizer": {"vocab_size": 512},
    "train": {
        "model": {"preset": "tiny"},
        "batch_size": 8,
        "max_steps": 30,
        "warmup_steps": 5,
        "eval_every": 15,
        "eval_batches": 2,
        "checkpoint_every": 10,
        "log_every": 5,
    },
    "evaluate": {"eval_batches": 2, "batch_size": 8, "prompts": ["ROMEO:"], "max_new_tokens": 16},
}


def write_config(folder: Path, name: str = "tiny.yaml", **sections) -> Path:
    """Write TINY, with `sections` merged one level deep (train={"lr": 1e-3} keeps the rest)."""
    config = copy.deepcopy(TINY)
    for section, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(section), dict):
            config[section] = {**config[section], **value}
        else:
            config[section] = value
    path = Path(folder) / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def settled_task_runs(client, flow_run_id, timeout_s: float = 60.0) -> list:
    """The task runs of a flow run, once each has a final state. Task runs report their states
    to the API in the background, so right after the flow returns one can still be without one."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout_s
    while True:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        if all(run.state is not None and run.state.is_final() for run in runs) or time.monotonic() > deadline:
            return runs
        time.sleep(0.5)
