"""Text shards: Parquet files with at least `id`, `text`, `source` (string columns).

Every stage that produces documents writes them under `<artifact>/shards/`: `ShardWriter` cuts
a stream of documents into `part-NNNNN.parquet` files of about `max_chars` characters, and
`ShardFileWriter` writes one named file (a shard-parallel stage's output for one input shard),
a batch at a time. The next stage reads them back with `list_shards`, `read_shard`, or in
bounded batches with `iter_batches`. Extra columns (a filter's `rule`, `value`, ...) are kept.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import pyarrow as pa
import pyarrow.parquet as pq

TEXT_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("source", pa.string())])

# About 16 M characters per shard: a stage holds one shard in memory at a time (a few hundred MB
# of Python strings at most), and the sample corpus (39 M characters) already gives three
# independent units of work, which is what a crashed stage resumes by.
DEFAULT_SHARD_CHARS = 16_000_000


def list_shards(folder: Path, suffix: str = ".parquet") -> list[Path]:
    """The shard files of a folder in a stable order (names are zero-padded)."""
    folder = Path(folder)
    return sorted(p for p in folder.glob(f"*{suffix}") if p.is_file()) if folder.is_dir() else []


def input_shards(artifact: Path, stage: str) -> tuple[list[Path], int]:
    """The text shards of an upstream artifact and their total row count (from Parquet footers)."""
    folder = Path(artifact) / "shards"
    if not folder.is_dir():
        raise ValueError(f"{folder}: no shards folder (is this a {stage} artifact?)")
    paths = list_shards(folder)
    return paths, sum(pq.ParquetFile(path).metadata.num_rows for path in paths)


def read_shard(path: Path, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(path, columns=columns)


def document_ids(table: pa.Table, path: Path) -> list[str]:
    """The `id` column of a shard's table, read from `path`; a document without one is an error
    that names the shard (the split and the tokenizer's sample are decided by the id)."""
    column = table["id"]
    if column.null_count:
        raise ValueError(f"{path}: a document has no id")
    return cast(list[str], column.to_pylist())  # the stubs allow None; null_count says there is none


def iter_batches(
    path: Path, columns: list[str] | None = None, batch_chars: int = 2_000_000, start: int = 0, stop: int | None = None
) -> Iterator[pa.RecordBatch]:
    """Rows start..stop of a shard in record batches of about `batch_chars` characters (sized from
    the Parquet footer), so that a reader holds a few MB of text rather than the whole shard (a
    shard read at once costs about 3x its text in memory, as Python strings)."""
    shard = pq.ParquetFile(path)
    meta = shard.metadata
    stop = meta.num_rows if stop is None else stop
    size = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    rows = max(1, round(meta.num_rows * batch_chars / max(1, size)))
    at = 0
    for batch in shard.iter_batches(batch_size=rows, columns=columns):
        if at + batch.num_rows > start:
            yield batch.slice(max(0, start - at), stop - max(at, start))
        at += batch.num_rows
        if at >= stop:
            break


def read_rows(path: Path, columns: list[str] | None = None, start: int = 0, stop: int | None = None) -> pa.Table:
    """Rows start..stop of a shard as one table, read in batches (only those rows are kept)."""
    schema = pq.read_schema(path)
    if columns is not None:
        schema = pa.schema([schema.field(c) for c in columns])
    return pa.Table.from_batches(list(iter_batches(path, columns, start=start, stop=stop)), schema=schema)


def iter_records(folder: Path, columns: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """Every record of every shard in a folder, as dicts, one shard in memory at a time."""
    for path in list_shards(folder):
        yield from read_shard(path, columns=columns).to_pylist()


class ShardWriter:
    """Appends records to `folder/part-NNNNN.parquet`, starting a new shard past `max_chars`.

    Use as a context manager; `close()` flushes the last shard. A writer with no records
    writes no file, so an empty output is an empty folder.
    """

    def __init__(
        self, folder: Path, schema: pa.Schema = TEXT_SCHEMA, max_chars: int = DEFAULT_SHARD_CHARS, prefix: str = "part"
    ):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.max_chars = max_chars
        self.prefix = prefix
        self.paths: list[Path] = []
        self.rows = 0
        self._buffer: list[dict[str, Any]] = []
        self._chars = 0

    def write(self, record: dict[str, Any]) -> None:
        self._buffer.append(record)
        self._chars += len(record.get("text") or "")
        self.rows += 1
        if self._chars >= self.max_chars:
            self._flush()

    def write_many(self, records: Iterable[dict[str, Any]]) -> None:
        for record in records:
            self.write(record)

    def _flush(self) -> None:
        if not self._buffer:
            return
        path = self.folder / f"{self.prefix}-{len(self.paths):05d}.parquet"
        table = pa.Table.from_pylist(self._buffer, schema=self.schema)
        pq.write_table(table, path, compression="zstd")
        self.paths.append(path)
        self._buffer, self._chars = [], 0

    def close(self) -> None:
        self._flush()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # On an error the half-written folder is thrown away by the store with the rest of the
        # temporary artifact, so there is nothing to flush.
        if exc_type is None:
            self.close()


class ShardFileWriter:
    """One output file, written a batch at a time (`add` rows, then `flush`; or `write` a table).

    The file appears, renamed from `<name>.partial`, only when `close` is called, and not at all
    when it got no rows: a unit of work that crashed leaves nothing that looks finished.
    """

    def __init__(self, path: Path, schema: pa.Schema):
        self.path, self.schema = Path(path), schema
        self.count = 0  # rows written
        self._columns: dict[str, list[Any]] = {name: [] for name in schema.names}  # rows added, not yet written
        self._writer: pq.ParquetWriter | None = None
        self._tmp = self.path.with_name(self.path.name + ".partial")

    def add(self, row: dict[str, Any]) -> None:
        for name, column in self._columns.items():
            column.append(row[name])

    def write(self, data: pa.Table | pa.RecordBatch) -> None:
        if data.num_rows == 0:
            return
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(self._tmp, self.schema, compression="zstd")
        table = data if isinstance(data, pa.Table) else pa.Table.from_batches([data])
        self._writer.write_table(table.cast(self.schema) if table.schema != self.schema else table)
        self.count += data.num_rows

    def flush(self) -> None:
        if self._columns[self.schema.names[0]]:
            columns, self._columns = self._columns, {name: [] for name in self.schema.names}
            self.write(pa.Table.from_pydict(columns, schema=self.schema))

    def close(self) -> None:
        self.flush()
        if self._writer is not None:
            self._writer.close()
            self._tmp.replace(self.path)
