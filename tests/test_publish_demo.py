"""publish (versions, latest, idempotence, no half releases) and the Gradio demo over a real server."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import pytest
import torch

from ember.model.checkpoint import save_model
from ember.model.quantize import quantize_int8, save_int8
from ember.model.transformer import PRESETS, ModelConfig, Transformer
from ember.storage.shards import ShardWriter
from ember.tasks import publish, train_tokenizer
from ember.tasks.stage import Reporter, StageContext

VOCAB = 512


def make_ctx(tmp_path: Path, name: str, inputs: dict[str, Path], store_root: Path) -> StageContext:
    out, work = tmp_path / name / "out", tmp_path / name / "work"
    out.mkdir(parents=True)
    work.mkdir(parents=True)
    return StageContext(inputs=inputs, out=out, work=work, report=Reporter(name), store_root=store_root)


def fake_ref(stage: str, label: str) -> str:
    return f"{stage}/{hashlib.sha256(label.encode()).hexdigest()}"


def write_manifest(folder: Path, stage: str, label: str, metrics: dict | None = None) -> None:
    (folder / "manifest.json").write_text(json.dumps({"ref": fake_ref(stage, label), "metrics": metrics or {}}))


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, corpora) -> Path:
    root = tmp_path_factory.mktemp("tokenizer")
    text = (corpora / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:100_000]
    with ShardWriter(root / "dedup" / "shards") as writer:
        writer.write_many({"id": f"shakespeare:{i}", "text": t, "source": "shakespeare"}
                          for i, t in enumerate(text.split("\n\n")))
    ctx = make_ctx(root, "tok", {"dedup": root / "dedup"}, root / "store")
    train_tokenizer.run(train_tokenizer.TokenizerConfig(vocab_size=VOCAB), ctx)
    write_manifest(ctx.out, "train_tokenizer", "tok")
    return ctx.out


def make_inputs(root: Path, tokenizer_dir: Path, label: str, seed: int = 0) -> dict[str, Path]:
    """train / quantize / evaluate artifact folders around a tiny random model."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=VOCAB, **PRESETS["tiny"])).eval()
    extra = {"tokenizer": {"bos_id": 1, "eos_id": 2, "pad_id": 0},
             "train": {"steps": 0, "tokens": 0, "seconds": 0.0, "train_loss": 6.2, "val_loss": 6.3}}
    folders = {stage: root / label / stage for stage in ("train", "quantize", "evaluate")}
    save_model(model, folders["train"], extra)
    (folders["train"] / "loss.jsonl").write_text(json.dumps({"step": 0, "loss": 6.2, "lr": 0.0}) + "\n")
    save_int8(quantize_int8(model), folders["quantize"], extra)
    folders["evaluate"].mkdir(parents=True)
    (folders["evaluate"] / "report.json").write_text(json.dumps({"val_loss": 6.3, "bits_per_byte": 3.1}))
    (folders["evaluate"] / "report.md").write_text(f"# Report {label}\n\nval loss 6.3\n")
    for stage, folder in folders.items():
        write_manifest(folder, stage, f"{label}-{stage}", {"label": label})
    return {**folders, "train_tokenizer": tokenizer_dir}


def run_publish(tmp_path: Path, name: str, inputs: dict[str, Path], store: Path, **cfg) -> tuple[dict, Path]:
    """Versioning without the gate (its models are random); test_publish_gate.py covers the gate."""
    ctx = make_ctx(tmp_path, name, inputs, store)
    return publish.run(publish.PublishConfig(**{"gate": False, **cfg}), ctx), ctx.out


def latest(store: Path) -> str:
    return os.readlink(store / "releases" / "latest")


def versions(store: Path) -> list[str]:
    return sorted(p.name for p in (store / "releases").iterdir() if not p.name.startswith("."))


# -- publish ----------------------------------------------------------------------------------


def test_versions_latest_and_republish(tmp_path, tokenizer_dir):
    store = tmp_path / "store"
    a = make_inputs(tmp_path, tokenizer_dir, "a", seed=0)
    b = make_inputs(tmp_path, tokenizer_dir, "b", seed=1)

    metrics, out = run_publish(tmp_path, "p1", a, store)
    assert (metrics["version"], metrics["new"], latest(store)) == ("v0001", True, "v0001")
    release = store / "releases" / "v0001"
    expected = {"model.safetensors", "model-int8.safetensors", "config.json", "loss.jsonl", "report.json",
                "report.md", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "release.json",
                "hf", "model-f16.gguf", "model-q8_0.gguf"}
    assert {p.name for p in release.iterdir()} == expected
    assert (release / "hf" / "config.json").is_file() and (release / "hf" / "model.safetensors").is_file()
    record = json.loads((release / "release.json").read_text())
    assert record["version"] == "v0001" and record["created"]
    assert record["refs"] == {stage: fake_ref(stage, f"a-{stage}") for stage in ("train", "quantize", "evaluate")} | {
        "train_tokenizer": fake_ref("train_tokenizer", "tok")}
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


@pytest.mark.parametrize("missing", ["train/model.safetensors", "evaluate/report.md",
                                     "quantize/model-int8.safetensors"])
def test_a_missing_file_is_named(tmp_path, tokenizer_dir, missing):
    inputs = make_inputs(tmp_path, tokenizer_dir, "a")
    stage, name = missing.split("/")
    (inputs[stage] / name).unlink()
    with pytest.raises(FileNotFoundError, match=name):
        run_publish(tmp_path, "p", inputs, tmp_path / "store")


def test_publish_config_rejects_unknown_keys():
    with pytest.raises(ValueError):
        publish.PublishConfig(int8=True)


# -- the demo ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def releases(tmp_path_factory, tokenizer_dir) -> Path:
    root = tmp_path_factory.mktemp("demo")
    ctx = make_ctx(root, "publish", make_inputs(root, tokenizer_dir, "demo"), root / "store")
    publish.run(publish.PublishConfig(), ctx)
    return root / "store" / "releases"


@pytest.fixture(scope="module")
def serve():
    """Launch demos on free ports of 127.0.0.1; close them all at the end."""
    from ember.deployments.app import launch

    demos = []

    def start(releases_root: Path):
        demo = launch(releases_root, host="127.0.0.1", port=free_port(), prevent_thread_lock=True)
        demos.append(demo)
        return demo

    yield start
    for demo in demos:
        demo.close()


def test_load_release(releases):
    from ember.deployments.app import load_release

    release = load_release(releases / "latest")
    assert release.version == "v0001"
    assert release.model.config.vocab_size == VOCAB
    assert release.tokenizer.token_to_id("<eos>") == 2
    assert release.report["bits_per_byte"] == 3.1


def test_demo_streams_generated_text(releases, serve):
    from gradio_client import Client

    demo = serve(releases)
    assert demo.local_url.startswith("http://127.0.0.1:")
    client = Client(demo.local_url, verbose=False)
    job = client.submit("To be, or not", 24, 0.0, 0, api_name="/generate")
    text = job.result(timeout=60)
    assert text.startswith("To be, or not") and len(text) > len("To be, or not")
    assert len(job.outputs()) > 1  # streamed: one update per token, not a single answer
    # Sampling with top-k, and a prompt far longer than the model's 64-token context.
    text = client.predict("word " * 400, 8, 1.0, 5, api_name="/generate")
    assert text.startswith("word ") and len(text) > len("word " * 400)


def test_demo_without_release_says_so(tmp_path, serve):
    from gradio_client import Client

    from ember.deployments.app import NO_RELEASE

    demo = serve(tmp_path / "releases")  # does not even exist yet
    assert NO_RELEASE in json.dumps(demo.config, default=str)  # the page says it too
    answer = Client(demo.local_url, verbose=False).predict("hello", 8, 0.8, 50, api_name="/generate")
    assert answer == NO_RELEASE == "No release yet: run `make run` first"
