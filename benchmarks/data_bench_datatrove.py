"""The datatrove side of data_bench.py, run in its child process: datatrove's equivalent of
Ember's normalize + filter + dedup on the same input (data_bench.py's docstring says which steps and
why), with the two stand-ins it needs here (a regex word tokenizer when spaCy is not used, and
xxhash64 over UTF-8 bytes)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any


def regex_tokenizer():
    """A stand-in for spaCy's English tokenizer (not installed): words and punctuation marks."""
    import regex
    from datatrove.utils.word_tokenizers import WordTokenizer

    class RegexTokenizer(WordTokenizer):
        words = regex.compile(r"\w+|[^\w\s]")
        sentences = regex.compile(r"[^.!?\n]+(?:[.!?]+|\n|$)")

        def word_tokenize(self, text: str) -> list[str]:
            return self.words.findall(text)

        def sent_tokenize(self, text: str) -> list[str]:
            return [s.strip() for s in self.sentences.findall(text) if s.strip()]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [m.span() for m in self.sentences.finditer(text) if m.group().strip()]

    return RegexTokenizer("en")


def xxhash64_of_text(data: str | bytes) -> int:
    """datatrove 0.10.1's xxhash64 passes str, which xxhash 4 refuses ("Strings must be encoded
    before hashing"): the same hash of the UTF-8 bytes."""
    import xxhash

    return xxhash.xxh64_intdigest(data.encode("utf-8") if isinstance(data, str) else data)


def child_datatrove(work: Path, workers: int, regex_tokenizer_: bool = False) -> dict:
    import importlib.util

    import datatrove.utils.hashes.xxhash as datatrove_xxhash

    datatrove_xxhash.xxhash64 = xxhash64_of_text  # picked up by create_hash_func; pickled with the step

    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.formatters import FTFYFormatter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    spacy = importlib.util.find_spec("spacy") is not None and not regex_tokenizer_
    language = "en" if spacy else regex_tokenizer()
    dt = work / "datatrove"
    config = MinhashConfig()
    steps = [
        (
            "filters",
            [
                JsonlReader(str(work / "dt_input")),
                FTFYFormatter(),
                GopherRepetitionFilter(language=language),
                GopherQualityFilter(language=language),
                # As FineWeb runs it: the terminal-punctuation line rule would drop most
                # hard-wrapped book lines, and MinHash would then have almost nothing to do.
                C4QualityFilter(filter_no_terminal_punct=False, language=language),
                JsonlWriter(str(dt / "filtered")),
            ],
            workers,
        ),
        (
            "minhash 1 signatures",
            [
                JsonlReader(str(dt / "filtered")),
                MinhashDedupSignature(output_folder=str(dt / "sigs"), config=config, language=language),
            ],
            workers,
        ),
        (
            "minhash 2 buckets",
            [MinhashDedupBuckets(input_folder=str(dt / "sigs"), output_folder=str(dt / "buckets"), config=config)],
            config.num_buckets,
        ),
        (
            "minhash 3 cluster",
            [
                MinhashDedupCluster(
                    input_folder=str(dt / "buckets"), output_folder=str(dt / "remove_ids"), config=config
                )
            ],
            1,
        ),
        (
            "minhash 4 filter",
            [
                JsonlReader(str(dt / "filtered")),
                MinhashDedupFilter(input_folder=str(dt / "remove_ids")),
                JsonlWriter(str(dt / "deduped")),
            ],
            workers,
        ),
    ]
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for name, pipeline, tasks in steps:
        executor = LocalPipelineExecutor(
            pipeline=pipeline,
            tasks=tasks,
            workers=min(workers, tasks),
            logging_dir=str(dt / "logs" / name.replace(" ", "_")),
        )
        (work / "step-datatrove").write_text(name)
        t0 = time.perf_counter()
        executor.run()
        rows.append({"step": name, "seconds": time.perf_counter() - t0})
    rows[0]["in_jsonl"] = str(work / "dt_input")
    for row in rows[1:]:
        row["in_jsonl"] = str(dt / "filtered")
    total = sum(r["seconds"] for r in rows)
    return {
        "steps": rows,
        "seconds": total,
        "wall": time.perf_counter() - started,
        "tokenizer": "spaCy (spacy.blank('en'), datatrove's default)"
        if spacy
        else "regex stand-in" + (" (--datatrove-regex-tokenizer)" if regex_tokenizer_ else " (spaCy not installed)"),
        "filtered_jsonl": str(dt / "filtered"),
        "deduped_jsonl": str(dt / "deduped"),
    }
