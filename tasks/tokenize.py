"""tokenize: text shards -> flat token streams for the trainer (Arrow IPC, memory-mapped; storage/tokens.py).

Each document is encoded (no special tokens added by the tokenizer) and followed by EOS (id 2),
then goes to train or val by a hash of its id, so the split survives reruns, reordering and
added documents. Each text shard is tokenized on its own (a unit of work that a crash does not
lose: finished shards wait in the work folder and a rerun reuses them) into
`part-<shard>-<k>.arrow` files of each split, holding ONE record batch
with one `tokens` column (uint16 while the vocabulary fits), so the trainer gets a zero-copy
numpy view with `pa.memory_map` + `pa.ipc.open_file(...).get_batch(0).column(0).to_numpy()`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from functools import partial
from itertools import chain
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import numpy.typing as npt
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field
from tokenizers import Tokenizer

from ember.model.tokenizer import BOS_ID, EOS_ID, PAD_ID, TOKENIZER_JSON, load_tokenizer
from ember.storage.shards import document_ids, list_shards, read_shard
from ember.storage.store import file_sha256
from ember.storage.tokens import META, SPLITS, TokenShardWriter, token_dtype
from ember.tasks.stage import Stage, StageContext

log = logging.getLogger("ember.tokenize")


class SplitStats(TypedDict):
    """What one shard gave a split: its documents, their UTF-8 bytes, tokens (EOS included), files."""

    docs: int
    bytes: int
    tokens: int
    files: list[str]


class TokenizeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    val_fraction: float = Field(
        0.05, gt=0.0, lt=0.5, description="Share of documents (by id hash) held out for validation."
    )
    batch_size: int = Field(1000, ge=1, description="Documents per `encode_batch` call (parallel over all cores).")
    shard_tokens: int = Field(50_000_000, ge=1, description="A part file is closed once it holds this many tokens.")


def split_fraction(doc_id: str) -> float:
    """The contract's split rule: a document is in val iff this is < val_fraction."""
    return int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) / 2**32


def _val_masks(shards: list[Path], val_fraction: float) -> list[npt.NDArray[np.bool_]]:
    """Per shard, which documents go to val. Reads only the `id` column."""
    fractions = []
    for path in shards:
        ids = document_ids(read_shard(path, columns=["id"]), path)
        fractions.append(np.fromiter((split_fraction(i) for i in ids), dtype=np.float64, count=len(ids)))
    masks = [f < val_fraction for f in fractions]
    n_docs, n_val = sum(len(m) for m in masks), sum(int(m.sum()) for m in masks)
    if n_docs >= 2 and n_val in (0, n_docs):
        # A tiny input can leave one split empty, and the trainer needs both. Move the single
        # document whose hash is closest to the boundary (smallest fraction into val, largest
        # into train): deterministic and independent of the order of documents and shards.
        flat = np.concatenate(fractions)
        pick = int(flat.argmin() if n_val == 0 else flat.argmax())
        for mask in masks:
            if pick < len(mask):
                mask[pick] = not mask[pick]
                break
            pick -= len(mask)
    return masks


def tokenize_shard(
    path: Path,
    is_val: npt.NDArray[np.bool_],
    tokenizer: Tokenizer,
    dtype: np.dtype[np.unsignedinteger[Any]],
    cfg: TokenizeConfig,
    out: Path,
) -> dict[str, SplitStats]:
    """One text shard to token files under `out/train` and `out/val`; returns its counts.

    Shards are independent: a shard's files depend on that shard alone (and the split mask,
    which depends only on document ids), so shards can run anywhere, in any order.
    """
    writers = {split: TokenShardWriter(out / split, cfg.shard_tokens) for split in SPLITS}
    counts = {split: {"docs": 0, "bytes": 0} for split in SPLITS}
    table = read_shard(path, columns=["text"])
    doc_bytes = pc.fill_null(pc.binary_length(table["text"]), 0).to_numpy()
    texts = [t or "" for t in table["text"].to_pylist()]
    for start in range(0, len(texts), cfg.batch_size):
        end = min(start + cfg.batch_size, len(texts))
        tokens, lengths = _encode(tokenizer, texts[start:end], dtype)
        # Each document's tokens plus its EOS go to its split; np.repeat turns the per
        # document choice into a per token mask.
        token_is_val = np.repeat(is_val[start:end], lengths)
        writers["train"].add(tokens[~token_is_val])
        writers["val"].add(tokens[token_is_val])
        for split, docs in (("train", ~is_val[start:end]), ("val", is_val[start:end])):
            counts[split]["docs"] += int(docs.sum())
            counts[split]["bytes"] += int(doc_bytes[start:end][docs].sum())
    for split in SPLITS:
        writers[split].flush()
    return {
        split: SplitStats(
            docs=counts[split]["docs"],
            bytes=counts[split]["bytes"],
            tokens=writers[split].tokens,
            files=[p.name for p in writers[split].paths],
        )
        for split in SPLITS
    }


def tokenize_unit(
    tokenizer_dir: str, cfg: TokenizeConfig, work: str, masks: dict[str, npt.NDArray[np.bool_]], shard: str
) -> dict[str, Any]:
    """One shard as a unit of `ctx.map`: plain arguments, so it can run in another process.

    Its token files land in `work/shard-<name>-<identity>/`, named after what they were made from
    (the shard's and tokenizer's bytes, the split mask, the config) and completed by renaming a
    temporary folder, so a rerun after a crash reuses finished shards and redoes only the rest.
    """
    path, tokenizer_path = Path(shard), Path(tokenizer_dir) / TOKENIZER_JSON
    is_val = masks[path.name]
    identity = hashlib.sha256(
        json.dumps(
            [file_sha256(path), file_sha256(tokenizer_path), np.packbits(is_val).tobytes().hex(), cfg.model_dump()]
        ).encode()
    ).hexdigest()[:16]
    done = Path(work) / f"shard-{path.stem}-{identity}"
    if (done / "stats.json").is_file():
        return {**json.loads((done / "stats.json").read_text()), "reused": True, "folder": str(done)}
    tokenizer = load_tokenizer(tokenizer_dir)
    dtype = token_dtype(tokenizer.get_vocab_size(with_added_tokens=True))
    tmp = Path(work) / f".tmp-shard-{path.stem}-{identity}"
    shutil.rmtree(tmp, ignore_errors=True)
    stats = tokenize_shard(path, is_val, tokenizer, dtype, cfg, tmp)
    (tmp / "stats.json").write_text(json.dumps(stats))  # the completion marker, written last
    os.rename(tmp, done)
    log.info("tokenized %s: %d documents", path.name, len(is_val))
    return {**stats, "reused": False, "folder": str(done)}


def run(cfg: TokenizeConfig, ctx: StageContext) -> dict[str, Any]:
    started = time.monotonic()
    tokenizer = load_tokenizer(ctx.inputs["train_tokenizer"])
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab_size)
    shard_dir = ctx.inputs["dedup"] / "shards"
    shards = list_shards(shard_dir)
    masks = _val_masks(shards, cfg.val_fraction)
    total_docs = sum(len(m) for m in masks)
    if total_docs == 0:
        raise ValueError(f"{shard_dir}: no documents to tokenize")
    if total_docs == 1:
        ctx.log.warning("%s: a single document: it goes to train and val stays empty", shard_dir)

    # Finished shards are kept in the work folder (which outlives a crash) under a name that
    # says what they were made from; a rerun after a crash reuses them and redoes the rest.
    unit = partial(
        tokenize_unit,
        str(ctx.inputs["train_tokenizer"]),
        cfg,
        str(ctx.work),
        {path.name: mask for path, mask in zip(shards, masks, strict=True)},
    )
    results = ctx.map(unit, [str(path) for path in shards], name="tokenize-shard")

    # Gather: shard i's files become part-<i>-<k>.arrow of each split, in shard order.
    totals = {split: {"docs": 0, "bytes": 0, "tokens": 0, "files": 0} for split in SPLITS}
    for index, stats in enumerate(results):
        for split in SPLITS:
            (ctx.out / split).mkdir(parents=True, exist_ok=True)
            for k, name in enumerate(stats[split]["files"]):
                os.link(Path(stats["folder"]) / split / name, ctx.out / split / f"part-{index:05d}-{k:03d}.arrow")
            for field in ("docs", "bytes", "tokens"):
                totals[split][field] += stats[split][field]
            totals[split]["files"] += len(stats[split]["files"])
    reused = sum(1 for stats in results if stats["reused"])
    if reused:
        ctx.log.info("reused %d of %d tokenized shards from an interrupted run", reused, len(results))

    meta: dict[str, Any] = {
        "vocab_size": vocab_size,
        "dtype": dtype.name,
        "eos_id": EOS_ID,
        "bos_id": BOS_ID,
        "pad_id": PAD_ID,
        # Tokens count every id in the files, EOS included: that is what the loss is averaged over.
        **{f"{split}_tokens": totals[split]["tokens"] for split in SPLITS},
        **{f"{split}_bytes": totals[split]["bytes"] for split in SPLITS},
        **{f"{split}_docs": totals[split]["docs"] for split in SPLITS},
    }
    (ctx.out / META).write_text(json.dumps(meta, indent=2) + "\n")

    seconds = time.monotonic() - started
    tokens = meta["train_tokens"] + meta["val_tokens"]
    n_bytes = meta["train_bytes"] + meta["val_bytes"]
    ctx.report.table(
        "tokenize-splits",
        [
            {
                "split": split,
                "docs": totals[split]["docs"],
                "tokens": totals[split]["tokens"],
                "bytes": totals[split]["bytes"],
                "bytes_per_token": round(totals[split]["bytes"] / max(totals[split]["tokens"], 1), 3),
                "files": totals[split]["files"],
            }
            for split in SPLITS
        ],
        "Token shards per split (tokens include one EOS per document)",
    )
    return {
        "tokens": tokens,
        "train_tokens": meta["train_tokens"],
        "val_tokens": meta["val_tokens"],
        "docs": total_docs,
        "val_docs": meta["val_docs"],
        "shards": len(shards),
        "shards_reused": reused,
        "bytes_per_token": round(n_bytes / max(tokens, 1), 3),
        "dtype": dtype.name,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / max(seconds, 1e-9)),
    }


def _encode(
    tokenizer: Tokenizer, texts: list[str], dtype: np.dtype[np.unsignedinteger[Any]]
) -> tuple[npt.NDArray[np.unsignedinteger[Any]], npt.NDArray[np.int64]]:
    """The batch as one flat array with EOS after each document, and each document's length (EOS included)."""
    # encode_batch_fast (tokenizers >= 0.21) skips the offsets we never read; same ids, less work.
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    ids = [e.ids for e in encode(texts, add_special_tokens=False)]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    return np.insert(flat, np.cumsum(lengths), EOS_ID), lengths + 1


STAGE = Stage(name="tokenize", version=2, run=run, inputs=("dedup", "train_tokenizer"))
