"""download's readers: each file format, compressed files, encodings, and bad input (a clear
error naming file and record, or a counted skip)."""

from __future__ import annotations

import gzip
import json
import logging

import pytest

from download_inputs import PROSE, run_download, write_file, write_folder
from ember.tasks import download
from ember.tasks.download import DownloadConfig, SourceError, readers
from helpers import run_stage_in


@pytest.mark.parametrize(
    "name, texts",
    [
        pytest.param("doc.txt", [PROSE], id="txt"),
        pytest.param("notes.md", ["# Title\n\n" + PROSE], id="md"),
        pytest.param("docs.jsonl", [PROSE, "Second document.", "Third, with ünïcödé ✓."], id="jsonl"),
        pytest.param("docs.jsonl.gz", [PROSE, "Second document."], id="jsonl_gz"),
        pytest.param("docs.parquet", [PROSE, "Second document.", "Third."], id="parquet"),
        pytest.param("docs.jsonl.zst", [PROSE, "Second document."], id="jsonl_zst"),
        pytest.param("docs.json", [PROSE, 'Second, "quoted" [bracketed] document.', "Third."], id="json_array"),
        pytest.param("docs.arrow", [PROSE, "Second document.", "Third.", "Fourth."], id="arrow_file"),
        pytest.param("docs-stream.arrow", [PROSE, "Second document.", "Third."], id="arrow_stream"),
        pytest.param("docs.feather", [PROSE, "Second document."], id="feather"),
    ],
)
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


def test_json_array_parsed_across_small_reads_and_json_lines_named_json(tmp_path, monkeypatch):
    texts = [f"document {i} " + "é" * (i * 3) + ' [with] {braces} and "quotes"' for i in range(40)]
    path = write_file(tmp_path / "a", "docs.json", texts)
    monkeypatch.setattr(readers, "BLOCK_CHARS", 7)  # every item spans several reads
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


def test_legacy_encoded_text_is_decoded_and_counted(tmp_path):
    folder = write_folder(tmp_path / "in", {"old.txt": "caf\u00e9 \u2014 na\u00efve".encode("cp1252")})
    records, metrics = run_download(tmp_path, [{"path": str(folder)}])
    assert records[0]["text"] == "caf\u00e9 \u2014 na\u00efve" and metrics["legacy_decoded_files"] == 1
    (row,) = [json.loads(x) for x in (tmp_path / "download" / "problems.jsonl").read_text().splitlines()]
    assert row["file"] == "old.txt" and row["where"] == "byte 3" and "read as cp1252" in row["problem"]


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
    pytest.param(
        {"a.jsonl.gz": truncated_gzip(random_words(400))},
        r"a.jsonl.gz: line \d+: corrupt or truncated compressed data",
        {"bad_files": 1},
        id="truncated_gzip",
    ),
    pytest.param(
        {"a.jsonl.gz": b"this is not gzip at all"},
        r"a.jsonl.gz: line 1: corrupt or truncated compressed data",
        {"bad_files": 1},
        id="not_gzip",
    ),
    pytest.param(
        {"a.jsonl.zst": b'(\xb5/\xfd\x00X\x11\x00\x00{"te'},
        r"a.jsonl.zst: line 1: corrupt",
        {"bad_files": 1},
        id="truncated_zstd",
    ),
    pytest.param(
        {"a.jsonl": b'{"text": "good one"}\n{"text": "bad \xff\xfe bytes"}\n'},
        r"a.jsonl: line 2: not valid UTF-8",
        {"bad_records": 1},
        id="invalid_utf8_jsonl",
    ),
    pytest.param(
        {"a.txt": b"caf\xc3\xa9 ok", "b.txt": b"legacy caf\xe9 text"},
        r"b.txt: byte 10: not valid UTF-8 \(encoding: utf-8\)",
        {"bad_files": 1},
        id="invalid_utf8_txt",
    ),
    pytest.param(
        {"a.txt": b"Fine text.", "b.txt": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "c.png": b"\x89PNG"},
        r"b.txt: file: binary file",
        {"bad_files": 1, "skipped_files": 1},
        id="binary_file_in_folder",
    ),
    pytest.param(
        {"a.jsonl": b'{"text": "one"}\n{"body": "no text field"}\n{"text": "three"}\n'},
        r"a.jsonl: line 2: no field 'text' \(fields: body\)",
        {"bad_records": 1},
        id="missing_text_field",
    ),
    pytest.param(
        {"a.jsonl": b'{"text": "one"}\n{"text": "two"\n'},
        r"a.jsonl: line 2: not valid JSON",
        {"bad_records": 1},
        id="bad_json_line",
    ),
    pytest.param(
        {"a.json": b'[{"text": "one"}, {"body": "two"}]'},
        r"a.json: record 1: no field 'text'",
        {"bad_records": 1},
        id="json_array_missing_field",
    ),
    pytest.param(
        {"a.txt": b"Fine.", "b.parquet": b"PAR1 not really"},
        r"b.parquet: file: not a readable Parquet",
        {"bad_files": 1},
        id="corrupt_parquet",
    ),
]


@pytest.mark.parametrize("files, error, skip_counts", BAD_INPUT)
def test_bad_input_raises_naming_file_and_record_by_default(tmp_path, files, error, skip_counts):
    folder = write_folder(tmp_path / "in", files)
    if "a.txt" not in files and "a.jsonl" not in files:
        (folder / "z.txt").write_text("Another good file.")
    source = {"path": str(folder), "encoding": "utf-8"}
    with pytest.raises(SourceError, match=r"download.sources\[0\]: .*" + error) as err:
        run_stage_in(tmp_path, download.STAGE, DownloadConfig(sources=[source]))
    assert str(folder) in str(err.value) and "on_error: skip" in str(err.value)


@pytest.mark.parametrize("files, error, skip_counts", BAD_INPUT)
def test_bad_input_is_skipped_counted_and_listed_on_request(tmp_path, files, error, skip_counts, caplog):
    folder = write_folder(tmp_path / "in", files)
    (folder / "z.txt").write_text("Another good file.")
    with caplog.at_level(logging.DEBUG, logger="ember.download"):
        records, metrics = run_download(tmp_path, [{"path": str(folder), "encoding": "utf-8"}], on_error="skip")
    for key in ("bad_files", "bad_records", "skipped_files"):
        assert metrics[key] == skip_counts.get(key, 0), key
    assert records[-1]["text"] == "Another good file."
    problems = [json.loads(line) for line in (tmp_path / "download" / "problems.jsonl").read_text().splitlines()]
    assert len(problems) == metrics["bad_files"] + metrics["bad_records"]
    where = error.split(": ")[1].replace("\\d+", "")
    assert all(p["source"] == "in" and p["file"] in files and p["where"].startswith(where) for p in problems)
    # The table: a section of the stage's report (its card under Prefect), logged at debug level.
    assert f"Bad input met ({len(problems)};" in caplog.text


def test_a_truncated_gzip_keeps_the_records_before_the_damage_when_skipping(tmp_path):
    texts = random_words(400)
    folder = write_folder(tmp_path / "in", {"a.jsonl.gz": truncated_gzip(texts)})
    records, _ = run_download(tmp_path, [{"path": str(folder)}], on_error="skip")
    assert 0 < len(records) < 400 and [r["text"] for r in records] == texts[: len(records)]
    (problem,) = [json.loads(x) for x in (tmp_path / "download" / "problems.jsonl").read_text().splitlines()]
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
    rows = [json.loads(x) for x in (tmp_path / "download" / "problems.jsonl").read_text().splitlines()]
    assert [(r["file"], r["problem"]) for r in rows] == [("empty.jsonl", "empty file"), ("empty.txt", "empty file")]
    only_empty = write_folder(tmp_path / "e", {"empty.txt": b""})
    with pytest.raises(SourceError, match=r"no text found .*1 empty file"):
        run_download(tmp_path / "e2", [{"path": str(only_empty)}])
