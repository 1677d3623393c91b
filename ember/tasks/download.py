"""download: sources (local files, http(s) files, Hugging Face datasets) -> raw text shards.

Every source is read as a stream of documents; a long document is cut into chunks of at most
`chunk_chars` characters on paragraph boundaries, so that the filters downstream, written for
web-page-sized documents, see book chapters rather than whole books. Each record keeps a stable
id, `f"{source}/{relative_file}:{record_index}"` plus `#chunkN` when its document was split.

`preflight` is the cheap part the flow runs before touching the store: it fails early on a
missing path or a file without the text field, and returns a fingerprint of every source for
the stage key, so that a changed corpus reruns download.
"""

from __future__ import annotations

import fnmatch
import glob
import gzip
import hashlib
import http.client
import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from itertools import islice, takewhile
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ember.storage.shards import ShardWriter
from ember.storage.store import file_sha256
from ember.tasks.stage import Stage, StageContext

# Longest suffix first: ".jsonl.gz" must win over ".gz".
SUPPORTED_SUFFIXES = (".jsonl.gz", ".jsonl", ".parquet", ".txt", ".md")
GLOB_CHARS = re.compile(r"[*?\[]")


class SourceError(ValueError):
    """A source that cannot be read; the message names the config key, the file and the line."""


class Source(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(
        None, pattern=r"^[^/\s]+$",
        description="names the records' `source` and id prefix; default: the folder, file or dataset name")
    path: str | None = Field(None, description="a file, a folder (searched recursively) or a glob")
    url: str | None = Field(None, description="an http(s) file (.txt, .md, .jsonl, .jsonl.gz, .parquet)")
    hf: str | None = Field(None, description="a Hugging Face dataset name or a local dataset folder")
    hf_config: str | None = Field(None, description="the dataset's config (subset) name")
    hf_split: str = Field("train", description="the dataset split to read")
    text_field: str = Field("text", min_length=1, description="field (jsonl, hf) or column (parquet) holding the text")
    max_docs: int | None = Field(None, ge=1, description="read at most this many documents of this source")
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$", description="expected digest of the url's file")
    # A dataset card or a licence next to the data is not training text: "SOURCE.md" beside the
    # jsonl files of a corpus folder would otherwise become a document. A file named
    # explicitly in `path` is always read.
    exclude: list[str] = Field(["README.md", "SOURCE.md", "LICENSE*", "CHANGELOG*"],
                               description="file-name patterns skipped when searching a folder or glob")

    @model_validator(mode="after")
    def _one_location(self) -> "Source":
        given = [key for key in ("path", "url", "hf") if getattr(self, key)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of path, url, hf (got {', '.join(given) or 'none'})")
        if self.url and urllib.parse.urlparse(self.url).scheme not in ("http", "https"):
            raise ValueError(f"url must be http:// or https://, got {self.url!r}")
        if self.sha256 and not self.url:
            raise ValueError("sha256 checks a url download; it is not used with path or hf")
        return self

    @property
    def location(self) -> str:
        return self.path or self.url or self.hf or ""

    def source_name(self) -> str:
        if self.name:
            return self.name
        if self.url:
            return _strip_suffix(Path(urllib.parse.urlparse(self.url).path).name) or "url"
        if self.hf:
            return self.hf.rstrip("/").replace("\\", "/").split("/")[-1] or "hf"
        # A single file is named after its folder ("tinyshakespeare/input.txt:0"), which says
        # more than a generic file name and keeps the relative path in the id.
        return _path_base(self.path or "").name or "source"


class DownloadConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sources: list[Source] = Field(..., min_length=1, description="where the text comes from")
    chunk_chars: int = Field(
        4000, ge=100,
        description="longer documents are split on paragraph boundaries into chunks of at most this many characters")
    min_chars: int = Field(1, ge=0, description="documents (and chunks) with fewer non-blank characters are skipped")

    @model_validator(mode="after")
    def _unique_names(self) -> "DownloadConfig":
        names = [source.source_name() for source in self.sources]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"sources share the name {', '.join(duplicates)}: "
                             "give each a distinct `name` so ids stay unique")
        return self


# ---------------------------------------------------------------------------------------------
# Local files


def _strip_suffix(name: str) -> str:
    for suffix in SUPPORTED_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def file_format(path: str | Path) -> str | None:
    name = str(path).lower()
    return next((suffix for suffix in SUPPORTED_SUFFIXES if name.endswith(suffix)), None)


def _path_base(path: str) -> Path:
    """The folder that relative file names (in ids) are taken from."""
    if GLOB_CHARS.search(path):
        fixed = list(takewhile(lambda part: not GLOB_CHARS.search(part), Path(path).parts))
        return Path(*fixed) if fixed else Path(".")
    # Decided by the name rather than by what is on disk, so that a source keeps its name
    # (and its ids) whether or not the file exists when the config is read.
    p = Path(path)
    return p.parent if file_format(p) and not p.is_dir() else p


@dataclass
class FileList:
    base: Path
    files: list[Path]
    skipped: list[Path] = field(default_factory=list)


def list_files(source: Source, index: int) -> FileList:
    """The supported files of a local `path` source in a stable order, or a SourceError."""
    key = f"download.sources[{index}].path"
    path = source.path or ""
    base = _path_base(path)
    if GLOB_CHARS.search(path):
        candidates = sorted(Path(p) for p in glob.glob(path, recursive=True))
        if not candidates:
            raise SourceError(f"{key}: no file matches {path}")
    elif Path(path).is_file():
        if file_format(path) is None:
            raise SourceError(f"{key}: {path}: unsupported file type (supported: {', '.join(SUPPORTED_SUFFIXES)})")
        return FileList(Path(path).parent, [Path(path)])
    elif Path(path).is_dir():
        candidates = sorted(p for p in Path(path).rglob("*"))
    else:
        raise SourceError(f"{key}: {path} does not exist")
    files, skipped = [], []
    for candidate in candidates:
        rel = candidate.relative_to(base) if candidate.is_relative_to(base) else candidate
        if not candidate.is_file() or any(part.startswith(".") for part in rel.parts):
            continue  # folders themselves, and hidden files such as a .cache/ of datasets
        if file_format(candidate) is None or any(fnmatch.fnmatch(candidate.name, pat) for pat in source.exclude):
            skipped.append(candidate)
        else:
            files.append(candidate)
    if not files:
        raise SourceError(f"{key}: {path} holds no supported file ({', '.join(SUPPORTED_SUFFIXES)}); "
                          f"{len(skipped)} other file(s) skipped")
    return FileList(base, files, skipped)


def _decode(data: bytes) -> str:
    # Mostly UTF-8; old Project Gutenberg files and the like are Latin-1 or cp1252. Bytes
    # 0x80-0x9F are printable in cp1252 and C1 controls in Latin-1, so they decide which.
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("cp1252" if re.search(rb"[\x80-\x9f]", data) else "latin-1", errors="replace")


def read_file(path: Path, text_field: str) -> Iterator[tuple[int, str]]:
    """(record index, text) of every document of a file, streaming; text may be empty."""
    fmt = file_format(path)
    if fmt in (".txt", ".md"):
        yield 0, _decode(path.read_bytes())
    elif fmt in (".jsonl", ".jsonl.gz"):
        opener = gzip.open if fmt == ".jsonl.gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            record = 0
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                yield record, _json_text(line, text_field, path, line_no)
                record += 1
    elif fmt == ".parquet":
        pf = pq.ParquetFile(path)
        if text_field not in pf.schema_arrow.names:
            raise SourceError(f"{path}: no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)})")
        record = 0
        for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
            for text in batch.column(0).to_pylist():
                yield record, "" if text is None else str(text)
                record += 1
    else:
        raise SourceError(f"{path}: unsupported file type")


def _json_text(line: str, text_field: str, path: Path, line_no: int) -> str:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        raise SourceError(f"{path}: line {line_no}: not valid JSON") from None
    if not isinstance(obj, dict) or text_field not in obj:
        raise SourceError(f"{path}: line {line_no}: no field {text_field!r}")
    text = obj[text_field]
    if text is not None and not isinstance(text, str):
        raise SourceError(f"{path}: line {line_no}: field {text_field!r} is {type(text).__name__}, not a string")
    return text or ""


# ---------------------------------------------------------------------------------------------
# Remote sources


def fetch_url(url: str, dest_dir: Path, sha256: str | None = None, attempts: int = 4, timeout: float = 60.0) -> Path:
    """Stream `url` into `dest_dir`, retrying 5xx answers and timeouts; check `sha256` if given.

    The file appears under its final name only once complete and verified, so a crash or a
    mismatch never leaves a file that looks like a good download.
    """
    name = Path(urllib.parse.urlparse(url).path).name or "download"
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / name
    partial = dest_dir / (name + ".part")
    if sha256 and dest.exists() and file_sha256(dest) == sha256.lower():
        return dest  # fetched before a crash (ctx.work outlives one) and still the pinned file
    for attempt in range(1, attempts + 1):
        digest = hashlib.sha256()
        try:
            request = urllib.request.Request(url, headers={"User-Agent": "ember"})
            with urllib.request.urlopen(request, timeout=timeout) as response, open(partial, "wb") as out:
                while block := response.read(1 << 20):
                    digest.update(block)
                    out.write(block)
            break
        except urllib.error.HTTPError as err:
            partial.unlink(missing_ok=True)
            if err.code < 500 or attempt == attempts:
                raise SourceError(f"{url}: HTTP {err.code} {err.reason}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as err:
            partial.unlink(missing_ok=True)
            if attempt == attempts:
                raise SourceError(f"{url}: {getattr(err, 'reason', err)} (after {attempts} attempts)") from None
        time.sleep(min(0.5 * 2 ** (attempt - 1), 8.0))
    if sha256 and digest.hexdigest() != sha256.lower():
        partial.unlink(missing_ok=True)
        raise SourceError(f"{url}: sha256 mismatch: expected {sha256.lower()}, "
                          f"got {digest.hexdigest()}; file discarded")
    os.replace(partial, dest)
    return dest


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").exists() or (folder / "state.json").exists()


def iter_hf(source: Source) -> Iterator[tuple[int, str]]:
    """(index, text) of a Hugging Face dataset split, streamed when the dataset allows it."""
    import datasets  # imported here: it takes seconds and only hf sources need it

    local = Path(source.hf or "")
    if local.is_dir() and _is_saved_dataset(local):
        ds = datasets.load_from_disk(str(local))  # a `save_to_disk` folder, memory-mapped
        if isinstance(ds, datasets.DatasetDict):
            if source.hf_split not in ds:
                raise SourceError(f"{source.hf}: no split {source.hf_split!r} (splits: {', '.join(ds)})")
            ds = ds[source.hf_split]
    else:
        try:
            ds = datasets.load_dataset(source.hf, source.hf_config, split=source.hf_split, streaming=True)
        except NotImplementedError:
            ds = datasets.load_dataset(source.hf, source.hf_config, split=source.hf_split)
    columns = ds.column_names
    if columns is not None and source.text_field not in columns:
        raise SourceError(f"{source.hf}: no field {source.text_field!r} (fields: {', '.join(columns)})")
    for index, row in enumerate(ds):
        text = row.get(source.text_field)
        if text is not None and not isinstance(text, str):
            raise SourceError(f"{source.hf}: row {index}: field {source.text_field!r} "
                              f"is {type(text).__name__}, not a string")
        yield index, text or ""


# ---------------------------------------------------------------------------------------------
# Chunking

PARAGRAPH_BREAK = re.compile(r"\r?\n(?:[ \t]*\r?\n)+")  # a blank line, CRLF or LF
LINE_BREAK = re.compile(r"\r?\n")


def _spans(text: str, start: int, end: int, sep: re.Pattern) -> list[tuple[int, int]]:
    spans, pos = [], start
    for match in sep.finditer(text, start, end):
        spans.append((pos, match.start()))
        pos = match.end()
    spans.append((pos, end))
    return [(a, b) for a, b in spans if b > a]


def chunk_text(text: str, max_chars: int) -> list[str]:
    """Split `text` into pieces of at most `max_chars` characters.

    Whole paragraphs are packed greedily; a paragraph too long on its own is packed by lines,
    and a line too long on its own is cut, at a space when there is one in its second half.
    Text inside a chunk is kept exactly (its separators included); the breaks between
    chunks are dropped.
    """
    if len(text) <= max_chars:
        return [text]
    pieces: list[tuple[int, int]] = []
    for a, b in _spans(text, 0, len(text), PARAGRAPH_BREAK):
        if b - a <= max_chars:
            pieces.append((a, b))
            continue
        for la, lb in _spans(text, a, b, LINE_BREAK):
            while lb - la > max_chars:
                space = text.rfind(" ", la + max_chars // 2, la + max_chars)
                cut = space if space > la else la + max_chars
                pieces.append((la, cut))
                la = cut + (space > la)  # the space at a cut goes with the break
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


# ---------------------------------------------------------------------------------------------
# Preflight: cheap checks before the store is touched

PREFLIGHT_RECORDS = 5  # records checked per file
PREFLIGHT_FILES = 100  # files whose first records are checked, per source


def preflight(cfg: DownloadConfig) -> list[dict]:
    """Check that every source can be read and return a fingerprint per source for the key."""
    fingerprints = []
    for i, source in enumerate(cfg.sources):
        name = source.source_name()
        if source.path is not None:
            listing = list_files(source, i)
            files = []
            for n, path in enumerate(listing.files):
                stat = path.stat()
                files.append([path.relative_to(listing.base).as_posix(), stat.st_size, stat.st_mtime_ns])
                if n < PREFLIGHT_FILES:
                    _check_first_records(path, source, i)
            fingerprints.append({"name": name, "path": source.path, "files": files})
        elif source.url is not None:
            _check_url_type(source, i)
            fingerprints.append({"name": name, "url": source.url, "sha256": source.sha256,
                                 **_head(source.url, source.sha256)})
        else:
            entry = {"name": name, "hf": source.hf, "config": source.hf_config, "split": source.hf_split}
            local = Path(source.hf or "")
            if local.is_dir():  # a local dataset folder: its files are its version
                entry["files"] = sorted([p.relative_to(local).as_posix(), p.stat().st_size, p.stat().st_mtime_ns]
                                        for p in local.rglob("*") if p.is_file() and ".cache" not in p.parts)
                _check_first_hf_records(source, i)
            fingerprints.append(entry)
    return fingerprints


def _check_first_records(path: Path, source: Source, index: int) -> None:
    texts = []
    try:
        for record, text in read_file(path, source.text_field):
            texts.append(text)
            if record + 1 >= PREFLIGHT_RECORDS:
                break
    except SourceError as err:
        raise SourceError(f"download.sources[{index}]: {err}") from None
    except (OSError, UnicodeDecodeError, EOFError) as err:
        raise SourceError(f"download.sources[{index}]: {path}: cannot read: {err}") from None
    if texts and not any(t.strip() for t in texts):
        raise SourceError(f"download.sources[{index}]: {path}: the first {len(texts)} record(s) "
                          f"have no text in {source.text_field!r}")


def _check_first_hf_records(source: Source, index: int) -> None:
    try:
        texts = [text for _, text in islice(iter_hf(source), PREFLIGHT_RECORDS)]
    except SourceError as err:
        raise SourceError(f"download.sources[{index}].hf: {err}") from None
    if not any(t.strip() for t in texts):
        raise SourceError(f"download.sources[{index}].hf: {source.hf}: the first {len(texts)} record(s) "
                          f"have no text in {source.text_field!r}")


def _head(url: str, sha256: str | None) -> dict:
    # A pinned digest already names the content; otherwise ETag and length are a cheap stand-in
    # (a server that answers no HEAD gets the url alone: a changed file then needs --force).
    if sha256:
        return {}
    try:
        request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "ember"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return {"etag": response.headers.get("ETag"), "length": response.headers.get("Content-Length"),
                    "last_modified": response.headers.get("Last-Modified")}
    except (urllib.error.URLError, TimeoutError, ConnectionError):
        return {}


# ---------------------------------------------------------------------------------------------
# The stage


@dataclass
class SourceCounts:
    name: str
    kind: str
    files: int = 0
    skipped_files: int = 0
    docs: int = 0
    empty_docs: int = 0
    chunks: int = 0
    chars: int = 0
    bytes: int = 0


def _check_url_type(source: Source, index: int) -> None:
    if file_format(urllib.parse.urlparse(source.url or "").path) is None:
        raise SourceError(f"download.sources[{index}].url: {source.url}: unsupported file type "
                          f"(supported: {', '.join(SUPPORTED_SUFFIXES)})")


def _fetch(source: Source, index: int, ctx: StageContext) -> Path:
    _check_url_type(source, index)
    # ctx.work survives a crash but not the commit: downloads are not kept twice.
    folder = ctx.work / "downloads" / hashlib.sha256((source.url or "").encode()).hexdigest()[:16]
    try:
        return fetch_url(source.url or "", folder, sha256=source.sha256)
    except SourceError as err:
        raise SourceError(f"download.sources[{index}].url: {err}") from None


def _documents(source: Source, index: int, ctx: StageContext, counts: SourceCounts,
               downloaded: Path | None) -> Iterator[tuple[str, str]]:
    """(id prefix, text) of every document of a source."""
    name = counts.name
    if source.hf is not None:
        for record, text in iter_hf(source):
            yield f"{name}/{source.hf_split}:{record}", text
        return
    listing = FileList(downloaded.parent, [downloaded]) if downloaded else list_files(source, index)
    counts.files, counts.skipped_files = len(listing.files), len(listing.skipped)
    total_bytes = sum(p.stat().st_size for p in listing.files) or 1
    done_bytes = 0
    for path in listing.files:
        rel = path.relative_to(listing.base).as_posix()
        for record, text in read_file(path, source.text_field):
            yield f"{name}/{rel}:{record}", text
            ctx.report.progress(done_bytes, total_bytes, f"download {name}")
        done_bytes += path.stat().st_size
        ctx.report.progress(done_bytes, total_bytes, f"download {name}")


def run(cfg: DownloadConfig, ctx: StageContext) -> dict:
    started = time.monotonic()
    all_counts = [SourceCounts(s.source_name(), "path" if s.path else "url" if s.url else "hf") for s in cfg.sources]
    # URLs first: a failed or mismatched download stops the run before any shard is written.
    downloaded = {i: _fetch(source, i, ctx) for i, source in enumerate(cfg.sources) if source.url is not None}
    with ShardWriter(ctx.out / "shards") as writer:
        for i, (source, counts) in enumerate(zip(cfg.sources, all_counts)):
            for doc_id, text in _documents(source, i, ctx, counts, downloaded.get(i)):
                if len(text.strip()) < max(cfg.min_chars, 1):
                    counts.empty_docs += 1
                else:
                    counts.docs += 1
                    chunks = chunk_text(text, cfg.chunk_chars)
                    for n, chunk in enumerate(chunks):
                        if len(chunk.strip()) < cfg.min_chars:
                            continue
                        writer.write({"id": f"{doc_id}#chunk{n}" if len(chunks) > 1 else doc_id,
                                      "text": chunk, "source": counts.name})
                        counts.chunks += 1
                        counts.chars += len(chunk)
                        counts.bytes += len(chunk.encode("utf-8"))
                if source.max_docs is not None and counts.docs >= source.max_docs:
                    break
            if counts.chunks == 0:
                raise SourceError(f"download.sources[{i}] ({source.location}): no text found "
                                  f"({counts.empty_docs} empty document(s), text field {source.text_field!r})")
            ctx.log.info("source %s: %d docs -> %d chunks, %.1f MB",
                         counts.name, counts.docs, counts.chunks, counts.bytes / 1e6)
    rows = [vars(c).copy() for c in all_counts]
    ctx.report.table("download-sources", rows, "Documents and chunks read from each source")
    seconds = time.monotonic() - started
    total_bytes = sum(c.bytes for c in all_counts)
    return {
        "docs": sum(c.docs for c in all_counts),
        "chunks": sum(c.chunks for c in all_counts),
        "chars": sum(c.chars for c in all_counts),
        "bytes": total_bytes,
        "empty_docs": sum(c.empty_docs for c in all_counts),
        "skipped_files": sum(c.skipped_files for c in all_counts),
        "shards": len(writer.paths),
        "per_source": {c.name: {"docs": c.docs, "chunks": c.chunks, "chars": c.chars} for c in all_counts},
        "seconds": round(seconds, 2),
        "mb_per_s": round(total_bytes / 1e6 / seconds, 2) if seconds > 0 else None,
    }


STAGE = Stage(name="download", version=1, run=run)
