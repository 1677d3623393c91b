"""Releases over time: `ember releases`, `ember publish --rollback` (and the demo following it),
and `ember gc` never touching what a release was made from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from demo_release import tiny_release_store
from ember.storage import releases as registry
from ember.storage.store import Store, compute_key, make_ref
from release_builders import free_port, make_inputs, run_publish


@pytest.fixture
def two_releases(tmp_path, tokenizer_dir) -> Path:  # noqa: F811
    """A store with v0001 and v0002 (two different random models); latest -> v0002."""
    store = tmp_path / "store"
    run_publish(tmp_path, "p1", make_inputs(tmp_path, tokenizer_dir, "a", seed=0), store)
    run_publish(tmp_path, "p2", make_inputs(tmp_path, tokenizer_dir, "b", seed=1), store)
    return store


def latest(store: Path) -> str:
    return (store / "releases" / "latest").resolve().name


def test_rollback(two_releases):
    releases = two_releases / "releases"
    assert registry.rollback(releases) == ("v0002", "v0001") and latest(two_releases) == "v0001"
    with pytest.raises(ValueError, match="v0001, the oldest release"):
        registry.rollback(releases)
    assert registry.rollback(releases, "v0002") == ("v0001", "v0002")  # forward again, by name
    with pytest.raises(ValueError, match="no release 'v0009'"):
        registry.rollback(releases, "v0009")
    history = [json.loads(line) for line in (releases / "history.jsonl").read_text().splitlines()]
    assert [(h["was"], h["latest"], h["why"]) for h in history] == [
        (None, "v0001", "publish"),
        ("v0001", "v0002", "publish"),
        ("v0002", "v0001", "rollback"),
        ("v0001", "v0002", "rollback"),
    ]
    assert latest(two_releases) == "v0002"


def test_cli_lists_and_rolls_back(two_releases):
    from ember.flows.cli import app

    runner = CliRunner()
    store = ["--store", str(two_releases)]
    result = runner.invoke(app, ["releases", *store], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if "v000" in line]
    assert len(rows) == 2 and "latest" in rows[1] and "latest" not in rows[0]
    assert "3.1000" in rows[0]  # the eval report's bits per byte
    result = runner.invoke(app, ["publish", "--rollback", *store])
    assert result.exit_code == 0, result.output
    assert "v0002 → v0001" in result.output and latest(two_releases) == "v0001"
    result = runner.invoke(app, ["publish", "--rollback", "v0007", *store])
    assert result.exit_code == 2 and "no release 'v0007'" in result.output
    result = runner.invoke(app, ["publish", *store])
    assert result.exit_code == 2 and "--rollback" in result.output
    result = runner.invoke(app, ["releases", "--store", str(two_releases / "empty")])
    assert result.exit_code == 0 and "no releases" in result.output


def test_the_demo_serves_the_release_rolled_back_to(two_releases):
    from gradio_client import Client

    from ember.deployments.app import launch
    from ember.deployments.releases_served import Releases, continue_text

    releases = two_releases / "releases"
    prompt = "To be, or not"

    # Sampled with a fixed seed: one text per model (greedy decoding of two random models can agree).
    settings: dict[str, Any] = dict(max_new_tokens=24, temperature=1.0, top_k=0, seed=5)

    def expected(version: str) -> str:
        return list(continue_text(Releases(releases), prompt, **settings, release=version))[-1]

    assert expected("v0001") != expected("v0002")
    demo = launch(releases, port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        client = Client(demo.local_url, verbose=False)
        assert client.predict(prompt, **settings, api_name="/generate") == expected("v0002")
        registry.rollback(releases)
        assert client.predict(api_name="/release_info")["release"] == "v0001"
        assert client.predict(prompt, **settings, api_name="/generate") == expected("v0001")
    finally:
        demo.close()


def _artifact(store: Store, stage: str, label: str, inputs: dict[str, str]) -> str:
    ref = make_ref(stage, compute_key(stage, 1, {"label": label}, inputs))
    with store.lock(ref), store.writer(ref, {"params": {"label": label}, "inputs": inputs}) as out:
        (out / "data.txt").write_text(label)
    return ref


def test_gc_keeps_every_artifact_a_release_names(tmp_path):
    """No run record keeps them: only release.json does, through `refs` and `lineage` (which
    also covers an artifact whose downstream manifest is gone)."""
    store = Store(tmp_path / "store")
    download = _artifact(store, "download", "d", {})
    dedup = _artifact(store, "dedup", "x", {"download": download})
    train = _artifact(store, "train", "t", {"dedup": dedup})
    orphan = _artifact(store, "train", "old", {"dedup": dedup})
    lineage_only = _artifact(store, "filter", "f", {})
    folder = store.releases_dir / "v0001"
    folder.mkdir(parents=True)
    (folder / "release.json").write_text(
        json.dumps({"version": "v0001", "refs": {"train": train}, "lineage": {"filter": lineage_only, "train": train}})
    )

    assert store.gc(dry_run=True) == [orphan]
    assert store.gc() == [orphan]
    assert {a.ref for a in store.ls()} == {download, dedup, train, lineage_only}
    (folder / "release.json").write_text("{broken")
    with pytest.raises(Exception, match="unreadable"):  # stop, rather than delete what it may name
        store.gc()
    assert len(store.ls()) == 4


@pytest.mark.slow
def test_gc_keeps_a_pipeline_release(tmp_path, tmp_path_factory, prefect_api):
    """The real flow's release, with its run records gone: gc leaves every artifact behind it."""
    root = tmp_path / "store"
    shutil.copytree(tiny_release_store(tmp_path_factory), root, symlinks=True)
    shutil.rmtree(root / "runs")
    store = Store(root)
    lineage = json.loads((root / "releases" / "latest" / "release.json").read_text())["lineage"]
    removed = store.gc()
    assert all(ref.startswith("publish/") for ref in removed)  # only the stage record, not the release's inputs
    assert all(store.get(ref) is not None for ref in lineage.values()) and len(lineage) == 9
    assert store.verify() == []
