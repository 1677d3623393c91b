"""download: formats, folders, chunking, preflight errors, url (loopback server) and hf sources."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import json
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from ember.storage.shards import iter_records, list_shards
from ember.tasks import download
from ember.tasks.download import DownloadConfig, SourceError, chunk_text, preflight
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
    elif name.endswith(".parquet"):
        pq.write_table(pa.table({field: texts, "n": list(range(len(texts)))}), path)
    return path


@pytest.mark.parametrize("name, texts", [
    pytest.param("doc.txt", [PROSE], id="txt"),
    pytest.param("notes.md", ["# Title\n\n" + PROSE], id="md"),
    pytest.param("docs.jsonl", [PROSE, "Second document.", "Third, with ünïcödé ✓."], id="jsonl"),
    pytest.param("docs.jsonl.gz", [PROSE, "Second document."], id="jsonl_gz"),
    pytest.param("docs.parquet", [PROSE, "Second document.", "Third."], id="parquet"),
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
])
def test_source_validation(source, message):
    with pytest.raises(ValidationError, match=message):
        DownloadConfig(sources=[source])


def test_sources_need_distinct_names(tmp_path):
    with pytest.raises(ValidationError, match="share the name data"):
        DownloadConfig(sources=[{"path": str(tmp_path / "data")}, {"path": str(tmp_path / "x" / "data")}])


# --- url sources, against a real server on the loopback interface --------------------------

class Handler(http.server.SimpleHTTPRequestHandler):
    failures_left = 0  # answer this many requests with 503 first

    def do_GET(self):
        if Handler.failures_left > 0:
            Handler.failures_left -= 1
            self.send_error(503, "try again")
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    handler = lambda *a, **k: Handler(*a, directory=str(root), **k)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    Handler.failures_left = 0


def test_url_download_checks_sha256_and_retries(tmp_path, server):
    root, base = server
    path = write_file(root, "books.jsonl.gz", [PROSE, "Another document."])
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    Handler.failures_left = 1  # the first answer is a 503: the download retries
    records, metrics = run_download(tmp_path / "run", [{"url": f"{base}/books.jsonl.gz", "sha256": digest}])
    assert [r["text"] for r in records] == [PROSE, "Another document."]
    assert records[0]["id"] == "books/books.jsonl.gz:0" and records[0]["source"] == "books"
    fingerprint = preflight(DownloadConfig(sources=[{"url": f"{base}/books.jsonl.gz"}]))
    assert fingerprint[0]["length"] == str(path.stat().st_size)


def test_url_sha256_mismatch_keeps_nothing(tmp_path, server):
    root, base = server
    write_file(root, "a.txt", [PROSE])
    cfg = DownloadConfig(sources=[{"url": f"{base}/a.txt", "sha256": "0" * 64}])
    ctx = make_ctx(tmp_path)
    with pytest.raises(SourceError, match="sha256 mismatch"):
        download.run(cfg, ctx)
    assert not list_shards(ctx.out / "shards")
    assert [p for p in ctx.work.rglob("*") if p.is_file()] == []


def test_url_not_found_is_a_clear_error(tmp_path, server):
    _, base = server
    with pytest.raises(SourceError, match="HTTP 404"):
        run_download(tmp_path, [{"url": f"{base}/missing.txt"}])


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
