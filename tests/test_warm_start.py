"""Warm start: training starts from `releases/latest` when its tokenizer and shape are this run's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ember.flows.pipeline import plan_warm_start
from ember.storage.releases import point_latest
from ember.storage.store import file_sha256
from ember.tasks import train
from test_train_stages import context, make_artifacts, tiny_train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def first_loss(folder: Path) -> float:
    return json.loads((folder / "loss.jsonl").read_text().splitlines()[0])["loss"]


def publish_by_hand(store: Path, version: str, model_dir: Path, tokenizer_dir: Path) -> Path:
    """A release folder in publish's layout (the files train reads, and release.json's digests)."""
    folder = store / "releases" / version
    folder.mkdir(parents=True)
    for source in (model_dir / "model.safetensors", model_dir / "config.json", tokenizer_dir / "tokenizer.json"):
        shutil.copy2(source, folder / source.name)
    files = {p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in folder.iterdir()}
    (folder / "release.json").write_text(json.dumps({"version": version, "files": files}))
    point_latest(store / "releases", version)
    return folder


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> tuple[Path, dict[str, Path], Path]:
    """A store whose latest release is a tiny model trained for 40 steps, and its artifacts."""
    tmp = tmp_path_factory.mktemp("warm")
    artifacts = make_artifacts(tmp / "artifacts", chars=60_000)
    ctx = context(tmp, "first", artifacts)
    train.run(tiny_train(), ctx)
    store = tmp / "store"
    publish_by_hand(store, "v0001", ctx.out, artifacts["train_tokenizer"])
    scratch = context(tmp, "scratch", artifacts)
    train.run(tiny_train(max_steps=3, log_every=1), scratch)
    return store, artifacts, scratch.out


def warm_run(tmp_path: Path, store: Path, inputs: dict[str, Path], cfg: train.TrainConfig):
    """Train as the flow does: `warm_start` resolved by the flow's plan, the release handed over."""
    plan = plan_warm_start(cfg, store / "releases", tokens_ref=None)
    ctx = context(tmp_path, "warm", inputs)
    ctx.resources = {"warm_start": plan.release} if plan.release else {}
    return ctx, train.run(plan.config, ctx)


def test_warm_start_begins_where_the_release_left_off(published, tmp_path, caplog):
    store, artifacts, scratch = published
    with caplog.at_level("INFO", logger="ember.train"):
        ctx, metrics = warm_run(tmp_path, store, artifacts, tiny_train(max_steps=3, log_every=1, warm_start=True))
    assert "warm start: started from the weights of release v0001" in caplog.text
    assert metrics["warm_start"] == "v0001"
    # The release was trained 40 steps: its first loss is far below a fresh model's (ln 512 = 6.24).
    assert first_loss(ctx.out) < first_loss(scratch) - 0.5


def test_changed_tokenizer_falls_back_to_scratch_and_says_why(published, tmp_path, caplog):
    store, artifacts, scratch = published
    other = tmp_path / "other_tokenizer"
    other.mkdir()
    tokenizer = json.loads((artifacts["train_tokenizer"] / "tokenizer.json").read_text())
    tokenizer["model"]["merges"] = tokenizer["model"]["merges"][:-1]  # one merge fewer: another tokenizer
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    with caplog.at_level("INFO", logger="ember.train"):
        ctx, metrics = warm_run(
            tmp_path,
            store,
            {**artifacts, "train_tokenizer": other},
            tiny_train(max_steps=3, log_every=1, warm_start=True),
        )
    assert (
        "warm start not possible: release v0001's tokenizer differs from this run's; training from scratch"
        in caplog.text
    )
    assert metrics["warm_start"] is None
    assert first_loss(ctx.out) == first_loss(scratch)  # the same seeded initialisation as a fresh run


def test_other_model_shape_falls_back_to_scratch(published, tmp_path, caplog):
    store, artifacts, _ = published
    with caplog.at_level("INFO", logger="ember.train"):
        _, metrics = warm_run(
            tmp_path,
            store,
            artifacts,
            tiny_train(model={"preset": "tiny", "n_layers": 1}, max_steps=1, warm_start=True),
        )
    assert "release v0001's model shape differs (n_layers 2 vs 1)" in caplog.text and metrics["warm_start"] is None


def release_json(folder: Path, tokens_ref: str) -> None:
    record = json.loads((folder / "release.json").read_text())
    (folder / "release.json").write_text(json.dumps({**record, "lineage": {"tokenize": tokens_ref}}))  # as publish


def test_plan_names_the_release_and_its_weights(published, tmp_path):
    store, _, _ = published
    digest = file_sha256(store / "releases" / "v0001" / "model.safetensors")
    releases = store / "releases"
    cfg, identity, release = plan_warm_start(tiny_train(warm_start=True), releases, "tokenize/new")
    assert (cfg.warm_start, identity, release) == ("v0001", f"v0001 sha256:{digest}", releases / "v0001")
    assert plan_warm_start(tiny_train(), releases, "tokenize/new") == (tiny_train(), None, None)  # nothing read
    plan = plan_warm_start(tiny_train(warm_start=True), tmp_path / "empty-store" / "releases", "tokenize/new")
    assert plan == (tiny_train(), None, None)  # no release: a cold start, the same key as a build's
    with pytest.raises(ValueError, match="v0009 has no model.safetensors"):
        plan_warm_start(tiny_train(warm_start="v0009"), releases, "tokenize/new")
    with pytest.raises(ValueError, match="not a release version"):
        tiny_train(warm_start="latest")


def test_a_retrain_over_the_same_tokens_resolves_to_the_same_release(published, tmp_path):
    """Night after night over an unchanged corpus the plan, hence the train key, stays put; a new
    corpus moves it to the newest release."""
    store, _, _ = published
    copy = tmp_path / "store"
    shutil.copytree(store / "releases" / "v0001", copy / "releases" / "v0001")
    release_json(copy / "releases" / "v0001", "tokenize/old")
    point_latest(copy / "releases", "v0001")
    # New tokens: start from v0001, which learned from the old ones.
    assert plan_warm_start(tiny_train(warm_start=True), copy / "releases", "tokenize/new")[0].warm_start == "v0001"
    # That retrain published v0002 from the new tokens; the next night has the same tokens.
    shutil.copytree(copy / "releases" / "v0001", copy / "releases" / "v0002")
    release_json(copy / "releases" / "v0002", "tokenize/new")
    point_latest(copy / "releases", "v0002")
    assert plan_warm_start(tiny_train(warm_start=True), copy / "releases", "tokenize/new")[0].warm_start == "v0001"
    # Then the corpus changes again: v0002 is the one to continue from.
    assert plan_warm_start(tiny_train(warm_start=True), copy / "releases", "tokenize/newer")[0].warm_start == "v0002"
    # Every release learned from these tokens already: nothing to continue from, a cold start (as a build).
    for version in ("v0001", "v0002"):
        release_json(copy / "releases" / version, "tokenize/newer")
    assert plan_warm_start(tiny_train(warm_start=True), copy / "releases", "tokenize/newer")[0].warm_start is False
