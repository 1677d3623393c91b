"""The download stage itself: each source's files read, chunked and written as shards, with the
metadata beside them, the counts per source and the list of bad input met."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ember.storage.shards import ShardWriter
from ember.tasks.download import fetch
from ember.tasks.download.chunker import iter_chunks
from ember.tasks.download.config import BadInput, DownloadConfig, Source, SourceError
from ember.tasks.download.fetch import FetchError
from ember.tasks.download.listing import FileList, list_files
from ember.tasks.download.preflight_checks import _check_url_type
from ember.tasks.download.readers import Doc, iter_hf, read_file
from ember.tasks.stage import Metrics, Stage, StageContext


@dataclass
class SourceCounts:
    name: str
    kind: str
    files: int = 0
    skipped_files: int = 0  # not a supported type, or excluded by name
    docs: int = 0
    empty_docs: int = 0
    chunks: int = 0
    chars: int = 0
    bytes: int = 0
    bad_records: int = 0
    bad_files: int = 0
    empty_files: int = 0
    legacy_decoded: int = 0


class Problems:
    """Bad records and files met while reading, in reading order: raised, or counted and listed."""

    def __init__(self) -> None:
        self.rows: list[dict[str, str]] = []

    def add(self, counts: SourceCounts, file: str, where: str, problem: str, action: str) -> None:
        self.rows.append({"source": counts.name, "file": file, "where": where, "problem": problem, "action": action})


def _fetch(source: Source, index: int, cfg: DownloadConfig, ctx: StageContext) -> FileList:
    """A url source's files: the downloaded file, or what its archive holds."""
    _check_url_type(source, index)
    # ctx.work survives a crash but not the commit: downloads are not kept twice.
    tag = source.sha256 or "\n".join(source.urls)
    folder = ctx.work / "downloads" / hashlib.sha256(tag.encode()).hexdigest()[:16]
    try:
        path = fetch.fetch(source.urls, folder, sha256=source.sha256, http=cfg.http)
        if fetch.archive_suffix(path.name) is None:
            return FileList(path.parent, [path])
        return list_files(source, index, fetch.unpack(path, folder / "unpacked"))
    except FetchError as err:
        raise SourceError(f"download.sources[{index}].url: {source.location}: {err}") from None


class MetadataWriter:
    """`metadata/part-00000.parquet`: a row group per ROWS documents, so memory stays flat."""

    ROWS = 20_000
    SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("meta", pa.string())])

    def __init__(self, folder: Path):
        self.path = folder / "part-00000.parquet"
        self.rows = 0
        self._buffer: list[tuple[str, str, str]] = []
        self._writer: pq.ParquetWriter | None = None

    def write(self, doc_id: str, source: str, meta: dict[str, Any]) -> None:
        # default=str: dates, decimals and the like of Parquet columns become their text
        self._buffer.append((doc_id, source, json.dumps(meta, ensure_ascii=False, default=str)))
        self.rows += 1
        if len(self._buffer) >= self.ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(self.path, self.SCHEMA, compression="zstd")
        columns = list(zip(*self._buffer, strict=True))
        self._writer.write_table(pa.table([pa.array(c, pa.string()) for c in columns], schema=self.SCHEMA))
        self._buffer = []

    def close(self, ok: bool = True) -> None:
        if ok:
            self._flush()
        if self._writer is not None:
            self._writer.close()


def _units(
    source: Source, index: int, cfg: DownloadConfig, ctx: StageContext, counts: SourceCounts
) -> Iterator[tuple[str, Path | None]]:
    """(relative name, path) of each file of a source; ("", None) for a dataset."""
    if source.hf is not None:
        yield "", None
        return
    listing = _fetch(source, index, cfg, ctx) if source.url is not None else list_files(source, index)
    counts.files, counts.skipped_files = len(listing.files), len(listing.skipped)
    total = sum(p.stat().st_size for p in listing.files) or 1
    done = 0
    for path in listing.files:
        yield path.relative_to(listing.base).as_posix(), path
        done += path.stat().st_size
        ctx.report.progress(done, total, f"download {counts.name}")


def run(cfg: DownloadConfig, ctx: StageContext) -> Metrics:
    started = time.monotonic()
    all_counts = [SourceCounts(s.source_name(), "path" if s.path else "url" if s.url else "hf") for s in cfg.sources]
    problems = Problems()
    meta_writer = MetadataWriter(ctx.out / "metadata")
    ok = False
    try:
        with ShardWriter(ctx.out / "shards") as writer:
            for i, (source, counts) in enumerate(zip(cfg.sources, all_counts, strict=True)):
                _read_source(cfg, ctx, i, source, counts, problems, writer, meta_writer)
        ok = True
    finally:
        meta_writer.close(ok)
    if problems.rows:
        with open(ctx.out / "problems.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in problems.rows)
        shown = problems.rows[:200]
        ctx.report.table(
            "download-problems",
            shown,
            f"Bad input met ({len(problems.rows)}; first {len(shown)} shown; all in problems.jsonl)",
        )
    rows = [vars(c).copy() for c in all_counts]
    ctx.report.table("download-sources", rows, "Documents and chunks read from each source")
    seconds = time.monotonic() - started
    total_bytes = sum(c.bytes for c in all_counts)

    def total(name: str) -> int:
        return sum(getattr(c, name) for c in all_counts)

    return {
        "docs": total("docs"),
        "chunks": total("chunks"),
        "chars": total("chars"),
        "bytes": total_bytes,
        "empty_docs": total("empty_docs"),
        "skipped_files": total("skipped_files"),
        "bad_records": total("bad_records"),
        "bad_files": total("bad_files"),
        "empty_files": total("empty_files"),
        "legacy_decoded_files": total("legacy_decoded"),
        "metadata_docs": meta_writer.rows,
        "shards": len(writer.paths),
        "per_source": {c.name: {"docs": c.docs, "chunks": c.chunks, "chars": c.chars} for c in all_counts},
        "seconds": round(seconds, 2),
        "mb_per_s": round(total_bytes / 1e6 / seconds, 2) if seconds > 0 else None,
    }


def _read_source(
    cfg: DownloadConfig,
    ctx: StageContext,
    i: int,
    source: Source,
    counts: SourceCounts,
    problems: Problems,
    writer: ShardWriter,
    meta_writer: MetadataWriter,
) -> None:
    mode = source.on_error or cfg.on_error
    hint = " (on_error: skip skips and counts such input)"
    min_chars = max(cfg.min_chars, 1)

    def emit(doc_id: str, n: int | None, chunk: str) -> None:
        if len(chunk.strip()) < cfg.min_chars:
            return
        writer.write({"id": doc_id if n is None else f"{doc_id}#chunk{n}", "text": chunk, "source": counts.name})
        counts.chunks += 1
        counts.chars += len(chunk)
        counts.bytes += len(chunk.encode("utf-8"))

    def write_doc(doc_id: str, doc: Doc) -> None:
        chunks = iter_chunks(doc.parts, cfg.chunk_chars)
        first = next(chunks, None)
        second = next(chunks, None) if first is not None else None
        if first is None or (second is None and len(first.strip()) < min_chars):
            counts.empty_docs += 1
            return
        counts.docs += 1
        if doc.meta:
            meta_writer.write(doc_id, counts.name, doc.meta)
        if second is None:
            emit(doc_id, None, first)
            return
        emit(doc_id, 0, first)
        emit(doc_id, 1, second)
        for n, chunk in enumerate(chunks, start=2):
            emit(doc_id, n, chunk)

    for rel, path in _units(source, i, cfg, ctx, counts):
        if path is None:  # a dataset: errors are the dataset's, raised whatever the mode
            try:
                for doc in iter_hf(source):
                    write_doc(f"{counts.name}/{source.hf_split}:{doc.index}", doc)
                    if source.max_docs is not None and counts.docs >= source.max_docs:
                        break
            except SourceError as err:
                raise SourceError(f"download.sources[{i}].hf: {err}") from None
            continue
        if path.stat().st_size == 0:
            counts.empty_files += 1
            problems.add(counts, rel, "file", "empty file", "skipped")
            continue

        def on_bad(where: str, reason: str, rel: str = rel, path: Path = path) -> None:
            if mode == "raise":
                raise SourceError(f"download.sources[{i}]: {path}: {where}: {reason}{hint}")
            counts.bad_records += 1
            problems.add(counts, rel, where, reason, "record skipped")

        def on_note(where: str, reason: str, rel: str = rel) -> None:
            counts.legacy_decoded += 1
            problems.add(counts, rel, where, reason, "decoded")

        try:
            for doc in read_file(
                path, source.text_field, on_bad, metadata=source.metadata, encoding=source.encoding, on_note=on_note
            ):
                write_doc(f"{counts.name}/{rel}:{doc.index}", doc)
                if source.max_docs is not None and counts.docs >= source.max_docs:
                    break
        except BadInput as err:
            if mode == "raise":
                raise SourceError(f"download.sources[{i}]: {err}{hint}") from None
            counts.bad_files += 1
            problems.add(counts, rel, err.where, err.reason, "rest of file skipped")
        if source.max_docs is not None and counts.docs >= source.max_docs:
            break
    if counts.chunks == 0:
        raise SourceError(
            f"download.sources[{i}] ({source.location}): no text found "
            f"({counts.empty_docs} empty document(s), {counts.empty_files} empty file(s), "
            f"{counts.bad_records} bad record(s), {counts.bad_files} bad file(s), "
            f"text field {source.text_field!r})"
        )
    ctx.log.info(
        "source %s: %d docs -> %d chunks, %.1f MB", counts.name, counts.docs, counts.chunks, counts.bytes / 1e6
    )


# Version 2: streamed .txt chunking, metadata/ and problems.jsonl, more formats, url mirrors.
STAGE = Stage(name="download", version=2, run=run, unkeyed=("http",))
