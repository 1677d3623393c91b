"""benchmarks/train_bench.py runs end to end (a GPU session runs it unchanged; CI only on CPU):
every training side with bf16 forced, generation against transformers, the no-cache run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "train_bench.py"


def test_train_bench_smoke_run_prints_every_side():
    result = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--preset",
            "tiny",
            "--seq",
            "32",
            "--batch",
            "2",
            "--new-tokens",
            "12",
            "--steps",
            "1",
            "--repeat",
            "1",
            "--threads",
            "1",
            "--precision",
            "bf16",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "Ember's precision: bf16 (set in the config)" in out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    for side in (
        "ember bf16",
        "transformers fp32",
        "ember fp32",
        "transformers bf16",
        "ember (KV cache)",
        "transformers generate() (KV cache)",
        "ember (no cache)",
    ):
        assert side in rows, f"no row for {side!r} in:\n{out}"
    # (Whether the greedy tokens match is printed, not asserted: a random tiny model's logits
    # are nearly uniform, and the decoding layout's other summation order may break a near-tie.)
    assert "logits agree to" in out
