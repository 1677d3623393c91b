"""What a file or a dataset holds, as a stream of documents: the format readers (.txt/.md streamed
in blocks, JSON Lines, JSON arrays, Parquet and Arrow tables, each compressed or not) and the
rows of a Hugging Face dataset. Bad records go to a callback; a bad file raises BadInput."""

from __future__ import annotations

import codecs
import gzip
import io
import json
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from ember.tasks.download.config import SUPPORTED, TEXT_FORMATS, BadInput, Source, SourceError, file_format

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

BLOCK_CHARS = 1 << 20  # a streamed .txt file is read this many characters at a time
SNIFF_BYTES = 8192  # a NUL byte in the first 8 KB makes a text file binary (as git and grep decide)


@dataclass
class Doc:
    index: int  # the record's number in its file (blank lines not counted), or the dataset row
    parts: Iterable[str]  # the text: whole (one string) or in blocks (a streamed .txt file)
    meta: dict[str, Any] | None = None  # the record's other fields, when metadata is kept


OnBad = Callable[[str, str], None]  # (where, reason): raises, or records a skipped record


def read_file(
    path: Path,
    text_field: str = "text",
    on_bad: OnBad | None = None,
    *,
    metadata: bool | list[str] = False,
    encoding: str = "auto",
    on_note: OnBad | None = None,
) -> Iterator[Doc]:
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

    def __init__(self, path: Path) -> None:
        import zstandard  # only .zst files need it

        self._zstd = zstandard
        self._file = open(path, "rb")
        self._dobj = zstandard.ZstdDecompressor().decompressobj()
        self._pending = b""
        self._in_frame = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
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
        view = memoryview(buffer)
        n = min(len(view), len(self._pending))
        view[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


BLOCK_BYTES = 1 << 20


def _open_binary(path: Path, fmt: str) -> gzip.GzipFile | io.BufferedReader:
    if fmt.endswith(".gz"):
        return gzip.open(path, "rb")
    if fmt.endswith(".zst"):
        return io.BufferedReader(_ZstdRaw(path), BLOCK_BYTES)
    return open(path, "rb")


# A damaged compressed file surfaces as one of these while it is read.
READ_ERRORS = (OSError, EOFError, zlib.error)


def _read_error(path: Path, where: str, err: Exception) -> BadInput:
    compressed = (file_format(path) or "").endswith((".gz", ".zst"))
    kind = "corrupt or truncated compressed data" if compressed else "cannot read"
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


def _fields(obj: object, text_field: str, metadata: bool | list[str], on_bad: OnBad, where: str) -> Doc | None:
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


def _jsonl_docs(path: Path, fmt: str, text_field: str, on_bad: OnBad, metadata: bool | list[str]) -> Iterator[Doc]:
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


def _json_array_docs(path: Path, fmt: str, text_field: str, on_bad: OnBad, metadata: bool | list[str]) -> Iterator[Doc]:
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


def _table_docs(path: Path, fmt: str, text_field: str, metadata: bool | list[str]) -> Iterator[Doc]:
    """Rows of a Parquet or Arrow IPC (file or stream) table, one batch in memory at a time."""
    batches: Iterator[pa.RecordBatch]
    reader: pa.ipc.RecordBatchFileReader | pa.ipc.RecordBatchStreamReader
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


def _table_columns(path: Path, schema: pa.Schema, text_field: str, metadata: bool | list[str]) -> list[str]:
    if text_field not in schema.names:
        raise BadInput(path, "file", f"no column {text_field!r} (columns: {', '.join(schema.names)})")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise BadInput(path, "file", f"column {text_field!r} is {kind}, not a string")
    others = [n for n in schema.names if n != text_field and (metadata is True or (metadata and n in metadata))]
    return [text_field] + others


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets (a hub name or a local folder)


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
            raise SourceError(
                f"{source.hf}: row {index}: field {source.text_field!r} is {type(text).__name__}, not a string"
            )
        meta = None
        if source.metadata:
            meta = {
                k: v
                for k, v in row.items()
                if k != source.text_field and (source.metadata is True or k in source.metadata)
            } or None
        yield Doc(index, [text or ""], meta)
