"""Token shards: what the tokenize stage writes and the trainer, evaluate and publish read.

A tokenize artifact holds `train/` and `val/`, each of Arrow IPC files `part-*.arrow` with ONE
record batch of one `tokens` column (uint16 while the vocabulary fits, else uint32): the
documents' ids one after the other, each followed by EOS. Readers memory-map them and get a
zero-copy numpy view. `meta.json` beside them holds the vocabulary size, the dtype, the special
ids and, per split, the tokens, documents and UTF-8 bytes of the text (for bits per byte).

numpy only: the trainer turns windows into tensors itself.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

META = "meta.json"
SPLITS = ("train", "val")

# Token ids as shards hold them: uint16 while the vocabulary fits, else uint32.
TokenArray = npt.NDArray[np.unsignedinteger[Any]]


def token_dtype(vocab_size: int) -> np.dtype[np.unsignedinteger[Any]]:
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def write_token_file(path: Path, tokens: TokenArray) -> None:
    """One Arrow IPC file, one record batch, one `tokens` column."""
    batch = pa.record_batch([pa.array(tokens)], names=["tokens"])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, batch.schema) as writer:
        writer.write_batch(batch)


def read_token_file(path: Path) -> TokenArray:
    """A zero-copy view of a token file (valid while the memory map lives, i.e. while referenced)."""
    reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
    return reader.get_batch(0).column(0).to_numpy()


class TokenShardWriter:
    """Collects token arrays of one split and writes a part file once it holds `shard_tokens`."""

    def __init__(self, folder: Path, shard_tokens: int):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shard_tokens = shard_tokens
        self.paths: list[Path] = []
        self.tokens = 0
        self._chunks: list[TokenArray] = []
        self._buffered = 0

    def add(self, tokens: TokenArray) -> None:
        if len(tokens):
            self._chunks.append(tokens)
            self._buffered += len(tokens)
            self.tokens += len(tokens)
        if self._buffered >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self._chunks:
            return
        path = self.folder / f"part-{len(self.paths):05d}.arrow"
        write_token_file(path, np.concatenate(self._chunks))
        self.paths.append(path)
        self._chunks, self._buffered = [], 0


def read_meta(tokens_dir: Path) -> dict[str, Any]:
    path = Path(tokens_dir) / META
    try:
        meta: dict[str, Any] = json.loads(path.read_text())
        return meta
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; is {tokens_dir} a tokenize artifact?") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def bits_per_byte(loss: float | None, meta: dict[str, Any], split: str = "val") -> float | None:
    """Nats per token -> bits per UTF-8 byte of the split's text."""
    tokens: int = meta.get(f"{split}_tokens", 0)
    n_bytes: int = meta.get(f"{split}_bytes", 0)
    if loss is None or not tokens or not n_bytes:
        return None
    return loss / math.log(2) * tokens / n_bytes


class TokenStream:
    """The token shards of one split, memory-mapped, seen as windows of seq_len + 1 tokens.

    A window never crosses a shard boundary; windows are numbered across shards so that a
    window index picks one position uniformly over the whole split.
    """

    def __init__(self, folder: Path, dtype: str | None = None):
        self.folder = Path(folder)
        self.paths = sorted(self.folder.glob("*.arrow"))
        self.parts = [self._map(path, dtype) for path in self.paths]

    @staticmethod
    def _map(path: Path, dtype: str | None) -> TokenArray:
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
        if reader.num_record_batches == 0:  # an empty split written as a table without rows
            return np.empty(0, dtype=reader.schema.field(0).type.to_pandas_dtype())
        if reader.num_record_batches != 1:
            raise ValueError(f"{path}: {reader.num_record_batches} record batches; a token shard has exactly one")
        column = reader.get_batch(0).column(0)
        if dtype is not None and column.type != pa.from_numpy_dtype(np.dtype(dtype)):
            raise ValueError(f"{path}: tokens are {column.type}, meta.json says {dtype}")
        return column.to_numpy(zero_copy_only=True)  # a view of the mapped file

    @property
    def num_tokens(self) -> int:
        return sum(len(p) for p in self.parts)

    def num_windows(self, seq_len: int) -> int:
        return sum(max(0, len(p) - seq_len) for p in self.parts)

    def windows(self, index: npt.NDArray[np.integer[Any]], seq_len: int) -> npt.NDArray[np.int64]:
        """Windows by global index: (n, seq_len + 1) int64."""
        counts = np.array([max(0, len(p) - seq_len) for p in self.parts])
        ends = np.cumsum(counts)
        part_of = np.searchsorted(ends, index, side="right")
        rows = [
            self.parts[p][s : s + seq_len + 1]
            for p, s in zip(part_of, index - (ends[part_of] - counts[part_of]), strict=True)
        ]
        return np.stack(rows).astype(np.int64)

    def random_index(self, n: int, seq_len: int, seed: int, step: int) -> npt.NDArray[np.int64]:
        """The window indices of step `step`'s batch: a function of (seed, step) alone."""
        return np.random.default_rng([seed, step]).integers(0, self.num_windows(seq_len), size=n)

    def fixed_windows(self, n: int, seq_len: int) -> npt.NDArray[np.int64] | None:
        """n windows evenly spaced over the split, the same every time; None if it is too short."""
        total = self.num_windows(seq_len)
        if total == 0:
            return None
        return self.windows(np.linspace(0, total - 1, num=n).round().astype(np.int64), seq_len)
