"""The store: keys, atomic commit, crash safety, locks, ls/show/verify/gc."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from ember.storage.store import LockTimeout, Store, StoreError, compute_key, make_ref
from ember.tasks.stage import Stage, run_stage


class EchoConfig(BaseModel):
    text: str = "hello"
    delay_s: float = 0.0


def echo(cfg: EchoConfig, ctx) -> dict:
    """A stage that copies its input (if any), appends its text, and counts its runs."""
    previous = ""
    if "up" in ctx.inputs:
        previous = (ctx.inputs["up"] / "out.txt").read_text()
    time.sleep(cfg.delay_s)
    (ctx.out / "out.txt").write_text(previous + cfg.text)
    with open(ctx.store_root / "runs.log", "a") as log:
        log.write(f"{os.getpid()}\n")
    return {"chars": len(previous + cfg.text)}


ECHO = Stage(name="echo", version=1, run=echo)


def runs_logged(store: Store) -> int:
    path = store.root / "runs.log"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(dict(stage="other"), id="stage_name"),
        pytest.param(dict(version=2), id="stage_version"),
        pytest.param(dict(params={"lr": 0.002}), id="own_params"),
        pytest.param(dict(inputs={"up": "up/" + "b" * 64}), id="input_ref"),
    ],
)
def test_key_changes_with_each_part(change):
    base: dict[str, Any] = dict(stage="train", version=1, params={"lr": 0.001}, inputs={"up": "up/" + "a" * 64})
    assert compute_key(**base) != compute_key(**{**base, **change})


def test_key_ignores_dict_order():
    a = compute_key("s", 1, {"a": 1, "b": {"x": 1, "y": 2}}, {"i": "r"})
    b = compute_key("s", 1, {"b": {"y": 2, "x": 1}, "a": 1}, {"i": "r"})
    assert a == b and len(a) == 64


def test_commit_writes_manifest_with_checksums(tmp_path):
    store = Store(tmp_path)
    outcome = run_stage(store, ECHO, EchoConfig(), {})
    artifact = store.require(outcome.ref)
    assert (artifact.path / "out.txt").read_text() == "hello"
    files = artifact.manifest["files"]
    assert set(files) == {"out.txt"} and files["out.txt"]["size"] == 5
    assert artifact.manifest["params"] == {"text": "hello", "delay_s": 0.0}
    assert artifact.metrics == {"chars": 5}
    assert not list((tmp_path / "tmp").iterdir())


def test_second_run_is_a_cache_hit_and_force_reruns(tmp_path):
    store = Store(tmp_path)
    first = run_stage(store, ECHO, EchoConfig(), {})
    second = run_stage(store, ECHO, EchoConfig(), {})
    assert (first.cached, second.cached) == (False, True) and first.ref == second.ref
    assert runs_logged(store) == 1
    forced = run_stage(store, ECHO, EchoConfig(), {}, force=True)
    assert not forced.cached and runs_logged(store) == 2
    assert store.require(forced.ref).metrics == {"chars": 5}


def test_downstream_key_follows_upstream(tmp_path):
    store = Store(tmp_path)
    up_a = run_stage(store, ECHO, EchoConfig(text="a"), {})
    up_b = run_stage(store, ECHO, EchoConfig(text="b"), {})
    down_a = run_stage(store, ECHO, EchoConfig(text="!"), {"up": up_a.ref})
    down_b = run_stage(store, ECHO, EchoConfig(text="!"), {"up": up_b.ref})
    assert down_a.ref != down_b.ref
    assert (store.path(down_b.ref) / "out.txt").read_text() == "b!"


def test_failed_stage_leaves_nothing(tmp_path):
    def explode(cfg, ctx):
        (ctx.out / "half.txt").write_text("half")
        raise RuntimeError("disk on fire")

    store = Store(tmp_path)
    stage = Stage(name="boom", version=1, run=explode)
    with pytest.raises(RuntimeError, match="disk on fire"):
        run_stage(store, stage, None, {})
    assert store.ls() == []
    assert not list((tmp_path / "tmp").iterdir())


def test_folder_without_manifest_is_not_an_artifact(tmp_path):
    store = Store(tmp_path)
    ref = make_ref("echo", compute_key("echo", 1, EchoConfig().model_dump(mode="json"), {}))
    store.path(ref).mkdir(parents=True)
    (store.path(ref) / "out.txt").write_text("stale half")
    assert store.get(ref) is None
    with pytest.raises(StoreError, match="no complete manifest"):
        store.require(ref)
    outcome = run_stage(store, ECHO, EchoConfig(), {})  # rebuilt, not read
    assert outcome.ref == ref and not outcome.cached
    assert (store.path(ref) / "out.txt").read_text() == "hello"


def test_sigkill_mid_write_leaves_no_artifact(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_store import ECHO, EchoConfig
        from ember.storage.store import Store
        from ember.tasks.stage import run_stage
        run_stage(Store({str(tmp_path)!r}), ECHO, EchoConfig(delay_s=60), {{}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 30
        while time.time() < deadline and not list((tmp_path / "tmp").glob("echo-*")):
            time.sleep(0.05)
        assert list((tmp_path / "tmp").glob("echo-*")), "writer never started"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    store = Store(tmp_path)
    assert store.ls() == []
    assert store.verify() == []
    removed = store.gc()
    assert any(line.startswith("tmp/echo-") for line in removed)
    # The lock died with the process: a new run goes straight through.
    assert not run_stage(store, ECHO, EchoConfig(), {}).cached


def _run_echo(root: str, delay: float, results) -> None:
    outcome = run_stage(Store(root), ECHO, EchoConfig(delay_s=delay), {})
    results.put((outcome.ref, outcome.cached))


def test_two_runs_at_once_write_once(tmp_path):
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_run_echo, args=(str(tmp_path), 1.5, results)) for _ in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
    got = sorted(results.get(timeout=5) for _ in procs)
    assert got[0][0] == got[1][0]
    assert sorted(cached for _, cached in got) == [False, True]
    assert runs_logged(Store(tmp_path)) == 1


def _hold_lock(root: str, ref: str, ready, release) -> None:
    with Store(root).lock(ref):
        ready.set()
        release.wait(30)


def test_lock_wait_is_bounded(tmp_path):
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    ref = make_ref("echo", "c" * 64)
    holder = ctx.Process(target=_hold_lock, args=(str(tmp_path), ref, ready, release))
    holder.start()
    try:
        assert ready.wait(20)
        with pytest.raises(LockTimeout, match=f"{ref} is being written by another run"):
            with Store(tmp_path).lock(ref, timeout_s=0.3):
                pass
    finally:
        release.set()
        holder.join(20)


def test_verify_finds_tampering(tmp_path):
    store = Store(tmp_path)
    ref = run_stage(store, ECHO, EchoConfig(), {}).ref
    assert store.verify() == []
    (store.path(ref) / "out.txt").write_text("HELLO")
    assert store.verify() == [f"{ref}: out.txt checksum differs from the manifest"]
    (store.path(ref) / "out.txt").unlink()
    assert store.verify() == [f"{ref}: missing out.txt"]


def test_gc_keeps_latest_run_and_its_inputs(tmp_path):
    store = Store(tmp_path)
    old = run_stage(store, ECHO, EchoConfig(text="old"), {})
    up = run_stage(store, ECHO, EchoConfig(text="up"), {})
    down = run_stage(store, ECHO, EchoConfig(text="down"), {"up": up.ref})
    store.record_run("sample", {"echo": old.ref})
    time.sleep(1.1)  # run records are named by the second
    store.record_run("sample", {"echo": down.ref})
    assert set(store.gc(dry_run=True)) == {old.ref}
    assert store.get(old.ref) is not None
    assert store.gc() == [old.ref]
    assert {a.ref for a in store.ls()} == {up.ref, down.ref}


def test_gc_keeps_released_artifacts(tmp_path):
    store = Store(tmp_path)
    released = run_stage(store, ECHO, EchoConfig(text="shipped"), {})
    (store.releases_dir / "v0001").mkdir(parents=True)
    (store.releases_dir / "v0001" / "release.json").write_text(json.dumps({"refs": {"echo": released.ref}}))
    assert store.gc() == []


def test_find_by_prefix(tmp_path):
    store = Store(tmp_path)
    ref = run_stage(store, ECHO, EchoConfig(), {}).ref
    assert store.find(ref[:12]).ref == ref
    assert store.find(ref.split("/")[1][:8]).ref == ref
    with pytest.raises(StoreError, match="no artifact matches"):
        store.find("nothing")


def test_rebuilt_input_with_same_content_keeps_downstream(tmp_path):
    store = Store(tmp_path)
    up = run_stage(store, ECHO, EchoConfig(text="up"), {})
    down = run_stage(store, ECHO, EchoConfig(text="!"), {"up": up.ref})
    store.delete(up.ref)
    assert not run_stage(store, ECHO, EchoConfig(text="up"), {}).cached
    again = run_stage(store, ECHO, EchoConfig(text="!"), {"up": up.ref})
    assert again.cached and again.ref == down.ref


def test_rebuilt_input_with_other_content_rebuilds_downstream(tmp_path):
    def stamp(cfg, ctx):  # like training under a time budget: same key, other bytes
        (ctx.out / "out.txt").write_text(f"{time.time_ns()}")
        return {}

    clock = Stage(name="clock", version=1, run=stamp)
    store = Store(tmp_path)
    up = run_stage(store, clock, None, {})
    down = run_stage(store, ECHO, EchoConfig(text="!"), {"up": up.ref})
    store.delete(up.ref)
    assert not run_stage(store, clock, None, {}).cached
    again = run_stage(store, ECHO, EchoConfig(text="!"), {"up": up.ref})
    assert not again.cached and again.ref == down.ref
    assert (store.path(down.ref) / "out.txt").read_text() == (store.path(up.ref) / "out.txt").read_text() + "!"
