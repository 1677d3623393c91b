"""filter: clean text shards -> kept shards + removed shards (each removed doc with its rule).

Gopher's quality and repetition heuristics (Rae et al. 2021, Table A1) as datatrove sets them,
with three changes for the text this pipeline sees:
- words are whitespace tokens stripped of edge punctuation, and punctuation-only tokens are
  not words: counting "--" or a lone quote as words drops dialogue-heavy book chunks;
- for CJK-heavy text (no spaces between words) the length and n-gram rules count characters,
  so a Chinese chapter is not "too few words";
- the stop-word rule applies only to text that looks English.

Each rule is a small function `(doc, cfg) -> Drop | None`; the first rule that fires names
the drop, and the removed document carries it (`rule`, `value`, `threshold`).
"""

from __future__ import annotations

import re
import string
import time
from functools import cached_property
from itertools import filterfalse, repeat
from typing import Callable, NamedTuple

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from ember.storage.shards import TEXT_SCHEMA, ShardWriter, input_shards, read_shard
from ember.tasks.stage import Stage, StageContext

REMOVED_SCHEMA = TEXT_SCHEMA.append(pa.field("rule", pa.string())).append(pa.field("value", pa.float64())) \
    .append(pa.field("threshold", pa.float64()))

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})  # Gopher's list


class FilterConfig(BaseModel):
    """Every threshold can be set to null to turn its rule off."""

    model_config = ConfigDict(extra="forbid")

    min_chars: int | None = Field(100, ge=0, description="drop documents shorter than this many characters")
    # Gopher quality
    min_words: int | None = Field(50, ge=0, description="fewer words (CJK: characters) than this")
    max_words: int | None = Field(100_000, ge=1, description="more words (CJK: characters) than this")
    min_mean_word_length: float | None = Field(3.0, ge=0, description="mean word length below this (not for CJK)")
    max_mean_word_length: float | None = Field(10.0, ge=0, description="mean word length above this (not for CJK)")
    max_hash_ratio: float | None = Field(0.1, ge=0, description="'#' per word above this")
    max_ellipsis_ratio: float | None = Field(0.1, ge=0, description="'...' or '…' per word above this")
    max_bullet_lines: float | None = Field(
        0.9, ge=0, le=1,
        description="fraction of non-blank lines starting with '•' or '-' above this")
    max_ellipsis_lines: float | None = Field(
        0.3, ge=0, le=1,
        description="fraction of non-blank lines ending with an ellipsis above this")
    min_alpha_words: float | None = Field(0.8, ge=0, le=1, description="fraction of words with a letter below this")
    min_stop_words: int | None = Field(
        2, ge=0,
        description="fewer English stop words (the, be, to, of, and, that, have, with); English-looking text only")
    # Gopher repetition
    max_dup_paragraphs: float | None = Field(0.3, ge=0, le=1,
                                             description="fraction of paragraphs that repeat an earlier one above this")
    max_dup_paragraph_chars: float | None = Field(
        0.2, ge=0, le=1,
        description="characters in repeated paragraphs / all characters above this")
    max_dup_lines: float | None = Field(0.3, ge=0, le=1,
                                        description="fraction of lines that repeat an earlier one above this")
    max_dup_line_chars: float | None = Field(0.2, ge=0, le=1,
                                             description="characters in repeated lines / all characters above this")
    # Speaker names in a play ("LADY ANNE:") and scene breaks ("*     *     *") repeat by design:
    # counted as repetitions they dropped 4% of tinyshakespeare's chunks and Dracula's log entries.
    repeat_min_words: int = Field(4, ge=0, description="lines and paragraphs with fewer words never count as repeated")
    top_ngram_chars: dict[int, float] | None = Field(
        {2: 0.20, 3: 0.18, 4: 0.16},
        description="n -> max share of characters covered by the most frequent word n-gram (CJK: character n-gram)")
    dup_ngram_chars: dict[int, float] | None = Field(
        {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
        description="n -> max share of characters covered by repeated word n-grams (CJK: character n-grams)")
    # Language heuristics (no language-id model: nothing to download)
    cjk_fraction: float = Field(0.3, ge=0, le=1,
                                description="above this share of CJK characters, count characters instead of words")
    english_fraction: float = Field(
        0.9, ge=0, le=1,
        description="the stop-word rule applies when at least this share of letters is ASCII")


class Drop(NamedTuple):
    rule: str
    value: float
    threshold: float


# Edge punctuation stripped from words: ASCII plus the quotes, dashes and marks of books and CJK.
PUNCTUATION = string.punctuation + "“”‘’«»„‚‹›—–―…¡¿·•†‡§¶" + "。，、！？：；「」『』（）《》【】〔〕〈〉・～"
CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0002fa1f]")
WORD = re.compile(r"\w+")
LETTER = re.compile(r"[^\W\d_]")
NON_ASCII = re.compile(r"[^\x00-\x7f]")
PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
ASCII_NON_LETTERS = bytes(c for c in range(128) if not chr(c).isalpha())
_MIX = np.uint64(0x9E3779B97F4A7C15)


class Doc:
    """The statistics the rules read, each computed on first use (most docs stop early)."""

    def __init__(self, text: str, cfg: FilterConfig):
        self.text = text
        self.cfg = cfg

    @cached_property
    def words(self) -> list[str]:
        """Lowercased whitespace tokens stripped of edge punctuation; punctuation-only tokens dropped."""
        tokens = self.text.lower().split()
        return list(filter(None, map(str.strip, tokens, repeat(PUNCTUATION, len(tokens)))))

    @cached_property
    def _letters(self) -> tuple[int, int, int]:
        """(ASCII letters, other letters, CJK characters)."""
        if self.text.isascii():
            return len(self.text.encode().translate(None, ASCII_NON_LETTERS)), 0, 0
        ascii_letters = len(self.text.encode("ascii", "ignore").translate(None, ASCII_NON_LETTERS))
        others = NON_ASCII.findall(self.text)
        return ascii_letters, sum(c.isalpha() for c in others), len(CJK.findall(self.text))

    @cached_property
    def is_cjk(self) -> bool:
        cjk = self._letters[2]
        visible = len(self.text) - self.text.count(" ") - self.text.count("\n")
        return cjk > 0 and cjk / max(1, visible) > self.cfg.cjk_fraction

    @cached_property
    def is_english(self) -> bool:
        ascii_letters, other_letters, _ = self._letters
        return ascii_letters > 0 and ascii_letters / (ascii_letters + other_letters) >= self.cfg.english_fraction

    @cached_property
    def units(self) -> list[str]:
        """What the length and n-gram rules count: words, or characters for CJK-heavy text."""
        if self.is_cjk:
            return [c for c in "".join(self.text.split()) if c not in PUNCTUATION]
        return self.words

    @cached_property
    def n_words(self) -> int:
        return len(self.units)

    @cached_property
    def lines(self) -> list[str]:
        return [line for line in (raw.strip() for raw in self.text.split("\n")) if line]

    @cached_property
    def paragraphs(self) -> list[str]:
        return [p for p in (raw.strip() for raw in PARAGRAPH_BREAK.split(self.text)) if p]

    @cached_property
    def unit_ids(self) -> np.ndarray:
        # Python's str hash differs between processes, but these ids only compare units of one
        # document within one call, so the result does not (up to 2^-64 collisions).
        return np.fromiter(map(hash, self.units), dtype=np.int64, count=self.n_words).view(np.uint64)

    @cached_property
    def unit_lengths(self) -> np.ndarray:
        return np.fromiter(map(len, self.units), dtype=np.int64, count=self.n_words)

    @cached_property
    def length_sums(self) -> np.ndarray:
        """length_sums[j] - length_sums[i]: the characters of units i..j-1."""
        return np.concatenate([[0], np.cumsum(self.unit_lengths)])

    def ngram_keys(self, n: int) -> np.ndarray:
        """One 64-bit key per n-gram position (a polynomial hash of the units' ids)."""
        ids = self.unit_ids
        keys = ids[: len(ids) - n + 1].copy()
        for k in range(1, n):
            keys = keys * _MIX + ids[k: len(ids) - n + 1 + k]
        return keys

    def ratio(self, count: float) -> float:
        return count / self.n_words if self.n_words else (float("inf") if count else 0.0)


def _duplicates(items: list[str], min_words: int = 0) -> tuple[int, int]:
    """How many items repeat an earlier one, and their characters (items of fewer words never do)."""
    seen: set[str] = set()
    count = chars = 0
    for item in items:
        if item in seen and len(WORD.findall(item)) >= min_words:
            count += 1
            chars += len(item)
        else:
            seen.add(item)
    return count, chars


# ---------------------------------------------------------------------------------------------
# The rules, cheapest first. Each returns why the document goes, or None.

def min_chars(doc: Doc, cfg: FilterConfig) -> Drop | None:
    if cfg.min_chars is not None and len(doc.text.strip()) < cfg.min_chars:
        return Drop("min_chars", len(doc.text.strip()), cfg.min_chars)


def word_count(doc: Doc, cfg: FilterConfig) -> Drop | None:
    if cfg.min_words is not None and doc.n_words < cfg.min_words:
        return Drop("min_words", doc.n_words, cfg.min_words)
    if cfg.max_words is not None and doc.n_words > cfg.max_words:
        return Drop("max_words", doc.n_words, cfg.max_words)


def mean_word_length(doc: Doc, cfg: FilterConfig) -> Drop | None:
    if doc.is_cjk or not doc.words:
        return None
    mean = sum(map(len, doc.words)) / len(doc.words)
    if cfg.min_mean_word_length is not None and mean < cfg.min_mean_word_length:
        return Drop("min_mean_word_length", mean, cfg.min_mean_word_length)
    if cfg.max_mean_word_length is not None and mean > cfg.max_mean_word_length:
        return Drop("max_mean_word_length", mean, cfg.max_mean_word_length)


def symbol_ratios(doc: Doc, cfg: FilterConfig) -> Drop | None:
    if cfg.max_hash_ratio is not None and (value := doc.ratio(doc.text.count("#"))) > cfg.max_hash_ratio:
        return Drop("max_hash_ratio", value, cfg.max_hash_ratio)
    if cfg.max_ellipsis_ratio is not None:
        value = doc.ratio(doc.text.count("...") + doc.text.count("…"))
        if value > cfg.max_ellipsis_ratio:
            return Drop("max_ellipsis_ratio", value, cfg.max_ellipsis_ratio)


def line_shapes(doc: Doc, cfg: FilterConfig) -> Drop | None:
    if not doc.lines:
        return None
    if cfg.max_bullet_lines is not None:
        value = sum(line.startswith(("•", "-")) for line in doc.lines) / len(doc.lines)
        if value > cfg.max_bullet_lines:
            return Drop("max_bullet_lines", value, cfg.max_bullet_lines)
    if cfg.max_ellipsis_lines is not None:
        value = sum(line.endswith(("...", "…")) for line in doc.lines) / len(doc.lines)
        if value > cfg.max_ellipsis_lines:
            return Drop("max_ellipsis_lines", value, cfg.max_ellipsis_lines)


def alpha_words(doc: Doc, cfg: FilterConfig) -> Drop | None:
    if cfg.min_alpha_words is None or not doc.words:
        return None
    # Most words are plain letters; only the others need a closer look.
    others = list(filterfalse(str.isalpha, doc.words))
    value = 1.0 - sum(LETTER.search(w) is None for w in others) / len(doc.words)
    if value < cfg.min_alpha_words:
        return Drop("min_alpha_words", value, cfg.min_alpha_words)


def stop_words(doc: Doc, cfg: FilterConfig) -> Drop | None:
    if cfg.min_stop_words is None or doc.is_cjk or not doc.is_english:
        return None
    count = sum(map(STOP_WORDS.__contains__, doc.words))
    if count < cfg.min_stop_words:
        return Drop("min_stop_words", count, cfg.min_stop_words)


def repeated_paragraphs_and_lines(doc: Doc, cfg: FilterConfig) -> Drop | None:
    n_chars = max(1, len(doc.text))
    for name, items, max_items, max_chars in (
        ("paragraph", doc.paragraphs, cfg.max_dup_paragraphs, cfg.max_dup_paragraph_chars),
        ("line", doc.lines, cfg.max_dup_lines, cfg.max_dup_line_chars),
    ):
        if not items or (max_items is None and max_chars is None):
            continue
        count, chars = _duplicates(items, cfg.repeat_min_words)
        plural = "paragraphs" if name == "paragraph" else "lines"
        if max_items is not None and count / len(items) > max_items:
            return Drop(f"max_dup_{plural}", count / len(items), max_items)
        if max_chars is not None and chars / n_chars > max_chars:
            return Drop(f"max_dup_{name}_chars", chars / n_chars, max_chars)


def repeated_ngrams(doc: Doc, cfg: FilterConfig) -> Drop | None:
    n_chars = max(1, len(doc.text))
    joiner = 0 if doc.is_cjk else 1  # a space between words, none between CJK characters
    for n, limit in sorted((cfg.top_ngram_chars or {}).items()):
        if doc.n_words < n:
            continue
        _, first, counts = np.unique(doc.ngram_keys(n), return_index=True, return_counts=True)
        top = int(counts.max())
        if top < 2:
            continue
        # Among equally frequent n-grams take the longest: the answer must not depend on hash order.
        starts = first[counts == top]
        gram_chars = int((doc.length_sums[starts + n] - doc.length_sums[starts]).max()) + joiner * (n - 1)
        value = gram_chars * top / n_chars
        if value > limit:
            return Drop(f"top_{n}gram_chars", value, limit)
    dup_limits = sorted((cfg.dup_ngram_chars or {}).items())
    for i, (n, limit) in enumerate(dup_limits):
        if doc.n_words < n:
            break
        keys = doc.ngram_keys(n)
        _, first = np.unique(keys, return_index=True)
        repeated = np.ones(len(keys), dtype=bool)
        repeated[first] = False  # the first occurrence of an n-gram is not a repetition
        if not repeated.any():
            break
        # A unit is covered when any repeated n-gram spans it; overlapping n-grams count once.
        covered = np.convolve(repeated.astype(np.int32), np.ones(n, dtype=np.int32))[: doc.n_words] > 0
        value = (int(doc.unit_lengths[covered].sum()) + joiner * int(covered.sum())) / n_chars
        if value > limit:
            return Drop(f"dup_{n}gram_chars", value, limit)
        # Every n-gram inside a repeated longer n-gram is repeated too, so coverage only falls
        # as n grows: once below all the limits still to check, none of them can fire.
        if value <= min(later for _, later in dup_limits[i:]):
            break


RULES: list[Callable[[Doc, FilterConfig], Drop | None]] = [
    min_chars, word_count, mean_word_length, symbol_ratios, line_shapes, alpha_words, stop_words,
    repeated_paragraphs_and_lines, repeated_ngrams,
]


def check(text: str, cfg: FilterConfig) -> Drop | None:
    """Why `text` should be dropped under `cfg` (the first rule that fires), or None to keep it."""
    doc = Doc(text, cfg)
    for rule in RULES:
        if (drop := rule(doc, cfg)) is not None:
            return drop
    return None


def run(cfg: FilterConfig, ctx: StageContext) -> dict:
    started = time.monotonic()
    shards, total = input_shards(ctx.inputs["normalize"], "normalize")
    docs = kept = kept_chars = removed_chars = 0
    per_rule: dict[str, dict] = {}
    with ShardWriter(ctx.out / "shards") as keep, ShardWriter(ctx.out / "removed", schema=REMOVED_SCHEMA) as drop:
        for shard in shards:
            for record in read_shard(shard, columns=["id", "text", "source"]).to_pylist():
                text = record["text"] or ""
                docs += 1
                reason = check(text, cfg)
                if reason is None:
                    kept += 1
                    kept_chars += len(text)
                    keep.write(record)
                else:
                    removed_chars += len(text)
                    drop.write({**record, "rule": reason.rule, "value": float(reason.value),
                                "threshold": float(reason.threshold)})
                    row = per_rule.setdefault(reason.rule, {"rule": reason.rule, "removed": 0, "chars": 0,
                                                            "threshold": reason.threshold, "example_id": record["id"],
                                                            "example_value": round(float(reason.value), 4)})
                    row["removed"] += 1
                    row["chars"] += len(text)
                ctx.report.progress(docs, total, "filter")
    rows = sorted(per_rule.values(), key=lambda r: -r["removed"])
    ctx.report.table("filter-removed", rows or [{"rule": "(none)", "removed": 0}],
                     f"Documents removed per rule ({docs - kept} of {docs})")
    seconds = time.monotonic() - started
    return {
        "docs": docs,
        "kept": kept,
        "removed": docs - kept,
        "removed_fraction": round((docs - kept) / docs, 4) if docs else 0.0,
        "removed_per_rule": {r["rule"]: r["removed"] for r in rows},
        "kept_chars": kept_chars,
        "removed_chars": removed_chars,
        "seconds": round(seconds, 2),
        "mb_per_s": round((kept_chars + removed_chars) / 1e6 / seconds, 2) if seconds > 0 else None,
    }


STAGE = Stage(name="filter", version=1, run=run)
