"""Publish inputs and releases for the publish, demo, releases and browser tests: a real
tokenizer, a tiny random model around it as train / quantize / evaluate artifacts, and
`publish_two_languages` (an English and a Chinese release in one folder)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from itertools import islice
from pathlib import Path

import torch

from ember.model.checkpoint import save_model
from ember.model.quantize import quantize_int8, save_int8
from ember.model.transformer import PRESETS, ModelConfig, Transformer
from ember.storage.shards import ShardWriter
from ember.tasks import publish, train_tokenizer
from ember.tasks.stage import Reporter, StageContext
from helpers import stage_context

VOCAB = 512


def make_ctx(tmp_path: Path, name: str, inputs: dict[str, Path], store_root: Path) -> StageContext:
    return stage_context(
        tmp_path / name, "out", inputs, work=tmp_path / name / "work", store_root=store_root, reporter=Reporter(name)
    )


def fake_ref(stage: str, label: str) -> str:
    return f"{stage}/{hashlib.sha256(label.encode()).hexdigest()}"


def write_manifest(folder: Path, stage: str, label: str, metrics: dict | None = None) -> None:
    (folder / "manifest.json").write_text(json.dumps({"ref": fake_ref(stage, label), "metrics": metrics or {}}))


def build_tokenizer(root: Path, source: str, texts: list[str]) -> Path:
    """A train_tokenizer artifact (the real stage, VOCAB tokens) trained on `texts`."""
    with ShardWriter(root / "dedup" / "shards") as writer:
        writer.write_many({"id": f"{source}:{i}", "text": t, "source": source} for i, t in enumerate(texts))
    ctx = make_ctx(root, "tok", {"dedup": root / "dedup"}, root / "store")
    train_tokenizer.run(train_tokenizer.TokenizerConfig(vocab_size=VOCAB), ctx)
    write_manifest(ctx.out, "train_tokenizer", f"tok-{source}")
    return ctx.out


def shakespeare_tokenizer(root: Path, corpora: Path) -> Path:
    text = (corpora / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:100_000]
    return build_tokenizer(root, "shakespeare", text.split("\n\n"))


def poetry_tokenizer(root: Path, corpora: Path) -> Path:
    """A Chinese vocabulary: the first 1,000 poems of the shared classical poetry."""
    with open(corpora / "chinese_poetry" / "chinese_poetry.jsonl", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in islice(f, 1000)]
    return build_tokenizer(root, "poetry", texts)


def make_inputs(
    root: Path, tokenizer_dir: Path, label: str, seed: int = 0, prompts: tuple[str, ...] = ()
) -> dict[str, Path]:
    """train / quantize / evaluate artifact folders around a tiny random model; `prompts` are
    the evaluate stage's (its samples in report.json)."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=VOCAB, **PRESETS["tiny"])).eval()
    extra = {
        "tokenizer": {"bos_id": 1, "eos_id": 2, "pad_id": 0},
        "train": {"steps": 0, "tokens": 0, "seconds": 0.0, "train_loss": 6.2, "val_loss": 6.3},
    }
    folders = {stage: root / label / stage for stage in ("train", "quantize", "evaluate")}
    save_model(model, folders["train"], extra)
    (folders["train"] / "loss.jsonl").write_text(json.dumps({"step": 0, "loss": 6.2, "lr": 0.0}) + "\n")
    save_int8(quantize_int8(model), folders["quantize"], extra)
    folders["evaluate"].mkdir(parents=True)
    (folders["evaluate"] / "report.json").write_text(
        json.dumps(  # the shape of a real report, in short
            {
                "models": ["fp32"],
                "fp32": {"val_loss": 6.3, "bpb": 3.1, "file_bytes": 1},
                "samples": {"fp32": [{"prompt": p, "completion": "…"} for p in prompts]},
            }
        )
    )
    (folders["evaluate"] / "report.md").write_text(f"# Report {label}\n\nval loss 6.3\n")
    for stage, folder in folders.items():
        write_manifest(folder, stage, f"{label}-{stage}", {"label": label})
    return {**folders, "train_tokenizer": tokenizer_dir}


ZH_PROMPT = "却说曹操"  # the Chinese release's own evaluate prompt


def publish_two_languages(root: Path, corpora: Path) -> Path:
    """A releases folder holding an English model (v0001, Shakespeare's vocabulary) and a Chinese
    one (v0002, classical poetry's), `latest` on the Chinese. Each one's evaluate prompts include
    one in the other language (as a Chinese run left at the English default prompts would have).
    Random weights: what is tested is what the demo shows around them."""
    store = root / "store"
    english = make_inputs(root, shakespeare_tokenizer(root / "en", corpora), "en", prompts=("To be", "床前明月光，"))
    chinese = make_inputs(
        root, poetry_tokenizer(root / "zh", corpora), "zh", seed=1, prompts=(ZH_PROMPT, "Once upon a time")
    )
    for name, inputs in (("en", english), ("zh", chinese)):
        publish.run(
            publish.PublishConfig(gate=False, gguf=[], export_hf=False),
            make_ctx(root, f"publish-{name}", inputs, store),
        )
    return store / "releases"


def run_publish(tmp_path: Path, name: str, inputs: dict[str, Path], store: Path, **cfg) -> tuple[dict, Path]:
    """Versioning without the gate (its models are random); test_publish_gate.py covers the gate."""
    ctx = make_ctx(tmp_path, name, inputs, store)
    return publish.run(publish.PublishConfig(**{"gate": False, **cfg}), ctx), ctx.out


def latest(store: Path) -> str:
    return os.readlink(store / "releases" / "latest")


def versions(store: Path) -> list[str]:
    return sorted(p.name for p in (store / "releases").iterdir() if p.name == "latest" or p.name.startswith("v0"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
