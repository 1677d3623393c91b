"""dedup: real releases of the same books cluster, distinct texts do not, exact duplicates go,
every drop is justified by an exact Jaccard, and the output is the same for any worker count."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from ember.storage.shards import ShardWriter, iter_records
from ember.tasks import dedup, download, normalize
from ember.tasks.dedup import DedupConfig, jaccard, shingles
from ember.tasks.stage import pool_map
from helpers import stage_context


def write_input(tmp_path: Path, records: list[dict], max_chars: int = 50_000) -> Path:
    with ShardWriter(tmp_path / "filter" / "shards", max_chars=max_chars) as writer:  # several shards
        writer.write_many(records)
    return tmp_path / "filter"


def run_dedup(
    tmp_path: Path, records: list[dict] | None, cfg: DedupConfig | None = None, mapper=None, name: str = "dedup"
) -> tuple[list[dict], list[dict], dict]:
    """Dedup `records` (in this order); returns kept records, clusters.jsonl lines and metrics."""
    if records is not None:
        write_input(tmp_path, records)
    ctx = stage_context(tmp_path, name, {"filter": tmp_path / "filter"}, mapper=mapper)
    metrics = dedup.run(cfg or DedupConfig(unit_chars=20_000), ctx)
    clusters = [json.loads(line) for line in (ctx.out / "clusters.jsonl").read_text(encoding="utf-8").splitlines()]
    return list(iter_records(ctx.out / "shards")), clusters, metrics


def chunks_of(tmp_path: Path, path: Path) -> list[dict]:
    """A corpus file through the real download (4,000-char chunks) and normalize stages."""
    download.run(download.DownloadConfig(sources=[{"path": str(path)}]), stage_context(tmp_path, "download", {}))
    normalize.run(
        normalize.NormalizeConfig(), stage_context(tmp_path, "normalize", {"download": tmp_path / "download"})
    )
    return list(iter_records(tmp_path / "normalize" / "shards"))


@pytest.fixture(scope="module")
def variants(corpora, tmp_path_factory) -> tuple[list[dict], list[dict], list[dict], dict]:
    """The ten Project Gutenberg releases of three books, chunked, normalized and deduplicated."""
    tmp_path = tmp_path_factory.mktemp("variants")
    records = chunks_of(tmp_path, corpora / "near_duplicates" / "gutenberg_raw_variants.jsonl")
    return (records, *run_dedup(tmp_path, records, DedupConfig(unit_chars=300_000)))


def removed_share_per_release(records: list[dict], kept: list[dict]) -> dict[int, float]:
    kept_ids = {r["id"] for r in kept}
    total: Counter[int] = Counter()
    removed: Counter[int] = Counter()
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
    assert metrics["verified_pairs"] > 0 and metrics["index_bytes_per_doc"] < 200


def test_every_drop_is_justified_by_its_kept_document(variants):
    """clusters.jsonl: one line per dropped document naming the kept one, and the exact Jaccard of
    their shingle sets (recomputed here) reaches the threshold: no false pair removes a document."""
    records, kept, clusters, metrics = variants
    kept_ids = {r["id"] for r in kept}
    by_id = {r["id"]: r for r in records}
    order = {r["id"]: i for i, r in enumerate(records)}
    dropped = [c["id"] for c in clusters]
    assert len(dropped) == len(set(dropped)) == metrics["exact_dups"] + metrics["near_dups"]
    assert set(dropped) | kept_ids == set(by_id) and not set(dropped) & kept_ids
    cfg = DedupConfig()
    for line in clusters:
        assert set(line) == {"id", "kept_id", "kind", "jaccard", "cluster"}
        assert line["kept_id"] in kept_ids and line["cluster"] in kept_ids
        assert order[line["kept_id"]] < order[line["id"]]  # keep: first
        a, b = by_id[line["id"]]["text"], by_id[line["kept_id"]]["text"]
        if line["kind"] == "exact":
            assert " ".join(a.lower().split()) == " ".join(b.lower().split()) and line["jaccard"] == 1.0
        else:
            assert line["kind"] == "near"
            assert line["jaccard"] == round(jaccard(shingles(a, cfg), shingles(b, cfg)), 4) >= 0.8


def test_output_is_the_same_for_any_worker_count_and_order(tmp_path, corpora):
    records = []
    for name in (
        "messy_web/dolma_provided_documents_000.jsonl",
        "near_duplicates/dolma_deduper_documents_000.jsonl",
        "messy_web/dolma_cc_en_head-0091.jsonl",
    ):
        with open(corpora / name, encoding="utf-8") as f:
            records += [
                {"id": f"{name}:{i}", "text": json.loads(line)["text"], "source": "web"} for i, line in enumerate(f)
            ]
    write_input(tmp_path, records, max_chars=20_000)

    def reversed_map(fn, items, name=""):  # units run last to first, results in input order
        return [fn(item) for item in reversed(items)][::-1]

    digests = []
    for name, mapper in [("seq", None), ("pool", pool_map(2)), ("reversed", reversed_map)]:
        kept, clusters, metrics = run_dedup(tmp_path, None, DedupConfig(unit_chars=5_000), mapper, name)
        files = sorted(p for p in (tmp_path / name).rglob("*") if p.is_file())
        digests.append(
            {p.relative_to(tmp_path / name).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
        )
        assert metrics["units"] > 4
    assert digests[0] == digests[1] == digests[2]
    # The Dolma fixture repeats 9 of the 10 pages byte for byte and edits the tenth.
    assert metrics["exact_dups"] == 9 and len(kept) == len(records) - 9 - metrics["near_dups"]


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
        {
            "id": "c",
            "text": "  THE QUICK brown fox\njumps over the   lazy dog near the river bank today.",
            "source": "t",
        },
        {"id": "d", "text": text, "source": "s"},
    ]
    kept, clusters, metrics = run_dedup(tmp_path, records)
    assert [r["id"] for r in kept] == ["a", "b"]
    assert clusters == [
        {"id": "c", "kept_id": "a", "kind": "exact", "jaccard": 1.0, "cluster": "a"},
        {"id": "d", "kept_id": "a", "kind": "exact", "jaccard": 1.0, "cluster": "a"},
    ]
    assert metrics["exact_dups"] == 2 and metrics["near_dups"] == 0


def book_text(corpora: Path, start: int, stop: int) -> str:
    with open(corpora / "gutenberg_en" / "books-03.jsonl", encoding="utf-8") as f:
        return json.loads(f.readline())["text"][start:stop]


def edit(text: str, every: int, offset: int = 50) -> str:
    """One word in `every` replaced, every 7th word upper-cased."""
    return " ".join(
        "changed" if i % every == offset % every else w.upper() if i % 7 == 0 else w for i, w in enumerate(text.split())
    )


def test_near_duplicate_with_a_few_edits(tmp_path, corpora):
    original, other = book_text(corpora, 10_000, 14_000), book_text(corpora, 20_000, 24_000)
    edited = edit(original, 100) + " An extra closing line."
    kept, clusters, metrics = run_dedup(
        tmp_path,
        [
            {"id": "original", "text": original, "source": "s"},
            {"id": "other", "text": other, "source": "s"},
            {"id": "edited", "text": edited, "source": "s"},
        ],
    )
    assert [r["id"] for r in kept] == ["original", "other"]
    assert len(clusters) == 1 and clusters[0]["kept_id"] == "original" and clusters[0]["id"] == "edited"
    assert clusters[0]["kind"] == "near" and 0.8 <= clusters[0]["jaccard"] < 1.0


def test_keep_longest_and_chains(tmp_path, corpora):
    """A ~ B and B ~ C but A and C too far apart: union-find makes one cluster, and the keep rule
    drops only what is within the threshold of a kept document."""
    cfg = DedupConfig()
    a = book_text(corpora, 30_000, 38_000)
    b = edit(a, 60, 10)
    c = edit(b, 60, 40)
    sa, sb, sc = (shingles(t, cfg) for t in (a, b, c))
    assert jaccard(sa, sb) >= 0.8 and jaccard(sb, sc) >= 0.8 and jaccard(sa, sc) < 0.8
    b += "\n" * (max(len(a), len(c)) - len(b) + 10)  # the longest in characters; blank lines change no shingle
    records = [
        {"id": "A", "text": a, "source": "s"},
        {"id": "B", "text": b, "source": "s"},
        {"id": "C", "text": c, "source": "s"},
    ]
    kept, clusters, _ = run_dedup(tmp_path / "first", records)
    assert [r["id"] for r in kept] == ["A", "C"]  # C is not within 0.8 of A: it stays
    assert [(x["id"], x["kept_id"], x["cluster"]) for x in clusters] == [("B", "A", "A")]
    kept, clusters, _ = run_dedup(tmp_path / "longest", records, DedupConfig(keep="longest"))
    assert [r["id"] for r in kept] == ["B"]  # B is the longest and within 0.8 of both
    assert [(x["id"], x["kept_id"]) for x in clusters] == [("A", "B"), ("C", "B")]


def test_false_candidates_are_rejected(tmp_path, corpora):
    """One-row bands make every pair sharing a single MinHash value a candidate; the exact
    Jaccard check rejects them, so nothing is removed."""
    text = book_text(corpora, 40_000, 44_000)
    words = text.split()
    half = " ".join(words[: len(words) // 2] + [w + "x" for w in words[len(words) // 2 :]])
    cfg = DedupConfig(bands=40, rows=1)
    kept, clusters, metrics = run_dedup(
        tmp_path, [{"id": "a", "text": text, "source": "s"}, {"id": "b", "text": half, "source": "s"}], cfg
    )
    assert metrics["candidate_pairs"] == 1 and metrics["rejected_pairs"] == 1 and len(kept) == 2 and not clusters


def test_chinese_uses_character_shingles(tmp_path, corpora):
    with open(corpora / "chinese_classic_novels" / "chapters.jsonl", encoding="utf-8") as f:
        chapters = [json.loads(next(f))["text"][:3000] for _ in range(2)]
    # The same chapter with full-width punctuation replaced and line breaks moved.
    variant = chapters[0].replace("，", ",").replace("。", ".").replace("\n", "")
    records = [
        {"id": "ch1", "text": chapters[0], "source": "zh"},
        {"id": "ch2", "text": chapters[1], "source": "zh"},
        {"id": "ch1-variant", "text": variant, "source": "zh"},
    ]
    kept, clusters, _ = run_dedup(tmp_path, records)
    assert [r["id"] for r in kept] == ["ch1", "ch2"]
    assert [c["id"] for c in clusters] == ["ch1-variant"]
    assert (
        len(shingles(chapters[0], DedupConfig())) > 2000
    )  # about one per character; spaces would give a few dozen "words"


@pytest.mark.slow
def test_chinese_poetry_exact_duplicates_are_removed(tmp_path, corpora):
    """Must-hold 4: the 472 poems whose text repeats an earlier poem's are all removed."""
    records: list[dict] = []
    first: dict[str, str] = {}
    repeats: set[str] = set()
    with open(corpora / "chinese_poetry" / "chinese_poetry.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            records.append({"id": row["id"], "text": row["text"], "source": "poetry"})
            if row["text"] in first:
                repeats.add(row["id"])
            first.setdefault(row["text"], row["id"])
    assert len(records) == 44_733 and len(repeats) == 472
    kept, clusters, metrics = run_dedup(tmp_path, records, DedupConfig())
    removed = {c["id"]: c for c in clusters}
    assert repeats <= set(removed) and not repeats & {r["id"] for r in kept}
    assert all(removed[i]["kind"] == "exact" or removed[i]["jaccard"] >= 0.8 for i in repeats)
    print(
        f"\nchinese_poetry: {metrics['docs']} docs, {metrics['exact_dups']} exact and {metrics['near_dups']} near "
        f"duplicates removed, keep rate {metrics['kept'] / metrics['docs']:.3f}"
    )
    # Near-duplicates (variant characters, punctuation) are real here, but most poems are unique.
    assert metrics["exact_dups"] >= 472 and metrics["kept"] / metrics["docs"] > 0.95


def test_shingles_are_stable_and_ignore_punctuation_and_case():
    cfg = DedupConfig()
    a = shingles("“Well,” said Alice, “I don’t know what you mean by that.”", cfg)
    b = shingles('"well," SAID alice, "i don\'t know\nwhat you mean by that."', cfg)
    assert a.dtype == np.uint64 and np.array_equal(a, b)
    assert jaccard(a, b) == 1.0 and jaccard(a, shingles("something else that is long enough here", cfg)) == 0.0
    # Fixed values: a change of hashing must bump the stage version.
    assert shingles("one two three four five", cfg).tolist() == [FIVE_WORDS]


FIVE_WORDS = 13252044965777964579


def test_minhash_off_keeps_near_duplicates(tmp_path):
    text = " ".join(f"word{i}" for i in range(300))
    records = [{"id": "a", "text": text, "source": "s"}, {"id": "b", "text": text + " plus", "source": "s"}]
    kept, clusters, metrics = run_dedup(tmp_path / "off", records, DedupConfig(minhash=False))
    assert len(kept) == 2 and clusters == []
    kept, clusters, metrics = run_dedup(tmp_path / "on", records, DedupConfig())
    assert [r["id"] for r in kept] == ["a"] and metrics["near_dups"] == 1


def test_config_validation():
    with pytest.raises(ValidationError):
        DedupConfig.model_validate({"shingle_size": 3})  # a dict: mypy would reject the unknown keyword
    with pytest.raises(ValidationError):
        DedupConfig(keep="shortest")


def test_edge_cases_empty_input_and_texts_without_words(tmp_path):
    (tmp_path / "empty" / "filter" / "shards").mkdir(parents=True)
    kept, clusters, metrics = run_dedup(tmp_path / "empty", None)
    assert kept == [] and clusters == [] and metrics["docs"] == 0
    records: list[dict] = [
        {"id": "a", "text": "!!! ...", "source": "s"},
        {"id": "b", "text": "", "source": "s"},
        {"id": "c", "text": None, "source": "s"},
        {"id": "d", "text": "?? ?", "source": "s"},
        {"id": "e", "text": "one", "source": "s"},
    ]
    kept, clusters, metrics = run_dedup(tmp_path / "odd", records)
    # "" and null normalize to the same (empty) text; punctuation-only texts have no shingles.
    assert [r["id"] for r in kept] == ["a", "b", "d", "e"]
    assert clusters == [{"id": "c", "kept_id": "b", "kind": "exact", "jaccard": 1.0, "cluster": "b"}]


def test_a_crashed_run_resumes_from_its_finished_units(tmp_path, corpora):
    text = (corpora / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:200_000]
    records = [{"id": f"s{i}", "text": text[i : i + 4000], "source": "s"} for i in range(0, len(text), 4000)]
    records += records[:5]  # some exact duplicates
    write_input(tmp_path, records)
    cfg = DedupConfig(unit_chars=20_000)

    def crash_before_writing(fn, items, name=""):
        if name == "dedup-write":
            raise KeyboardInterrupt
        return [fn(item) for item in items]

    def run_in(out: str, work: str, mapper=None) -> dict:
        ctx = stage_context(tmp_path, out, {"filter": tmp_path / "filter"}, work=tmp_path / work, mapper=mapper)
        dedup.run(cfg, ctx)
        return {p.relative_to(tmp_path / out).as_posix(): p.read_bytes() for p in (tmp_path / out).rglob("*.*")}

    with pytest.raises(KeyboardInterrupt):
        run_in("crashed", "work", crash_before_writing)
    finished = {p: p.stat().st_mtime_ns for p in (tmp_path / "work").glob("sig-*.npz")}
    assert len(finished) > 3
    resumed = run_in("resumed", "work")
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "work").glob("sig-*.npz")} == finished  # reused
    assert resumed == run_in("clean", "clean-work")
