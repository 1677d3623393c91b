"""Text shards: Parquet files with at least `id`, `text`, `source` (string columns).

Every stage that produces documents writes them under `<artifact>/shards/part-NNNNN.parquet`
with `ShardWriter`, and the next stage reads them back with `read_shard` / `list_shards`.
Extra columns (a filter's `rule`, `value`, `threshold`, ...) are kept as they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

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


def iter_records(folder: Path, columns: list[str] | None = None) -> Iterator[dict]:
    """Every record of every shard in a folder, as dicts, one shard in memory at a time."""
    for path in list_shards(folder):
        yield from read_shard(path, columns=columns).to_pylist()


class ShardWriter:
    """Appends records to `folder/part-NNNNN.parquet`, starting a new shard past `max_chars`.

    Use as a context manager; `close()` flushes the last shard. A writer with no records
    writes no file, so an empty output is an empty folder.
    """

    def __init__(self, folder: Path, schema: pa.Schema = TEXT_SCHEMA, max_chars: int = DEFAULT_SHARD_CHARS,
                 prefix: str = "part"):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.max_chars = max_chars
        self.prefix = prefix
        self.paths: list[Path] = []
        self.rows = 0
        self._buffer: list[dict] = []
        self._chars = 0

    def write(self, record: dict) -> None:
        self._buffer.append(record)
        self._chars += len(record.get("text") or "")
        self.rows += 1
        if self._chars >= self.max_chars:
            self._flush()

    def write_many(self, records: Iterable[dict]) -> None:
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

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # On an error the half-written folder is thrown away by the store with the rest of the
        # temporary artifact, so there is nothing to flush.
        if exc_type is None:
            self.close()
