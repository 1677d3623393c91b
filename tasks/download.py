"""download: sources (local files, http(s) files and archives, Hugging Face datasets) -> raw text shards.

Every source is read as a stream of documents; a long document is cut into chunks of at most
`chunk_chars` characters on paragraph boundaries, so that the filters downstream, written for
web-page-sized documents, see book chapters rather than whole books. A .txt or .md file is one
document and is streamed, so that a 100 MB file (even a single line) never sits in memory
whole. Each record keeps a stable id, `f"{source}/{relative_file}:{record_index}"` plus
`#chunkN` when its document was split.

The artifact:
- `shards/part-*.parquet`: `id, text, source`, what the next stages read.
- `metadata/part-00000.parquet`: `id, source, meta` for each document that has fields besides
  its text (a jsonl/json record's other keys, a Parquet/Arrow row's other columns, a dataset
  row's other fields), `meta` being those fields as a JSON object. `id` is the document's id:
  a chunk `X#chunkN` has the metadata of `X`.
- `problems.jsonl`: every bad record or file met and what was done with it (see `on_error`).

Bad input never passes silently: a record that is not JSON, lacks the text field or is not
UTF-8, and a file that is corrupt (gzip, zstd, Parquet), binary or not decodable, is either
an error naming the file and the line/record (`on_error: raise`, the default) or skipped,
counted in the metrics and listed in a table and in `problems.jsonl` (`on_error: skip`). In
skip mode, records read from a file before its damage (a truncated gzip) are kept. An empty
file is always a counted skip. A .txt/.md file that is not UTF-8 is read as cp1252/Latin-1
(old Project Gutenberg files) and counted, unless `encoding` names a codec.

`preflight` is the cheap part the flow runs before touching the store: it fails early on a
missing path or a file without the text field, and returns the identity of every source for
the stage key: the sha256 of each local file (so `touch` changes nothing and an edit reruns
download), a url's sha256 when given or else its ETag / Last-Modified / Content-Length.
"""

from __future__ import annotations

import codecs
import fnmatch
import glob
import gzip
import hashlib
import io
import json
import re
import time
import urllib.parse
import zlib
from dataclasses import dataclass, field
from itertools import islice, takewhile
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ember.storage.shards import ShardWriter
from ember.storage.store import file_sha256
from ember.tasks import fetch
from ember.tasks.fetch import FetchError, HttpConfig
from ember.tasks.stage import Stage, StageContext

TEXT_FORMATS = (".txt", ".md")
JSON_FORMATS = (".jsonl", ".json")
TABLE_FORMATS = (".parquet", ".arrow", ".feather")  # .arrow: Arrow IPC, file or stream
COMPRESSIONS = (".gz", ".zst")
# Longest suffix first: ".jsonl.gz" must win over ".gz".
SUPPORTED_SUFFIXES = tuple(sorted(
    [f + c for f in TEXT_FORMATS + JSON_FORMATS for c in ("", *COMPRESSIONS)] + list(TABLE_FORMATS),
    key=len, reverse=True))
SUPPORTED = ".txt .md .jsonl .json (each also .gz or .zst), .parquet, .arrow, .feather"
GLOB_CHARS = re.compile(r"[*?\[]")
BLOCK_CHARS = 1 << 20  # a streamed .txt file is read this many characters at a time
SNIFF_BYTES = 8192  # a NUL byte in the first 8 KB makes a text file binary (as git and grep decide)
ErrorMode = Literal["raise", "skip"]


class SourceError(ValueError):
    """A source that cannot be read; the message names the config key, the file and the line."""


class BadInput(SourceError):
    """A bad record or file: `where` is "line N", "record N", "byte N" or "file"."""

    def __init__(self, path: Path | str, where: str, reason: str):
        super().__init__(f"{path}: {where}: {reason}")
        self.path, self.where, self.reason = str(path), where, reason


class Source(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(
        None, pattern=r"^[^/\s]+$",
        description="names the records' `source` and id prefix; default: the folder, file or dataset name")
    path: str | None = Field(None, description="a file, a folder (searched recursively) or a glob")
    url: str | list[str] | None = Field(
        None, description="an http(s) file or .tar.gz/.tgz/.zip archive; a list: mirrors of one file, tried in order")
    hf: str | None = Field(None, description="a Hugging Face dataset name or a local dataset folder")
    hf_config: str | None = Field(None, description="the dataset's config (subset) name")
    hf_split: str = Field("train", description="the dataset split to read")
    text_field: str = Field("text", min_length=1, description="field (json, hf) or column (parquet, arrow) holding the text")
    metadata: bool | list[str] = Field(
        True, description="other fields kept as metadata: all (true), none (false) or these")
    max_docs: int | None = Field(None, ge=1, description="read at most this many documents of this source")
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$", description="expected digest of the url's file")
    on_error: ErrorMode | None = Field(None, description="bad records and files: raise or skip; default: the stage's")
    encoding: str = Field(
        "auto", description=".txt/.md encoding; auto: UTF-8, else cp1252/Latin-1 (counted); a codec name: strict")
    # A dataset card or a licence next to the data is not training text: "SOURCE.md" beside the
    # jsonl files of a corpus folder would otherwise become a document. A file named
    # explicitly in `path` is always read.
    exclude: list[str] = Field(["README.md", "SOURCE.md", "LICENSE*", "CHANGELOG*"],
                               description="file-name patterns skipped when searching a folder, glob or archive")

    @field_validator("encoding")
    @classmethod
    def _known_codec(cls, value: str) -> str:
        if value != "auto":
            try:
                codecs.lookup(value)
            except LookupError:
                raise ValueError(f"unknown encoding {value!r}") from None
        return value

    @model_validator(mode="after")
    def _one_location(self) -> "Source":
        given = [key for key in ("path", "url", "hf") if getattr(self, key)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of path, url, hf (got {', '.join(given) or 'none'})")
        for url in self.urls:
            if urllib.parse.urlparse(url).scheme not in ("http", "https"):
                raise ValueError(f"url must be http:// or https://, got {url!r}")
        if self.sha256 and not self.url:
            raise ValueError("sha256 checks a url download; it is not used with path or hf")
        return self

    @property
    def urls(self) -> list[str]:
        return [self.url] if isinstance(self.url, str) else list(self.url or [])

    @property
    def location(self) -> str:
        return self.path or (self.urls[0] if self.url else "") or self.hf or ""

    def source_name(self) -> str:
        if self.name:
            return self.name
        if self.url:
            return _strip_suffix(fetch.url_file_name(self.urls[0])) or "url"
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
    on_error: ErrorMode = Field("raise", description="bad records and files: raise (stop, naming them) or skip (count, list)")
    http: HttpConfig = Field(default_factory=HttpConfig, description="retries and timeouts of url sources")

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
    for suffix in SUPPORTED_SUFFIXES + fetch.ARCHIVE_SUFFIXES:
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


def list_files(source: Source, index: int, folder: Path | None = None) -> FileList:
    """The supported files of a local `path` source (or of an unpacked archive's `folder`) in a
    stable order, or a SourceError."""
    key = f"download.sources[{index}].{'url' if folder else 'path'}"
    path = str(folder) if folder else source.path or ""
    base = Path(path) if folder else _path_base(path)
    if GLOB_CHARS.search(path) and not folder:
        candidates = sorted(Path(p) for p in glob.glob(path, recursive=True))
        if not candidates:
            raise SourceError(f"{key}: no file matches {path}")
    elif Path(path).is_file():
        if file_format(path) is None:
            raise SourceError(f"{key}: {path}: unsupported file type (supported: {SUPPORTED})")
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
        where = source.location if folder else path
        raise SourceError(f"{key}: {where} holds no supported file ({SUPPORTED}); "
                          f"{len(skipped)} other file(s) skipped")
    return FileList(base, files, skipped)


@dataclass
class Doc:
    index: int  # the record's number in its file (blank lines not counted), or the dataset row
    parts: Iterable[str]  # the text: whole (one string) or in blocks (a streamed .txt file)
    meta: dict | None = None  # the record's other fields, when metadata is kept


OnBad = Callable[[str, str], None]  # (where, reason): raises, or records a skipped record


def read_file(path: Path, text_field: str = "text", on_bad: OnBad | None = None, *,
              metadata: bool | list[str] = False, encoding: str = "auto",
              on_note: OnBad | None = None) -> Iterator[Doc]:
    """Every document of a file, streaming.

    A bad record goes to `on_bad(where, reason)` (default: raise BadInput); a bad file raises
    BadInput naming the position reached. `on_note` hears of a fallback decoding.
    """
    def raise_bad(where: str, reason: str) -> None:
        raise BadInput(path, where, reason)

    on_bad = on_bad or raise_bad
    fmt = file_format(path)
    if fmt is None:
        raise BadInput(path, "file", f"unsupported file type (supported: {SUPPORTED})")
    base = fmt.removesuffix(".gz").removesuffix(".zst")
    if base in TEXT_FORMATS:
        yield Doc(0, _text_blocks(path, fmt, encoding, on_note))
    elif base == ".jsonl":
        yield from _jsonl_docs(path, fmt, text_field, on_bad, metadata)
    elif base == ".json":
        yield from _json_array_docs(path, fmt, text_field, on_bad, metadata)
    else:
        yield from _table_docs(path, fmt, text_field, metadata)


class _ZstdRaw(io.RawIOBase):
    """A .zst file as a stream, frame after frame; a truncated last frame is an error
    (zstandard's own stream reader ends quietly there)."""

    def __init__(self, path: Path):
        import zstandard  # only .zst files need it

        self._zstd = zstandard
        self._file = open(path, "rb")
        self._dobj = zstandard.ZstdDecompressor().decompressobj()
        self._pending = b""
        self._in_frame = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            data = self._file.read(BLOCK_BYTES)
            if not data:
                if self._in_frame:
                    raise EOFError("zstd data ends inside a frame (truncated file)")
                return 0
            while data:
                try:
                    self._pending += self._dobj.decompress(data)
                except self._zstd.ZstdError as err:
                    raise zlib.error(f"zstd: {err}") from None
                self._in_frame = not self._dobj.eof
                if self._dobj.eof:  # the next frame, if any, starts in unused_data
                    data = self._dobj.unused_data
                    self._dobj = self._zstd.ZstdDecompressor().decompressobj()
                else:
                    data = b""
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


BLOCK_BYTES = 1 << 20


def _open_binary(path: Path, fmt: str) -> BinaryIO:
    if fmt.endswith(".gz"):
        return gzip.open(path, "rb")
    if fmt.endswith(".zst"):
        return io.BufferedReader(_ZstdRaw(path), BLOCK_BYTES)
    return open(path, "rb")


# A damaged compressed file surfaces as one of these while it is read.
READ_ERRORS = (OSError, EOFError, zlib.error)


def _read_error(path: Path, where: str, err: Exception) -> BadInput:
    kind = "corrupt or truncated compressed data" if file_format(path).endswith((".gz", ".zst")) else "cannot read"
    return BadInput(path, where, f"{kind}: {type(err).__name__}: {err}")


def _sniff(path: Path, fmt: str) -> tuple[int | None, bool]:
    """(offset of the first byte that is not UTF-8 or None, whether any byte is 0x80-0x9F);
    raises BadInput for a binary file."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    bad_at, c1, offset = None, False, 0
    try:
        with _open_binary(path, fmt) as f:
            while block := f.read(BLOCK_BYTES):
                if offset == 0 and b"\0" in block[:SNIFF_BYTES]:
                    raise BadInput(path, "file", "binary file (NUL bytes in the first 8 KB); not text")
                if bad_at is None:
                    try:
                        decoder.decode(block)
                    except UnicodeDecodeError as err:
                        bad_at = offset + err.start
                c1 = c1 or re.search(rb"[\x80-\x9f]", block) is not None
                offset += len(block)
            if bad_at is None:
                try:
                    decoder.decode(b"", final=True)
                except UnicodeDecodeError:
                    bad_at = offset
    except READ_ERRORS as err:
        raise _read_error(path, f"byte {offset}", err) from None
    return bad_at, c1


def _text_blocks(path: Path, fmt: str, encoding: str, on_note: OnBad | None) -> Iterator[str]:
    """The text of a .txt/.md file in blocks of BLOCK_CHARS characters; line ends kept as they are."""
    errors = "strict"
    if encoding in ("auto", "utf-8", "utf8"):
        bad_at, c1 = _sniff(path, fmt)
        codec = "utf-8-sig"
        if bad_at is not None and encoding != "auto":
            raise BadInput(path, f"byte {bad_at}", "not valid UTF-8 (encoding: utf-8)")
        if bad_at is not None:
            # Mostly UTF-8; old Project Gutenberg files and the like are Latin-1 or cp1252. Bytes
            # 0x80-0x9F are printable in cp1252 and C1 controls in Latin-1, so they decide which.
            codec, errors = ("cp1252" if c1 else "latin-1"), "replace"
            if on_note:
                on_note(f"byte {bad_at}", f"not valid UTF-8: read as {codec}")
    else:
        codec = encoding
    chars = 0
    try:
        with _open_binary(path, fmt) as raw, io.TextIOWrapper(raw, encoding=codec, errors=errors, newline="") as f:
            while block := f.read(BLOCK_CHARS):
                chars += len(block)
                yield block
    except UnicodeDecodeError as err:
        raise BadInput(path, f"character {chars}", f"not valid {codec}: {err.reason}") from None
    except READ_ERRORS as err:
        raise _read_error(path, f"character {chars}", err) from None


def _fields(obj, text_field: str, metadata: bool | list[str], on_bad: OnBad, where: str) -> Doc | None:
    """The text and metadata of one JSON record, or None after reporting it as bad."""
    if not isinstance(obj, dict):
        on_bad(where, f"not a JSON object but {type(obj).__name__}")
        return None
    if text_field not in obj:
        on_bad(where, f"no field {text_field!r} (fields: {', '.join(list(obj)[:10])})")
        return None
    text = obj[text_field]
    if text is not None and not isinstance(text, str):
        on_bad(where, f"field {text_field!r} is {type(text).__name__}, not a string")
        return None
    meta = None
    if metadata:
        meta = {k: v for k, v in obj.items() if k != text_field and (metadata is True or k in metadata)} or None
    return Doc(-1, [text or ""], meta)


def _jsonl_docs(path: Path, fmt: str, text_field: str, on_bad: OnBad, metadata) -> Iterator[Doc]:
    line_no, record = 0, 0
    try:
        with _open_binary(path, fmt) as f:
            if b"\0" in f.peek(SNIFF_BYTES)[:SNIFF_BYTES]:
                raise BadInput(path, "file", "binary file (NUL bytes in the first 8 KB); not JSON Lines")
            for line_no, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                where = f"line {line_no}"
                record += 1  # a record's index stays its place in the file, whether or not others are skipped
                try:
                    line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
                except UnicodeDecodeError as err:
                    on_bad(where, f"not valid UTF-8 (byte {err.start} of the line)")
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    on_bad(where, f"not valid JSON ({err.msg} at column {err.colno})")
                    continue
                doc = _fields(obj, text_field, metadata, on_bad, where)
                if doc is not None:
                    doc.index = record - 1
                    yield doc
    except READ_ERRORS as err:
        raise _read_error(path, f"line {line_no + 1}", err) from None


def _json_array_docs(path: Path, fmt: str, text_field: str, on_bad: OnBad, metadata) -> Iterator[Doc]:
    """The items of a JSON array, parsed one at a time (the file is never loaded whole). A
    file whose first character is `{` is read as JSON Lines, as Hugging Face's json loader does."""
    decoder = json.JSONDecoder()
    buf, pos, eof, item = "", 0, False, 0
    try:
        with _open_binary(path, fmt) as raw:
            if b"\0" in raw.peek(SNIFF_BYTES)[:SNIFF_BYTES]:
                raise BadInput(path, "file", "binary file (NUL bytes in the first 8 KB); not JSON")
            f = io.TextIOWrapper(raw, encoding="utf-8-sig")

            def more(at_least: int = BLOCK_CHARS) -> bool:
                nonlocal buf, pos, eof
                data = f.read(max(at_least, BLOCK_CHARS))
                buf, pos = buf[pos:] + data, 0
                eof = not data
                return bool(data)

            def skip_space() -> str:
                nonlocal pos
                while True:
                    while pos < len(buf) and buf[pos] in " \t\r\n":
                        pos += 1
                    if pos < len(buf) or not more():
                        return buf[pos] if pos < len(buf) else ""

            first = skip_space()
            if first == "{":
                f.detach()
                yield from _jsonl_docs(path, fmt, text_field, on_bad, metadata)
                return
            if first != "[":
                raise BadInput(path, "file", "not a JSON array (nor JSON Lines)")
            pos += 1
            while True:
                c = skip_space()
                if c == "]":
                    break
                if item and c == ",":
                    pos += 1
                    skip_space()
                elif item:
                    raise BadInput(path, f"record {item}", f"expected ',' or ']' but found {c!r}")
                while True:
                    try:
                        obj, end = decoder.raw_decode(buf, pos)
                        if end < len(buf) or eof:
                            break
                    except json.JSONDecodeError as err:
                        if eof:
                            raise BadInput(path, f"record {item}", f"not valid JSON ({err.msg})") from None
                    more(2 * (len(buf) - pos))  # an item longer than the buffer: read on
                pos = end
                doc = _fields(obj, text_field, metadata, on_bad, f"record {item}")
                if doc is not None:
                    doc.index = item
                    yield doc
                item += 1
    except UnicodeDecodeError as err:
        raise BadInput(path, f"record {item}", f"not valid UTF-8: {err.reason}") from None
    except READ_ERRORS as err:
        raise _read_error(path, f"record {item}", err) from None


def _table_docs(path: Path, fmt: str, text_field: str, metadata) -> Iterator[Doc]:
    """Rows of a Parquet or Arrow IPC (file or stream) table, one batch in memory at a time."""
    try:
        if fmt == ".parquet":
            pf = pq.ParquetFile(path)
            schema = pf.schema_arrow
            columns = _table_columns(path, schema, text_field, metadata)
            batches = pf.iter_batches(batch_size=1024, columns=columns)
        else:
            source = pa.memory_map(str(path))
            try:
                reader = pa.ipc.open_file(source)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            except pa.ArrowInvalid:
                source.seek(0)
                reader = pa.ipc.open_stream(source)
                batches = iter(reader)
            schema = reader.schema
            columns = _table_columns(path, schema, text_field, metadata)
        record = 0
        for batch in batches:
            # by name: Parquet hands columns back in the file's order, not the order asked for
            texts = batch.column(text_field).to_pylist()
            metas = batch.select(columns[1:]).to_pylist() if len(columns) > 1 else None
            for n, text in enumerate(texts):
                yield Doc(record, ["" if text is None else text], metas[n] if metas else None)
                record += 1
    except (pa.ArrowException, OSError) as err:
        kind = "Parquet" if fmt == ".parquet" else "Arrow IPC"
        raise BadInput(path, "file", f"not a readable {kind} file: {err}") from None


def _table_columns(path: Path, schema: pa.Schema, text_field: str, metadata) -> list[str]:
    if text_field not in schema.names:
        raise BadInput(path, "file", f"no column {text_field!r} (columns: {', '.join(schema.names)})")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise BadInput(path, "file", f"column {text_field!r} is {kind}, not a string")
    others = [n for n in schema.names if n != text_field and (metadata is True or (metadata and n in metadata))]
    return [text_field] + others


# ---------------------------------------------------------------------------------------------
# Remote sources


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").exists() or (folder / "state.json").exists()


def iter_hf(source: Source) -> Iterator[Doc]:
    """The rows of a Hugging Face dataset split, streamed when the dataset allows it."""
    import datasets  # imported here: it takes seconds and only hf sources need it

    local = Path(source.hf or "")
    try:
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
    except SourceError:
        raise
    except Exception as err:  # datasets raises many kinds (not found, offline, bad config)
        raise SourceError(f"{source.hf}: cannot load the dataset: {type(err).__name__}: {err}") from None
    columns = ds.column_names
    if columns is not None and source.text_field not in columns:
        raise SourceError(f"{source.hf}: no field {source.text_field!r} (fields: {', '.join(columns)})")
    for index, row in enumerate(ds):
        text = row.get(source.text_field)
        if text is not None and not isinstance(text, str):
            raise SourceError(f"{source.hf}: row {index}: field {source.text_field!r} "
                              f"is {type(text).__name__}, not a string")
        meta = None
        if source.metadata:
            meta = {k: v for k, v in row.items()
                    if k != source.text_field and (source.metadata is True or k in source.metadata)} or None
        yield Doc(index, [text or ""], meta)


# ---------------------------------------------------------------------------------------------
# Chunking

PARAGRAPH_BREAK = re.compile(r"\r?\n(?:[ \t]*\r?\n)+")  # a blank line, CRLF or LF
LINE_BREAK = re.compile(r"\r?\n")
BLANK_TAIL = re.compile(r"[ \t]*\r?\Z")  # what may still grow into a paragraph break


def chunk_text(text: str, max_chars: int) -> list[str]:
    """Split `text` into pieces of at most `max_chars` characters (see `iter_chunks`)."""
    return list(iter_chunks([text], max_chars))


def iter_chunks(parts: Iterable[str], max_chars: int) -> Iterator[str]:
    """Chunks of at most `max_chars` characters of the text made of `parts`, streaming.

    Whole paragraphs are packed greedily; a paragraph too long on its own is packed by lines,
    and a line too long on its own is cut, at a space when there is one in its second half.
    Text inside a chunk is kept exactly (its separators included); the breaks between chunks
    are dropped. A text of at most `max_chars` is one chunk, as it is.

    The result does not depend on how the text is split into parts: a piece is decided only
    once the text that could change it has arrived (at most about `max_chars` ahead), and
    packing restarts from the start of the open chunk, so memory stays near one part plus
    two chunks however long the text or its lines.
    """
    parts = iter(parts)
    head: list[str] = []
    size = 0
    for part in parts:
        head.append(part)
        size += len(part)
        if size > max_chars:
            break
    else:
        text = "".join(head)
        if text:
            yield text
        return

    buf = "".join(head)
    pos = 0  # where the text not yet cut into pieces starts
    long_para = False  # inside a paragraph longer than max_chars: cut by lines
    start = end = -1  # the open chunk
    done: list[str] = []

    def pack(a: int, b: int) -> None:
        nonlocal start, end
        if b <= a:
            return
        if start >= 0 and b - start > max_chars:
            done.append(buf[start:end])
            start = -1
        if start < 0:
            start = a
        end = b

    final = False
    while True:
        n = len(buf)
        while pos < n:
            if not long_para:
                m = PARAGRAPH_BREAK.search(buf, pos)
                if m and (final or not BLANK_TAIL.match(buf, m.end())):
                    if m.start() - pos <= max_chars:
                        pack(pos, m.start())
                        pos = m.end()
                        continue
                elif final:
                    if n - pos <= max_chars:
                        pack(pos, n)
                        pos = n
                        continue
                else:
                    # The paragraph ends at this break, or at one still to come that cannot
                    # start before `bound`: long for sure past max_chars, else wait for text.
                    bound = m.start() if m else _earliest_break(buf, pos)
                    if bound - pos <= max_chars:
                        break
                long_para = True
            m = LINE_BREAK.search(buf, pos)
            para = PARAGRAPH_BREAK.match(buf, m.start()) if m else None
            line_end = m.start() if m else (n if final else -1)
            known = line_end if line_end >= 0 else n - 1 if buf.endswith("\r") else n  # the line ends at or after
            while known - pos > max_chars:
                space = buf.rfind(" ", pos + max_chars // 2, pos + max_chars)
                cut = space if space > pos else pos + max_chars
                pack(pos, cut)
                pos = cut + (space > pos)  # the space at a cut goes with the break
            if line_end < 0:
                break
            if not final and m and BLANK_TAIL.match(buf, para.end() if para else m.end()):
                break  # the break may still grow into (a longer) paragraph break
            pack(pos, line_end)
            if m is None:
                pos = n
            elif para:
                pos, long_para = para.end(), False
            else:
                pos = m.end()
        for chunk in done:
            chunk = chunk.strip("\r\n")
            if chunk.strip():
                yield chunk
        done.clear()
        if final:
            break
        part = next(parts, None)
        if part is None:
            final = True
        else:
            keep = min(pos, start) if start >= 0 else pos
            buf = buf[keep:] + part
            pos -= keep
            if start >= 0:
                start, end = start - keep, end - keep
    if start >= 0:
        chunk = buf[start:end].strip("\r\n")
        if chunk.strip():
            yield chunk


def _earliest_break(buf: str, pos: int) -> int:
    """Where a paragraph break not yet complete at the end of `buf` could start."""
    i = buf.rfind("\n", pos)
    if i >= 0 and BLANK_TAIL.match(buf, i + 1):
        return i - 1 if i > pos and buf[i - 1] == "\r" else i
    return len(buf) - 1 if buf.endswith("\r") else len(buf)


# ---------------------------------------------------------------------------------------------
# Preflight: cheap checks before the store is touched

PREFLIGHT_RECORDS = 5  # records checked per file
PREFLIGHT_FILES = 100  # files whose first records are checked, per source
# sha256 of a file, by (path, size, mtime, inode): a process that asks again (the corpus-changed
# trigger) rereads only files whose stat changed; `touch` costs a reread, never a new key.
_DIGESTS: dict[tuple, str] = {}


def content_digest(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = file_sha256(path)
    return _DIGESTS[key]


def preflight(cfg: DownloadConfig) -> list[dict]:
    """Check that every source can be read and return its identity (JSON-able) for the stage key.

    Local files are named by content (sha256), a url by its sha256 if given, else by what a
    HEAD request tells (ETag, Last-Modified, Content-Length; nothing if unreachable), a local
    dataset folder by its files' contents, a hub dataset by name, config and split.
    """
    fingerprints = []
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
            fingerprints.append({"name": name, "url": source.url, "sha256": source.sha256,
                                 **_url_identity(source, i)})
        else:
            entry = {"name": name, "hf": source.hf, "config": source.hf_config, "split": source.hf_split}
            local = Path(source.hf or "")
            if local.is_dir():  # a local dataset folder: its files are its version
                entry["files"] = sorted([p.relative_to(local).as_posix(), p.stat().st_size, content_digest(p)]
                                        for p in local.rglob("*") if p.is_file() and ".cache" not in p.parts)
                _check_first_hf_records(source, i)
            fingerprints.append(entry)
    return fingerprints


def _check_first_records(path: Path, source: Source, index: int, mode: ErrorMode) -> None:
    if path.stat().st_size == 0:
        return  # a counted skip when the stage runs
    texts = []
    skip = mode == "skip"
    try:
        docs = read_file(path, source.text_field, (lambda where, reason: None) if skip else None,
                         encoding=source.encoding)
        for doc in islice(docs, PREFLIGHT_RECORDS):
            texts.append(next(iter(doc.parts), ""))
    except SourceError as err:
        if skip:
            return
        raise SourceError(f"download.sources[{index}]: {err}") from None
    if texts and not any(t.strip() for t in texts) and not skip:
        raise SourceError(f"download.sources[{index}]: {path}: the first {len(texts)} record(s) "
                          f"have no text in {source.text_field!r}")


def _check_first_hf_records(source: Source, index: int) -> None:
    try:
        texts = [next(iter(doc.parts)) for doc in islice(iter_hf(source), PREFLIGHT_RECORDS)]
    except SourceError as err:
        raise SourceError(f"download.sources[{index}].hf: {err}") from None
    if not any(t.strip() for t in texts):
        raise SourceError(f"download.sources[{index}].hf: {source.hf}: the first {len(texts)} record(s) "
                          f"have no text in {source.text_field!r}")


def _url_identity(source: Source, index: int) -> dict:
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
        raise SourceError(f"download.sources[{index}].url: {source.location}: HTTP {statuses[0]} "
                          f"at {'every location' if len(statuses) > 1 else 'the server'}")
    return {}


# ---------------------------------------------------------------------------------------------
# The stage


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

    def __init__(self):
        self.rows: list[dict] = []

    def add(self, counts: SourceCounts, file: str, where: str, problem: str, action: str) -> None:
        self.rows.append({"source": counts.name, "file": file, "where": where, "problem": problem, "action": action})


def _check_url_type(source: Source, index: int) -> None:
    name = fetch.url_file_name(source.urls[0])
    if file_format(name) is None and fetch.archive_suffix(name) is None:
        raise SourceError(f"download.sources[{index}].url: {source.location}: unsupported file type "
                          f"(supported: {SUPPORTED}, or a {', '.join(fetch.ARCHIVE_SUFFIXES)} archive of them)")


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

    def write(self, doc_id: str, source: str, meta: dict) -> None:
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
        columns = list(zip(*self._buffer))
        self._writer.write_table(pa.table([pa.array(c, pa.string()) for c in columns], schema=self.SCHEMA))
        self._buffer = []

    def close(self, ok: bool = True) -> None:
        if ok:
            self._flush()
        if self._writer is not None:
            self._writer.close()


def _units(source: Source, index: int, cfg: DownloadConfig, ctx: StageContext,
           counts: SourceCounts) -> Iterator[tuple[str, Path | None]]:
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


def run(cfg: DownloadConfig, ctx: StageContext) -> dict:
    started = time.monotonic()
    all_counts = [SourceCounts(s.source_name(), "path" if s.path else "url" if s.url else "hf") for s in cfg.sources]
    problems = Problems()
    meta_writer = MetadataWriter(ctx.out / "metadata")
    ok = False
    try:
        with ShardWriter(ctx.out / "shards") as writer:
            for i, (source, counts) in enumerate(zip(cfg.sources, all_counts)):
                _read_source(cfg, ctx, i, source, counts, problems, writer, meta_writer)
        ok = True
    finally:
        meta_writer.close(ok)
    if problems.rows:
        with open(ctx.out / "problems.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in problems.rows)
        shown = problems.rows[:200]
        ctx.report.table("download-problems", shown,
                         f"Bad input met ({len(problems.rows)}; first {len(shown)} shown; all in problems.jsonl)")
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


def _read_source(cfg: DownloadConfig, ctx: StageContext, i: int, source: Source, counts: SourceCounts,
                 problems: Problems, writer: ShardWriter, meta_writer: MetadataWriter) -> None:
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

        def on_bad(where: str, reason: str, rel=rel, path=path) -> None:
            if mode == "raise":
                raise SourceError(f"download.sources[{i}]: {path}: {where}: {reason}{hint}")
            counts.bad_records += 1
            problems.add(counts, rel, where, reason, "record skipped")

        def on_note(where: str, reason: str, rel=rel) -> None:
            counts.legacy_decoded += 1
            problems.add(counts, rel, where, reason, "decoded")

        try:
            for doc in read_file(path, source.text_field, on_bad, metadata=source.metadata,
                                 encoding=source.encoding, on_note=on_note):
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
        raise SourceError(f"download.sources[{i}] ({source.location}): no text found "
                          f"({counts.empty_docs} empty document(s), {counts.empty_files} empty file(s), "
                          f"{counts.bad_records} bad record(s), {counts.bad_files} bad file(s), "
                          f"text field {source.text_field!r})")
    ctx.log.info("source %s: %d docs -> %d chunks, %.1f MB", counts.name, counts.docs, counts.chunks, counts.bytes / 1e6)


# Version 2: streamed .txt chunking, metadata/ and problems.jsonl, more formats, url mirrors.
STAGE = Stage(name="download", version=2, run=run, unkeyed=("http",))
