"""SIGKILL in the middle of training, run again: training resumes from its last checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline_configs import write_config

pytestmark = pytest.mark.slow


def start_run(config: Path, store: Path, api_url: str) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_API_URL": api_url}
    return subprocess.Popen(
        [sys.executable, "-m", "ember.flows.cli", "run", str(config), "--store", str(store)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def test_sigkill_during_training_then_resume(tmp_path, prefect_api):
    from ember.storage.store import Store

    # Steps of 8 windows accumulated from micro-batches of 4: the resumed run must carry on mid-schedule.
    config = write_config(
        tmp_path,
        train={"max_steps": 120, "checkpoint_every": 20, "eval_every": 60, "batch_size": 4, "tokens_per_step": 8 * 64},
    )
    store_root = tmp_path / "store"
    proc = start_run(config, store_root, prefect_api)
    try:
        deadline = time.time() + 300
        checkpoints: list[Path] = []
        while time.time() < deadline and proc.poll() is None and not checkpoints:
            checkpoints = list((store_root / "work" / "train").glob("*/LATEST"))
            time.sleep(0.05)
        output = proc.stdout.read() if proc.stdout and proc.poll() is not None else ""
        assert checkpoints, f"no training checkpoint appeared:\n{output}"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    store = Store(store_root)
    assert store.ls("train") == [], "a killed training run must not leave a train artifact"
    assert store.verify() == []
    killed_at = int((checkpoints[0].parent / "LATEST").read_text().strip().split("-")[-1])
    assert killed_at > 0

    proc = start_run(config, store_root, prefect_api)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    (train,) = store.ls("train")
    assert train.metrics["resumed_from"] >= killed_at, json.dumps(train.metrics)
    assert train.metrics["steps"] == 120 and train.metrics["tokens_per_step"] == 8 * 64
    assert [a.stage for a in store.ls("publish")] == ["publish"]
