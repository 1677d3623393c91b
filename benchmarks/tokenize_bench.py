"""Ember's tokenize stage against raw `encode_batch` and datatrove's DocumentTokenizer, side by side.

    .venv/bin/python benchmarks/tokenize_bench.py [--all] [--repeat 2] [--threads 2]

Input (written first, not timed): gutenberg_en + tinyshakespeare (`--all`: every corpus in
`../shared/corpora`, `raw/` folders excluded) chunked with `chunk_text(text, 4000)` into text
shards, and a tokenizer trained once by the train_tokenizer stage (vocab 8192). Then, each in a
fresh child process (so each peak RSS, the child's VmHWM, is its own) with the same
RAYON_NUM_THREADS:

- ember: `ember.tasks.tokenize.run` end to end (read shards, split, encode, write Arrow).
- raw: `Tokenizer.encode_batch` on the same texts already in memory, same tokenizer file, batches
  of the same size as Ember's (1000), reading each document's ids; `encode_batch_fast` too.
- datatrove: ParquetReader on the same shards -> DocumentTokenizer(tokenizer.json, eos "<eos>"),
  one task on the local executor; once as shipped (shuffle_documents=True, batch 10,000) and
  once doing what Ember does (no shuffle, batch 1000).

MB/s counts the UTF-8 bytes of the documents, the same for all. Targets: Ember >= 0.9x raw
encode_batch, Ember peak RSS < 1 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tokenizer_train_bench import (
    DEFAULT_CORPORA,
    bench_env,
    child_main,
    machine_line,
    markdown_table,
    rss_mb,
    run_child,
    write_corpus_shards,
)

DEFAULT_CORPUS_NAMES = ["gutenberg_en", "tinyshakespeare"]
BATCH_SIZE = 1000  # TokenizeConfig's default; raw encode_batch uses the same


# ---------------------------------------------------------------------------------------------
# Children: each measures one tokenizer over the same shards and reports what it did


def child_ember(args: dict) -> dict:
    from ember.tasks import tokenize
    from ember.tasks.stage import Reporter, StageContext

    out, work = Path(args["out"]), Path(args["work"])
    out.mkdir(parents=True)
    work.mkdir(parents=True)
    ctx = StageContext(
        inputs={"dedup": Path(args["dedup"]), "train_tokenizer": Path(args["tokenizer"])},
        out=out,
        work=work,
        report=Reporter("tokenize"),
        store_root=work,
    )
    cfg = tokenize.TokenizeConfig(batch_size=args["batch_size"])
    rss_before = rss_mb()
    started, cpu_started = time.perf_counter(), time.process_time()
    metrics = tokenize.run(cfg, ctx)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    meta = json.loads((out / "meta.json").read_text())
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "tokens": metrics["tokens"],
        "docs": metrics["docs"],
        "bytes": meta["train_bytes"] + meta["val_bytes"],
        "rss_after_imports_mb": rss_before,
    }


def _load_texts(dedup: Path) -> list[str]:
    from ember.storage.shards import list_shards, read_shard

    texts: list[str] = []
    for path in list_shards(dedup / "shards"):
        texts += [t or "" for t in read_shard(path, columns=["text"])["text"].to_pylist()]
    return texts


def child_raw(args: dict) -> dict:
    from tokenizers import Tokenizer

    texts = _load_texts(Path(args["dedup"]))
    tokenizer = Tokenizer.from_file(str(Path(args["tokenizer"]) / "tokenizer.json"))
    tokenizer.encode_special_tokens = True  # as Ember's load_tokenizer: identical work and ids
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    rss_before = rss_mb()
    batch = args["batch_size"]
    timings = {}
    for method in ("encode_batch", "encode_batch_fast"):
        encode = getattr(tokenizer, method, None)
        if encode is None:
            continue
        tokens = 0
        started, cpu_started = time.perf_counter(), time.process_time()
        for start in range(0, len(texts), batch):
            tokens += sum(len(e.ids) for e in encode(texts[start : start + batch], add_special_tokens=False))
        timings[method] = {
            "seconds": time.perf_counter() - started,
            "cpu_seconds": time.process_time() - cpu_started,
            "tokens": tokens,
        }
    return {"timings": timings, "docs": len(texts), "bytes": n_bytes, "rss_after_imports_mb": rss_before}


def child_datatrove(args: dict) -> dict:
    from datatrove.executor.local import LocalPipelineExecutor
    from datatrove.pipeline.readers import ParquetReader
    from datatrove.pipeline.tokens import DocumentTokenizer

    out = Path(args["out"])
    executor = LocalPipelineExecutor(
        pipeline=[
            ParquetReader(str(Path(args["dedup"]) / "shards"), text_key="text", id_key="id", glob_pattern="*.parquet"),
            DocumentTokenizer(
                output_folder=str(out / "tokens"),
                tokenizer_name_or_path=str(Path(args["tokenizer"]) / "tokenizer.json"),
                eos_token="<eos>",
                local_working_dir=str(out / "work"),
                shuffle_documents=args["shuffle"],
                batch_size=args["batch_size"],
                seed=0,
            ),
        ],
        tasks=1,
        workers=1,
        logging_dir=str(out / "logs"),
        skip_completed=False,
    )
    rss_before = rss_mb()
    started, cpu_started = time.perf_counter(), time.process_time()
    executor.run()
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    token_bytes = sum(p.stat().st_size for p in (out / "tokens").rglob("*.ds"))
    return {"seconds": seconds, "cpu_seconds": cpu, "tokens": token_bytes // 2, "rss_after_imports_mb": rss_before}


CHILDREN = {"ember": child_ember, "raw": child_raw, "datatrove": child_datatrove}


# ---------------------------------------------------------------------------------------------


def train_tokenizer_once(dedup: Path, out: Path, vocab_size: int) -> dict:
    from ember.tasks import train_tokenizer
    from ember.tasks.stage import Reporter, StageContext

    out.mkdir(parents=True)
    (out.parent / "tok-work").mkdir()
    ctx = StageContext(
        inputs={"dedup": dedup},
        out=out,
        work=out.parent / "tok-work",
        report=Reporter("train_tokenizer"),
        store_root=out.parent,
    )
    return train_tokenizer.run(train_tokenizer.TokenizerConfig(vocab_size=vocab_size), ctx)


def measure(
    script: Path,
    tmp: Path,
    run_no: int,
    dedup: Path,
    tok: Path,
    threads: int,
    skip_datatrove: bool,
    n_bytes: int,
    verbose: bool,
) -> list[dict]:
    """One pass over the measures (started in an order rotated by `run_no`, so that no measure always
    runs first or last on a machine whose load drifts); rows in a fixed order."""
    env = bench_env(threads)
    base = {"dedup": str(dedup), "tokenizer": str(tok)}
    ember_dir = tmp / f"ember-{run_no}"
    jobs = [
        ("ember", {**base, "out": str(ember_dir / "out"), "work": str(ember_dir / "work"), "batch_size": BATCH_SIZE}),
        ("raw", {**base, "batch_size": BATCH_SIZE}),
    ]
    if not skip_datatrove:
        jobs += [
            ("datatrove", {**base, "out": str(tmp / f"dt-{run_no}-{shuffle}"), "shuffle": shuffle, "batch_size": batch})
            for shuffle, batch in ((True, 10_000), (False, BATCH_SIZE))
        ]
    shift = run_no % len(jobs)
    results = {}
    for i in list(range(shift, len(jobs))) + list(range(shift)):
        results[i] = run_child(script, jobs[i][0], jobs[i][1], env, verbose)

    rows = []
    for i, (kind, job) in enumerate(jobs):
        r = results[i]
        if kind == "ember":
            rows.append(_row("ember tokenize.run (end to end)", r))
        elif kind == "raw" and "error" in r:
            rows.append(_row("raw encode_batch (texts in memory)", r))
        elif kind == "raw":
            rows += [_row(f"raw {method} (texts in memory)", {**r, **t}) for method, t in r["timings"].items()]
        else:
            label = "as shipped: shuffle, batch 10000" if job["shuffle"] else "no shuffle, batch 1000"
            rows.append(_row(f"datatrove DocumentTokenizer ({label})", r))
    for row in rows:
        row["MB/s"] = round(n_bytes / 1e6 / row["seconds"], 2) if row.get("seconds") else None
        row["seconds"] = round(row["seconds"], 2) if row.get("seconds") else None
    return rows


def _row(name: str, r: dict) -> dict:
    peak, after_imports = r.get("peak_rss_mb"), r.get("rss_after_imports_mb")
    row = {
        "measure": name,
        "seconds": r.get("seconds"),
        "cpu_seconds": round(r["cpu_seconds"], 2) if r.get("cpu_seconds") else None,
        "tokens": r.get("tokens"),
        "peak_rss_mb": round(peak) if peak else None,
        "rss_after_imports_mb": round(after_imports) if after_imports else None,
    }
    if "error" in r:
        row["error"] = r["error"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpora", type=Path, default=DEFAULT_CORPORA)
    parser.add_argument("--all", action="store_true", help="every corpus, not just gutenberg_en + tinyshakespeare")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="RAYON_NUM_THREADS for every child")
    parser.add_argument("--repeat", type=int, default=1, help="passes over all measures; the median is reported")
    parser.add_argument("--skip-datatrove", action="store_true")
    parser.add_argument("--verbose", action="store_true", help="show the children's own output")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "ARGS", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        kind, child_args, result_path = args.child
        child_main(CHILDREN[kind], json.loads(child_args), Path(result_path))
        return

    names = None if args.all else DEFAULT_CORPUS_NAMES
    print(f"machine: {machine_line()}; RAYON_NUM_THREADS={args.threads}")
    with tempfile.TemporaryDirectory(prefix="ember-tokenize-bench-") as tmp_name:
        tmp = Path(tmp_name)
        corpus = write_corpus_shards(args.corpora, tmp / "dedup", names)
        print(
            f"input: {', '.join(names) if names else 'all corpora'}: {corpus['docs']:,} documents, "
            f"{corpus['bytes'] / 1e6:.1f} MB in {corpus['shards']} shard(s)"
        )
        os.environ.update(bench_env(args.threads))
        started = time.perf_counter()
        tok_metrics = train_tokenizer_once(tmp / "dedup", tmp / "tok", args.vocab_size)
        print(
            f"tokenizer: vocab {tok_metrics['vocab_size']}, trained by the stage in "
            f"{time.perf_counter() - started:.1f} s (not timed)"
        )

        passes = []
        for run_no in range(args.repeat):
            rows = measure(
                Path(__file__).resolve(),
                tmp,
                run_no,
                tmp / "dedup",
                tmp / "tok",
                args.threads,
                args.skip_datatrove,
                corpus["bytes"],
                args.verbose,
            )
            print(f"\npass {run_no + 1} (load average {os.getloadavg()[0]:.2f}):")
            print(markdown_table(rows))
            passes.append(rows)

    summary = []
    for i, first in enumerate(passes[0]):
        same = [p[i] for p in passes if i < len(p) and p[i]["measure"] == first["measure"]]
        seconds = [r["seconds"] for r in same if r.get("seconds")]
        if not seconds:
            summary.append({"measure": first["measure"], "error": first.get("error", "no result")})
            continue
        s = statistics.median(seconds)
        cpu = statistics.median(r["cpu_seconds"] for r in same if r.get("cpu_seconds"))
        tokens = first["tokens"]
        summary.append(
            {
                "measure": first["measure"],
                "seconds": round(s, 2),
                "tokens": tokens,
                "M tokens/s": round(tokens / s / 1e6, 3),
                "MB/s": round(corpus["bytes"] / 1e6 / s, 2),
                "CPU s": round(cpu, 2),
                "MB per CPU s": round(corpus["bytes"] / 1e6 / cpu, 2),
                "peak RSS MB": max(r["peak_rss_mb"] or 0 for r in same),
                "RSS after imports MB": max(r["rss_after_imports_mb"] or 0 for r in same),
            }
        )
    by_name = {r["measure"].split(" (")[0] + (" shipped" if "shipped" in r["measure"] else ""): r for r in summary}
    ember = by_name.get("ember tokenize.run")
    ratios = []
    if ember and "MB/s" in ember:
        for name, label in (
            ("raw encode_batch", "Ember / raw encode_batch (target >= 0.9)"),
            ("raw encode_batch_fast", "Ember / raw encode_batch_fast"),
            ("datatrove DocumentTokenizer shipped", "Ember / datatrove (as shipped)"),
            ("datatrove DocumentTokenizer", "Ember / datatrove (no shuffle, batch 1000)"),
        ):
            peer = by_name.get(name)
            if peer and "MB/s" in peer:
                ratios.append(
                    {
                        "ratio": label,
                        "wall (MB/s)": f"{ember['MB/s'] / peer['MB/s']:.2f}x",
                        "CPU (MB per CPU s)": f"{ember['MB per CPU s'] / peer['MB per CPU s']:.2f}x",
                    }
                )
            elif peer:
                ratios.append({"ratio": label, "wall (MB/s)": f"n/a ({peer.get('error')})"})
        ratios.append({"ratio": "Ember peak RSS (target < 1024 MB)", "wall (MB/s)": f"{ember['peak RSS MB']} MB"})

    print(f"\nsummary (median of {args.repeat} pass(es); same {corpus['bytes'] / 1e6:.1f} MB for all):")
    print(markdown_table(summary))
    print()
    print(markdown_table(ratios))
    counts = {r["measure"]: r.get("tokens") for r in summary if r.get("tokens")}
    if ember and counts:
        raw_tokens = by_name.get("raw encode_batch", {}).get("tokens")
        print(
            f"\ntoken counts: ember {ember['tokens']:,} (with one EOS per doc, {corpus['docs']:,} docs)"
            + (f"; raw + EOS {raw_tokens + corpus['docs']:,}" if raw_tokens else "")
            + "".join(f"; {n} {t:,}" for n, t in counts.items() if n.startswith("datatrove"))
        )


if __name__ == "__main__":
    main()
