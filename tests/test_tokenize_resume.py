"""Kill the tokenize stage midway, run it again: finished shards are reused, the result is the
same as an uninterrupted run's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from ember.storage.shards import ShardWriter
from ember.storage.store import Store
from ember.storage.tokens import read_token_file
from ember.tasks import tokenize, train_tokenizer
from ember.tasks.download import chunk_text
from ember.tasks.stage import Stage, run_stage

SHARDS = 6


def copy_in(folder: Path):
    """A stage that copies a folder of prepared files in: how the test puts inputs in a store."""

    def run(cfg, ctx):
        for path in folder.rglob("*"):
            if path.is_file():
                target = ctx.out / path.relative_to(folder)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(path.read_bytes())
        return {}

    return Stage(name=folder.name, version=1, run=run)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, corpora) -> tuple[Path, Path]:
    """A dedup-like folder of SHARDS text shards (about 1.5 MB each) and a trained tokenizer."""
    root = tmp_path_factory.mktemp("inputs")
    lines = (corpora / "gutenberg_en" / "books-00.jsonl").read_text(encoding="utf-8").splitlines()
    chunks = [c for line in lines[:12] for c in chunk_text(json.loads(line)["text"], 4000)]
    per_shard = len(chunks) // SHARDS
    dedup = root / "dedup"
    for shard in range(SHARDS):
        with ShardWriter(dedup / "shards", prefix=f"part-{shard:05d}") as writer:
            writer.write_many(
                {"id": f"book/{shard}:{i}", "text": text, "source": "book"}
                for i, text in enumerate(chunks[shard * per_shard : (shard + 1) * per_shard])
            )
    for path in sorted((dedup / "shards").glob("*.parquet")):  # ShardWriter names them <prefix>-00000
        path.rename(path.with_name(path.name.replace("-00000.parquet", ".parquet")))
    store = Store(root / "tok-store")
    dedup_ref = run_stage(store, copy_in(dedup), None, {}).ref
    trained = run_stage(
        store, train_tokenizer.STAGE, train_tokenizer.TokenizerConfig(vocab_size=1024), {"dedup": dedup_ref}
    )
    return store.path(dedup_ref), store.path(trained.ref)


def tokenize_in(store_root: Path, dedup: Path, tok: Path):
    store = Store(store_root)
    refs = {
        "dedup": run_stage(store, copy_in(dedup), None, {}).ref,
        "train_tokenizer": run_stage(store, copy_in(tok), None, {}).ref,
    }
    return store, run_stage(store, tokenize.STAGE, tokenize.TokenizeConfig(), refs)


def streams(store: Store, ref: str) -> dict[str, np.ndarray]:
    folder = store.path(ref)
    return {
        split: np.concatenate([read_token_file(p) for p in sorted((folder / split).glob("*.arrow"))])
        for split in ("train", "val")
    }


def test_killed_tokenize_reuses_finished_shards(tmp_path, inputs):
    dedup, tok = inputs
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from test_tokenize_resume import tokenize_in
        tokenize_in(Path({str(tmp_path / "killed")!r}), Path({str(dedup)!r}), Path({str(tok)!r}))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    work = tmp_path / "killed" / "work" / "tokenize"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not list(work.glob("*/shard-*")):
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finished = list(work.glob("*/shard-*"))
    assert 1 <= len(finished) < SHARDS, f"killed after {len(finished)} of {SHARDS} shards"
    assert Store(tmp_path / "killed").ls("tokenize") == []

    store, resumed = tokenize_in(tmp_path / "killed", dedup, tok)
    assert 1 <= resumed.metrics["shards_reused"] < SHARDS
    clean_store, clean = tokenize_in(tmp_path / "clean", dedup, tok)
    assert clean.metrics["shards_reused"] == 0
    assert resumed.ref == clean.ref
    assert store.require(resumed.ref).manifest["digest"] == clean_store.require(clean.ref).manifest["digest"]
    for split, tokens in streams(clean_store, clean.ref).items():
        assert np.array_equal(streams(store, resumed.ref)[split], tokens)
    assert not (tmp_path / "killed" / "work" / "tokenize").exists() or not any(work.iterdir())
