"""download: formats, metadata, folders, chunking, bad input, preflight and identity, hf sources.

url sources and archives: tests/test_http_source.py."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import time
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from ember.storage.shards import iter_records, list_shards
from ember.tasks import download
from ember.tasks.download import (
    DownloadConfig,
    SourceError,
    chunk_text,
    iter_chunks,
    preflight,
)
from ember.tasks.stage import Reporter, StageContext


def make_ctx(tmp_path: Path, name: str = "download") -> StageContext:
    out = tmp_path / "artifact"
    out.mkdir(parents=True, exist_ok=True)
    return StageContext(inputs={}, out=out, work=tmp_path / "work", report=Reporter(name), store_root=tmp_path)


def run_download(tmp_path: Path, sources: list[dict], **kwargs) -> tuple[list[dict], dict]:
    cfg = DownloadConfig(sources=sources, **kwargs)
    ctx = make_ctx(tmp_path)
    metrics = download.run(cfg, ctx)
    return list(iter_records(ctx.out / "shards")), metrics


PROSE = "It was a bright cold day in April, and the clocks were striking thirteen."


def write_file(folder: Path, name: str, texts: list[str], field: str = "text") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if name.endswith((".txt", ".md")):
        path.write_text(texts[0], encoding="utf-8")
    elif name.endswith(".jsonl"):
        path.write_text("".join(json.dumps({field: t, "other": 1}) + "\n" for t in texts), encoding="utf-8")
    elif name.endswith(".jsonl.gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.writelines(json.dumps({field: t}) + "\n" for t in texts)
    elif name.endswith(".jsonl.zst"):
        import zstandard

        data = "".join(json.dumps({field: t}) + "\n" for t in texts).encode()
        path.write_bytes(zstandard.ZstdCompressor().compress(data))
    elif name.endswith(".json"):
        path.write_text(json.dumps([{field: t, "i": i} for i, t in enumerate(texts)], indent=1), encoding="utf-8")
    elif name.endswith(".parquet"):
        pq.write_table(pa.table({field: texts, "n": list(range(len(texts)))}), path)
    elif name.endswith((".arrow", ".feather")):
        table = pa.table({"n": list(range(len(texts))), field: texts})
        with pa.OSFile(str(path), "wb") as sink:
            new = pa.ipc.new_stream if "stream" in name else pa.ipc.new_file
            with new(sink, table.schema) as writer:
                writer.write_table(table, max_chunksize=2)
    return path


@pytest.mark.parametrize("name, texts", [
    pytest.param("doc.txt", [PROSE], id="txt"),
    pytest.param("notes.md", ["# Title\n\n" + PROSE], id="md"),
    pytest.param("docs.jsonl", [PROSE, "Second document.", "Third, with ünïcödé ✓."], id="jsonl"),
    pytest.param("docs.jsonl.gz", [PROSE, "Second document."], id="jsonl_gz"),
    pytest.param("docs.parquet", [PROSE, "Second document.", "Third."], id="parquet"),
    pytest.param("docs.jsonl.zst", [PROSE, "Second document."], id="jsonl_zst"),
    pytest.param("docs.json", [PROSE, "Second, \"quoted\" [bracketed] document.", "Third."], id="json_array"),
    pytest.param("docs.arrow", [PROSE, "Second document.", "Third.", "Fourth."], id="arrow_file"),
    pytest.param("docs-stream.arrow", [PROSE, "Second document.", "Third."], id="arrow_stream"),
    pytest.param("docs.feather", [PROSE, "Second document."], id="feather"),
])
def test_reads_each_format(tmp_path, name, texts):
    path = write_file(tmp_path / "data", name, texts)
    records, metrics = run_download(tmp_path, [{"path": str(path)}])
    assert [r["text"] for r in records] == texts
    assert [r["id"] for r in records] == [f"data/{name}:{i}" for i in range(len(texts))]
    assert {r["source"] for r in records} == {"data"}
    assert metrics["docs"] == metrics["chunks"] == len(texts)
    assert metrics["chars"] == sum(map(len, texts))


def test_text_field_and_blank_lines_in_jsonl(tmp_path):
    path = tmp_path / "data" / "x.jsonl"
    path.parent.mkdir()
    path.write_text('{"body": "one"}\n\n{"body": "two", "text": "ignored"}\n', encoding="utf-8")
    records, _ = run_download(tmp_path, [{"path": str(path), "text_field": "body", "name": "x"}])
    assert [(r["id"], r["text"]) for r in records] == [("x/x.jsonl:0", "one"), ("x/x.jsonl:1", "two")]


def test_folder_is_searched_recursively_and_skips_other_files(tmp_path):
    root = tmp_path / "corpus"
    write_file(root, "a.txt", ["alpha text"])
    write_file(root, "sub/b.jsonl", ["beta one", "beta two"])
    write_file(root, "sub/deeper/c.parquet", ["gamma"])
    (root / "table.csv").write_text("x,y\n1,2\n")
    (root / "README.md").write_text("A dataset card, not a document.")
    write_file(root, ".cache/hidden.txt", ["hidden"])
    records, metrics = run_download(tmp_path, [{"path": str(root)}])
    assert [r["id"] for r in records] == ["corpus/a.txt:0", "corpus/sub/b.jsonl:0", "corpus/sub/b.jsonl:1",
                                          "corpus/sub/deeper/c.parquet:0"]
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


# --- chunking -------------------------------------------------------------------------------

PARA = "word " * 19 + "end."  # 99 characters


@pytest.mark.parametrize("text, max_chars, expected", [
    pytest.param("short text", 100, ["short text"], id="short_unchanged"),
    pytest.param("\n\n".join([PARA] * 3), 250, ["\n\n".join([PARA] * 2), PARA], id="packs_paragraphs"),
    pytest.param("\r\n\r\n".join([PARA] * 3), 250, ["\r\n\r\n".join([PARA] * 2), PARA], id="crlf_paragraphs"),
    pytest.param("\n\n\n\n".join([PARA] * 2), 150, [PARA, PARA], id="many_blank_lines"),
    pytest.param("\n".join([PARA] * 3), 250, ["\n".join([PARA] * 2), PARA], id="long_paragraph_by_lines"),
    pytest.param("abcdefghij" * 25, 100, ["abcdefghij" * 10, "abcdefghij" * 10, "abcdefghij" * 5], id="hard_split"),
])
def test_chunk_text_cases(text, max_chars, expected):
    assert chunk_text(text, max_chars) == expected


@pytest.mark.parametrize("max_chars", [100, 500, 4000])
def test_chunks_are_bounded_and_lose_no_words(corpora, max_chars):
    text = (corpora / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:60_000]
    chunks = chunk_text(text, max_chars)
    assert all(0 < len(c) <= max_chars for c in chunks)
    assert " ".join(chunks).split() == text.split()
    # A cut falls between speeches (at a blank line) unless the speech is longer than a chunk.
    position = 0
    for chunk in chunks:
        position = text.index(chunk, position) + len(chunk)
        if text[position: position + 2] not in ("\n\n", ""):
            speech_start = text.rfind("\n\n", 0, position) + 2
            speech_end = text.find("\n\n", position) % (len(text) + 1)  # -1: the end
            assert speech_end - speech_start > max_chars


def test_long_line_is_cut_at_a_space():
    text = " ".join(["lorem"] * 100)  # 599 characters, one line
    chunks = chunk_text(text, 100)
    assert all(len(c) <= 100 for c in chunks)
    assert not any(c.startswith(" ") or c.endswith(" ") for c in chunks)
    assert "".join(chunks).replace(" ", "") == text.replace(" ", "")
    assert all(w == "lorem" for c in chunks for w in c.split())  # no word cut in two


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


# --- preflight ------------------------------------------------------------------------------

def test_preflight_missing_path_names_the_source(tmp_path):
    good = write_file(tmp_path, "ok.txt", ["text"])
    missing = tmp_path / "nowhere" / "books"
    cfg = DownloadConfig(sources=[{"path": str(good)}, {"path": str(missing)}])
    with pytest.raises(SourceError) as err:
        preflight(cfg)
    assert "download.sources[1].path" in str(err.value) and str(missing) in str(err.value)


def test_preflight_empty_folder(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "notes.csv").write_text("a,b\n")
    with pytest.raises(SourceError, match=r"download.sources\[0\].path: .*empty holds no supported file"):
        preflight(DownloadConfig(sources=[{"path": str(folder)}]))


def test_preflight_jsonl_without_the_text_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"content": "hello"}\n', encoding="utf-8")
    with pytest.raises(SourceError) as err:
        preflight(DownloadConfig(sources=[{"path": str(path)}]))
    message = str(err.value)
    assert str(path) in message and "line 1" in message and "'text'" in message


@pytest.mark.parametrize("content, expected", [
    pytest.param('{"text": "ok"}\nnot json\n', "line 2: not valid JSON", id="bad_json"),
    pytest.param('{"text": 3}\n', "line 1: field 'text' is int", id="not_a_string"),
    pytest.param('{"text": ""}\n{"text": " "}\n', "have no text in 'text'", id="first_records_empty"),
])
def test_preflight_reads_the_first_records(tmp_path, content, expected):
    path = tmp_path / "docs.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(SourceError, match=expected):
        preflight(DownloadConfig(sources=[{"path": str(path)}]))


def test_preflight_unsupported_file_and_parquet_without_column(tmp_path):
    csv = tmp_path / "table.csv"
    csv.write_text("a,b\n")
    with pytest.raises(SourceError, match="unsupported file type"):
        preflight(DownloadConfig(sources=[{"path": str(csv)}]))
    parquet = tmp_path / "t.parquet"
    pq.write_table(pa.table({"body": ["x"]}), parquet)
    with pytest.raises(SourceError, match="no column 'text'"):
        preflight(DownloadConfig(sources=[{"path": str(parquet)}]))


def test_preflight_fingerprint_follows_the_files(tmp_path):
    folder = tmp_path / "corpus"
    path = write_file(folder, "a.jsonl", ["one", "two"])
    cfg = DownloadConfig(sources=[{"path": str(folder)}])
    first = preflight(cfg)
    assert first[0]["name"] == "corpus"
    assert [f[:2] for f in first[0]["files"]] == [["a.jsonl", path.stat().st_size]]
    json.dumps(first)  # goes into the stage key
    assert preflight(cfg) == first
    write_file(folder, "a.jsonl", ["one", "two", "three"])
    assert preflight(cfg) != first


def test_preflight_on_the_real_corpus(corpora):
    fingerprint = preflight(DownloadConfig(sources=[{"path": str(corpora / "gutenberg_en")}]))
    assert [f[0] for f in fingerprint[0]["files"]] == [f"books-0{i}.jsonl" for i in range(4)]  # SOURCE.md skipped


@pytest.mark.parametrize("source, message", [
    pytest.param({}, "exactly one of path, url, hf", id="none"),
    pytest.param({"path": "a", "hf": "b"}, "exactly one of path, url, hf", id="two"),
    pytest.param({"url": "ftp://x/y.txt"}, "http", id="ftp"),
    pytest.param({"path": "a", "colour": "red"}, "Extra inputs", id="unknown_key"),
    pytest.param({"path": "a", "sha256": "0" * 64}, "sha256", id="sha_without_url"),
    pytest.param({"url": ["http://a/x.txt", "ftp://b/x.txt"]}, "http", id="ftp_mirror"),
    pytest.param({"path": "a", "on_error": "ignore"}, r"on_error\n.*'raise' or 'skip'", id="bad_on_error"),
    pytest.param({"path": "a", "encoding": "klingon"}, r"encoding\n.*unknown encoding 'klingon'", id="bad_encoding"),
])
def test_source_validation(source, message):
    with pytest.raises(ValidationError, match=message):
        DownloadConfig(sources=[source])


def test_http_settings_are_checked_and_stay_out_of_the_key(tmp_path):
    with pytest.raises(ValidationError, match=r"http.retries\n.*Extra inputs"):
        DownloadConfig(sources=[{"path": "a"}], http={"retries": 3})
    cfg = DownloadConfig(sources=[{"path": "a"}], http={"attempts": 2})
    assert download.STAGE.params(cfg) == download.STAGE.params(DownloadConfig(sources=[{"path": "a"}]))


def test_sources_need_distinct_names(tmp_path):
    with pytest.raises(ValidationError, match="share the name data"):
        DownloadConfig(sources=[{"path": str(tmp_path / "data")}, {"path": str(tmp_path / "x" / "data")}])


# --- Hugging Face datasets, offline from local folders --------------------------------------

def test_hf_saved_dataset_folder(tmp_path):
    import datasets

    folder = tmp_path / "my_dataset"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"content": [PROSE, "Second."], "label": [0, 1]}),
        "test": datasets.Dataset.from_dict({"content": ["held out"], "label": [2]}),
    }).save_to_disk(str(folder))
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


def test_preflight_checks_hf_folders_and_url_types(tmp_path):
    folder = tmp_path / "ds"
    write_file(folder, "train.jsonl", ["a", "b"], field="body")
    with pytest.raises(SourceError, match=r"download.sources\[0\].hf: .*no field 'text'"):
        preflight(DownloadConfig(sources=[{"hf": str(folder)}]))
    assert preflight(DownloadConfig(sources=[{"hf": str(folder), "text_field": "body"}]))[0]["split"] == "train"
    with pytest.raises(SourceError, match=r"download.sources\[0\].url: .*unsupported file type"):
        preflight(DownloadConfig(sources=[{"url": "http://127.0.0.1:9/page.html"}]))


# --- metadata: the other fields of a record, beside the shards -----------------------------

def read_metadata(tmp_path: Path) -> dict[str, dict]:
    path = tmp_path / "artifact" / "metadata" / "part-00000.parquet"
    return {row["id"]: json.loads(row["meta"]) for row in pq.read_table(path).to_pylist()} if path.exists() else {}


def test_other_fields_are_kept_as_metadata_by_document_id(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jsonl").write_text(
        json.dumps({"text": PROSE * 80, "url": "https://x.org/1", "tags": ["a", "b"]}) + "\n"
        + json.dumps({"text": "Plain record."}) + "\n", encoding="utf-8")
    pq.write_table(pa.table({"body": ["Row text."], "lang": ["en"], "score": [0.5]}), folder / "b.parquet")
    records, metrics = run_download(tmp_path, [{"path": str(folder / "a.jsonl")},
                                               {"path": str(folder / "b.parquet"), "text_field": "body", "name": "b"}])
    assert records[0]["id"] == "data/a.jsonl:0#chunk0"  # a chunk's metadata is its document's
    assert set(records[0]) == {"id", "text", "source"}  # the shard schema is unchanged
    assert read_metadata(tmp_path) == {"data/a.jsonl:0": {"url": "https://x.org/1", "tags": ["a", "b"]},
                                       "b/b.parquet:0": {"lang": "en", "score": 0.5}}
    assert metrics["metadata_docs"] == 2


def test_metadata_can_be_limited_or_turned_off(tmp_path):
    path = tmp_path / "d" / "a.jsonl"
    path.parent.mkdir()
    path.write_text(json.dumps({"text": "T.", "url": "u", "big": "x" * 100}) + "\n", encoding="utf-8")
    run_download(tmp_path / "some", [{"path": str(path), "metadata": ["url"]}])
    assert read_metadata(tmp_path / "some") == {"d/a.jsonl:0": {"url": "u"}}
    run_download(tmp_path / "none", [{"path": str(path), "metadata": False}])
    assert not (tmp_path / "none" / "artifact" / "metadata").exists()


def test_json_array_parsed_across_small_reads_and_json_lines_named_json(tmp_path, monkeypatch):
    texts = [f"document {i} " + "é" * (i * 3) + " [with] {braces} and \"quotes\"" for i in range(40)]
    path = write_file(tmp_path / "a", "docs.json", texts)
    monkeypatch.setattr(download, "BLOCK_CHARS", 7)  # every item spans several reads
    records, _ = run_download(tmp_path / "a", [{"path": str(path)}])
    assert [r["text"] for r in records] == texts
    lines = write_file(tmp_path / "b", "x.jsonl", texts[:3])
    lines.rename(lines.with_suffix(".json"))
    records, _ = run_download(tmp_path / "b", [{"path": str(lines.with_suffix(".json"))}])
    assert [r["text"] for r in records] == texts[:3]


def test_compressed_text_files(tmp_path):
    path = tmp_path / "c" / "book.txt.gz"
    path.parent.mkdir()
    path.write_bytes(gzip.compress(PROSE.encode()))
    records, _ = run_download(tmp_path, [{"path": str(path)}])
    assert [(r["id"], r["text"]) for r in records] == [("c/book.txt.gz:0", PROSE)]


# --- streaming chunker ----------------------------------------------------------------------

def reference_chunks(text: str, max_chars: int) -> list[str]:
    """The whole-text chunker of download v1, the oracle for the streaming one."""
    import re

    def spans(start, end, sep):
        out, pos = [], start
        for m in sep.finditer(text, start, end):
            out.append((pos, m.start()))
            pos = m.end()
        out.append((pos, end))
        return [(a, b) for a, b in out if b > a]

    if len(text) <= max_chars:
        return [text]
    pieces = []
    for a, b in spans(0, len(text), re.compile(r"\r?\n(?:[ \t]*\r?\n)+")):
        if b - a <= max_chars:
            pieces.append((a, b))
            continue
        for la, lb in spans(a, b, re.compile(r"\r?\n")):
            while lb - la > max_chars:
                space = text.rfind(" ", la + max_chars // 2, la + max_chars)
                cut = space if space > la else la + max_chars
                pieces.append((la, cut))
                la = cut + (space > la)
            pieces.append((la, lb))
    chunks, start, end = [], None, None
    for a, b in pieces:
        if start is not None and b - start > max_chars:
            chunks.append(text[start:end])
            start = None
        if start is None:
            start = a
        end = b
    if start is not None:
        chunks.append(text[start:end])
    return [c for c in (c.strip("\r\n") for c in chunks) if c.strip()]


def split_into_parts(text: str, sizes: list[int], seed: int) -> list[str]:
    import random

    rng, parts, i = random.Random(seed), [], 0
    while i < len(text):
        n = rng.choice(sizes)
        parts.append(text[i:i + n])
        i += n
    return parts


def test_streaming_chunks_equal_whole_text_chunks_however_the_text_arrives(corpora):
    import random

    rng = random.Random(7)
    alphabet = ["a", "b", " ", "\n", "\r\n", "\n\n", " \n", "\t", "\n \n", "word ", "\r", "xyz" * 40]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 1500))) for _ in range(80)]
    shakespeare = (corpora / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:30_000]
    texts += [shakespeare, shakespeare.replace("\n", "\r\n"), " ".join(["lorem"] * 3000)]
    for n, text in enumerate(texts):
        for max_chars in (100, 137, 500):
            expected = reference_chunks(text, max_chars) if text else []
            tiny = ([1, 2, 3],) if n % 5 == 0 or n >= 80 else ()  # a round per part: the slow case, sampled
            for sizes in ([len(text) + 1], [40, 300], [7, 1000], *tiny):
                assert list(iter_chunks(split_into_parts(text, sizes, n), max_chars)) == expected, (n, max_chars, sizes)


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
        ctx = make_ctx(tmp_path)
        metrics = download.run(DownloadConfig(sources=[{"path": str(path)}]), ctx)
        seconds = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"100 MB line: {seconds:.1f}s, Python peak {peak / 1e6:.0f} MB, {metrics['chunks']} chunks")
    assert peak < 80e6  # a whole-file read alone would hold 100 MB of bytes and 100 MB of text
    assert metrics["docs"] == 1 and metrics["chunks"] > size / 4000
    # cut at spaces: every chunk within bounds, and only the spaces at the cuts are lost
    assert metrics["chars"] + metrics["chunks"] - 1 >= size - 1
    first = pq.read_table(list_shards(ctx.out / "shards")[0], columns=["id", "text"]).slice(0, 1000).to_pylist()
    assert first[0]["id"] == "big/one-line.txt:0#chunk0"
    assert all(3000 < len(r["text"]) <= 4000 and r["text"].split(" ")[-1] in unit.split(" ") for r in first)


# --- bad input: a clear error naming file and record, or a counted skip ---------------------

def truncated_gzip(texts: list[str]) -> bytes:
    data = gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in texts).encode(), compresslevel=1)
    return data[: len(data) * 2 // 3]


def random_words(n: int, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(100000)}" for _ in range(50)) for _ in range(n)]


# Each case: the files of a folder, the error expected by default, then the counts of a skip run.
BAD_INPUT = [
    pytest.param({"a.jsonl.gz": truncated_gzip(random_words(400))},
                 r"a.jsonl.gz: line \d+: corrupt or truncated compressed data", {"bad_files": 1},
                 id="truncated_gzip"),
    pytest.param({"a.jsonl.gz": b"this is not gzip at all"},
                 r"a.jsonl.gz: line 1: corrupt or truncated compressed data", {"bad_files": 1}, id="not_gzip"),
    pytest.param({"a.jsonl.zst": b"(\xb5/\xfd\x00X\x11\x00\x00{\"te"}, r"a.jsonl.zst: line 1: corrupt",
                 {"bad_files": 1}, id="truncated_zstd"),
    pytest.param({"a.jsonl": b'{"text": "good one"}\n{"text": "bad \xff\xfe bytes"}\n'},
                 r"a.jsonl: line 2: not valid UTF-8", {"bad_records": 1}, id="invalid_utf8_jsonl"),
    pytest.param({"a.txt": b"caf\xc3\xa9 ok", "b.txt": b"legacy caf\xe9 text"},
                 r"b.txt: byte 10: not valid UTF-8 \(encoding: utf-8\)", {"bad_files": 1}, id="invalid_utf8_txt"),
    pytest.param({"a.txt": b"Fine text.", "b.txt": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "c.png": b"\x89PNG"},
                 r"b.txt: file: binary file", {"bad_files": 1, "skipped_files": 1}, id="binary_file_in_folder"),
    pytest.param({"a.jsonl": b'{"text": "one"}\n{"body": "no text field"}\n{"text": "three"}\n'},
                 r"a.jsonl: line 2: no field 'text' \(fields: body\)", {"bad_records": 1}, id="missing_text_field"),
    pytest.param({"a.jsonl": b'{"text": "one"}\n{"text": "two"\n'}, r"a.jsonl: line 2: not valid JSON",
                 {"bad_records": 1}, id="bad_json_line"),
    pytest.param({"a.json": b'[{"text": "one"}, {"body": "two"}]'}, r"a.json: record 1: no field 'text'",
                 {"bad_records": 1}, id="json_array_missing_field"),
    pytest.param({"a.txt": b"Fine.", "b.parquet": b"PAR1 not really"}, r"b.parquet: file: not a readable Parquet",
                 {"bad_files": 1}, id="corrupt_parquet"),
]


def write_folder(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


@pytest.mark.parametrize("files, error, skip_counts", BAD_INPUT)
def test_bad_input_raises_naming_file_and_record_by_default(tmp_path, files, error, skip_counts):
    folder = write_folder(tmp_path / "in", files)
    if "a.txt" not in files and "a.jsonl" not in files:
        (folder / "z.txt").write_text("Another good file.")
    source = {"path": str(folder), "encoding": "utf-8"}
    ctx = make_ctx(tmp_path)
    with pytest.raises(SourceError, match=r"download.sources\[0\]: .*" + error) as err:
        download.run(DownloadConfig(sources=[source]), ctx)
    assert str(folder) in str(err.value) and "on_error: skip" in str(err.value)


@pytest.mark.parametrize("files, error, skip_counts", BAD_INPUT)
def test_bad_input_is_skipped_counted_and_listed_on_request(tmp_path, files, error, skip_counts, caplog):
    folder = write_folder(tmp_path / "in", files)
    (folder / "z.txt").write_text("Another good file.")
    with caplog.at_level(logging.INFO, logger="ember.download"):
        records, metrics = run_download(tmp_path, [{"path": str(folder), "encoding": "utf-8"}], on_error="skip")
    for key in ("bad_files", "bad_records", "skipped_files"):
        assert metrics[key] == skip_counts.get(key, 0), key
    assert records[-1]["text"] == "Another good file."
    problems = [json.loads(line) for line in (tmp_path / "artifact" / "problems.jsonl").read_text().splitlines()]
    assert len(problems) == metrics["bad_files"] + metrics["bad_records"]
    where = error.split(": ")[1].replace("\\d+", "")
    assert all(p["source"] == "in" and p["file"] in files and p["where"].startswith(where) for p in problems)
    assert f"Bad input met ({len(problems)};" in caplog.text  # the table, as logged outside Prefect


def test_a_truncated_gzip_keeps_the_records_before_the_damage_when_skipping(tmp_path):
    texts = random_words(400)
    folder = write_folder(tmp_path / "in", {"a.jsonl.gz": truncated_gzip(texts)})
    records, _ = run_download(tmp_path, [{"path": str(folder)}], on_error="skip")
    assert 0 < len(records) < 400 and [r["text"] for r in records] == texts[: len(records)]
    (problem,) = [json.loads(x) for x in (tmp_path / "artifact" / "problems.jsonl").read_text().splitlines()]
    assert problem["where"] == f"line {len(records) + 1}" and problem["action"] == "rest of file skipped"


def test_on_error_per_source_overrides_the_stage(tmp_path):
    bad = write_folder(tmp_path / "bad", {"a.jsonl": b'{"text": "one"}\nnot json\n'})
    good = write_folder(tmp_path / "good", {"b.txt": b"Good."})
    records, metrics = run_download(tmp_path / "x", [{"path": str(bad), "on_error": "skip"}, {"path": str(good)}])
    assert [r["text"] for r in records] == ["one", "Good."] and metrics["bad_records"] == 1
    with pytest.raises(SourceError, match="line 2: not valid JSON"):
        run_download(tmp_path / "y", [{"path": str(bad), "on_error": "raise"}], on_error="skip")


def test_empty_file_is_a_counted_skip(tmp_path):
    folder = write_folder(tmp_path / "in", {"empty.txt": b"", "empty.jsonl": b"", "a.txt": b"Text."})
    records, metrics = run_download(tmp_path, [{"path": str(folder)}])
    assert [r["id"] for r in records] == ["in/a.txt:0"] and metrics["empty_files"] == 2
    rows = [json.loads(x) for x in (tmp_path / "artifact" / "problems.jsonl").read_text().splitlines()]
    assert [(r["file"], r["problem"]) for r in rows] == [("empty.jsonl", "empty file"), ("empty.txt", "empty file")]
    only_empty = write_folder(tmp_path / "e", {"empty.txt": b""})
    with pytest.raises(SourceError, match=r"no text found .*1 empty file"):
        run_download(tmp_path / "e2", [{"path": str(only_empty)}])


def test_legacy_encoded_text_is_decoded_and_counted(tmp_path):
    folder = write_folder(tmp_path / "in", {"old.txt": "caf\u00e9 \u2014 na\u00efve".encode("cp1252")})
    records, metrics = run_download(tmp_path, [{"path": str(folder)}])
    assert records[0]["text"] == "caf\u00e9 \u2014 na\u00efve" and metrics["legacy_decoded_files"] == 1
    (row,) = [json.loads(x) for x in (tmp_path / "artifact" / "problems.jsonl").read_text().splitlines()]
    assert row["file"] == "old.txt" and row["where"] == "byte 3" and "read as cp1252" in row["problem"]


def test_a_failed_download_leaves_no_artifact_in_the_store(tmp_path):
    from ember.storage.store import Store
    from ember.tasks.stage import run_stage

    folder = write_folder(tmp_path / "in", {"a.jsonl": b'{"text": "ok"}\n' * 50 + b'{"text": 1}\n'})
    cfg = DownloadConfig(sources=[{"path": str(folder)}])
    store = Store(tmp_path / "store")
    with pytest.raises(SourceError, match="line 51: field 'text' is int"):
        run_stage(store, download.STAGE, cfg, {}, identity=preflight(cfg))
    assert store.ls() == [] and not any((store.artifacts_dir / "download").glob("*/manifest.json"))


# --- identity: content, not timestamps ------------------------------------------------------

def test_identity_follows_content_not_mtime(tmp_path):
    folder = tmp_path / "corpus"
    path = write_file(folder, "a.jsonl", ["one", "two"])
    cfg = DownloadConfig(sources=[{"path": str(folder)}])
    first = preflight(cfg)
    assert first[0]["files"][0][2] == hashlib.sha256(path.read_bytes()).hexdigest()
    os.utime(path, (time.time() + 100, time.time() + 100))  # touch
    assert preflight(cfg) == first
    path.write_text(path.read_text().replace("one", "One"))  # same size, new content
    assert preflight(cfg) != first


def test_hub_dataset_offline_is_a_clear_error(tmp_path):
    with pytest.raises(SourceError, match=r"download.sources\[0\].hf: nobody-here/no-such-dataset: cannot load the dataset"):
        run_download(tmp_path, [{"hf": "nobody-here/no-such-dataset"}])
