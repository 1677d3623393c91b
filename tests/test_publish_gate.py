"""The publish gate, end to end: a worse candidate is not published, a better one is, and
`--force-publish` overrides."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline_configs import write_config

pytestmark = pytest.mark.slow


def build(config: Path, store: Path):
    from ember.flows.config import load_config
    from ember.flows.pipeline import build_llm

    return build_llm(load_config(config), store_root=str(store))


def latest(store: Path) -> str:
    return (store / "releases" / "latest").resolve().name


def test_gate(tmp_path, prefect_api):
    store = tmp_path / "store"
    first = build(write_config(tmp_path, "base.yaml", train={"max_steps": 40}), store)
    assert Path(first["release"]).name == "v0001" and latest(store) == "v0001"

    # Fewer steps: a worse model. Not published, and latest stays.
    worse = write_config(tmp_path, "worse.yaml", train={"max_steps": 3})
    summary = build(worse, store)
    assert summary["release"] == "" and latest(store) == "v0001"
    assert summary["not_published"].startswith("not published: candidate ")
    assert "vs published v0001" in summary["not_published"]

    # More steps: a better model replaces it.
    summary = build(write_config(tmp_path, "better.yaml", train={"max_steps": 120}), store)
    assert Path(summary["release"]).name == "v0002" and latest(store) == "v0002"

    # The CLI's --force-publish ships the worse one anyway.
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    result = subprocess.run(
        [sys.executable, "-m", "ember.flows.cli", "run", str(worse), "--force-publish", "--store", str(store)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert latest(store) == "v0003"
