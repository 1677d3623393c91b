"""What the filter keeps, and how fast normalize and filter run.

    .venv/bin/python benchmarks/filter_quality.py            # quality + keep rates
    .venv/bin/python benchmarks/filter_quality.py --speed    # also MB/s, 1 process and 2 workers

1. messy_web (must-hold 3): the 181 full-page texts (menus, cookie banners, footers left in)
   go through the filter; a line of a page counts as article body when it is also a line of the
   human-annotated article body. Prints precision and recall of the lines kept, for the line
   rules alone and for the whole default filter (which also drops whole pages: too little text
   left, another language).
2. Keep rates (must-hold 4) of documents and characters per corpus, chunked as the download
   stage chunks them (4,000 characters): Chinese novels and poems, gutenberg_en,
   tinyshakespeare, tinystories; and the share of book lines dropped by C4's terminal
   punctuation rule judged line by line (as datatrove does) against paragraph by paragraph.
3. --speed: the normalize and filter stages on gutenberg_en (MB/s of UTF-8 input), in one
   process (also per CPU second, which a shared, busy machine does not blur) and with
   `StageContext(map=pool_map(2))` (wall time only). Print `uptime` beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import Counter
from functools import partial
from pathlib import Path

from ember.tasks.download import chunk_text
from ember.tasks.filter import FilterConfig, judge, line_rules

CORPORA = Path(__file__).resolve().parents[2] / "shared" / "corpora"
# The line rules alone: every document rule off, so no page is dropped whole.
LINE_RULES_ONLY = dict(
    languages=None,
    min_chars=None,
    min_words=None,
    max_words=None,
    cjk_min_words=None,
    drop_lorem_ipsum=False,
    drop_curly_bracket=False,
    min_sentences=None,
    min_mean_word_length=None,
    max_mean_word_length=None,
    max_hash_ratio=None,
    max_ellipsis_ratio=None,
    max_bullet_lines=None,
    max_ellipsis_lines=None,
    min_alpha_words=None,
    min_stop_words=None,
    max_dup_paragraphs=None,
    max_dup_paragraph_chars=None,
    max_dup_lines=None,
    max_dup_line_chars=None,
    top_ngram_chars=None,
    dup_ngram_chars=None,
    fineweb_min_punct_paragraphs=None,
    fineweb_max_short_lines=None,
    fineweb_max_dup_line_chars=None,
    fineweb_max_newlines_per_word=None,
)


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _lines(text: str) -> set[str]:
    return {" ".join(line.split()) for line in text.split("\n") if line.strip()}


def messy_web_scores(corpora: Path = CORPORA, cfg: FilterConfig | None = None) -> dict:
    """Precision and recall of kept lines against the article bodies (micro-averaged over pages)."""
    pages = read_jsonl(corpora / "messy_web" / "aeb_pages_fulltext.jsonl")
    bodies = {r["id"]: r["text"] for r in read_jsonl(corpora / "messy_web" / "aeb_pages_articlebody.jsonl")}
    cfg = cfg or FilterConfig()
    kept_body = kept_other = body_total = other_total = pages_dropped = 0
    kept_body_chars = body_chars = 0
    for page in pages:
        body = _lines(bodies[page["id"]])
        lines = _lines(page["text"])
        is_body = {line: line in body for line in lines}
        verdict = judge(page["text"], cfg)
        kept = _lines(verdict.text) if verdict.drop is None else set()
        pages_dropped += verdict.drop is not None
        for line, b in is_body.items():
            if b:
                body_total += 1
                body_chars += len(line)
                if line in kept:
                    kept_body += 1
                    kept_body_chars += len(line)
            else:
                other_total += 1
                kept_other += line in kept
    return {
        "pages": len(pages),
        "pages_dropped": pages_dropped,
        "body_lines": body_total,
        "other_lines": other_total,
        "precision": kept_body / max(1, kept_body + kept_other),
        "recall": kept_body / max(1, body_total),
        "recall_chars": kept_body_chars / max(1, body_chars),
        "other_dropped": 1 - kept_other / max(1, other_total),
    }


def corpus_docs(name: str, corpora: Path = CORPORA, chunk_chars: int = 4000, limit: int | None = None) -> list[str]:
    """A corpus as the download stage would shard it: each document chunked on paragraphs."""
    folder = corpora / name
    texts: list[str] = []
    for path in sorted(folder.glob("*.jsonl")) or sorted(folder.glob("*.txt")):
        if path.suffix == ".jsonl":
            texts += [r["text"] for r in read_jsonl(path)]
        else:
            texts.append(path.read_text(encoding="utf-8"))
    docs = [chunk for text in texts for chunk in chunk_text(text, chunk_chars) if chunk.strip()]
    return docs[:limit] if limit else docs


def keep_rates(docs: list[str], cfg: FilterConfig | None = None) -> dict:
    cfg = cfg or FilterConfig()
    kept = kept_chars = 0
    rules: Counter = Counter()
    line_drops: Counter = Counter()
    for text in docs:
        verdict = judge(text, cfg)
        line_drops.update(d.rule for d in verdict.lines)
        if verdict.drop is None:
            kept += 1
            kept_chars += len(verdict.text)
        else:
            rules[verdict.drop.rule] += 1
    chars = sum(map(len, docs))
    return {
        "docs": len(docs),
        "kept": kept / max(1, len(docs)),
        "kept_chars": kept_chars / max(1, chars),
        "rules": dict(rules.most_common(4)),
        "line_drops": dict(line_drops.most_common(3)),
    }


def book_line_drop_rates(docs: list[str]) -> dict:
    """Share of non-blank lines C4's terminal-punctuation rule drops, line by line vs per paragraph."""
    out = {}
    for label, join in (("line by line", False), ("paragraphs", True)):
        cfg = FilterConfig(
            join_wrapped_lines=join,
            line_min_words=None,
            line_javascript=False,
            line_policy_phrases=None,
            line_max_word_chars=None,
        )
        lines = dropped = 0
        for text in docs:
            lines += sum(1 for line in text.split("\n") if line.strip())
            dropped += len(line_rules(text, cfg, False)[1])
        out[label] = dropped / max(1, lines)
    return out


def speed(corpora: Path = CORPORA, shard_chars: int = 4_000_000) -> list[dict]:
    """MB/s of the normalize and filter stages on gutenberg_en, 1 process and 2 workers."""
    from ember.storage.shards import ShardWriter
    from ember.tasks import filter as quality_filter
    from ember.tasks import normalize
    from ember.tasks.normalize import NormalizeConfig
    from ember.tasks.stage import Reporter, StageContext, pool_map, sequential_map

    docs = corpus_docs("gutenberg_en", corpora)
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    rows = []
    with tempfile.TemporaryDirectory(prefix="ember-filter-bench-") as tmp:
        root = Path(tmp)
        with ShardWriter(root / "download" / "shards", max_chars=shard_chars) as writer:
            writer.write_many({"id": f"doc{i}", "text": d, "source": "gutenberg_en"} for i, d in enumerate(docs))
        for workers, mapper in ((1, sequential_map), (2, pool_map(2))):
            for stage, run, upstream in (  # each stage's run with its config
                ("normalize", partial(normalize.run, NormalizeConfig()), "download"),
                ("filter", partial(quality_filter.run, FilterConfig()), "normalize"),
            ):
                out = root / f"{stage}-{workers}"
                out.mkdir()
                ctx = StageContext(
                    inputs={upstream: root / (upstream if upstream == "download" else f"normalize-{workers}")},
                    out=out,
                    work=root / "work",
                    report=Reporter(stage),
                    store_root=root,
                    map=mapper,
                )
                started, cpu = time.perf_counter(), time.process_time()
                run(ctx)
                seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
                row = {
                    "stage": stage,
                    "workers": workers,
                    "MB": round(mb, 1),
                    "seconds": round(seconds, 2),
                    "MB/s": round(mb / seconds, 2),
                }
                if workers == 1:  # CPU time of this process: what a busy machine does not blur
                    row.update({"cpu_s": round(cpu, 2), "MB/cpu_s": round(mb / cpu, 2)})
                rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speed", action="store_true", help="also time the stages on gutenberg_en")
    args = parser.parse_args()

    print("== messy_web: lines of 181 full pages, article body = ground truth ==")
    for label, cfg in (("line rules only", FilterConfig(**LINE_RULES_ONLY)), ("whole default filter", FilterConfig())):
        s = messy_web_scores(cfg=cfg)
        print(
            f"{label:22s} precision {s['precision']:.3f}  recall {s['recall']:.3f} (chars {s['recall_chars']:.3f})  "
            f"boilerplate lines dropped {s['other_dropped']:.3f}  pages dropped {s['pages_dropped']}/{s['pages']}  "
            f"({s['body_lines']} body / {s['other_lines']} other lines)"
        )

    print("\n== keep rates with the default config (documents chunked at 4,000 characters) ==")
    for name in ("chinese_classic_novels", "chinese_poetry", "gutenberg_en", "tinyshakespeare", "tinystories_sample"):
        started = time.perf_counter()
        docs = corpus_docs(name)
        r = keep_rates(docs)
        print(
            f"{name:24s} docs {r['docs']:6d}  kept {r['kept']:.4f}  chars kept {r['kept_chars']:.4f}  "
            f"({time.perf_counter() - started:.1f}s)  drops {r['rules']}  line drops {r['line_drops']}"
        )

    print("\n== C4 terminal punctuation on hard-wrapped books (share of non-blank lines dropped) ==")
    for name in ("gutenberg_en", "tinyshakespeare"):
        rates = book_line_drop_rates(corpus_docs(name))
        print(f"{name:24s} " + "  ".join(f"{k}: {v:.4f}" for k, v in rates.items()))

    if args.speed:
        print(f"\n== speed on gutenberg_en (MB/s of UTF-8 input; load average {os.getloadavg()[0]:.1f}) ==")
        for row in speed():
            print("  ".join(f"{k} {v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
