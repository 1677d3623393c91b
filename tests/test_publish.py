"""publish: versions, latest, idempotence, no half releases, read-only releases, and the model
card (also of a release the real flow made)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from demo_release import PROMPT, tiny_release_store
from ember.model.transformer import PRESETS
from ember.tasks import publish
from release_builders import VOCAB, fake_ref, latest, make_inputs, run_publish, versions


def test_versions_latest_and_republish(tmp_path, tokenizer_dir):
    store = tmp_path / "store"
    a = make_inputs(tmp_path, tokenizer_dir, "a", seed=0)
    b = make_inputs(tmp_path, tokenizer_dir, "b", seed=1)

    metrics, out = run_publish(tmp_path, "p1", a, store)
    assert (metrics["version"], metrics["new"], latest(store)) == ("v0001", True, "v0001")
    release = store / "releases" / "v0001"
    expected = {
        "model.safetensors",
        "model-int8.safetensors",
        "config.json",
        "loss.jsonl",
        "report.json",
        "report.md",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "release.json",
        "hf",
        "model-f16.gguf",
        "model-q8_0.gguf",
        "README.md",
        "pipeline.yaml",
    }
    assert {p.name for p in release.iterdir()} == expected
    assert (release / "hf" / "config.json").is_file() and (release / "hf" / "model.safetensors").is_file()
    record = json.loads((release / "release.json").read_text())
    assert record["version"] == "v0001" and record["created"]
    assert record["refs"] == {stage: fake_ref(stage, f"a-{stage}") for stage in ("train", "quantize", "evaluate")} | {
        "train_tokenizer": fake_ref("train_tokenizer", "tok-shakespeare")
    }
    assert record["metrics"]["train"] == {"label": "a"}
    assert (out / "release.json").read_bytes() == (release / "release.json").read_bytes()
    assert (release / "model.safetensors").read_bytes() == (a["train"] / "model.safetensors").read_bytes()
    assert metrics["size_bytes"] == sum(f["size"] for f in record["files"].values())
    # The tokenizer now knows the model's context.
    tokenizer_config = json.loads((release / "tokenizer_config.json").read_text())
    assert tokenizer_config["model_max_length"] == PRESETS["tiny"]["max_seq_len"]

    metrics, _ = run_publish(tmp_path, "p2", b, store)
    assert (metrics["version"], metrics["new"], latest(store)) == ("v0002", True, "v0002")

    # The same inputs again: no new version; latest points back at the release that has them.
    metrics, out = run_publish(tmp_path, "p3", a, store)
    assert (metrics["version"], metrics["new"], latest(store)) == ("v0001", False, "v0001")
    assert json.loads((out / "release.json").read_text())["version"] == "v0001"
    assert versions(store) == ["latest", "v0001", "v0002"]
    assert (store / "releases" / "latest" / "model.safetensors").is_file()  # the relative link resolves


def test_a_release_is_read_only_and_has_a_card(tmp_path, tokenizer_dir):
    store = tmp_path / "store"
    run_publish(tmp_path, "p1", make_inputs(tmp_path, tokenizer_dir, "a"), store)
    release = store / "releases" / "v0001"
    files = [p for p in release.rglob("*") if p.is_file()]
    assert files and all(p.stat().st_mode & 0o222 == 0 for p in files)  # nobody may write
    card = (release / "README.md").read_text()
    assert (
        card.startswith("# Ember model v0001")
        and f"- parameters: {sum(p.numel() for p in model_params(release)):,}\n" in card
    )
    # Stand-in artifacts have no download / curation manifests: the card says so rather than guess.
    assert "Not recorded" in card
    record = json.loads((release / "release.json").read_text())
    assert record["files"]["README.md"]["sha256"] and record["lineage"]["train"] == fake_ref("train", "a-train")


def model_params(folder: Path):
    from ember.model.checkpoint import load_model

    return list(load_model(folder).parameters())


def test_the_same_model_in_a_new_layout_skips_the_gate(tmp_path, tokenizer_dir):
    """A new layout (here: no GGUF) of the published weights is a new version; the gate has
    nothing to compare (it would need the tokenize artifact, which these inputs lack)."""
    store = tmp_path / "store"
    a = make_inputs(tmp_path, tokenizer_dir, "a")
    run_publish(tmp_path, "p1", a, store)
    metrics, _ = run_publish(tmp_path, "p2", a, store, gate=True, gguf=[])
    assert (metrics["version"], metrics["new"], latest(store)) == ("v0002", True, "v0002")
    with pytest.raises(ValueError, match="tokenize"):  # another model does go through the gate
        run_publish(tmp_path, "p3", make_inputs(tmp_path, tokenizer_dir, "b", seed=1), store, gate=True)


def test_without_int8_is_another_release(tmp_path, tokenizer_dir):
    store = tmp_path / "store"
    a = make_inputs(tmp_path, tokenizer_dir, "a")
    run_publish(tmp_path, "p1", a, store)
    metrics, _ = run_publish(tmp_path, "p2", a, store, include_int8=False)
    assert metrics["version"] == "v0002"
    assert not (store / "releases" / "v0002" / "model-int8.safetensors").exists()


def test_a_failed_publish_leaves_no_half_release(tmp_path, tokenizer_dir):
    store = tmp_path / "store"
    run_publish(tmp_path, "p1", make_inputs(tmp_path, tokenizer_dir, "a"), store)
    broken = make_inputs(tmp_path, tokenizer_dir, "b")
    (broken["train"] / "config.json").write_text("{not json")  # fails after the copies, before the rename
    with pytest.raises(json.JSONDecodeError):
        run_publish(tmp_path, "p2", broken, store)
    assert versions(store) == ["latest", "v0001"] and latest(store) == "v0001"
    assert not list((store / "releases").glob(".tmp-*"))


@pytest.mark.parametrize(
    "missing", ["train/model.safetensors", "evaluate/report.md", "quantize/model-int8.safetensors"]
)
def test_a_missing_file_is_named(tmp_path, tokenizer_dir, missing):
    inputs = make_inputs(tmp_path, tokenizer_dir, "a")
    stage, name = missing.split("/")
    (inputs[stage] / name).unlink()
    with pytest.raises(FileNotFoundError, match=name):
        run_publish(tmp_path, "p", inputs, tmp_path / "store")


def test_publish_config_rejects_unknown_keys():
    with pytest.raises(ValueError):
        publish.PublishConfig.model_validate({"int8": True})


@pytest.mark.slow
def test_model_card_of_a_pipeline_release(tmp_path_factory, prefect_api):
    """The card of a release made by the real flow: data per source with its licence, what
    curation removed, training, eval, samples; pipeline.yaml is a config `ember run` accepts."""
    from ember.flows.config import load_config

    release = tiny_release_store(tmp_path_factory) / "releases" / "latest"
    card = (release / "README.md").read_text()
    for expected in (
        "## Model",
        "## Training",
        "## Evaluation",
        "## Data",
        "## Sample outputs",
        "## Provenance",
        "| shakespeare | 1 | ",
        "public domain",
        "tinyshakespeare/SOURCE.md",
        "- filter: removed ",
        "- dedup: removed ",
        "40 steps",
        f"> **{PROMPT}**",
        "| fp32 | ",
        "| int8 | ",
    ):
        assert expected in card, expected
    record = json.loads((release / "release.json").read_text())
    assert list(record["lineage"]) == [
        "download",
        "normalize",
        "filter",
        "dedup",
        "train_tokenizer",
        "tokenize",
        "train",
        "quantize",
        "evaluate",
    ]
    for stage, ref in record["lineage"].items():
        assert f"| {stage} | `{ref}` |" in card
    config = load_config(release / "pipeline.yaml")
    assert config.train.max_steps == 40 and config.download.sources[0].name == "shakespeare"
    assert yaml.safe_load((release / "pipeline.yaml").read_text())["train_tokenizer"]["vocab_size"] == VOCAB
