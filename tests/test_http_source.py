"""url sources against a real HTTP server on 127.0.0.1: resume, retry, checksums, mirrors, archives."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import json
import logging
import random
import socket
import tarfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from ember.storage.shards import iter_records, list_shards
from ember.tasks import download
from ember.tasks.download import DownloadConfig, SourceError, fetch, preflight
from ember.tasks.download.fetch import FetchError, HttpConfig
from ember.tasks.stage import StageContext
from helpers import stage_context

FAST = {"backoff_s": 0.01, "timeout_s": 5}


@dataclass
class Served:
    """What the server holds and how it misbehaves; every request is logged."""

    files: dict[str, bytes] = field(default_factory=dict)
    cut_after: dict[str, int] = field(default_factory=dict)  # first GET sends only this many bytes
    stall_after: dict[str, tuple[int, float]] = field(default_factory=dict)  # first GET: bytes, then silence
    fail_first: dict[str, list[int]] = field(default_factory=dict)  # statuses answered before the file
    ignore_range: bool = False  # a server without Range support answers 200 with the whole file
    requests: list[tuple[str, str, dict]] = field(default_factory=list)

    def gets(self, path: str) -> list[dict]:
        return [headers for method, p, headers in self.requests if method == "GET" and p == path]


def make_handler(served: Served):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self._answer(body=False)

        def do_GET(self):
            self._answer(body=True)

        def _answer(self, body: bool):
            path = self.path
            served.requests.append((self.command, path, dict(self.headers)))
            if body and served.fail_first.get(path):
                self.send_error(served.fail_first[path].pop(0))
                return
            data = served.files.get(path)
            if data is None:
                self.send_error(404)
                return
            etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
            start = 0
            rng = self.headers.get("Range")
            if rng and not served.ignore_range and self.headers.get("If-Range") in (None, etag):
                start = int(rng.removeprefix("bytes=").split("-")[0])
            part = data[start:]
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(part)))
            self.send_header("ETag", etag)
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if not body:
                return
            first = len(served.gets(path)) == 1
            if first and path in served.cut_after:
                self.wfile.write(part[: served.cut_after[path]])
                return  # HTTP/1.0: returning closes the connection, mid-body
            if first and path in served.stall_after:
                sent, seconds = served.stall_after[path]
                self.wfile.write(part[:sent])
                self.wfile.flush()
                time.sleep(seconds)
                return
            self.wfile.write(part)

        def log_message(self, *args):
            pass

    return Handler


@pytest.fixture
def server():
    served = Served()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make_handler(served))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["river", "stone", "light", "wind", "harbour", "lantern", "orchard", "winter", "letter", "bridge"]
    return [" ".join(rng.choice(words) + str(rng.randrange(1000)) for _ in range(200)) + "." for _ in range(n)]


def jsonl_gz(texts: list[str]) -> bytes:
    return gzip.compress("".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(texts)).encode())


def run_download(tmp_path: Path, sources: list[dict], ctx: StageContext | None = None, **kwargs):
    """The stage run in `ctx`, or in `tmp_path/download` (scratch: `tmp_path/download-work`)."""
    cfg = DownloadConfig(sources=sources, http=kwargs.pop("http", FAST), **kwargs)
    ctx = ctx or stage_context(tmp_path, "download")
    metrics = download.run(cfg, ctx)
    return list(iter_records(ctx.out / "shards")), metrics


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- resume, retry, timeouts ------------------------------------------------------------------


def test_cut_transfer_resumes_with_a_range_request(tmp_path, server):
    served, base = server
    data = jsonl_gz(docs(300))
    assert len(data) > 100_000
    served.files["/books.jsonl.gz"] = data
    served.cut_after["/books.jsonl.gz"] = 40_000
    path = fetch.fetch([f"{base}/books.jsonl.gz"], tmp_path / "dl", sha256=sha(data), http=HttpConfig(**FAST))
    assert path.read_bytes() == data
    first, second = served.gets("/books.jsonl.gz")
    assert "Range" not in first
    assert second["Range"] == "bytes=40000-" and second["If-Range"].startswith('"')  # resumed, not restarted
    assert [p.name for p in (tmp_path / "dl").iterdir()] == ["books.jsonl.gz"]  # no partial left


def test_interrupted_download_survives_in_work_and_resumes_next_run(tmp_path, server):
    served, base = server
    texts = docs(200, seed=1)
    data = jsonl_gz(texts)
    served.files["/c.jsonl.gz"] = data
    served.cut_after["/c.jsonl.gz"] = 25_000
    source = {"url": f"{base}/c.jsonl.gz", "sha256": sha(data)}
    ctx = stage_context(tmp_path, "download")
    with pytest.raises(SourceError, match=r"download.sources\[0\].url: .*connection closed after 25000 of "):
        run_download(tmp_path, [source], ctx=ctx, http={**FAST, "attempts": 1})
    assert not list_shards(ctx.out / "shards")
    parts = list(ctx.work.rglob("*.part"))
    assert [p.stat().st_size for p in parts] == [25_000]  # kept in ctx.work for the next run
    records, metrics = run_download(tmp_path, [source], ctx=ctx)
    assert served.gets("/c.jsonl.gz")[-1]["Range"] == "bytes=25000-"
    assert [r["text"] for r in records] == texts and metrics["docs"] == 200
    assert metrics["metadata_docs"] == 200  # the "n" field of each record


def test_server_without_range_support_restarts_from_zero(tmp_path, server):
    served, base = server
    data = jsonl_gz(docs(100, seed=5))
    served.files["/r.jsonl.gz"] = data
    served.cut_after["/r.jsonl.gz"] = 20_000
    served.ignore_range = True
    path = fetch.fetch([f"{base}/r.jsonl.gz"], tmp_path / "dl", sha256=sha(data), http=HttpConfig(**FAST))
    assert path.read_bytes() == data and served.gets("/r.jsonl.gz")[1]["Range"] == "bytes=20000-"


def test_a_file_changed_between_tries_is_fetched_whole_again(tmp_path, server):
    served, base = server
    served.files["/v.jsonl.gz"] = jsonl_gz(docs(100, seed=6))
    served.cut_after["/v.jsonl.gz"] = 20_000
    ctx = stage_context(tmp_path, "download")
    with pytest.raises(SourceError, match="connection closed"):
        run_download(tmp_path, [{"url": f"{base}/v.jsonl.gz"}], ctx=ctx, http={**FAST, "attempts": 1})
    new = docs(50, seed=7)
    served.files["/v.jsonl.gz"] = jsonl_gz(new)  # a new ETag: the If-Range of the resume no longer matches
    records, _ = run_download(tmp_path, [{"url": f"{base}/v.jsonl.gz"}], ctx=ctx)
    assert [r["text"] for r in records] == new
    assert served.gets("/v.jsonl.gz")[-1]["If-Range"] != '"' + sha(served.files["/v.jsonl.gz"])[:16] + '"'


def test_stalled_transfer_times_out_and_resumes(tmp_path, server):
    served, base = server
    data = jsonl_gz(docs(100, seed=2))
    served.files["/s.jsonl.gz"] = data
    served.stall_after["/s.jsonl.gz"] = (10_000, 3.0)
    started = time.monotonic()
    path = fetch.fetch([f"{base}/s.jsonl.gz"], tmp_path / "dl", http=HttpConfig(backoff_s=0.01, timeout_s=0.5))
    assert path.read_bytes() == data
    assert served.gets("/s.jsonl.gz")[1]["Range"] == "bytes=10000-"
    assert time.monotonic() - started < 2.5  # gave up on the stalled answer, did not wait it out


def test_503_then_200_is_retried_with_growing_waits(tmp_path, server):
    served, base = server
    served.files["/a.txt"] = b"A short text."
    served.fail_first["/a.txt"] = [503, 502]
    started = time.monotonic()
    path = fetch.fetch([f"{base}/a.txt"], tmp_path, http=HttpConfig(backoff_s=0.2, max_backoff_s=5))
    assert path.read_bytes() == b"A short text."
    assert len(served.gets("/a.txt")) == 3
    assert time.monotonic() - started >= 0.2 + 0.4  # waited 0.2 s, then twice as long


def test_5xx_gives_up_after_the_configured_tries(tmp_path, server):
    served, base = server
    served.files["/a.txt"] = b"never served"
    served.fail_first["/a.txt"] = [500] * 10
    with pytest.raises(FetchError, match=r"HTTP 500 .*\(after 3 tries\)"):
        fetch.fetch([f"{base}/a.txt"], tmp_path, http=HttpConfig(attempts=3, backoff_s=0.01))
    assert len(served.gets("/a.txt")) == 3


def test_404_is_a_clear_error_without_retries(tmp_path, server):
    served, base = server
    with pytest.raises(SourceError, match=r"download.sources\[0\].url: http://.*/missing.txt: HTTP 404"):
        run_download(tmp_path, [{"url": f"{base}/missing.txt"}])
    assert len(served.gets("/missing.txt")) == 1
    with pytest.raises(SourceError, match="HTTP 404"):  # and preflight says so before any work
        preflight(DownloadConfig(sources=[{"url": f"{base}/missing.txt"}]))


def test_sha256_mismatch_keeps_nothing(tmp_path, server):
    served, base = server
    served.files["/a.txt"] = b"The file the server has."
    ctx = stage_context(tmp_path, "download")
    with pytest.raises(SourceError, match=r"sha256 mismatch: expected 0{64}, got [0-9a-f]{64}; file discarded"):
        run_download(tmp_path, [{"url": f"{base}/a.txt", "sha256": "0" * 64}], ctx=ctx)
    assert not list_shards(ctx.out / "shards")
    assert [p for p in ctx.work.rglob("*") if p.is_file()] == []


def test_url_records_ids_and_identity(tmp_path, server):
    served, base = server
    texts = docs(3, seed=3)
    served.files["/books.jsonl.gz"] = jsonl_gz(texts)
    records, _ = run_download(tmp_path, [{"url": f"{base}/books.jsonl.gz"}])
    assert [r["id"] for r in records] == [f"books/books.jsonl.gz:{i}" for i in range(3)]
    assert {r["source"] for r in records} == {"books"}
    cfg = DownloadConfig(sources=[{"url": f"{base}/books.jsonl.gz"}])
    first = preflight(cfg)
    assert first[0]["etag"] and first[0]["length"] == str(len(served.files["/books.jsonl.gz"]))
    assert preflight(cfg) == first
    served.files["/books.jsonl.gz"] = jsonl_gz(texts[:2])
    assert preflight(cfg) != first  # a changed file changes the stage key
    pinned = DownloadConfig(sources=[{"url": f"{base}/books.jsonl.gz", "sha256": "a" * 64}])
    heads = len(served.requests)
    assert preflight(pinned)[0]["sha256"] == "a" * 64 and len(served.requests) == heads  # no HEAD needed


# --- mirrors --------------------------------------------------------------------------------


def test_mirrors_first_that_works_wins(tmp_path, server, caplog):
    served, base = server
    texts = docs(5, seed=4)
    data = jsonl_gz(texts)
    served.files["/good/corpus.jsonl.gz"] = data
    served.files["/bad/corpus.jsonl.gz"] = b"corrupted copy"
    urls = [
        f"http://127.0.0.1:{closed_port()}/corpus.jsonl.gz",
        f"{base}/gone/corpus.jsonl.gz",
        f"{base}/bad/corpus.jsonl.gz",
        f"{base}/good/corpus.jsonl.gz",
    ]
    with caplog.at_level(logging.WARNING, logger="ember.download"):
        records, _ = run_download(tmp_path, [{"url": urls, "sha256": sha(data)}])
    assert [r["text"] for r in records] == texts
    assert records[0]["id"] == "corpus/corpus.jsonl.gz:0"
    log = caplog.text
    assert "refused" in log and "HTTP 404" in log and "sha256 mismatch" in log  # each failure, and why


def test_mirrors_all_failing_name_each(tmp_path, server):
    _, base = server
    urls = [f"{base}/x/a.txt", f"http://127.0.0.1:{closed_port()}/a.txt"]
    with pytest.raises(SourceError, match=r"all 2 locations failed: .*/x/a.txt: HTTP 404.*refused"):
        run_download(tmp_path, [{"url": urls}])


# --- archives ---------------------------------------------------------------------------------


def tar_bytes(entries: list[tarfile.TarInfo | tuple[str, bytes]], mode: Literal["w:gz", "w"] = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for entry in entries:
            if isinstance(entry, tarfile.TarInfo):
                tar.addfile(entry)
            else:
                info = tarfile.TarInfo(entry[0])
                info.size = len(entry[1])
                tar.addfile(info, io.BytesIO(entry[1]))
    return buf.getvalue()


def link(name: str, target: str, kind=tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def zip_bytes(
    entries: list[tuple[str, bytes]], symlink: tuple[str, str] | None = None, compression: int = zipfile.ZIP_STORED
) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        for name, data in entries:
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink[0])
            info.external_attr = 0o120777 << 16
            zf.writestr(info, symlink[1])
    return buf.getvalue()


def test_archive_url_is_unpacked_and_read(tmp_path, server):
    served, base = server
    served.files["/corpus.tar.gz"] = tar_bytes(
        [
            ("corpus/a.txt", b"Alpha text."),
            ("corpus/sub/b.jsonl", b'{"text": "beta"}\n'),
            ("corpus/README.md", b"A card, not a document."),
            ("corpus/c.txt", b"x"),
        ]
    )
    served.files["/bundle.zip"] = zip_bytes([("one.md", b"# One"), ("two/three.txt", b"Three.")])
    records, metrics = run_download(tmp_path, [{"url": f"{base}/corpus.tar.gz"}, {"url": f"{base}/bundle.zip"}])
    assert [(r["id"], r["text"]) for r in records] == [
        ("corpus/corpus/a.txt:0", "Alpha text."),
        ("corpus/corpus/c.txt:0", "x"),
        ("corpus/corpus/sub/b.jsonl:0", "beta"),
        ("bundle/one.md:0", "# One"),
        ("bundle/two/three.txt:0", "Three."),
    ]
    assert metrics["skipped_files"] == 1  # README.md


@pytest.mark.parametrize(
    "name, data, message",
    [
        pytest.param(
            "d.zip", zip_bytes([("ok.txt", b"fine"), ("../evil.txt", b"x")]), r"'\.\./evil.txt'.*outside", id="zip_slip"
        ),
        pytest.param("d.zip", zip_bytes([("/tmp/abs-evil.txt", b"x")]), "absolute path", id="zip_absolute"),
        pytest.param(
            "d.zip",
            zip_bytes([("ok.txt", b"fine")], symlink=("link.txt", "../../etc/passwd")),
            "links to '../../etc/passwd', outside",
            id="zip_symlink_out",
        ),
        pytest.param(
            "d.tar.gz",
            tar_bytes([("ok.txt", b"fine"), ("sub/../../evil.txt", b"x")]),
            r"outside.*'\.\.'",
            id="tar_dotdot",
        ),
        pytest.param("d.tgz", tar_bytes([("/abs-evil.txt", b"x")]), "absolute path", id="tar_absolute"),
        pytest.param(
            "d.tar.gz",
            tar_bytes([link("sub/evil.txt", "../../outside.txt")]),
            "links to '../../outside.txt'",
            id="tar_symlink_out",
        ),
        pytest.param(
            "d.tar",
            tar_bytes([link("evil.txt", "/etc/passwd", tarfile.LNKTYPE)], mode="w"),
            "links to '/etc/passwd'",
            id="tar_hardlink_out",
        ),
    ],
)
def test_unsafe_archives_are_refused(tmp_path, name, data, message):
    path = tmp_path / "in" / name
    path.parent.mkdir()
    path.write_bytes(data)
    target = tmp_path / "deep" / "er" / "unpacked"
    target.parent.mkdir(parents=True)
    with pytest.raises(FetchError, match=message):
        fetch.unpack(path, target)
    assert not target.exists()
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [name]  # nothing written anywhere


def test_unsafe_archive_url_fails_the_stage(tmp_path, server):
    served, base = server
    served.files["/slip.tar.gz"] = tar_bytes([("../evil.txt", b"escaped")])
    with pytest.raises(SourceError, match=r"download.sources\[0\].url: .*slip.tar.gz: entry '../evil.txt'"):
        run_download(tmp_path, [{"url": f"{base}/slip.tar.gz"}])
    # Unpacked, `../evil.txt` would land beside the archive's folder, somewhere under the work folder.
    assert not list((tmp_path / "download-work").rglob("evil.txt"))


@pytest.mark.parametrize("name", ["bomb.zip", "bomb.tar.gz"])
def test_archive_larger_than_the_room_is_refused_before_writing(tmp_path, name):
    zeros = b"\0" * (20 << 20)  # 20 MB that compress to some kilobytes
    data = (
        zip_bytes([("a.txt", b"fine"), ("zeros.txt", zeros)], compression=zipfile.ZIP_DEFLATED)
        if name.endswith(".zip")
        else tar_bytes([("a.txt", b"fine"), ("zeros.txt", zeros)])
    )
    assert len(data) < 100_000
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(
        FetchError,
        match=rf"{name}: its entries unpack to 20,971,524 bytes, more than the "
        r"10,000,000 bytes free",
    ):
        fetch.unpack(path, tmp_path / "out", room=10_000_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # nothing unpacked, no leftovers
    assert (fetch.unpack(path, tmp_path / "out", room=30_000_000) / "zeros.txt").stat().st_size == 20 << 20


def test_symlink_inside_the_archive_is_allowed(tmp_path):
    path = tmp_path / "ok.tar.gz"
    path.write_bytes(tar_bytes([("a/real.txt", b"text"), link("a/alias.txt", "real.txt")]))
    target = fetch.unpack(path, tmp_path / "out")
    assert (target / "a" / "alias.txt").read_text() == "text"
