"""filter: clean text shards -> kept shards + removed documents + removed lines (each with its rule).

What happens to each document, in order (`STEPS`; the first rule that fires names the drop):
1. `min_chars`, then the language (`languages`, `min_language_score`; langid.py, offline, on a
   prefix of the document; documents too short to tell are kept as "unknown").
2. C4's line rules (lines.py; Raffel et al. 2020, as datatrove's C4QualityFilter): lines without terminal
   punctuation, with fewer than 3 words, with "javascript", with cookie/policy phrases, with a
   word over 1,000 characters are dropped; citation markers ([1], [edit]) are stripped. Books
   are hard-wrapped, so the rules judge *paragraphs*: a line that does not end a sentence and
   is long (a wrapped line) or ends in , ; : or a dash is joined with the next line of its
   block first. Judged line by line, C4 drops 82% of the lines of gutenberg_en; judged so, well
   under 1% (benchmarks/filter_quality.py). Closing quotes count as terminal punctuation
   (“Yes,” she said.” ends a sentence), as do CJK full stops.
3. C4's document rules on what is left: "lorem ipsum", a curly bracket, fewer than 5 sentences.
4. Gopher quality and repetition (rules.py; Rae et al. 2021, Table A1), as datatrove sets them, with
   three changes: words are whitespace tokens stripped of edge punctuation, punctuation-only
   tokens are not words (counting "--" or a lone quote as words dropped 13% of good dialogue
   chunks); lines and paragraphs of fewer than 4 words never count as repeated (speaker names
   in a play); the stop-word rule applies only to English-looking text.
5. FineWeb's quality rules (Penedo et al. 2024): share of paragraphs ending in punctuation,
   share of short lines, characters in duplicated lines, newlines per word.

For CJK-heavy text (no spaces between words) every rule that counts words counts characters,
with its own minimum length (`cjk_min_words`), so a Chinese chapter or a quatrain is not "too
few words"; sentences end at 。！？．.

A dropped document is written to `removed/` with `rule`, `value` (what was measured),
`threshold` and `detail`; each dropped line of a document to `removed_lines/` with the document
`id`, its `line` number (0-based, in the normalized text) and its rule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import pyarrow as pa

from ember.storage.shards import TEXT_SCHEMA, ShardFileWriter
from ember.tasks.filter import langid
from ember.tasks.filter.config import FilterConfig
from ember.tasks.filter.lines import Drop, LineDrop, c4_document, line_rules
from ember.tasks.filter.rules import RULES, Doc, min_chars
from ember.tasks.shard_stage import Document, ShardStage, Stats
from ember.tasks.stage import Metrics, Stage, StageContext

REMOVED_SCHEMA = (
    TEXT_SCHEMA.append(pa.field("rule", pa.string()))
    .append(pa.field("value", pa.float64()))
    .append(pa.field("threshold", pa.float64()))
    .append(pa.field("detail", pa.string()))
)
# Named as DataType: inferred from the literal alone, the list's item type would be `object`.
_REMOVED_LINES_FIELDS: list[tuple[str, pa.DataType]] = [
    ("id", pa.string()),
    ("line", pa.int32()),
    ("text", pa.string()),
    ("source", pa.string()),
    ("rule", pa.string()),
    ("value", pa.float64()),
    ("threshold", pa.float64()),
]
REMOVED_LINES_SCHEMA = pa.schema(_REMOVED_LINES_FIELDS)
NO_LANGUAGE = langid.Language("-", 0.0, "off")


class Judging:
    """One document on its way through STEPS: its text so far (and that text's statistics), the
    language found and the lines dropped."""

    def __init__(self, text: str, cfg: FilterConfig):
        self.doc = Doc(text, cfg)
        self.language = NO_LANGUAGE
        self.lines: list[LineDrop] = []
        self.cjk = False  # decided on the whole text, before the line rules cut it


def min_length(j: Judging, cfg: FilterConfig) -> Drop | None:
    return min_chars(j.doc, cfg)


def language(j: Judging, cfg: FilterConfig) -> Drop | None:
    if cfg.languages is None:
        return None
    j.language = found = langid.detect(j.doc.text, cfg.langid_chars, cfg.langid_min_letters, cfg.langid_low_accuracy)
    if found.code == "unknown":
        return None
    if found.code not in cfg.languages:
        return Drop("language", found.score, cfg.min_language_score, found.code)
    if found.score < cfg.min_language_score:
        return Drop("min_language_score", found.score, cfg.min_language_score, found.code)
    return None


def c4_lines(j: Judging, cfg: FilterConfig) -> None:
    """Drops lines, never the document: later steps judge the text that is left."""
    doc, text = j.doc, j.doc.text
    j.cjk = doc.is_cjk
    # The words only serve line_rules' longest-word gate (not for CJK), and the words of a text
    # whose lines change are never used again (the rules below judge the kept text). Without a
    # whitespace token of half that length (str.lower can double a token: 'İ' is two code points
    # lowercased) no word is that long, and a plain split is a fifth of the cost of the words.
    limit = cfg.line_max_word_chars
    long_token = (
        limit is not None
        and not doc.is_cjk
        and len(text) > limit
        and max(map(len, text.split()), default=0) > limit // 2
    )
    kept, j.lines = line_rules(text, cfg, doc.is_cjk, doc.words if long_token else [], doc.c4_units)
    if kept is not text:
        j.doc = Doc(kept, cfg)


def c4_documents(j: Judging, cfg: FilterConfig) -> Drop | None:
    return c4_document(j.doc.text, cfg, j.cjk)


def quality(j: Judging, cfg: FilterConfig) -> Drop | None:
    """The document rules (rules.py: min_chars again on what is left, Gopher, FineWeb)."""
    return next((drop for rule in RULES if (drop := rule(j.doc, cfg)) is not None), None)


# The stage's pipeline, in order: the first step that returns a Drop removes the document.
STEPS: list[Callable[[Judging, FilterConfig], Drop | None]] = [min_length, language, c4_lines, c4_documents, quality]


def check(text: str, cfg: FilterConfig) -> Drop | None:
    """Why `text` should be dropped under `cfg` (the first rule that fires), or None to keep it.
    Document rules only: see `judge` for the whole stage (language, line rules, then these)."""
    return quality(Judging(text, cfg), cfg)


class Verdict(NamedTuple):
    text: str  # what is kept (the line rules may have removed lines)
    drop: Drop | None
    lines: list[LineDrop]
    language: langid.Language


def judge(text: str, cfg: FilterConfig) -> Verdict:
    """Everything the stage decides about one document."""
    j = Judging(text, cfg)
    drop = next((drop for step in STEPS if (drop := step(j, cfg)) is not None), None)
    return Verdict(j.doc.text, drop, j.lines, j.language)


class QualityFilter(ShardStage[FilterConfig]):
    name = "filter"
    outputs = {"shards": TEXT_SCHEMA, "removed": REMOVED_SCHEMA, "removed_lines": REMOVED_LINES_SCHEMA}

    def process(self, doc: Document, out: dict[str, ShardFileWriter], stats: Stats) -> None:
        verdict = judge(doc.text, self.cfg)
        stats.add("languages", key=verdict.language.code)
        for line in verdict.lines:
            out["removed_lines"].add(
                {
                    "id": doc.id,
                    "line": line.line,
                    "text": line.text,
                    "source": doc.source,
                    "rule": line.rule,
                    "value": float(line.value),
                    "threshold": float(line.threshold),
                }
            )
            stats.add("removed_lines", key=line.rule)
            stats.add("removed_line_chars", len(line.text) + 1, key=line.rule)
        for rule in dict.fromkeys(line.rule for line in verdict.lines):
            stats.add("removed_line_docs", key=rule)
        if verdict.drop is None:
            out["shards"].add({"id": doc.id, "text": verdict.text, "source": doc.source})
            stats.add("kept")
            stats.add("kept_chars", len(verdict.text))
            return
        drop = verdict.drop
        out["removed"].add(
            {
                "id": doc.id,
                "text": doc.text,
                "source": doc.source,
                "rule": drop.rule,
                "value": float(drop.value),
                "threshold": float(drop.threshold),
                "detail": drop.detail,
            }
        )
        stats.add("removed_docs", key=drop.rule)
        stats.add("removed_chars", len(doc.text), key=drop.rule)
        stats.first("removed_example", drop.rule, (doc.id, round(float(drop.value), 4), float(drop.threshold)))

    def summarize(self, stats: Stats, ctx: StageContext) -> Metrics:
        docs, kept = int(stats.total("docs")), int(stats.total("kept"))
        chars_in, kept_chars = int(stats.total("chars_in")), int(stats.total("kept_chars"))
        examples = stats.firsts.get("removed_example", {})
        rows: list[dict[str, Any]] = sorted(
            (
                {
                    "rule": rule,
                    "docs": int(n),
                    "chars": int(stats.keyed("removed_chars")[rule]),
                    "threshold": examples[rule][2],
                    "example_id": examples[rule][0],
                    "example_value": examples[rule][1],
                }
                for rule, n in stats.keyed("removed_docs").items()
            ),
            key=lambda r: (-r["docs"], r["rule"]),
        )
        line_rows: list[dict[str, Any]] = sorted(
            (
                {
                    "rule": rule,
                    "lines": int(n),
                    "chars": int(stats.keyed("removed_line_chars")[rule]),
                    "docs": int(stats.keyed("removed_line_docs")[rule]),
                }
                for rule, n in stats.keyed("removed_lines").items()
            ),
            key=lambda r: (-r["lines"], r["rule"]),
        )
        languages = {code: int(n) for code, n in stats.keyed("languages").items()}
        ctx.report.table(
            "filter-removed",
            rows or [{"rule": "(none)", "docs": 0, "chars": 0}],
            f"Documents removed per rule ({docs - kept} of {docs}; chars = characters removed)",
        )
        ctx.report.table(
            "filter-removed-lines",
            line_rows or [{"rule": "(none)", "lines": 0, "chars": 0}],
            "Lines removed per line rule (from documents kept or not)",
        )
        ctx.report.markdown(
            "filter-summary",
            "\n".join(
                [
                    f"**{kept} of {docs} documents kept** ({kept_chars:,} of {chars_in:,} characters).",
                    "",
                    "Languages: "
                    + ", ".join(f"{code} {n}" for code, n in sorted(languages.items(), key=lambda kv: -kv[1])),
                    "",
                    "Every removed document is in `removed/` (rule, value, threshold) and every removed line "
                    "in `removed_lines/` (id, line); `ember audit DOC_ID` explains one document.",
                ]
            ),
        )
        return {
            "docs": docs,
            "kept": kept,
            "removed": docs - kept,
            "removed_fraction": round((docs - kept) / docs, 4) if docs else 0.0,
            "removed_per_rule": {r["rule"]: r["docs"] for r in rows},
            "removed_chars_per_rule": {r["rule"]: r["chars"] for r in rows},
            "removed_lines_per_rule": {r["rule"]: r["lines"] for r in line_rows},
            "languages": dict(sorted(languages.items())),
            "chars_in": chars_in,
            "kept_chars": kept_chars,
            "removed_chars": chars_in - kept_chars,
        }


def run(cfg: FilterConfig, ctx: StageContext) -> Metrics:
    return QualityFilter(cfg).run(ctx)


STAGE = Stage(name=QualityFilter.name, version=3, run=run, inputs=("normalize",))
