"""Preflight, the cheap part of download that the flow runs before touching the store: fail early
on a missing path, an unsupported url or a file without the text field, and return the identity
of every source (its files' sha256, a url's digest or HTTP validators) for the stage key."""

from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Any

from ember.storage.store import file_sha256
from ember.tasks.download import fetch
from ember.tasks.download.config import SUPPORTED, DownloadConfig, ErrorMode, Source, SourceError, file_format
from ember.tasks.download.listing import list_files
from ember.tasks.download.readers import iter_hf, read_file

PREFLIGHT_RECORDS = 5  # records checked per file
PREFLIGHT_FILES = 100  # files whose first records are checked, per source
# sha256 of a file, by (path, size, mtime, inode): a process that asks again (the corpus-changed
# trigger) rereads only files whose stat changed; `touch` costs a reread, never a new key.
_DIGESTS: dict[tuple[str, int, int, int, int], str] = {}


def content_digest(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = file_sha256(path)
    return _DIGESTS[key]


def preflight(cfg: DownloadConfig) -> list[dict[str, Any]]:
    """Check that every source can be read and return its identity (JSON-able) for the stage key.

    Local files are named by content (sha256), a url by its sha256 if given, else by what a
    HEAD request tells (ETag, Last-Modified, Content-Length; nothing if unreachable), a local
    dataset folder by its files' contents, a hub dataset by name, config and split.
    """
    fingerprints: list[dict[str, Any]] = []
    for i, source in enumerate(cfg.sources):
        name = source.source_name()
        mode = source.on_error or cfg.on_error
        if source.path is not None:
            listing = list_files(source, i)
            files = []
            for n, path in enumerate(listing.files):
                files.append([path.relative_to(listing.base).as_posix(), path.stat().st_size, content_digest(path)])
                if n < PREFLIGHT_FILES:
                    _check_first_records(path, source, i, mode)
            fingerprints.append({"name": name, "path": source.path, "files": files})
        elif source.url is not None:
            _check_url_type(source, i)
            fingerprints.append({"name": name, "url": source.url, "sha256": source.sha256, **_url_identity(source, i)})
        else:
            entry: dict[str, Any] = {
                "name": name,
                "hf": source.hf,
                "config": source.hf_config,
                "split": source.hf_split,
            }
            local = Path(source.hf or "")
            if local.is_dir():  # a local dataset folder: its files are its version
                entry["files"] = sorted(
                    [p.relative_to(local).as_posix(), p.stat().st_size, content_digest(p)]
                    for p in local.rglob("*")
                    if p.is_file() and ".cache" not in p.parts
                )
                _check_first_hf_records(source, i)
            fingerprints.append(entry)
    return fingerprints


def _check_first_records(path: Path, source: Source, index: int, mode: ErrorMode) -> None:
    if path.stat().st_size == 0:
        return  # a counted skip when the stage runs
    texts = []
    skip = mode == "skip"
    try:
        docs = read_file(
            path, source.text_field, (lambda where, reason: None) if skip else None, encoding=source.encoding
        )
        for doc in islice(docs, PREFLIGHT_RECORDS):
            texts.append(next(iter(doc.parts), ""))
    except SourceError as err:
        if skip:
            return
        raise SourceError(f"download.sources[{index}]: {err}") from None
    if texts and not any(t.strip() for t in texts) and not skip:
        raise SourceError(
            f"download.sources[{index}]: {path}: the first {len(texts)} record(s) have no text in {source.text_field!r}"
        )


def _check_first_hf_records(source: Source, index: int) -> None:
    try:
        texts = [next(iter(doc.parts)) for doc in islice(iter_hf(source), PREFLIGHT_RECORDS)]
    except SourceError as err:
        raise SourceError(f"download.sources[{index}].hf: {err}") from None
    if not any(t.strip() for t in texts):
        raise SourceError(
            f"download.sources[{index}].hf: {source.hf}: the first {len(texts)} record(s) "
            f"have no text in {source.text_field!r}"
        )


def _url_identity(source: Source, index: int) -> dict[str, str | int | None]:
    # A pinned digest already names the content; otherwise ETag, date and length are a cheap
    # stand-in. A server that answers no HEAD gets the url alone: a changed file then needs --force.
    if source.sha256:
        return {}
    statuses = []
    for url in source.urls:
        answer = fetch.head(url)
        if "status" not in answer and answer:
            return answer
        statuses.append(answer.get("status"))
    if statuses and all(s in (404, 410) for s in statuses):
        raise SourceError(
            f"download.sources[{index}].url: {source.location}: HTTP {statuses[0]} "
            f"at {'every location' if len(statuses) > 1 else 'the server'}"
        )
    return {}


def _check_url_type(source: Source, index: int) -> None:
    name = fetch.url_file_name(source.urls[0])
    if file_format(name) is None and fetch.archive_suffix(name) is None:
        raise SourceError(
            f"download.sources[{index}].url: {source.location}: unsupported file type "
            f"(supported: {SUPPORTED}, or a {', '.join(fetch.ARCHIVE_SUFFIXES)} archive of them)"
        )
