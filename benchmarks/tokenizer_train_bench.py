"""Train the tokenizer stage on all the shared corpora: wall time, peak RSS, bytes per token by corpus.

    .venv/bin/python benchmarks/tokenizer_train_bench.py [--vocab-size 32000] [--max-chars N]

Every `.jsonl` `text` field and every `.txt` under `../shared/corpora` (not `raw/` folders) is
chunked as the download stage does (`chunk_text`, 4,000 chars) and written as text shards into
a temp folder (not timed). `train_tokenizer.run` then runs in a child process, so that its
peak RSS (the child's VmHWM; `run_child` says why not ru_maxrss) is the stage's own. Bytes per
token are measured in this process afterwards on the documents the stage held out of training (its `sample_fraction`
rule), per corpus and per script (Chinese = documents whose non-space characters are at least
30% Han), because the stage's own table stops after 2M characters in shard order.
Targets: peak RSS < 4 GB; Chinese bytes per token >= 1.5.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere, without installing

from ember.storage.shards import ShardWriter, list_shards, read_shard  # noqa: E402
from ember.tasks.download import chunk_text  # noqa: E402

DEFAULT_CORPORA = REPO.parent / "shared" / "corpora"
OFFLINE_ENV = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}
HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\U00020000-\U0002a6df\uf900-\ufaff]")
ZH_SHARE = 0.3


# ---------------------------------------------------------------------------------------------
# Input (shared with tokenize_bench.py)


def corpus_files(corpora: Path, names: list[str] | None = None) -> list[Path]:
    """Every text file of the corpora (or of the named corpus folders), skipping `raw/` and the docs."""
    folders = [corpora / n for n in names] if names else sorted(p for p in corpora.iterdir() if p.is_dir())
    files = []
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.suffix in (".jsonl", ".txt") and "raw" not in path.relative_to(folder).parts:
                files.append(path)
    return files


def _texts(path: Path) -> Iterator[str]:
    if path.suffix == ".txt":
        yield path.read_text(encoding="utf-8")
        return
    with path.open(encoding="utf-8") as lines:
        for n, line in enumerate(lines, 1):
            text = json.loads(line).get("text")
            if not isinstance(text, str):
                raise TypeError(f"{path}: line {n}: no string `text` field")
            yield text


def write_corpus_shards(corpora: Path, folder: Path, names: list[str] | None = None, chunk_chars: int = 4000) -> dict:
    """Text shards of the corpora in `folder/shards`, ids and sources as the download stage makes them."""
    docs = chars = 0
    n_bytes = 0
    with ShardWriter(folder / "shards") as writer:
        for path in corpus_files(corpora, names):
            source = path.relative_to(corpora).parts[0]
            rel = path.relative_to(corpora / source).as_posix()
            for n, text in enumerate(_texts(path)):
                for c, chunk in enumerate(chunk_text(text, chunk_chars)):
                    if not chunk.strip():
                        continue
                    writer.write({"id": f"{source}/{rel}:{n}:{c}", "text": chunk, "source": source})
                    docs += 1
                    chars += len(chunk)
                    n_bytes += len(chunk.encode("utf-8"))
    return {"docs": docs, "chars": chars, "bytes": n_bytes, "shards": len(writer.paths)}


# ---------------------------------------------------------------------------------------------
# Child processes (shared with tokenize_bench.py)


def bench_env(threads: int | None = None) -> dict:
    env = {**os.environ, **OFFLINE_ENV, "TOKENIZERS_PARALLELISM": "true"}
    if threads:
        env["RAYON_NUM_THREADS"] = str(threads)  # tokenizers' thread pool
    return env


def run_child(script: Path, kind: str, args: dict, env: dict, verbose: bool = False) -> dict:
    """Run `script --child kind` in a fresh interpreter; its JSON result (with its peak RSS) and wall time.

    The peak is the child's own VmHWM, read by the child at its end (see `child_main`). The
    `ru_maxrss` that `wait4`/RUSAGE_CHILDREN report is NOT used: Linux carries the parent's
    peak RSS into the child's ru_maxrss at exec (fork copies the parent's RSS; exec records the
    replaced address space's high-water mark), so a 500 MB parent makes every child look >= 500 MB.
    """
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = Path(f.name)
    started = time.perf_counter()
    # The child's own output (datatrove's stats, logs) is shown only when it fails or with --verbose.
    proc = subprocess.run(
        [sys.executable, str(script), "--child", kind, json.dumps(args), str(result_path)],
        env=env,
        check=False,
        stdout=None if verbose else subprocess.PIPE,
        stderr=None if verbose else subprocess.STDOUT,
        text=True,
    )
    wall = time.perf_counter() - started
    try:
        if proc.returncode != 0:
            print(
                f"--- {kind} child failed (exit {proc.returncode}); the end of its output:\n"
                f"{(proc.stdout or '')[-4000:]}\n---",
                file=sys.stderr,
            )
            lines = [line for line in (proc.stdout or "").strip().splitlines() if line.strip()]
            return {
                "error": lines[-1][:200] if lines else f"exit {proc.returncode}",
                "process_seconds": wall,
                "peak_rss_mb": None,
            }
        return {**json.loads(result_path.read_text()), "process_seconds": wall}
    finally:
        result_path.unlink(missing_ok=True)


def child_main(fn, args: dict, result_path: Path) -> None:
    """Run one measure in this (child) process and write its result with the process's peak RSS."""
    result = fn(args)
    # VmHWM belongs to this address space, which exec started afresh; grandchildren (none expected,
    # except datatrove's small multiprocessing manager) are covered by RUSAGE_CHILDREN.
    grandchildren_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result["peak_rss_mb"] = max(rss_mb("VmHWM"), grandchildren_mb)
    result_path.write_text(json.dumps(result))


def rss_mb(field: str = "VmHWM") -> float:
    """This process's peak (VmHWM) or current (VmRSS) resident set, from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def machine_line() -> str:
    load = os.getloadavg()
    return (
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}, {platform.node()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )


def markdown_table(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The training child


def child_train(args: dict) -> dict:
    import logging

    from ember.tasks import train_tokenizer
    from ember.tasks.stage import Reporter, StageContext

    logging.basicConfig(level=logging.INFO if args["verbose"] else logging.WARNING)

    class Capture(Reporter):
        def __init__(self, stage: str):
            super().__init__(stage)
            self.tables: dict[str, Sequence[Mapping[str, object]]] = {}

        def table(self, key: str, rows: Sequence[Mapping[str, object]], description: str = "") -> None:
            self.tables[key] = rows
            super().table(key, rows, description)

    out, work = Path(args["out"]), Path(args["work"])
    out.mkdir(parents=True)
    work.mkdir(parents=True)
    report = Capture("train_tokenizer")
    ctx = StageContext(
        inputs={"dedup": Path(args["dedup"])}, out=out, work=work, report=report, store_root=Path(args["work"])
    )
    cfg = train_tokenizer.TokenizerConfig(
        vocab_size=args["vocab_size"], **({"max_chars": args["max_chars"]} if args["max_chars"] else {})
    )
    rss_before = rss_mb()
    started = time.perf_counter()
    metrics = train_tokenizer.run(cfg, ctx)
    return {
        "run_seconds": time.perf_counter() - started,
        "metrics": metrics,
        "rss_after_imports_mb": rss_before,
        "max_chars": cfg.max_chars,
        "stage_bytes_per_token": report.tables.get("tokenizer-bytes-per-token", []),
    }


# ---------------------------------------------------------------------------------------------
# Bytes per token on held-out documents


def is_chinese(text: str) -> bool:
    visible = len(text) - sum(c.isspace() for c in text)
    return visible > 0 and len(HAN.findall(text)) / visible >= ZH_SHARE


def held_out_bytes_per_token(dedup: Path, tokenizer_dir: Path) -> tuple[list[dict], list[dict]]:
    """(rows per corpus, rows per script) over every document the stage held out of training."""
    from ember.model.tokenizer import load_tokenizer
    from ember.tasks.train_tokenizer import HELD_FRACTION, sample_fraction

    tokenizer = load_tokenizer(tokenizer_dir)
    by_source: dict[str, list[str]] = defaultdict(list)
    for path in list_shards(dedup / "shards"):
        table = read_shard(path)
        for doc_id, text, source in zip(*(table[c].to_pylist() for c in ("id", "text", "source")), strict=True):
            if text and sample_fraction(doc_id) >= 1.0 - HELD_FRACTION:
                by_source[source].append(text)

    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # script -> docs, bytes, tokens
    rows = []
    for source in sorted(by_source):
        texts = by_source[source]
        encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
        n_bytes = n_tokens = 0
        for text, encoding in zip(texts, encodings, strict=True):
            b, t = len(text.encode("utf-8")), len(encoding.ids)
            n_bytes, n_tokens = n_bytes + b, n_tokens + t
            script = totals["Chinese (>=30% Han)" if is_chinese(text) else "other (English, mixed)"]
            script[0], script[1], script[2] = script[0] + 1, script[1] + b, script[2] + t
        rows.append(
            {
                "corpus": source,
                "held-out docs": len(texts),
                "bytes": n_bytes,
                "tokens": n_tokens,
                "bytes/token": round(n_bytes / max(n_tokens, 1), 3),
            }
        )
    script_rows = [
        {"script": s, "held-out docs": d, "bytes": b, "tokens": t, "bytes/token": round(b / max(t, 1), 3)}
        for s, (d, b, t) in sorted(totals.items())
    ]
    return rows, script_rows


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpora", type=Path, default=DEFAULT_CORPORA)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--max-chars", type=int, default=0, help="the stage's max_chars (0: its default)")
    parser.add_argument("--chunk-chars", type=int, default=4000)
    parser.add_argument("--threads", type=int, default=0, help="RAYON_NUM_THREADS for the child (0: all cores)")
    parser.add_argument("--verbose", action="store_true", help="the stage's INFO logs")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "ARGS", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        kind, child_args, result_path = args.child
        assert kind == "train", kind
        child_main(child_train, json.loads(child_args), Path(result_path))
        return

    print(f"machine: {machine_line()}")
    with tempfile.TemporaryDirectory(prefix="ember-tokbench-") as tmp_name:
        tmp = Path(tmp_name)
        started = time.perf_counter()
        corpus = write_corpus_shards(args.corpora, tmp / "dedup", chunk_chars=args.chunk_chars)
        print(
            f"input: {corpus['docs']:,} documents, {corpus['chars']:,} chars, {corpus['bytes'] / 1e6:.1f} MB "
            f"in {corpus['shards']} shards from {args.corpora} (written in {time.perf_counter() - started:.1f} s, "
            f"not timed)"
        )

        child_args = {
            "dedup": str(tmp / "dedup"),
            "out": str(tmp / "tok"),
            "work": str(tmp / "work"),
            "vocab_size": args.vocab_size,
            "max_chars": args.max_chars,
            "verbose": args.verbose,
        }
        result = run_child(Path(__file__).resolve(), "train", child_args, bench_env(args.threads), args.verbose)
        if "error" in result:
            sys.exit(f"training failed: {result['error']}")
        metrics = result["metrics"]
        print(
            f"\ntrain_tokenizer.run, vocab {args.vocab_size}, max_chars {result['max_chars']:,}: "
            f"{metrics['docs_trained_on']:,} docs, {metrics['chars_trained_on']:,} chars trained on"
        )
        print(
            markdown_table(
                [
                    {"measure": "run() wall time", "value": f"{result['run_seconds']:.1f} s"},
                    {"measure": "of which BPE training (train_seconds)", "value": f"{metrics['train_seconds']:.1f} s"},
                    {
                        "measure": "child process wall time (with imports)",
                        "value": f"{result['process_seconds']:.1f} s",
                    },
                    {"measure": "child RSS after imports", "value": f"{result['rss_after_imports_mb']:.0f} MB"},
                    {
                        "measure": "child peak RSS (its VmHWM)",
                        "value": f"{result['peak_rss_mb']:.0f} MB (target < 4096 MB)",
                    },
                    {
                        "measure": "chars trained on per second of run()",
                        "value": f"{metrics['chars_trained_on'] / result['run_seconds'] / 1e6:.2f} M",
                    },
                ]
            )
        )

        rows, script_rows = held_out_bytes_per_token(tmp / "dedup", tmp / "tok")
        print("\nbytes per token on the held-out documents, per corpus:")
        print(markdown_table(rows))
        print("\nper script:")
        print(markdown_table(script_rows))
        print("\nthe stage's own table (held-out documents, first 2M chars in shard order):")
        print(markdown_table(result["stage_bytes_per_token"]))

        zh = next((r for r in script_rows if r["script"].startswith("Chinese")), None)
        checks = [("peak RSS < 4 GB", result["peak_rss_mb"] < 4096, f"{result['peak_rss_mb']:.0f} MB")]
        if zh:
            checks.append(("Chinese bytes/token >= 1.5", zh["bytes/token"] >= 1.5, f"{zh['bytes/token']}"))
        print("\ntargets: " + "; ".join(f"{name}: {'OK' if ok else 'MISSED'} ({value})" for name, ok, value in checks))


if __name__ == "__main__":
    main()
