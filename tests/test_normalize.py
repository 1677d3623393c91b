"""normalize: ftfy on real mojibake (ftfy's own test cases), line breaks, controls, blank lines."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import pytest
from pydantic import ValidationError

from ember.storage.shards import ShardWriter, iter_records
from ember.tasks import normalize
from ember.tasks.normalize import NormalizeConfig, ftfy_can_change, normalize_text
from helpers import run_stage_in


def load_cases(corpora: Path) -> list[dict]:
    with open(corpora / "mojibake_ftfy" / "ftfy_cases.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def cases(corpora) -> dict[str, dict]:
    return {case["id"]: case for case in load_cases(corpora)}


def run_normalize(tmp_path: Path, records: list[dict], cfg: NormalizeConfig | None = None) -> tuple[list[dict], dict]:
    upstream = tmp_path / "download"
    with ShardWriter(upstream / "shards") as writer:
        writer.write_many(records)
    out, metrics = run_stage_in(
        tmp_path, normalize.STAGE, cfg or NormalizeConfig(), {"download": upstream}, work=tmp_path / "work"
    )
    return list(iter_records(out / "shards")), metrics


# Real strings from the wild (Twitter, OSCAR, bug reports), fixed exactly by the default config.
@pytest.mark.parametrize(
    "case_id, expected",
    [
        ("in-the-wild.json#0", "He's Justin❤"),
        (
            "in-the-wild.json#1",
            "Le Schtroumpf Docteur conseille gâteaux et baies schtroumpfantes pour un régime équilibré.",
        ),
        ("in-the-wild.json#8", "Beta Haber: Hırsızı Büyü Korkuttu"),
        ("in-the-wild.json#14", "Iggy Pop (né Jim Osterberg)"),
        ("in-the-wild.json#45", "weiß"),
    ],
)
def test_default_config_fixes_real_mojibake(cases, case_id, expected):
    case = cases[case_id]
    assert case["fixed"] == expected  # the corpus says so too
    assert normalize_text(case["text"], NormalizeConfig()) == expected


def test_default_config_keeps_curly_quotes(cases):
    # UTF-8 read as cp1252: fixed to the curly quotes the writer typed, not uncurled.
    text = next(c["text"] for c in cases.values() if c["text"].startswith("Ecuadorâ"))
    assert normalize_text(text, NormalizeConfig()).startswith("Ecuador’s ‘purely political decision on Assange’")


def test_ftfy_defaults_reproduce_every_in_the_wild_fix(cases):
    # With ftfy's own defaults switched back on, the stage gives exactly what ftfy's tests expect.
    cfg = NormalizeConfig(uncurl_quotes=True, fix_latin_ligatures=True, fix_character_width=True)
    wild = [c for c in cases.values() if c["file"] == "in-the-wild.json" and c["expect"] == "pass"]
    assert len(wild) >= 60
    wrong = [c["id"] for c in wild if normalize_text(c["text"], cfg) != c["fixed"]]
    assert wrong == []


def test_correct_text_that_looks_like_mojibake_is_left_alone(cases):
    from ftfy.fixes import uncurl_quotes

    negatives = [c for c in cases.values() if c["file"] == "negative.json"]
    assert len(negatives) >= 25
    # ftfy's expectation uncurls quotes, which this stage does not do by default.
    expected = {c["id"]: c["text"] if uncurl_quotes(c["text"]) == c["fixed"] else c["fixed"] for c in negatives}
    assert sum(expected[c["id"]] == c["text"] for c in negatives) >= 25
    wrong = [c["id"] for c in negatives if normalize_text(c["text"], NormalizeConfig()) != expected[c["id"]]]
    assert wrong == []


@pytest.mark.parametrize(
    "text, expected",
    [
        pytest.param("one\r\ntwo\rthree\u2028four\u2029five", "one\ntwo\nthree\nfour\nfive", id="newlines"),
        pytest.param("a\x00b\x07c\x1bd\ufeffe\tf", "abcde\tf", id="control_chars"),
        pytest.param("\ufeffBOM at the start", "BOM at the start", id="bom"),
        pytest.param("e\u0301te\u0301", "été", id="nfc"),
        pytest.param("p1\n\n\n\n\n\np2\n \n\t\n \n\np3\n\n\np4", "p1\n\n\np2\n\n\np3\n\n\np4", id="blank_lines"),
        pytest.param("fish &amp; chips", "fish & chips", id="html_entity_in_ascii"),
        pytest.param("if a < b &amp;&amp; c", "if a < b &amp;&amp; c", id="html_kept_when_markup"),
        pytest.param("full-width，punctuation。", "full-width，punctuation。", id="cjk_width_kept"),
    ],
)
def test_normalize_text_cases(text, expected):
    assert normalize_text(text, NormalizeConfig()) == expected


def test_options_turn_steps_off():
    text = "caf\u00c3\u00a9\r\n\n\n\n\nend"
    cfg = NormalizeConfig(ftfy=False, normalize_newlines=False, max_blank_lines=None)
    assert normalize_text(text, cfg) == text
    assert normalize_text(text, NormalizeConfig(max_blank_lines=0)) == "café\nend"


@pytest.mark.parametrize(
    "text, can_change",
    [
        ("plain ASCII prose, nothing to fix.", False),
        ("AT&amp;T", True),
        ("\x1b[36mcoloured\x1b[0m", True),
        ("naïve", True),
    ],
)
def test_ftfy_fast_path(text, can_change):
    cfg = NormalizeConfig()
    assert ftfy_can_change(text, cfg) is can_change
    if not can_change:  # the shortcut is only taken where ftfy would change nothing
        import ftfy

        assert ftfy.fix_text(text, config=normalize.ftfy_config(cfg)) == text


def test_run_keeps_ids_and_counts_changes(tmp_path, cases):
    records = [
        {"id": case_id, "text": cases[case_id]["text"], "source": "ftfy"}
        for case_id in ("in-the-wild.json#0", "in-the-wild.json#8", "negative.json#1")
    ]
    records += [{"id": "crlf", "text": "line\r\nline", "source": "x"}, {"id": "ascii", "text": "fine", "source": "x"}]
    out, metrics = run_normalize(tmp_path, records)
    assert [(r["id"], r["source"]) for r in out] == [(r["id"], r["source"]) for r in records]
    assert out[0]["text"] == "He's Justin❤" and out[3]["text"] == "line\nline" and out[4]["text"] == "fine"
    assert metrics["docs"] == 5
    assert metrics["ftfy_changed"] == 2
    assert metrics["other_changed"] == 1
    assert metrics["ftfy_skipped_ascii"] == 2
    assert metrics["chars_in"] == sum(len(r["text"]) for r in records)
    assert metrics["chars_out"] == sum(len(r["text"]) for r in out)


def test_run_on_all_ftfy_cases(tmp_path, corpora):
    records = [{"id": c["id"], "text": c["text"], "source": "ftfy"} for c in load_cases(corpora)]
    out, metrics = run_normalize(tmp_path, records)
    assert len(out) == len(records) == 161
    assert metrics["ftfy_changed"] >= 90
    assert not any("\r" in r["text"] or "\u2028" in r["text"] for r in out)


def test_unknown_key_fails():
    with pytest.raises(ValidationError):
        NormalizeConfig.model_validate({"ftfy_level": 3})  # a dict: mypy would reject the unknown keyword


# -- must-hold 1: every case that ftfy itself gets right, through the stage ----------------------


def ftfy_right(cases: list[dict]) -> list[dict]:
    """The cases (of every file, known failures included) where plain `ftfy.fix_text` gives the
    expected fix: computed here, not read from the `expect` labels."""
    import ftfy

    return [c for c in cases if ftfy.fix_text(c["text"]) == c["fixed"]]


def test_stage_fixes_every_case_that_ftfy_gets_right(tmp_path, corpora):
    import ftfy

    cases = load_cases(corpora)
    right = ftfy_right(cases)
    assert 120 <= len(right) < len(cases)  # ftfy does not get all of them right
    records = [{"id": c["id"], "text": c["text"], "source": "ftfy"} for c in right]
    # With ftfy's own style defaults (uncurled quotes, no ligatures, half-width) switched on, the
    # stage's output is exactly the expected fix of every such case.
    cfg = NormalizeConfig(uncurl_quotes=True, fix_latin_ligatures=True, fix_character_width=True)
    out, _ = run_normalize(tmp_path / "ftfy-style", records, cfg)
    wrong = [(c["id"], r["text"], c["fixed"]) for c, r in zip(right, out, strict=True) if r["text"] != c["fixed"]]
    assert wrong == []
    # With Ember's defaults (curly quotes, ligatures and widths kept as written), every case whose
    # expected fix does not depend on those style choices is fixed exactly too, and the others
    # equal ftfy run with the same documented options.
    out, _ = run_normalize(tmp_path / "defaults", records)
    styled = {
        c["id"]: ftfy.fix_text(c["text"], uncurl_quotes=False, fix_latin_ligatures=False, fix_character_width=False)
        for c in right
    }
    style_free = [c for c in right if styled[c["id"]] == c["fixed"]]
    assert len(style_free) >= 100
    assert [c["id"] for c, r in zip(right, out, strict=True) if c in style_free and r["text"] != c["fixed"]] == []
    assert [c["id"] for c, r in zip(right, out, strict=True) if r["text"] != styled[c["id"]]] == []


def _corpus_sample(corpora: Path) -> list[str]:
    texts = []
    for path, limit in (
        ("gutenberg_en/books-03.jsonl", 12),
        ("chinese_classic_novels/chapters.jsonl", 40),
        ("messy_web/aeb_pages_fulltext.jsonl", 181),
        ("chinese_poetry/chinese_poetry.jsonl", 2000),
        ("near_duplicates/gutenberg_raw_variants.jsonl", 6),
    ):
        with open(corpora / path, encoding="utf-8") as f:
            for line in islice(f, limit):
                text = json.loads(line)["text"]
                texts += [text[i : i + 20_000] for i in range(0, len(text), 20_000)]
    return texts


@pytest.mark.slow
def test_ftfy_shortcut_equals_full_ftfy_on_real_text(corpora):
    """The shortcut skips ftfy only where ftfy would change nothing: checked on books, Chinese
    novels and poems, web pages and raw Gutenberg releases."""
    import ftfy

    cfg = NormalizeConfig()
    fixer = normalize.ftfy_config(cfg)
    texts = _corpus_sample(corpora)
    skipped = [t for t in texts if not ftfy_can_change(t, cfg)]
    assert len(skipped) > len(texts) / 3  # the shortcut is taken often (else it is worthless)
    assert [t[:60] for t in skipped if ftfy.fix_text(t, config=fixer) != t] == []


def test_change_kinds_are_counted(tmp_path):
    records = [
        {"id": "a", "text": "caf\u00c3\u00a9 ok", "source": "x"},
        {"id": "b", "text": "one\r\ntwo\n\n\n\n\nthree", "source": "x"},
        {"id": "c", "text": "bell\x07 and e\u0301", "source": "x"},
        {"id": "d", "text": "nothing to do", "source": "x"},
    ]
    out, metrics = run_normalize(tmp_path, records)
    assert [r["text"] for r in out] == ["café ok", "one\ntwo\n\n\nthree", "bell and é", "nothing to do"]
    assert metrics["changed_per_kind"] == {
        "ftfy": 1,
        "newlines": 1,
        "control_chars": 1,
        "unicode_form": 1,
        "blank_lines": 1,
    }
    assert metrics["changed_docs"] == 3


def test_shards_map_to_shards_whatever_the_order(tmp_path):
    from ember.tasks.stage import pool_map

    upstream = tmp_path / "download"
    for n in range(3):
        with ShardWriter(upstream / "shards", prefix=f"part-{n:05d}") as writer:
            writer.write_many(
                {"id": f"{n}-{i}", "text": f"caf\u00c3\u00a9 {n} {i}\r\n", "source": "x"} for i in range(5)
            )
    outputs = []
    for name, mapper in (
        ("seq", None),
        ("reversed", lambda fn, items, name="": [fn(i) for i in items[::-1]][::-1]),
        ("pool", pool_map(2)),
    ):
        out, metrics = run_stage_in(
            tmp_path,
            normalize.STAGE,
            NormalizeConfig(),
            {"download": upstream},
            name=name,
            work=tmp_path / "work",
            mapper=mapper,
        )
        assert metrics["shards"] == 3 and metrics["docs"] == 15
        files = sorted(p.name for p in (out / "shards").iterdir())
        assert files == sorted(p.name for p in (upstream / "shards").iterdir())  # names follow the input
        outputs.append({f: (out / "shards" / f).read_bytes() for f in files})
    assert outputs[0] == outputs[1] == outputs[2]
