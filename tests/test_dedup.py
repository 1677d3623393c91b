"""dedup: real releases of the same books cluster, distinct texts do not, exact duplicates go."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from ember.storage.shards import ShardWriter, iter_records
from ember.tasks import dedup, download, normalize
from ember.tasks.dedup import DedupConfig, Shingler, jaccard
from ember.tasks.stage import Reporter, StageContext


def make_ctx(tmp_path: Path, name: str, inputs: dict[str, Path]) -> StageContext:
    (tmp_path / name).mkdir(parents=True)
    return StageContext(inputs=inputs, out=tmp_path / name, work=tmp_path / f"{name}-work",
                        report=Reporter(name), store_root=tmp_path)


def run_dedup(tmp_path: Path, records: list[dict], cfg: DedupConfig | None = None) -> tuple[list[dict], list[dict], dict]:
    """Dedup `records` (in this order); returns kept records, clusters and metrics."""
    with ShardWriter(tmp_path / "filter" / "shards", max_chars=50_000) as writer:  # several shards
        writer.write_many(records)
    ctx = make_ctx(tmp_path, "dedup", {"filter": tmp_path / "filter"})
    metrics = dedup.run(cfg or DedupConfig(), ctx)
    clusters = [json.loads(line) for line in (ctx.out / "clusters.jsonl").read_text(encoding="utf-8").splitlines()]
    return list(iter_records(ctx.out / "shards")), clusters, metrics


def chunks_of(tmp_path: Path, path: Path) -> list[dict]:
    """A corpus file through the real download (4,000-char chunks) and normalize stages."""
    download.run(download.DownloadConfig(sources=[{"path": str(path)}]), make_ctx(tmp_path, "download", {}))
    normalize.run(normalize.NormalizeConfig(), make_ctx(tmp_path, "normalize", {"download": tmp_path / "download"}))
    return list(iter_records(tmp_path / "normalize" / "shards"))


@pytest.fixture(scope="module")
def variants(corpora, tmp_path_factory) -> tuple[list[dict], list[dict], list[dict], dict]:
    """The ten Project Gutenberg releases of three books, chunked, normalized and deduplicated."""
    tmp_path = tmp_path_factory.mktemp("variants")
    records = chunks_of(tmp_path, corpora / "near_duplicates" / "gutenberg_raw_variants.jsonl")
    return (records, *run_dedup(tmp_path, records))


def removed_share_per_release(records: list[dict], kept: list[dict]) -> dict[int, float]:
    kept_ids = {r["id"] for r in kept}
    total, removed = Counter(), Counter()
    for record in records:
        release = int(record["id"].split(":")[1].split("#")[0])  # record index in the jsonl
        total[release] += 1
        removed[release] += record["id"] not in kept_ids
    return {release: removed[release] / total[release] for release in total}


def test_releases_of_the_same_book_cluster(variants):
    records, kept, clusters, metrics = variants
    share = removed_share_per_release(records, kept)
    # Records 0, 2 and 5 are the first release of each book: kept. Every later release of
    # Alice (1, quotes restyled) and A Christmas Carol (3, 4) goes entirely; the older Pride
    # and Prejudice releases (7-9) have real textual differences, so most but not all of them.
    assert share[0] == share[2] == 0.0 and share[5] < 0.05
    assert min(share[1], share[3], share[4], share[6]) >= 0.95
    assert min(share[7], share[8], share[9]) >= 0.6
    assert metrics["exact_dups"] > 100 and metrics["near_dups"] > 400
    assert metrics["kept"] == len(kept) == metrics["docs"] - metrics["exact_dups"] - metrics["near_dups"]


def test_clusters_file_names_kept_and_removed(variants):
    records, kept, clusters, metrics = variants
    kept_ids = {r["id"] for r in kept}
    order = {r["id"]: i for i, r in enumerate(records)}
    removed = [doc for c in clusters for doc in c["removed"]]
    assert len(removed) == len(set(removed)) == metrics["exact_dups"] + metrics["near_dups"]
    for cluster in clusters:
        assert set(cluster) == {"kept", "removed", "kind", "similarity"}
        assert cluster["kept"] in kept_ids and not kept_ids & set(cluster["removed"])
        assert all(order[cluster["kept"]] < order[doc] for doc in cluster["removed"])  # the first is kept
        if cluster["kind"] == "exact":
            assert cluster["similarity"] == 1.0
        else:
            assert cluster["kind"] == "minhash" and cluster["similarity"] >= 0.8


def test_distinct_texts_make_no_clusters(tmp_path, corpora):
    records = chunks_of(tmp_path, corpora / "tinyshakespeare" / "input.txt")
    kept, clusters, metrics = run_dedup(tmp_path, records)
    assert len(records) > 250
    assert clusters == [] and metrics["near_dups"] == metrics["exact_dups"] == 0
    assert [r["id"] for r in kept] == [r["id"] for r in records]


def test_exact_duplicates_ignore_case_and_whitespace(tmp_path):
    text = "The quick brown fox jumps over the lazy dog near the river bank today."
    records = [
        {"id": "a", "text": text, "source": "s"},
        {"id": "b", "text": "Something else entirely, about ships and sealing wax and kings.", "source": "s"},
        {"id": "c", "text": "  THE QUICK brown fox\njumps over the   lazy dog near the river bank today.", "source": "t"},
        {"id": "d", "text": text, "source": "s"},
    ]
    kept, clusters, metrics = run_dedup(tmp_path, records)
    assert [r["id"] for r in kept] == ["a", "b"]
    assert clusters == [{"kept": "a", "removed": ["c", "d"], "kind": "exact", "similarity": 1.0}]
    assert metrics["exact_dups"] == 2 and metrics["near_dups"] == 0


@pytest.mark.parametrize("cfg", [
    pytest.param(DedupConfig(), id="exact_jaccard"),
    pytest.param(DedupConfig(verify="estimate"), id="estimated_jaccard"),
])
def test_near_duplicate_with_a_few_edits(tmp_path, corpora, cfg):
    with open(corpora / "gutenberg_en" / "books-03.jsonl", encoding="utf-8") as f:
        book = json.loads(f.readline())["text"]
    original = book[10_000:14_000]
    words = original.split()
    # One word in 100 replaced, case changed, lines rewrapped, a closing line added.
    edited = " ".join("changed" if i % 100 == 50 else w.upper() if i % 7 == 0 else w
                      for i, w in enumerate(words)) + " An extra closing line."
    other = book[20_000:24_000]
    kept, clusters, metrics = run_dedup(tmp_path, [
        {"id": "original", "text": original, "source": "s"},
        {"id": "other", "text": other, "source": "s"},
        {"id": "edited", "text": edited, "source": "s"},
    ], cfg)
    assert [r["id"] for r in kept] == ["original", "other"]
    assert len(clusters) == 1 and clusters[0]["kept"] == "original" and clusters[0]["removed"] == ["edited"]
    assert clusters[0]["kind"] == "minhash" and 0.8 <= clusters[0]["similarity"] < 1.0


def test_chinese_uses_character_shingles(tmp_path, corpora):
    with open(corpora / "chinese_classic_novels" / "chapters.jsonl", encoding="utf-8") as f:
        chapters = [json.loads(next(f))["text"][:3000] for _ in range(2)]
    # The same chapter with full-width punctuation replaced and line breaks moved.
    variant = chapters[0].replace("，", ",").replace("。", ".").replace("\n", "")
    records = [{"id": "ch1", "text": chapters[0], "source": "zh"}, {"id": "ch2", "text": chapters[1], "source": "zh"},
               {"id": "ch1-variant", "text": variant, "source": "zh"}]
    kept, clusters, _ = run_dedup(tmp_path, records)
    assert [r["id"] for r in kept] == ["ch1", "ch2"]
    assert clusters[0]["removed"] == ["ch1-variant"]
    shingles = Shingler(DedupConfig())(chapters[0])
    assert len(shingles) > 2000  # about one per character; spaces would give a few dozen "words"


def test_shingles_are_stable_and_ignore_punctuation_and_case():
    shingler = Shingler(DedupConfig())
    a = shingler("“Well,” said Alice, “I don’t know what you mean by that.”")
    b = Shingler(DedupConfig())("\"well,\" SAID alice, \"i don't know\nwhat you mean by that.\"")
    assert a.dtype == np.uint64 and np.array_equal(a, b)
    assert jaccard(a, b) == 1.0 and jaccard(a, shingler("something else that is long enough here")) == 0.0


def test_minhash_off_keeps_near_duplicates(tmp_path):
    text = " ".join(f"word{i}" for i in range(300))
    records = [{"id": "a", "text": text, "source": "s"}, {"id": "b", "text": text + " plus", "source": "s"}]
    kept, clusters, metrics = run_dedup(tmp_path / "off", records, DedupConfig(minhash=False))
    assert len(kept) == 2 and clusters == []
    kept, clusters, metrics = run_dedup(tmp_path / "on", records, DedupConfig())
    assert [r["id"] for r in kept] == ["a"] and metrics["near_dups"] == 1


def test_config_validation():
    with pytest.raises(ValidationError, match="exceeds num_perm"):
        DedupConfig(num_perm=64, bands=14, rows=8)
    with pytest.raises(ValidationError):
        DedupConfig(shingle_size=3)
