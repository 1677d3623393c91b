"""Ember's normalize + filter + dedup against datatrove's equivalent pipeline, side by side.

    .venv/bin/python benchmarks/data_bench.py [--mb 39] [--workers 2] [--skip-recall] [--datatrove-regex-tokenizer]
    .venv/bin/python benchmarks/data_bench.py --dedup-only [--workers 2]   # dedup alone

Input (written first, not timed): gutenberg_en then tinyshakespeare, cut by the download
stage's `chunk_text(text, 4000)`, the first `--mb` MB (UTF-8 bytes) of chunks; the default 39
is all of both (about 10,600 chunks). Ember reads them as a download artifact (text shards as
the download stage writes them), datatrove as two .jsonl files (one per task).

Each side runs in a fresh child process; the parent polls the child's whole process tree
(workers included) with psutil every 50 ms: the peak of the summed PSS (proportional set
size: pages shared by forked workers counted once) and the CPU seconds of
all its processes, per step. MB per CPU second is the figure to compare when the machine is
busy (wall time then measures the other jobs too).

- ember: `normalize.run`, `filter.run`, `dedup.run` with their default configs, each with
  `StageContext(map=pool_map(workers))` (a forkserver pool; the child preloads the three stage
  modules and pandas into the forkserver, so workers start with them imported and share those
  pages, as one would in production: pyarrow imports pandas, about 50 MB, the first time it
  converts a Python list, which every stage does when it writes a shard).
- datatrove: LocalPipelineExecutor(tasks=workers, workers=workers): JsonlReader ->
  FTFYFormatter -> GopherRepetitionFilter -> GopherQualityFilter -> C4QualityFilter (with
  `filter_no_terminal_punct=False`, as datatrove's FineWeb example: with it, C4 drops most
  hard-wrapped book lines and then nearly every chunk, leaving MinHash almost nothing) ->
  JsonlWriter, then MinhashDedupSignature (tasks=workers), MinhashDedupBuckets (tasks=14, one per
  bucket, as its example), MinhashDedupCluster (1 task), MinhashDedupFilter + JsonlWriter
  (tasks=workers); default MinhashConfig (5-grams, 14 x 8).
  datatrove's English word splitting is spaCy's (`spacy.blank("en")` plus its sentencizer: no
  model download), as datatrove runs it. `--datatrove-regex-tokenizer` (or spaCy not installed)
  gives datatrove a regex tokenizer instead (`\\w+|[^\\w\\s]`, sentences split after . ! ? or
  a newline), much faster than spaCy (three quarters of datatrove's filter time in
  ../shared/REFERENCE.md), so the ratio then flatters datatrove. The output says which ran. datatrove 0.10.1's
  xxhash64 passes str to xxhash 4, which refuses it: the bench encodes to UTF-8 first.

MB/s counts the UTF-8 bytes of the input documents, the same for both. Per step, the steps'
own input bytes are used too (dedup sees what the filters kept). Then, unless --skip-recall,
must-hold 2: dedup's recall and precision against a brute-force exact Jaccard on
near_duplicates with its sources (tests/test_dedup_recall.py), whole documents and 4,000-char
chunks. Target (issue 3): Ember >= 10x datatrove end to end with a peak memory no higher.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from tokenizer_train_bench import DEFAULT_CORPORA, OFFLINE_ENV, machine_line, markdown_table  # noqa: E402

CHUNK_CHARS = 4000


# ---------------------------------------------------------------------------------------------
# Input


def prepare(corpora: Path, mb: float, work: Path) -> dict:
    from ember.storage.shards import ShardWriter
    from ember.tasks.download import chunk_text

    def documents():
        for path in sorted((corpora / "gutenberg_en").glob("*.jsonl")):
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f):
                    yield f"gutenberg_en/{path.name}:{i}", json.loads(line)["text"]
        yield "tinyshakespeare/input.txt:0", (corpora / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")

    chunks, size, limit = [], 0, mb * 1e6
    for doc_id, text in documents():
        for k, chunk in enumerate(chunk_text(text, CHUNK_CHARS)):
            n = len(chunk.encode("utf-8"))
            if size + n > limit:
                break
            chunks.append({"id": f"{doc_id}#chunk{k}", "text": chunk, "source": doc_id.split("/")[0]})
            size += n
        if size + 1000 > limit:
            break
    with ShardWriter(work / "input" / "shards") as writer:  # as the download stage writes them
        writer.write_many(chunks)
    (work / "dt_input").mkdir(parents=True)
    half = len(chunks) // 2
    for part, rows in enumerate((chunks[:half], chunks[half:])):
        with open(work / "dt_input" / f"part-{part}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps({"id": row["id"], "text": row["text"]}, ensure_ascii=False) + "\n")
    return {"docs": len(chunks), "bytes": size, "shards": len(writer.paths)}


def shard_bytes(folder: Path) -> int:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    return sum(
        int(pc.sum(pc.binary_length(pq.read_table(p, columns=["text"]).column("text"))).as_py() or 0)
        for p in sorted(folder.glob("*.parquet"))
    )


def jsonl_bytes(folder: Path) -> tuple[int, int]:
    import gzip

    docs = size = 0
    for path in sorted(folder.rglob("*.jsonl*")):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            for line in f:
                docs += 1
                size += len(json.loads(line)["text"].encode("utf-8"))
    return docs, size


# ---------------------------------------------------------------------------------------------
# The two sides (each in its own child process)


def child_ember(work: Path, workers: int) -> dict:
    import logging
    import multiprocessing

    multiprocessing.get_context("forkserver").set_forkserver_preload(
        ["ember.tasks.normalize", "ember.tasks.filter", "ember.tasks.dedup", "pandas"]
    )
    from ember.tasks import dedup, normalize
    from ember.tasks import filter as quality_filter
    from ember.tasks.stage import Reporter, StageContext, pool_map

    logging.basicConfig(level=logging.WARNING)
    mapper = pool_map(workers)
    steps = [
        ("normalize", normalize, normalize.NormalizeConfig(), "download"),
        ("filter", quality_filter, quality_filter.FilterConfig(), "normalize"),
        ("dedup", dedup, dedup.DedupConfig(), "filter"),
    ]
    previous, rows, started = work / "input", [], time.perf_counter()
    for name, module, cfg, upstream in steps:
        out = work / "ember" / name
        out.mkdir(parents=True)
        ctx = StageContext(
            inputs={upstream: previous},
            out=out,
            work=work / "ember" / f"{name}-work",
            report=Reporter(name),
            store_root=work,
            map=mapper,
        )
        (work / "step-ember").write_text(name)
        t0 = time.perf_counter()
        metrics = module.run(cfg, ctx)
        rows.append(
            {"step": name, "seconds": time.perf_counter() - t0, "in_dir": str(previous / "shards"), "metrics": metrics}
        )
        previous = out
    total = sum(r["seconds"] for r in rows)
    return {
        "steps": rows,
        "seconds": total,
        "wall": time.perf_counter() - started,
        "kept_docs": rows[-1]["metrics"].get("kept"),
        "filtered_docs": rows[1]["metrics"].get("kept"),
    }


def child_dedup(work: Path, workers: int) -> dict:
    """Ember's dedup alone, on the input chunks as if the filters had kept them all."""
    import logging
    import multiprocessing

    multiprocessing.get_context("forkserver").set_forkserver_preload(["ember.tasks.dedup", "pandas"])
    from ember.tasks import dedup
    from ember.tasks.stage import Reporter, StageContext, pool_map

    logging.basicConfig(level=logging.WARNING)
    out = work / "dedup-only"
    out.mkdir(parents=True)
    ctx = StageContext(
        inputs={"filter": work / "input"},
        out=out,
        work=work / "dedup-only-work",
        report=Reporter("dedup"),
        store_root=work,
        map=pool_map(workers),
    )
    (work / "step-dedup").write_text("dedup")
    t0 = time.perf_counter()
    metrics = dedup.run(dedup.DedupConfig(), ctx)
    seconds = time.perf_counter() - t0
    return {
        "steps": [{"step": "dedup", "seconds": seconds, "in_dir": str(work / "input" / "shards"), "metrics": metrics}],
        "seconds": seconds,
        "kept_docs": metrics["kept"],
    }


# ---------------------------------------------------------------------------------------------
# The parent: children, memory polling, tables


def run_side(side: str, work: Path, workers: int, extra: tuple[str, ...] = ()) -> dict:
    import psutil

    result_path = work / f"result-{side}.json"
    env = {**os.environ, **OFFLINE_ENV, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", side, "--work", str(work), "--workers", str(workers), *extra],
        env=env,
        cwd=REPO,
    )
    # Per step (the child names its current step in a file): peak of the tree's summed RSS, and
    # CPU seconds of every process of the tree (pool workers are the forkserver's children, which
    # RUSAGE_CHILDREN misses), from samples every 50 ms.
    step_file = work / f"step-{side}"
    root = psutil.Process(proc.pid)
    last: dict[int, float] = {}  # CPU seconds per pid at the last sample
    peaks: dict[str, int] = {}  # bytes per step
    cpu: dict[str, float] = {}  # CPU seconds per step
    while proc.poll() is None:
        step = step_file.read_text() if step_file.exists() else "setup"
        rss = 0
        for p in [root] + _children(root):
            try:
                with p.oneshot():
                    # PSS, not RSS: forked workers share their parent's pages, which RSS counts
                    # once per process.
                    rss += p.memory_full_info().pss
                    times = p.cpu_times()
            except psutil.Error:
                continue
            now = times.user + times.system
            cpu[step] = cpu.get(step, 0.0) + now - last.get(p.pid, 0.0)
            last[p.pid] = now
        peaks[step] = max(peaks.get(step, 0), rss)
        time.sleep(0.05)
    if proc.returncode:
        raise SystemExit(f"the {side} child failed with exit code {proc.returncode}")
    result = json.loads(result_path.read_text())
    # Sizes of each step's input, measured here in the parent (reading them in the child would
    # count in its memory peak).
    for row in result["steps"]:
        row["in_bytes"] = shard_bytes(Path(row["in_dir"])) if "in_dir" in row else jsonl_bytes(Path(row["in_jsonl"]))[1]
    if "filtered_jsonl" in result:
        result["filtered_docs"] = jsonl_bytes(Path(result["filtered_jsonl"]))[0]
        result["kept_docs"] = jsonl_bytes(Path(result["deduped_jsonl"]))[0]
    result["peak_mb"] = max(peaks.values()) / 1e6
    result["cpu"] = sum(cpu.values())  # the setup before the timed steps included
    for row in result["steps"]:
        row["peak_mb"] = peaks.get(row["step"], 0) / 1e6
        row["cpu"] = cpu.get(row["step"], 0.0)
    return result


def _children(process) -> list:
    import psutil

    try:
        return process.children(recursive=True)
    except psutil.Error:
        return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpora", type=Path, default=DEFAULT_CORPORA)
    parser.add_argument("--mb", type=float, default=39.0, help="input size in MB (UTF-8 bytes); 39 = all")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip-recall", action="store_true", help="skip the recall/precision measure")
    parser.add_argument("--only", choices=["ember", "datatrove"], help="run one side only")
    parser.add_argument(
        "--dedup-only",
        action="store_true",
        help="time Ember's dedup stage alone on the input (the dedup speed target), no peer",
    )
    parser.add_argument(
        "--datatrove-regex-tokenizer",
        action="store_true",
        help="give datatrove a regex word tokenizer instead of spaCy (the older, flattering comparison)",
    )
    parser.add_argument("--child", choices=["ember", "datatrove", "dedup"], help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        if args.child == "datatrove":
            from data_bench_datatrove import child_datatrove

            result = child_datatrove(args.work, args.workers, args.datatrove_regex_tokenizer)
        else:
            result = {"ember": child_ember, "dedup": child_dedup}[args.child](args.work, args.workers)
        (args.work / f"result-{args.child}.json").write_text(json.dumps(result))
        return

    print(f"# data_bench: {machine_line()}")
    with tempfile.TemporaryDirectory(prefix="ember-data-bench-") as tmp:
        work = Path(tmp)
        info = prepare(args.corpora, args.mb, work)
        mb = info["bytes"] / 1e6
        print(
            f"input: gutenberg_en + tinyshakespeare, {info['docs']:,} chunks of <= {CHUNK_CHARS} chars, {mb:.1f} MB, "
            f"{info['shards']} Ember shards, 2 datatrove files; {args.workers} workers each\n"
        )
        sides = {}
        for side in ("dedup",) if args.dedup_only else ("ember", "datatrove"):
            if args.dedup_only or args.only in (None, side):
                extra = (
                    ("--datatrove-regex-tokenizer",) if side == "datatrove" and args.datatrove_regex_tokenizer else ()
                )
                sides[side] = run_side(side, work, args.workers, extra)
                r = sides[side]
                print(
                    f"{side}: {r['seconds']:.1f} s, {mb / r['seconds']:.2f} MB/s, peak {r['peak_mb']:.0f} MB "
                    f"(process tree PSS), CPU {r['cpu']:.1f} s",
                    flush=True,
                )

        rows = []
        for side, r in sides.items():
            for step in r["steps"]:
                rows.append(
                    {
                        "side": side,
                        "step": step["step"],
                        "seconds": f"{step['seconds']:.2f}",
                        "step input MB": f"{step['in_bytes'] / 1e6:.1f}",
                        "MB/s (step input)": f"{step['in_bytes'] / 1e6 / step['seconds']:.2f}",
                        "CPU s": f"{step['cpu']:.1f}",
                        "MB per CPU s": f"{step['in_bytes'] / 1e6 / step['cpu']:.2f}" if step["cpu"] else "",
                        "peak MB (tree PSS)": f"{step['peak_mb']:.0f}",
                    }
                )
            rows.append(
                {
                    "side": side,
                    "step": "**end to end**",
                    "seconds": f"{r['seconds']:.2f}",
                    "step input MB": f"{mb:.1f}",
                    "MB/s (step input)": f"**{mb / r['seconds']:.2f}**",
                    "CPU s": f"{r['cpu']:.1f}",
                    "MB per CPU s": f"{mb / r['cpu']:.2f}",
                    "peak MB (tree PSS)": f"{r['peak_mb']:.0f}",
                }
            )
        print(markdown_table(rows))
        print()
        summary = [
            {
                "side": side,
                "MB/s end to end": f"{mb / r['seconds']:.2f}",
                "CPU s": f"{r['cpu']:.1f}",
                "MB per CPU s": f"{mb / r['cpu']:.2f}" if r["cpu"] else "",
                "peak MB (tree PSS)": f"{r['peak_mb']:.0f}",
                "docs after filters": r.get("filtered_docs"),
                "docs out": r.get("kept_docs"),
            }
            for side, r in sides.items()
        ]
        print(markdown_table(summary))
        if "datatrove" in sides:
            print(f"\ndatatrove word tokenizer: {sides['datatrove']['tokenizer']}")
        if len(sides) == 2:
            e, d = sides["ember"], sides["datatrove"]
            print(
                f"ratio Ember / datatrove: {d['seconds'] / e['seconds']:.1f}x wall, {d['cpu'] / e['cpu']:.1f}x CPU; "
                f"peak memory {e['peak_mb']:.0f} MB vs {d['peak_mb']:.0f} MB ({e['peak_mb'] / d['peak_mb']:.2f}x)"
            )
        for m in [sides[k]["steps"][-1]["metrics"] for k in ("ember", "dedup") if k in sides]:
            print(
                f"ember dedup: {m['docs']:,} docs, {m['exact_dups']} exact + {m['near_dups']} near duplicates, "
                f"{m['index_bytes_per_doc']} bytes per document in the global step, steps {m['seconds_per_step']}"
            )
        print(f"\n# load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    if not args.skip_recall and not args.dedup_only:
        sys.path.insert(0, str(REPO / "tests"))
        from ember.tasks.stage import pool_map
        from test_dedup_recall import measure_recall

        print("\n## Must-hold 2: recall and precision against brute-force exact Jaccard (threshold 0.8)")
        rows = []
        for unit, chunk in (("whole documents (chapters, books)", None), (f"{CHUNK_CHARS}-char chunks", CHUNK_CHARS)):
            with tempfile.TemporaryDirectory(prefix="ember-recall-") as tmp:
                r = measure_recall(args.corpora, Path(tmp), pool_map(args.workers), chunk_chars=chunk)
            rows.append(
                {
                    "documents": f"{r['documents']:,} {unit}",
                    "pairs compared": f"{r['pairs_compared']:,}",
                    "true pairs >= 0.8": r["true_pairs"],
                    "found": r["found"],
                    "recall": f"{r['recall']:.4f}",
                    "recall 0.80-0.85": (
                        f"{r['recall_below_0.85']:.3f} of {r['true_pairs_below_0.85']}"
                        if r["true_pairs_below_0.85"]
                        else "-"
                    ),
                    "红楼梦 pairs (recall)": f"{r['hongloumeng_true_pairs']} ({r['hongloumeng_recall']:.3f})",
                    "dropped": r["asserted_pairs"],
                    "precision": f"{r['precision']:.4f}",
                    "dedup s": r["dedup_seconds"],
                    "brute force s": r["brute_force_seconds"],
                }
            )
        print(markdown_table(rows))


if __name__ == "__main__":
    main()
