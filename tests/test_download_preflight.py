"""download's preflight and config: early errors naming the source, the identity that keys the
stage (content, not timestamps), and the validation of sources."""

from __future__ import annotations

import hashlib
import json
import os
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from download_inputs import write_file
from ember.tasks import download
from ember.tasks.download import DownloadConfig, SourceError, preflight


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


@pytest.mark.parametrize(
    "content, expected",
    [
        pytest.param('{"text": "ok"}\nnot json\n', "line 2: not valid JSON", id="bad_json"),
        pytest.param('{"text": 3}\n', "line 1: field 'text' is int", id="not_a_string"),
        pytest.param('{"text": ""}\n{"text": " "}\n', "have no text in 'text'", id="first_records_empty"),
    ],
)
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


def test_preflight_checks_hf_folders_and_url_types(tmp_path):
    folder = tmp_path / "ds"
    write_file(folder, "train.jsonl", ["a", "b"], field="body")
    with pytest.raises(SourceError, match=r"download.sources\[0\].hf: .*no field 'text'"):
        preflight(DownloadConfig(sources=[{"hf": str(folder)}]))
    assert preflight(DownloadConfig(sources=[{"hf": str(folder), "text_field": "body"}]))[0]["split"] == "train"
    with pytest.raises(SourceError, match=r"download.sources\[0\].url: .*unsupported file type"):
        preflight(DownloadConfig(sources=[{"url": "http://127.0.0.1:9/page.html"}]))


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


# --- config: sources, http settings, names --------------------------------------------------


@pytest.mark.parametrize(
    "source, message",
    [
        pytest.param({}, "exactly one of path, url, hf", id="none"),
        pytest.param({"path": "a", "hf": "b"}, "exactly one of path, url, hf", id="two"),
        pytest.param({"url": "ftp://x/y.txt"}, "http", id="ftp"),
        pytest.param({"path": "a", "colour": "red"}, "Extra inputs", id="unknown_key"),
        pytest.param({"path": "a", "sha256": "0" * 64}, "sha256", id="sha_without_url"),
        pytest.param({"url": ["http://a/x.txt", "ftp://b/x.txt"]}, "http", id="ftp_mirror"),
        pytest.param({"path": "a", "on_error": "ignore"}, r"on_error\n.*'raise' or 'skip'", id="bad_on_error"),
        pytest.param(
            {"path": "a", "encoding": "klingon"}, r"encoding\n.*unknown encoding 'klingon'", id="bad_encoding"
        ),
    ],
)
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
