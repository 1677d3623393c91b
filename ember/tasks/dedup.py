"""dedup: kept shards -> unique shards + clusters.jsonl (exact, then MinHash LSH near-duplicates).

Documents are visited in shard order and the first of each cluster is kept. A document is an
exact duplicate when its text matches an earlier one after lowercasing and collapsing
whitespace. Otherwise its MinHash signature (datasketch) is looked up in an LSH index of the
documents kept so far; a candidate counts as a duplicate when the Jaccard similarity of their
shingle sets reaches `threshold`. Only kept documents enter the index, so every removed
document is similar to the kept one it is listed under (no chains A~B~C with A far from C).

Shingles: `ngram` consecutive words (lowercased, punctuation dropped, so quote style and line
wrapping do not matter), or `char_ngram` consecutive characters for CJK-heavy text, which has
no spaces between words.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from datasketch import MinHash, MinHashLSH
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ember.storage.shards import ShardWriter, input_shards, read_shard
from ember.tasks.stage import Stage, StageContext


class DedupConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    exact: bool = Field(True,
                        description="remove exact duplicates (same text after lowercasing and collapsing whitespace)")
    minhash: bool = Field(True, description="remove near-duplicates with MinHash LSH")
    num_perm: int = Field(112, ge=8, le=1024, description="MinHash permutations (signature length)")
    # 14 bands x 8 rows: a pair at Jaccard 0.8 becomes a candidate with probability 0.92, at 0.9
    # with 1.00 (datatrove's setting; an "optimal" 9x13 misses 60% of the pairs at 0.8).
    bands: int = Field(14, ge=1, description="LSH bands; bands * rows <= num_perm")
    rows: int = Field(8, ge=1, description="signature rows per band")
    threshold: float = Field(0.8, gt=0, le=1,
                             description="a candidate is a duplicate at this Jaccard similarity or more")
    verify: Literal["exact", "estimate"] = Field(
        "exact",
        description="exact: Jaccard of the shingle sets (kept docs' sets stay in memory); estimate: from signatures")
    ngram: int = Field(5, ge=1, description="words per shingle")
    char_ngram: int = Field(5, ge=1, description="characters per shingle for CJK-heavy text")
    cjk_fraction: float = Field(0.3, ge=0, le=1,
                                description="above this share of CJK characters, shingle characters instead of words")
    seed: int = Field(1, description="seed of the MinHash permutations")
    batch_size: int = Field(256, ge=1, description="documents hashed per MinHash.bulk call")
    report_clusters: int = Field(10, ge=0, description="largest clusters listed in the report")

    @model_validator(mode="after")
    def _bands_fit(self) -> "DedupConfig":
        if self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands * rows = {self.bands * self.rows} exceeds num_perm = {self.num_perm}")
        return self


CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0002fa1f]")
WORD = re.compile(r"\w+")
_MUL = np.uint64(0x9E3779B97F4A7C15)
_MIX = np.uint64(0xBF58476D1CE4E5B9)


def exact_key(text: str) -> bytes:
    return hashlib.blake2b(" ".join(text.lower().split()).encode("utf-8"), digest_size=16).digest()


def is_cjk(text: str, fraction: float) -> bool:
    if text.isascii():
        return False
    chars = len(text) - sum(map(text.count, (" ", "\n", "\t", "\r", "\u3000")))
    return chars > 0 and len(CJK.findall(text)) / chars > fraction


class Shingler:
    """Text -> sorted unique 64-bit shingle hashes, the same on every run and machine."""

    def __init__(self, cfg: DedupConfig):
        self.cfg = cfg
        self._word_hashes: dict[str, int] = {}

    def _word_hashes_of(self, words: list[str]) -> np.ndarray:
        memo = self._word_hashes
        missing = set(words).difference(memo)  # set operations run in C; most words are known
        if missing:
            if len(memo) + len(missing) > 2_000_000:  # a memo, not an index: bound its memory
                memo.clear()
                missing = set(words)
            for word in missing:
                memo[word] = int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")
        return np.fromiter(map(memo.__getitem__, words), dtype=np.uint64, count=len(words))

    def __call__(self, text: str) -> np.ndarray:
        if is_cjk(text, self.cfg.cjk_fraction):
            n = self.cfg.char_ngram
            chars = "".join(WORD.findall(text))  # CJK characters are \w; spaces and punctuation go
            ids = np.frombuffer(chars.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        else:
            n = self.cfg.ngram
            ids = self._word_hashes_of(WORD.findall(text.lower()))
        if len(ids) == 0:
            return ids
        n = min(n, len(ids))  # a text shorter than one shingle is one shingle
        keys = ids[: len(ids) - n + 1].copy()
        for k in range(1, n):
            keys = keys * _MUL + ids[k: len(ids) - n + 1 + k]  # wraps mod 2^64, on purpose
        # splitmix64's finalizer: neighbouring keys must not share their high bits.
        keys ^= keys >> np.uint64(31)
        keys *= _MIX
        keys ^= keys >> np.uint64(29)
        return np.unique(keys)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity of two sorted unique arrays."""
    inter = len(np.intersect1d(a, b, assume_unique=True))
    union = len(a) + len(b) - inter
    return inter / union if union else 1.0


def _identity(value: int) -> int:
    return value


@dataclass
class Cluster:
    kept: str
    kind: str
    removed: list[str] = field(default_factory=list)
    similarity: float = 1.0


def run(cfg: DedupConfig, ctx: StageContext) -> dict:
    started = time.monotonic()
    shards, total = input_shards(ctx.inputs["filter"], "filter")
    shingler = Shingler(cfg)
    lsh = MinHashLSH(num_perm=cfg.num_perm, params=(cfg.bands, cfg.rows))
    kept_ids: list[str] = []  # LSH key -> id of a kept document
    kept_sets: list[np.ndarray] = []  # LSH key -> shingle set (verify="exact")
    kept_sigs: list[MinHash] = []  # LSH key -> signature (verify="estimate")
    # exact key -> (kind, id of the kept document, similarity) of the first document with that text
    seen: dict[bytes, tuple[str, str, float]] = {}
    clusters: dict[tuple[str, str], Cluster] = {}
    docs = exact_dups = near_dups = candidates = kept = chars_in = 0

    def remove(kind: str, kept_id: str, doc_id: str, similarity: float) -> None:
        cluster = clusters.setdefault((kept_id, kind), Cluster(kept_id, kind))
        cluster.removed.append(doc_id)
        cluster.similarity = min(cluster.similarity, similarity)

    with ShardWriter(ctx.out / "shards") as writer:
        for shard in shards:
            records = read_shard(shard, columns=["id", "text", "source"]).to_pylist()
            for start in range(0, len(records), cfg.batch_size):
                batch = records[start: start + cfg.batch_size]
                shingles = [shingler(r["text"] or "") for r in batch] if cfg.minhash else [None] * len(batch)
                # datasketch's default scheme permutes 32-bit values: give it the high half.
                signatures = (MinHash.bulk([(s >> np.uint64(32)).tolist() for s in shingles], num_perm=cfg.num_perm,
                                           seed=cfg.seed, hashfunc=_identity) if cfg.minhash else [None] * len(batch))
                for record, shingle_set, signature in zip(batch, shingles, signatures):
                    docs += 1
                    text = record["text"] or ""
                    chars_in += len(text)
                    key = exact_key(text) if cfg.exact else None
                    if key is not None and key in seen:
                        kind, kept_id, similarity = seen[key]
                        exact_dups += kind == "exact"
                        near_dups += kind == "minhash"
                        remove(kind, kept_id, record["id"], similarity)
                        continue
                    match = None
                    if cfg.minhash and len(shingle_set):
                        best = (0.0, -1)
                        for candidate in lsh.query(signature):
                            candidates += 1
                            similarity = (jaccard(shingle_set, kept_sets[candidate]) if cfg.verify == "exact"
                                          else signature.jaccard(kept_sigs[candidate]))
                            best = max(best, (similarity, -candidate))  # ties: the earliest kept doc
                        if best[0] >= cfg.threshold:
                            match = (kept_ids[-best[1]], round(best[0], 4))
                    if match is not None:
                        near_dups += 1
                        remove("minhash", match[0], record["id"], match[1])
                        if key is not None:
                            seen[key] = ("minhash", match[0], match[1])
                        continue
                    if key is not None:
                        seen[key] = ("exact", record["id"], 1.0)
                    if cfg.minhash and len(shingle_set):
                        lsh.insert(len(kept_ids), signature, check_duplication=False)
                        kept_ids.append(record["id"])
                        if cfg.verify == "exact":
                            kept_sets.append(shingle_set)
                        else:
                            kept_sigs.append(signature)
                    kept += 1
                    writer.write(record)
                ctx.report.progress(docs, total, "dedup")

    ordered = sorted(clusters.values(), key=lambda c: -len(c.removed))
    with open(ctx.out / "clusters.jsonl", "w", encoding="utf-8") as f:
        for cluster in clusters.values():
            f.write(json.dumps({"kept": cluster.kept, "removed": cluster.removed, "kind": cluster.kind,
                                "similarity": cluster.similarity}, ensure_ascii=False) + "\n")
    rows = [{"kept": c.kept, "kind": c.kind, "removed": len(c.removed), "similarity": c.similarity,
             "examples": ", ".join(c.removed[:3])} for c in ordered[: cfg.report_clusters]]
    ctx.report.table("dedup-clusters", rows or [{"kept": "(no duplicates)", "removed": 0}],
                     f"Largest duplicate clusters ({exact_dups} exact and {near_dups} near duplicates "
                     f"of {docs} documents)")
    seconds = time.monotonic() - started
    return {
        "docs": docs,
        "exact_dups": exact_dups,
        "near_dups": near_dups,
        "kept": kept,
        "clusters": len(clusters),
        "candidates_checked": candidates,
        "seconds": round(seconds, 2),
        "mb_per_s": round(chars_in / 1e6 / seconds, 2) if seconds > 0 else None,
    }


STAGE = Stage(name="dedup", version=1, run=run, unkeyed=("batch_size", "report_clusters"))
