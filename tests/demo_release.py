"""A tiny trained release for the demo tests, built once per test run by the real flow.

Several test modules use it (the model card, gc, the browser), on any of pytest-xdist's workers:
the first to ask builds it under the run's temp folder, which all workers share, while the others
wait on its lock and then find it there, so the run trains one model. Tests only read it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from filelock import FileLock

from pipeline_configs import write_config

PROMPT = "ROMEO:"


def tiny_release_store(tmp_path_factory) -> Path:
    """The store root of the run's tiny release (tiny Shakespeare, 40 steps). Needs a
    Prefect API (the `prefect_api` fixture) the first time."""
    import torch

    from ember.flows.config import load_config
    from ember.flows.pipeline import build_llm

    root = run_temp(tmp_path_factory) / "tiny-release"
    done = root / "release.txt"
    root.mkdir(exist_ok=True)
    with FileLock(root / "building.lock"):
        if done.is_file():
            return root / "store"
        config = write_config(
            root,
            train={"max_steps": 40, "eval_every": 20},
            evaluate={"prompts": [PROMPT], "max_new_tokens": 16, "eval_batches": 2, "batch_size": 8, "speed_tokens": 8},
        )
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a tiny model gains nothing from a second thread (see conftest)
        try:
            summary = build_llm(load_config(config), store_root=str(root / "store"))
        finally:
            torch.set_num_threads(threads)
        assert summary["release"], summary
        done.write_text(summary["release"])
    return root / "store"


def run_temp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The temp folder of the whole test run: under xdist each worker's basetemp is a folder of it
    (`popen-gw0`, ...); without xdist it is the session's own."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
