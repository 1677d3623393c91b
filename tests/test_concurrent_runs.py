"""Two `ember run`s of one config at once, on one store: both finish, each artifact is written once
(the other run waits on its lock and reuses it), and the store verifies."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline_configs import write_config

pytestmark = pytest.mark.slow

EMBER = str(Path(sys.executable).parent / "ember")
STAGES = [
    "download",
    "normalize",
    "filter",
    "dedup",
    "train_tokenizer",
    "tokenize",
    "train",
    "quantize",
    "evaluate",
    "publish",
]


def stage_results(stdout: str) -> dict[str, str]:
    """`ran` or `cache hit` per stage, from the table `ember run` prints."""
    results = {}
    for line in stdout.splitlines():
        cells = [cell.strip() for cell in line.replace("┃", "│").split("│") if cell.strip()]
        if len(cells) >= 2 and cells[0] in STAGES and cells[1] in ("ran", "cache hit"):
            results[cells[0]] = cells[1]
    return results


def test_two_overlapping_runs_of_one_config_share_the_store(prefect_api, tmp_path, corpora):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    from ember.storage.store import Store

    source = tmp_path / "stories"
    source.mkdir()
    text = (corpora / "tinystories_sample" / "tinystories_valid_head.txt").read_text(encoding="utf-8")
    (source / "stories.txt").write_text(text[:250_000], encoding="utf-8")
    config = write_config(
        tmp_path,
        "overlap.yaml",
        download={"sources": [{"name": "stories", "path": str(source)}]},
        # Training lasts about 25 s (0.15 s a step on one thread), longer than the
        # second process can lag behind the first in starting up on a busy machine.
        train={
            "model": {"preset": "cpu"},
            "seq_len": 128,
            "batch_size": 4,
            "max_steps": 150,
            "warmup_steps": 1,
            "eval_every": 150,
            "eval_batches": 1,
            "checkpoint_every": 50,
            "log_every": 10,
            "precision": "fp32",
        },
        evaluate={"eval_batches": 1, "batch_size": 4, "prompts": ["Once"], "max_new_tokens": 8},
    )
    store = tmp_path / "store"
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    runs = [
        subprocess.Popen(
            [EMBER, "run", str(config), "--store", str(store)],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=400)[0] for run in runs]
    for run, output in zip(runs, outputs, strict=True):
        assert run.returncode == 0, output[-4000:]

    # Each stage ran in exactly one of the two; the other found it complete (after its lock).
    results = [stage_results(output) for output in outputs]
    assert all(sorted(r) == sorted(STAGES) for r in results), results
    for stage in STAGES:
        assert sorted(r[stage] for r in results) == ["cache hit", "ran"], (stage, results)
    assert len(Store(store).ls()) == len(STAGES)
    assert [p.name for p in (store / "releases").iterdir() if p.name.startswith("v")] == ["v0001"]
    verify = subprocess.run([EMBER, "verify", "--store", str(store)], env=env, capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr

    # And they did overlap: both flow runs were running at the same time.
    with get_client(sync_client=True) as client:
        flow_runs = [
            r
            for r in client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["build-llm"])))
            if r.parameters.get("store_root") == str(store)
        ]
    assert len(flow_runs) == 2 and all(r.state is not None and r.state.is_completed() for r in flow_runs)
    spans = []
    for r in flow_runs:
        assert r.start_time is not None and r.end_time is not None  # a completed run has both
        spans.append((r.start_time, r.end_time))
    (_, first_end), (second_start, _) = sorted(spans, key=lambda span: span[0])
    assert second_start < first_end

    # What the terminal shows: the run's name first (the flow run's own name), a bar per long
    # step (the trainer's 150 steps, with an ETA column), and none of the stages' report tables.
    from ember.flows.config import load_config

    name = f"build-tiny-{load_config(config).digest()}"
    assert {r.name for r in flow_runs} == {name}
    trained = outputs[[r["train"] for r in results].index("ran")]
    assert trained.lstrip().startswith(f"{name}: 10 stages")
    bar = next(line for line in trained.splitlines() if line.startswith("train ") and "150/150" in line)
    assert "100%" in bar and "ETA" in bar, bar
    for line in ("|---|", "train 100% (150/150)"):  # a card's table; the bar's own log line
        assert line not in trained, trained[max(0, trained.find(line) - 1500) : trained.find(line) + 300]
