"""What the download tests share: small input files of every format, and the stage run on them."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ember.storage.shards import iter_records
from ember.tasks import download
from ember.tasks.download import DownloadConfig
from helpers import run_stage_in


def run_download(tmp_path: Path, sources: list[dict], **kwargs) -> tuple[list[dict], dict]:
    """The stage's records and metrics, its artifact in `tmp_path/download`."""
    out, metrics = run_stage_in(tmp_path, download.STAGE, DownloadConfig(sources=sources, **kwargs))
    return list(iter_records(out / "shards")), metrics


PROSE = "It was a bright cold day in April, and the clocks were striking thirteen."


def write_file(folder: Path, name: str, texts: list[str], field: str = "text") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if name.endswith((".txt", ".md")):
        path.write_text(texts[0], encoding="utf-8")
    elif name.endswith(".jsonl"):
        path.write_text("".join(json.dumps({field: t, "other": 1}) + "\n" for t in texts), encoding="utf-8")
    elif name.endswith(".jsonl.gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.writelines(json.dumps({field: t}) + "\n" for t in texts)
    elif name.endswith(".jsonl.zst"):
        import zstandard

        data = "".join(json.dumps({field: t}) + "\n" for t in texts).encode()
        path.write_bytes(zstandard.ZstdCompressor().compress(data))
    elif name.endswith(".json"):
        path.write_text(json.dumps([{field: t, "i": i} for i, t in enumerate(texts)], indent=1), encoding="utf-8")
    elif name.endswith(".parquet"):
        pq.write_table(pa.table({field: texts, "n": list(range(len(texts)))}), path)
    elif name.endswith((".arrow", ".feather")):
        table = pa.table({"n": list(range(len(texts))), field: texts})
        with pa.OSFile(str(path), "wb") as sink:
            new = pa.ipc.new_stream if "stream" in name else pa.ipc.new_file
            with new(sink, table.schema) as writer:
                writer.write_table(table, max_chunksize=2)
    return path


def write_folder(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder
