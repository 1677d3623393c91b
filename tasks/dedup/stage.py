"""dedup: kept shards -> unique shards + clusters.jsonl (exact, then MinHash LSH near-duplicates).

The stage runs in five steps; the heavy ones map over units (a shard, or a row range of one):

1. `ctx.map(signatures)`: per unit, for every document its length, a 128-bit hash of its
   normalized text (lowercased, whitespace collapsed) and the LSH band keys of its MinHash
   signature, written to `ctx.work` as .npy files. Text is not kept, so the memory of the
   global step grows with the number of documents, not with the size of the text (about
   80 bytes per document, logged and returned as `index_bytes_per_doc`; the shingle sets of
   candidate documents come on top, and only while they are verified).
2. Exact duplicates: documents with the same normalized-text hash; one is kept per group.
3. LSH over the groups' representatives, one band at a time: documents that share a band key
   are candidate pairs.
4. `ctx.map(candidate_shingles)` (in-process when there are few): the units re-read only the
   candidate documents and write their shingle sets; every candidate pair is verified by the
   exact Jaccard similarity of the two sets, so a false candidate never removes a document.
   Verified pairs are joined by union-find into clusters.
5. Keep rule, per cluster: the first document in input order is kept (`keep: first`, as
   datatrove does: order sources by preference) or the longest, ties by input order
   (`keep: longest`). Every member within `threshold` of it is dropped for it; the members
   left (a chain A~B~C can hold A and C that are not alike) repeat the rule among themselves.
   So every dropped document is at least `threshold` similar to the document listed as its
   `kept_id`. `ctx.map(write_kept)` writes each unit's kept documents.

Shingling and MinHash are in hashing.py. The output depends only on the input and the keyed
config: units are cut by rows from the Parquet footers, every decision is taken in the main
process on arrays in input order, and each unit writes its own output shard, so any worker
count or order gives the same bytes.
"""

from __future__ import annotations

import json
import os
import time
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import Any, TypedDict, cast

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ember.storage.shards import ShardFileWriter, input_shards, iter_batches, read_rows
from ember.tasks.dedup.config import DedupConfig
from ember.tasks.dedup.hashing import analyze, band_keys, fill_empty, jaccard, minhash
from ember.tasks.stage import Metrics, Stage, StageContext, sequential_map

# ---------------------------------------------------------------------------------------------
# Units of work (module-level, plain arguments: they may run in another process)


class _UnitRows(TypedDict):
    shard: str  # the input shard
    index: int  # its position among the input shards
    start: int  # its rows start..stop
    stop: int


class Unit(_UnitRows, total=False):
    """A unit of work: a row range of one shard (`plan_units`), then the paths in `ctx.work`
    that its steps write (`run`), its output shard, and (step 4) its candidate rows."""

    sig: str  # step 1: lengths, exact keys and which documents have band keys (.npz)
    bands: str  # step 1: band keys (.npy)
    sets: str  # step 4: the candidates' shingle sets (.npz)
    drop: str  # step 5: the rows to drop, counted from `start` (.npy)
    out: str  # step 5: the output shard
    rows: list[int]  # step 4: the candidate rows, counted from `start`
    base: int  # step 4: the global index of row `start`


def _read_texts(unit: Unit, rows: npt.NDArray[np.int64] | None = None) -> pa.StringArray:
    """The unit's texts (or some of its rows), streaming the shard in batches: a worker holds
    its own rows, not the whole shard (a shard read at once costs about 3x its text in RSS)."""
    # Arrow knows the column's type at run time only: `text` is a string column (TEXT_SCHEMA).
    return cast(pa.StringArray, _read_column(unit, "text", rows))


def _read_column(unit: Unit, name: str, rows: npt.NDArray[np.int64] | None = None) -> pa.Array[Any]:
    column = read_rows(Path(unit["shard"]), [name], unit["start"], unit["stop"]).column(0).combine_chunks()
    return column if rows is None else column.take(pa.array(rows, type=pa.int64()))


def _save(path: Path, **arrays: npt.NDArray[np.generic]) -> None:
    """Write an .npz so that a crash never leaves a half-written file under its final name."""
    tmp = path.with_name(path.name + ".tmp.npz")
    # numpy's stub matches `**arrays` against savez's keyword `allow_pickle: bool` (numpy 2.1+).
    np.savez(tmp, **arrays)  # type: ignore[arg-type]
    os.replace(tmp, path)


def _save_npy(path: Path, array: npt.NDArray[np.generic]) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


BATCH_DOCS = 256  # documents analyzed together in a unit (about 1 MB of text in 4,000-char chunks)


def signatures(unit: Unit, cfg: DedupConfig) -> dict[str, str]:
    """Step 1 for one unit: lengths, exact keys and band keys of its documents, into unit['sig'] and
    unit['bands'] (a .npy, so that the global step memory-maps it and reads one band at a time)."""
    path = Path(unit["sig"])
    if not path.exists():  # else a run that crashed after this unit already did it (bands first)
        texts = _read_texts(unit)
        lengths = pc.utf8_length(fill_empty(texts)).to_numpy().astype(np.int64)
        exact = np.zeros((len(texts), 2), dtype=np.uint64)
        bands = np.zeros((cfg.bands, len(texts)), dtype=np.uint64)
        has = np.zeros(len(texts), dtype=bool)
        for start in range(0, len(texts), BATCH_DOCS):  # the intermediates of a few MB of text at a time
            stop = min(start + BATCH_DOCS, len(texts))
            keys, sets = analyze(texts.slice(start, stop - start), cfg, sets=cfg.minhash)
            assert keys is not None  # analyze(keys=True)
            exact[start:stop] = keys
            if cfg.minhash:
                some = np.fromiter((len(s) > 0 for s in sets), dtype=bool, count=len(sets))
                has[start:stop] = some
                if some.any():
                    bands[:, np.flatnonzero(some) + start] = band_keys(minhash([s for s in sets if len(s)], cfg), cfg)
        _save_npy(Path(unit["bands"]), bands)
        _save(path, lengths=lengths, exact=exact, has=has)
    return {"sig": str(path)}


def candidate_shingles(unit: Unit, cfg: DedupConfig) -> dict[str, str]:
    """Step 4 for one unit: the shingle sets of its candidate documents (unit['rows']) into unit['sets']."""
    path = Path(unit["sets"])
    if not path.exists():
        rows = np.asarray(unit["rows"], dtype=np.int64)
        _, sets = analyze(_read_texts(unit, rows), cfg, keys=False)
        offsets = np.cumsum([0] + [len(s) for s in sets])
        _save(path, rows=rows, offsets=offsets, values=np.concatenate(sets) if sets else np.zeros(0, np.uint64))
    return {"sets": str(path)}


def write_kept(unit: Unit) -> dict[str, int]:
    """Step 5 for one unit: its rows minus the dropped ones (unit['drop']), every column kept."""
    drop = np.load(unit["drop"])
    out = ShardFileWriter(Path(unit["out"]), pq.read_schema(unit["shard"]))
    at = 0  # the batch's first row, counted from the unit's first
    for batch in iter_batches(Path(unit["shard"]), start=unit["start"], stop=unit["stop"]):
        keep = np.ones(batch.num_rows, dtype=bool)
        keep[drop[(drop >= at) & (drop < at + batch.num_rows)] - at] = False
        out.write(batch.filter(pa.array(keep)))
        at += batch.num_rows
    out.close()
    return {"kept": out.count}


# ---------------------------------------------------------------------------------------------
# The global steps (main process)


def plan_units(shards: list[Path], unit_chars: int) -> list[Unit]:
    """Row ranges of about `unit_chars` characters, from the Parquet footers (no text read)."""
    units: list[Unit] = []
    for s, shard in enumerate(shards):
        meta = pq.ParquetFile(shard).metadata
        rows = meta.num_rows
        if rows == 0:
            continue
        schema = meta.schema.to_arrow_schema()
        if "text" not in schema.names:
            raise ValueError(f"{shard}: no `text` column (is this a filter artifact?)")
        col = schema.get_field_index("text")
        size = sum(meta.row_group(g).column(col).total_uncompressed_size for g in range(meta.num_row_groups))
        parts = max(1, min(rows, round(size / unit_chars)))
        bounds = [rows * k // parts for k in range(parts + 1)]
        units += [{"shard": str(shard), "index": s, "start": a, "stop": b} for a, b in pairwise(bounds)]
    return units


# A dropped document: (doc, kept doc, kind "exact" or "near", jaccard, its cluster's first kept doc),
# documents by global index.
ClusterLine = tuple[int, int, str, float, int]


class UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = int(parent[x])
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def candidate_pairs(keys: npt.NDArray[np.uint64], docs: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Pairs (global index a < b) of `docs` sharing a key; a group of m gives all its pairs up to
    m = 32, beyond that a star on its first member plus the chain of neighbours (no m^2 blow-up)."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    change = np.flatnonzero(np.diff(sorted_keys)) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [len(keys)]])
    sizes = ends - starts
    pairs = [np.stack([docs[order[starts[sizes == 2]]], docs[order[starts[sizes == 2] + 1]]], axis=1)]
    for a, b in zip(starts[sizes > 2], ends[sizes > 2], strict=True):
        members = docs[order[a:b]]
        m = len(members)
        if m <= 32:
            i, j = np.triu_indices(m, 1)
        else:
            i = np.concatenate([np.zeros(m - 1, dtype=np.int64), np.arange(1, m - 1)])
            j = np.concatenate([np.arange(1, m), np.arange(2, m)])
        pairs.append(np.stack([members[i], members[j]], axis=1))
    return np.sort(np.concatenate(pairs).astype(np.int64), axis=1)


def run(cfg: DedupConfig, ctx: StageContext) -> Metrics:
    started = time.monotonic()
    shards, total = input_shards(ctx.inputs["filter"], "filter")
    units = plan_units(shards, cfg.unit_chars)
    ctx.work.mkdir(parents=True, exist_ok=True)
    for u in units:
        # Files of a crashed run are reused only for the same rows of the same shard file.
        stat = Path(u["shard"]).stat()
        name = f"{u['index']:05d}-{u['start']}-{u['stop']}-{stat.st_size}-{stat.st_mtime_ns}"
        u["sig"] = str(ctx.work / f"sig-{name}.npz")
        u["bands"] = str(ctx.work / f"bands-{name}.npy")
        u["sets"] = str(ctx.work / f"sets-{name}.npz")
        u["drop"] = str(ctx.work / f"drop-{name}.npy")
    ctx.log.info("dedup: %d documents in %d shards, %d units", total, len(shards), len(units))

    # Step 1: per unit, in parallel.
    ctx.map(partial(signatures, cfg=cfg), units, "dedup-signatures")
    loaded = [dict(np.load(u["sig"])) for u in units]
    offsets = np.cumsum([0] + [len(z["lengths"]) for z in loaded])
    n = int(offsets[-1])
    lengths = np.concatenate([z["lengths"] for z in loaded]) if n else np.zeros(0, np.int64)
    exact = np.concatenate([z["exact"] for z in loaded]) if n else np.zeros((0, 2), np.uint64)
    has = np.concatenate([z["has"] for z in loaded]) if n else np.zeros(0, bool)
    chars_in = int(lengths.sum())
    del loaded
    timings = {"signatures": time.monotonic() - started}
    ctx.report.progress(1, 4, "dedup: signatures")

    # The keep rule as a rank: lower is kept first.
    index = np.arange(n, dtype=np.int64)
    if cfg.keep == "first":
        rank = index
    else:
        rank = np.empty(n, dtype=np.int64)
        rank[np.lexsort((index, -lengths))] = index

    # Step 2: exact duplicates. rep[i]: the kept document of i's exact group.
    rep = index.copy()
    if cfg.exact and n:
        order = np.lexsort((rank, exact[:, 1], exact[:, 0]))
        same = np.all(exact[order[1:]] == exact[order[:-1]], axis=1)
        group_start = np.maximum.accumulate(np.where(np.concatenate([[True], ~same]), np.arange(n), 0))
        rep[order] = order[group_start]
    is_rep = rep == index

    # Step 3: LSH over the representatives, one band at a time (memory: a few arrays of n).
    active = np.flatnonzero(is_rep & has) if cfg.minhash else np.zeros(0, np.int64)
    pair_list: list[npt.NDArray[np.int64]] = []
    held = lengths.nbytes + exact.nbytes + has.nbytes + rep.nbytes + rank.nbytes + active.nbytes
    bytes_per_doc = held / n if n else 0.0
    if len(active) > 1:
        for band in range(cfg.bands):
            keys = np.concatenate([np.load(u["bands"], mmap_mode="r")[band] for u in units])[active]
            pair_list.append(candidate_pairs(keys, active))
            bytes_per_doc = max(bytes_per_doc, (held + keys.nbytes * 3 + n * 8) / n)  # keys, argsort, uf
            del keys
    pairs = np.unique(np.concatenate(pair_list), axis=0) if pair_list else np.zeros((0, 2), np.int64)
    timings["candidates"] = time.monotonic() - started - sum(timings.values())
    ctx.report.progress(2, 4, "dedup: candidates")

    # Step 4: verify candidates by the exact Jaccard of their shingle sets.
    cand_docs = np.unique(pairs)
    unit_of = np.searchsorted(offsets, cand_docs, side="right") - 1
    busy: list[Unit] = []
    for k, u in enumerate(units):
        rows = cand_docs[unit_of == k] - offsets[k]
        if len(rows):
            busy.append({**u, "rows": rows.tolist(), "base": int(offsets[k])})
    # A few hundred candidates are re-read faster here than a pool of workers starts.
    mapper = ctx.map if len(cand_docs) > 2000 else sequential_map
    mapper(partial(candidate_shingles, cfg=cfg), busy, "dedup-verify")
    sets: dict[int, npt.NDArray[np.uint64]] = {}
    for u in busy:
        z = np.load(u["sets"])
        base = u["base"]
        values, offs = z["values"], z["offsets"]
        for i, row in enumerate(z["rows"]):
            sets[int(base + row)] = values[offs[i] : offs[i + 1]]
    uf = UnionFind(n)
    verified = rejected = 0
    for a, b in pairs.tolist():
        if uf.find(a) == uf.find(b):
            continue  # already one cluster: the pair cannot change it
        if jaccard(sets[a], sets[b]) >= cfg.threshold:
            uf.union(a, b)
            verified += 1
        else:
            rejected += 1
    timings["verify"] = time.monotonic() - started - sum(timings.values())
    ctx.report.progress(3, 4, "dedup: verified")

    # Step 5: the keep rule in each cluster; near[i] = (kept doc, jaccard) of dropped representatives.
    clusters: dict[int, list[int]] = {}
    for doc in cand_docs.tolist():
        clusters.setdefault(uf.find(doc), []).append(doc)
    near: dict[int, tuple[int, float]] = {}
    cluster_of: dict[int, int] = {}  # representative -> its cluster's first kept document
    for members in clusters.values():
        if len(members) < 2:
            continue
        left = sorted(members, key=lambda d: rank[d])
        head = left[0]
        while left:
            keeper, rest = left[0], []
            cluster_of[keeper] = head
            for doc in left[1:]:
                similarity = jaccard(sets[keeper], sets[doc])
                if similarity >= cfg.threshold:
                    near[doc] = (keeper, similarity)
                    cluster_of[doc] = head
                else:
                    rest.append(doc)
            left = rest
    del sets

    # Every dropped document: exact duplicates point to the survivor of their representative.
    dropped = np.flatnonzero(~is_rep | np.isin(index, np.fromiter(near, dtype=np.int64, count=len(near))))
    lines: list[ClusterLine] = []
    for doc in dropped.tolist():
        r = int(rep[doc])
        if r in near:
            kept, similarity, kind = near[r][0], near[r][1], "near"
        else:
            kept, similarity, kind = r, 1.0, "exact"
        lines.append((doc, kept, kind, similarity, cluster_of.get(r, r)))
    needed = sorted({x for line in lines for x in (line[0], line[1], line[4])})
    ids = _ids_of(units, offsets, needed)

    # Step 5b: per unit, the kept documents (one output shard per unit, named by its position).
    (ctx.out / "shards").mkdir(parents=True, exist_ok=True)
    drop_mask = np.zeros(n, dtype=bool)
    drop_mask[dropped] = True
    for k, u in enumerate(units):
        np.save(u["drop"], np.flatnonzero(drop_mask[offsets[k] : offsets[k + 1]]))
        u["out"] = str(ctx.out / "shards" / f"part-{k:05d}.parquet")
    results = ctx.map(write_kept, units, "dedup-write")
    kept_docs = sum(r["kept"] for r in results)
    timings["write"] = time.monotonic() - started - sum(timings.values())

    with open(ctx.out / "clusters.jsonl", "w", encoding="utf-8") as f:
        for doc, kept, kind, similarity, head in lines:
            f.write(
                json.dumps(
                    {
                        "id": ids[doc],
                        "kept_id": ids[kept],
                        "kind": kind,
                        "jaccard": round(similarity, 4),
                        "cluster": ids[head],
                    },
                    ensure_ascii=False,
                )
                + "\n"
            )

    # Counted by the step that removed them (a line's `kind` tells how it relates to its kept_id:
    # an exact copy of a near-duplicate is "near" there).
    exact_dups = int(n - is_rep.sum())
    near_dups = len(near)
    _report(ctx, cfg, units, offsets, lines, ids, n, exact_dups, near_dups, bytes_per_doc)
    seconds = time.monotonic() - started
    ctx.log.info("dedup: %.0f bytes per document held by the global step (%d documents)", bytes_per_doc, n)
    return {
        "docs": n,
        "exact_dups": exact_dups,
        "near_dups": near_dups,
        "kept": kept_docs,
        "clusters": len({line[4] for line in lines}),
        "candidate_pairs": len(pairs),
        "verified_pairs": verified,
        "rejected_pairs": rejected,
        "units": len(units),
        "index_bytes_per_doc": round(bytes_per_doc, 1),
        "seconds": round(seconds, 2),
        "seconds_per_step": {k: round(v, 2) for k, v in timings.items()},
        "mb_per_s": round(chars_in / 1e6 / seconds, 2) if seconds > 0 else None,
    }


def _ids_of(units: list[Unit], offsets: npt.NDArray[np.int64], docs: list[int]) -> dict[int, str | None]:
    """The `id` of some documents by global index, reading only the id column."""
    out: dict[int, str | None] = {}  # None for a null id, which no stage writes
    docs_arr = np.asarray(docs, dtype=np.int64)
    unit_of = np.searchsorted(offsets, docs_arr, side="right") - 1
    for k in np.unique(unit_of).tolist():
        u = units[k]
        mine = docs_arr[unit_of == k]
        for doc, value in zip(mine.tolist(), _read_column(u, "id", mine - offsets[k]).to_pylist(), strict=True):
            out[doc] = value
    return out


def _snippets(units: list[Unit], offsets: npt.NDArray[np.int64], docs: list[int], width: int = 70) -> dict[int, str]:
    out: dict[int, str] = {}
    docs_arr = np.asarray(sorted(set(docs)), dtype=np.int64)
    unit_of = np.searchsorted(offsets, docs_arr, side="right") - 1
    for k in np.unique(unit_of).tolist():
        mine = docs_arr[unit_of == k]
        for doc, text in zip(mine.tolist(), _read_texts(units[k], mine - offsets[k]).to_pylist(), strict=True):
            out[doc] = " ".join((text or "").split())[:width]
    return out


def _report(
    ctx: StageContext,
    cfg: DedupConfig,
    units: list[Unit],
    offsets: npt.NDArray[np.int64],
    lines: list[ClusterLine],
    ids: dict[int, str | None],
    n: int,
    exact_dups: int,
    near_dups: int,
    bytes_per_doc: float,
) -> None:
    by_kept: dict[int, list[ClusterLine]] = {}
    for line in lines:
        by_kept.setdefault(line[1], []).append(line)
    top = sorted(by_kept.items(), key=lambda kv: (-len(kv[1]), kv[0]))[: cfg.report_clusters]
    snippets = _snippets(units, offsets, [k for k, _ in top] + [group[0][0] for _, group in top])
    rows = [
        {
            "kept": ids[kept],
            "removed": len(group),
            "kinds": "/".join(sorted({g[2] for g in group})),
            "min_jaccard": round(min(g[3] for g in group), 4),
            "kept_text": snippets[kept],
            "removed_example": f"{ids[group[0][0]]}: {snippets[group[0][0]]}",
        }
        for kept, group in top
    ]
    ctx.report.table(
        "dedup-clusters",
        rows or [{"kept": "(no duplicates)", "removed": 0}],
        f"Largest duplicate clusters ({exact_dups} exact and {near_dups} near duplicates of {n} documents)",
    )
    ctx.report.markdown(
        "dedup-summary",
        f"| documents | exact duplicates | near duplicates | kept | bytes per document (global step) |\n"
        f"|---:|---:|---:|---:|---:|\n| {n} | {exact_dups} | {near_dups} | {n - exact_dups - near_dups} | "
        f"{bytes_per_doc:.0f} |\n\nMinHash {cfg.bands} bands x {cfg.rows} rows; a pair at Jaccard 0.8 is a "
        f"candidate with probability {1 - (1 - 0.8**cfg.rows) ** cfg.bands:.3f}; candidates verified by exact "
        f"Jaccard >= {cfg.threshold}.",
        "Deduplication",
    )


STAGE = Stage(name="dedup", version=2, run=run, inputs=("filter",), unkeyed=("unit_chars", "report_clusters"))
