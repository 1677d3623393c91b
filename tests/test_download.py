"""download, the stage: folders and globs, ids, long documents in chunks, metadata, Hugging Face
datasets, and a failed run in the store.

Formats and bad input: test_download_formats.py; preflight, identity and config:
test_download_preflight.py; chunking: test_chunker.py; url sources and archives:
test_http_source.py."""

from __future__ import annotations

import json
import time
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from download_inputs import PROSE, run_download, write_file, write_folder
from ember.storage.shards import list_shards
from ember.tasks import download
from ember.tasks.download import DownloadConfig, SourceError, preflight
from helpers import run_stage_in


def test_folder_is_searched_recursively_and_skips_other_files(tmp_path):
    root = tmp_path / "corpus"
    write_file(root, "a.txt", ["alpha text"])
    write_file(root, "sub/b.jsonl", ["beta one", "beta two"])
    write_file(root, "sub/deeper/c.parquet", ["gamma"])
    (root / "table.csv").write_text("x,y\n1,2\n")
    (root / "README.md").write_text("A dataset card, not a document.")
    write_file(root, ".cache/hidden.txt", ["hidden"])
    records, metrics = run_download(tmp_path, [{"path": str(root)}])
    assert [r["id"] for r in records] == [
        "corpus/a.txt:0",
        "corpus/sub/b.jsonl:0",
        "corpus/sub/b.jsonl:1",
        "corpus/sub/deeper/c.parquet:0",
    ]
    assert metrics["skipped_files"] == 2  # table.csv and README.md; hidden folders are not looked at


def test_glob_and_max_docs(tmp_path):
    root = tmp_path / "corpus"
    write_file(root, "p1.jsonl", [f"doc {i}" for i in range(5)])
    write_file(root, "p2.jsonl", [f"doc {i}" for i in range(5, 10)])
    write_file(root, "skip.txt", ["not matched by the glob"])
    records, _ = run_download(tmp_path, [{"path": str(root / "p*.jsonl"), "max_docs": 7}])
    assert [r["text"] for r in records] == [f"doc {i}" for i in range(7)]
    assert records[-1]["id"] == "corpus/p2.jsonl:1"


def test_empty_documents_are_skipped_and_a_source_without_text_fails(tmp_path):
    path = write_file(tmp_path / "d", "x.jsonl", ["", "   ", "real text"])
    records, metrics = run_download(tmp_path, [{"path": str(path)}])
    assert [r["id"] for r in records] == ["d/x.jsonl:2"]  # record indexes stay those of the file
    assert metrics["empty_docs"] == 2
    empty = write_file(tmp_path / "e", "y.jsonl", ["", " \n "])
    with pytest.raises(SourceError, match=r"download.sources\[0\].*no text"):
        run_download(tmp_path / "second", [{"path": str(empty)}])


def test_tinyshakespeare_chunks_with_stable_ids(tmp_path, corpora):
    source = {"path": str(corpora / "tinyshakespeare" / "input.txt")}
    records, metrics = run_download(tmp_path / "a", [source])
    again, _ = run_download(tmp_path / "b", [source])
    assert records == again
    assert metrics["docs"] == 1 and metrics["chunks"] == len(records) > 250
    assert records[0]["id"] == "tinyshakespeare/input.txt:0#chunk0"
    assert records[0]["text"].startswith("First Citizen:\nBefore we proceed any further, hear me speak.")
    assert all(len(r["text"]) <= 4000 for r in records)
    assert len({r["id"] for r in records}) == len(records)


# --- Hugging Face datasets, offline from local folders --------------------------------------


def test_hf_saved_dataset_folder(tmp_path):
    import datasets

    folder = tmp_path / "my_dataset"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"content": [PROSE, "Second."], "label": [0, 1]}),
            "test": datasets.Dataset.from_dict({"content": ["held out"], "label": [2]}),
        }
    ).save_to_disk(str(folder))
    records, _ = run_download(tmp_path, [{"hf": str(folder), "text_field": "content"}])
    assert [(r["id"], r["text"]) for r in records] == [("my_dataset/train:0", PROSE), ("my_dataset/train:1", "Second.")]
    records, _ = run_download(tmp_path / "t", [{"hf": str(folder), "hf_split": "test", "text_field": "content"}])
    assert [r["text"] for r in records] == ["held out"]


def test_hf_data_files_folder_streams(tmp_path):
    folder = tmp_path / "parquet_dataset"
    write_file(folder / "data", "train-00000-of-00001.parquet", [f"row {i}" for i in range(20)])
    records, _ = run_download(tmp_path, [{"hf": str(folder), "max_docs": 5}])
    assert [r["text"] for r in records] == [f"row {i}" for i in range(5)]
    assert preflight(DownloadConfig(sources=[{"hf": str(folder)}]))[0]["files"]
    with pytest.raises(SourceError, match="no field 'body'"):
        run_download(tmp_path / "x", [{"hf": str(folder), "text_field": "body"}])


# --- metadata: the other fields of a record, beside the shards -----------------------------


def read_metadata(tmp_path: Path) -> dict[str, dict]:
    path = tmp_path / "download" / "metadata" / "part-00000.parquet"
    return {row["id"]: json.loads(row["meta"]) for row in pq.read_table(path).to_pylist()} if path.exists() else {}


def test_other_fields_are_kept_as_metadata_by_document_id(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jsonl").write_text(
        json.dumps({"text": PROSE * 80, "url": "https://x.org/1", "tags": ["a", "b"]})
        + "\n"
        + json.dumps({"text": "Plain record."})
        + "\n",
        encoding="utf-8",
    )
    pq.write_table(pa.table({"body": ["Row text."], "lang": ["en"], "score": [0.5]}), folder / "b.parquet")
    records, metrics = run_download(
        tmp_path,
        [{"path": str(folder / "a.jsonl")}, {"path": str(folder / "b.parquet"), "text_field": "body", "name": "b"}],
    )
    assert records[0]["id"] == "data/a.jsonl:0#chunk0"  # a chunk's metadata is its document's
    assert set(records[0]) == {"id", "text", "source"}  # the shard schema is unchanged
    assert read_metadata(tmp_path) == {
        "data/a.jsonl:0": {"url": "https://x.org/1", "tags": ["a", "b"]},
        "b/b.parquet:0": {"lang": "en", "score": 0.5},
    }
    assert metrics["metadata_docs"] == 2


def test_metadata_can_be_limited_or_turned_off(tmp_path):
    path = tmp_path / "d" / "a.jsonl"
    path.parent.mkdir()
    path.write_text(json.dumps({"text": "T.", "url": "u", "big": "x" * 100}) + "\n", encoding="utf-8")
    run_download(tmp_path / "some", [{"path": str(path), "metadata": ["url"]}])
    assert read_metadata(tmp_path / "some") == {"d/a.jsonl:0": {"url": "u"}}
    run_download(tmp_path / "none", [{"path": str(path), "metadata": False}])
    assert not (tmp_path / "none" / "download" / "metadata").exists()


@pytest.mark.slow
def test_a_100mb_single_line_streams_in_bounded_memory(tmp_path):
    path = tmp_path / "big" / "one-line.txt"
    path.parent.mkdir()
    unit = "lorem ipsum dolor sit amet, consectetur adipiscing elit "  # 57 characters, no newline
    repeats = 100_000_000 // len(unit) + 1
    with open(path, "w", encoding="ascii") as f:
        for _ in range(100):
            f.write(unit * (repeats // 100))
    size = path.stat().st_size
    assert size >= 99_000_000
    tracemalloc.start()
    try:
        started = time.monotonic()
        out, metrics = run_stage_in(tmp_path, download.STAGE, DownloadConfig(sources=[{"path": str(path)}]))
        seconds = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"100 MB line: {seconds:.1f}s, Python peak {peak / 1e6:.0f} MB, {metrics['chunks']} chunks")
    assert peak < 80e6  # a whole-file read alone would hold 100 MB of bytes and 100 MB of text
    assert metrics["docs"] == 1 and metrics["chunks"] > size / 4000
    # cut at spaces: every chunk within bounds, and only the spaces at the cuts are lost
    assert metrics["chars"] + metrics["chunks"] - 1 >= size - 1
    first = pq.read_table(list_shards(out / "shards")[0], columns=["id", "text"]).slice(0, 1000).to_pylist()
    assert first[0]["id"] == "big/one-line.txt:0#chunk0"
    assert all(3000 < len(r["text"]) <= 4000 and r["text"].split(" ")[-1] in unit.split(" ") for r in first)


def test_a_failed_download_leaves_no_artifact_in_the_store(tmp_path):
    from ember.storage.store import Store
    from ember.tasks.stage import run_stage

    folder = write_folder(tmp_path / "in", {"a.jsonl": b'{"text": "ok"}\n' * 50 + b'{"text": 1}\n'})
    cfg = DownloadConfig(sources=[{"path": str(folder)}])
    store = Store(tmp_path / "store")
    with pytest.raises(SourceError, match="line 51: field 'text' is int"):
        run_stage(store, download.STAGE, cfg, {}, identity=preflight(cfg))
    assert store.ls() == [] and not any((store.artifacts_dir / "download").glob("*/manifest.json"))


def test_hub_dataset_offline_is_a_clear_error(tmp_path):
    with pytest.raises(
        SourceError, match=r"download.sources\[0\].hf: nobody-here/no-such-dataset: cannot load the dataset"
    ):
        run_download(tmp_path, [{"hf": "nobody-here/no-such-dataset"}])
