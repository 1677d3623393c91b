"""The document rules, as a list (`RULES`): Gopher quality and repetition (Rae et al. 2021, Table
A1, as datatrove sets them) and FineWeb's quality rules (Penedo et al. 2024), over the statistics
of one document (`Doc`), each computed on first use.

Gopher as datatrove sets it, with three changes: words are whitespace tokens stripped of edge
punctuation, and punctuation-only tokens are not words (counting "--" or a lone quote as words
dropped 13% of good dialogue chunks); lines and paragraphs of fewer than 4 words never count as
repeated (speaker names in a play); the stop-word rule applies only to English-looking text. For
CJK-heavy text every rule that counts words counts characters.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import cached_property
from itertools import filterfalse, islice, repeat

import numpy as np

from ember.tasks.filter.config import FilterConfig
from ember.tasks.filter.lines import PUNCTUATION, Drop, Unit, paragraphs_of
from ember.tasks.text import CJK_CHAR, PARAGRAPH_SPLIT

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})  # Gopher's list
CJK = re.compile(CJK_CHAR)
WORD = re.compile(r"\w+")
LETTER = re.compile(r"[^\W\d_]")
NON_ASCII_RUN = re.compile(r"[^\x00-\x7f]+")
ASCII_NON_LETTERS = bytes(c for c in range(128) if not chr(c).isalpha())
_MIX = np.uint64(0x9E3779B97F4A7C15)


class Doc:
    """The statistics the rules read, each computed on first use (most docs stop early)."""

    def __init__(self, text: str, cfg: FilterConfig):
        self.text = text
        self.cfg = cfg
        self._keys: tuple[int, np.ndarray] | None = None  # (n, ngram_keys(n)) last computed

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
        others = "".join(NON_ASCII_RUN.findall(self.text))  # curly quotes in books: short runs
        cjk = len(CJK.findall(others)) if CJK.search(others) else 0
        return ascii_letters, sum(map(str.isalpha, others)), cjk

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
        return [line for line in map(str.strip, self.text.split("\n")) if line]

    @cached_property
    def c4_units(self) -> list[Unit]:
        """The paragraphs the line rules judge (hard-wrapped lines joined)."""
        return paragraphs_of(self.text.split("\n"), self.cfg, self.is_cjk)

    @cached_property
    def paragraphs(self) -> list[str]:
        return [p for p in (raw.strip() for raw in PARAGRAPH_SPLIT.split(self.text)) if p]

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
        # keys(n) = keys(n-1) * MIX + the n-th unit: built from the last n asked for, as the
        # rules ask for n = 2, 3, 4, then 5, 6, ...
        ids = self.unit_ids
        have, keys = self._keys if self._keys is not None and self._keys[0] <= n else (1, ids)
        for k in range(have, n):
            keys = keys[:-1] * _MIX + ids[k:]
        self._keys = (n, keys)
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


# -- Gopher quality and repetition, cheapest first. Each returns why the document goes, or None. --


def min_chars(doc: Doc, cfg: FilterConfig) -> Drop | None:
    if cfg.min_chars is not None and len(doc.text.strip()) < cfg.min_chars and not doc.is_cjk:
        return Drop("min_chars", len(doc.text.strip()), cfg.min_chars)
    return None


def word_count(doc: Doc, cfg: FilterConfig) -> Drop | None:
    least = cfg.cjk_min_words if doc.is_cjk else cfg.min_words
    if least is not None and doc.n_words < least:
        return Drop("min_words", doc.n_words, least)
    if cfg.max_words is not None and doc.n_words > cfg.max_words:
        return Drop("max_words", doc.n_words, cfg.max_words)
    return None


def mean_word_length(doc: Doc, cfg: FilterConfig) -> Drop | None:
    if doc.is_cjk or not doc.words:
        return None
    mean = sum(map(len, doc.words)) / len(doc.words)
    if cfg.min_mean_word_length is not None and mean < cfg.min_mean_word_length:
        return Drop("min_mean_word_length", mean, cfg.min_mean_word_length)
    if cfg.max_mean_word_length is not None and mean > cfg.max_mean_word_length:
        return Drop("max_mean_word_length", mean, cfg.max_mean_word_length)
    return None


def symbol_ratios(doc: Doc, cfg: FilterConfig) -> Drop | None:
    if cfg.max_hash_ratio is not None and (value := doc.ratio(doc.text.count("#"))) > cfg.max_hash_ratio:
        return Drop("max_hash_ratio", value, cfg.max_hash_ratio)
    if cfg.max_ellipsis_ratio is not None:
        value = doc.ratio(doc.text.count("...") + doc.text.count("…"))
        if value > cfg.max_ellipsis_ratio:
            return Drop("max_ellipsis_ratio", value, cfg.max_ellipsis_ratio)
    return None


def line_shapes(doc: Doc, cfg: FilterConfig) -> Drop | None:
    if not doc.lines:
        return None
    if cfg.max_bullet_lines is not None:
        firsts = "".join([line[0] for line in doc.lines])
        value = (firsts.count("•") + firsts.count("-")) / len(doc.lines)
        if value > cfg.max_bullet_lines:
            return Drop("max_bullet_lines", value, cfg.max_bullet_lines)
    if cfg.max_ellipsis_lines is not None:
        value = 0.0
        if "..." in doc.text or "…" in doc.text:
            value = sum(line.endswith(("...", "…")) for line in doc.lines) / len(doc.lines)
        if value > cfg.max_ellipsis_lines:
            return Drop("max_ellipsis_lines", value, cfg.max_ellipsis_lines)
    return None


def alpha_words(doc: Doc, cfg: FilterConfig) -> Drop | None:
    if cfg.min_alpha_words is None or not doc.words:
        return None
    # Most words are plain letters; only the others need a closer look.
    others = list(filterfalse(str.isalpha, doc.words))
    value = 1.0 - sum(LETTER.search(w) is None for w in others) / len(doc.words)
    if value < cfg.min_alpha_words:
        return Drop("min_alpha_words", value, cfg.min_alpha_words)
    return None


def stop_words(doc: Doc, cfg: FilterConfig) -> Drop | None:
    if cfg.min_stop_words is None or doc.is_cjk or not doc.is_english:
        return None
    # Counted up to the minimum only: the value matters only when the rule fires.
    count = sum(1 for _ in islice(filter(STOP_WORDS.__contains__, doc.words), cfg.min_stop_words))
    if count < cfg.min_stop_words:
        return Drop("min_stop_words", count, cfg.min_stop_words)
    return None


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
    return None


def repeated_ngrams(doc: Doc, cfg: FilterConfig) -> Drop | None:
    n_chars = max(1, len(doc.text))
    joiner = 0 if doc.is_cjk else 1  # a space between words, none between CJK characters
    # A document is ~700 words: sorting its n-gram keys (a few microseconds) is cheaper than a
    # hashed bound. An n-gram occurs at most as often as its first n-1 units do, so the top count
    # found for a shorter n bounds the longer ones (most documents need a single sort), and once
    # no n-gram repeats no longer one does, so every rule for that n and above is cleared.
    unique_from: int | None = None
    top_bound: int | None = None
    for n, limit in sorted((cfg.top_ngram_chars or {}).items()):
        if doc.n_words < n or (unique_from is not None and n >= unique_from):
            continue
        longest = int((doc.length_sums[n:] - doc.length_sums[:-n]).max()) + joiner * (n - 1)
        if top_bound is not None and top_bound * longest / n_chars <= limit:
            continue
        keys = doc.ngram_keys(n)
        ordered = np.sort(keys)
        ends = np.flatnonzero(ordered[1:] != ordered[:-1])  # the last index of each run but the last
        if len(ends) == len(keys) - 1:  # every n-gram occurs once
            unique_from = n
            continue
        top = int(ends[0]) + 1 if len(ends) else len(keys)
        if len(ends):
            top = max(top, len(keys) - 1 - int(ends[-1]), int((ends[1:] - ends[:-1]).max(initial=0)))
        top_bound = top
        if top * longest / n_chars <= limit:
            continue
        _, first, counts = np.unique(keys, return_index=True, return_counts=True)
        # Among equally frequent n-grams take the longest: the answer must not depend on hash order.
        starts = first[counts == top]
        gram_chars = int((doc.length_sums[starts + n] - doc.length_sums[starts]).max()) + joiner * (n - 1)
        value = gram_chars * top / n_chars
        if value > limit:
            return Drop(f"top_{n}gram_chars", value, limit)
    dup_limits = sorted((cfg.dup_ngram_chars or {}).items())
    for i, (n, limit) in enumerate(dup_limits):
        if doc.n_words < n or (unique_from is not None and n >= unique_from):
            break
        keys = doc.ngram_keys(n)
        order = np.argsort(keys, kind="stable")
        ordered = keys[order]
        again = ordered[1:] == ordered[:-1]
        if not again.any():
            break
        # In a run of equal keys the stable sort keeps positions in order, so all but the run's
        # first are later occurrences: the repetitions (the first occurrence is not one).
        repeated = np.zeros(len(keys), dtype=bool)
        repeated[order[1:][again]] = True
        # A unit is covered when any repeated n-gram spans it; overlapping n-grams count once.
        covered = np.convolve(repeated.astype(np.int32), np.ones(n, dtype=np.int32))[: doc.n_words] > 0
        value = (int(doc.unit_lengths[covered].sum()) + joiner * int(covered.sum())) / n_chars
        if value > limit:
            return Drop(f"dup_{n}gram_chars", value, limit)
        # Every n-gram inside a repeated longer n-gram is repeated too, so coverage only falls
        # as n grows: once below all the limits still to check, none of them can fire.
        if value <= min(later for _, later in dup_limits[i:]):
            break
    return None


# -- FineWeb's quality rules -----------------------------------------------------------------------


def fineweb_quality(doc: Doc, cfg: FilterConfig) -> Drop | None:
    if not doc.lines:
        return None
    # Chinese verse ends lines without punctuation and in short lines: those two rules are for
    # spaced text only.
    if cfg.fineweb_min_punct_paragraphs is not None and not doc.is_cjk:
        value = sum(u.ends for u in doc.c4_units) / max(1, len(doc.c4_units))
        if value < cfg.fineweb_min_punct_paragraphs:
            return Drop("fineweb_punct_paragraphs", value, cfg.fineweb_min_punct_paragraphs)
    if cfg.fineweb_max_short_lines is not None and not doc.is_cjk:
        short = cfg.fineweb_short_line_chars
        lengths = np.fromiter(map(len, doc.lines), dtype=np.int32, count=len(doc.lines))
        value = int((lengths <= short).sum()) / len(doc.lines)
        if value > cfg.fineweb_max_short_lines:
            return Drop("fineweb_short_lines", value, cfg.fineweb_max_short_lines)
    if cfg.fineweb_max_dup_line_chars is not None:
        _, chars = _duplicates(doc.lines, cfg.repeat_min_words)
        value = chars / max(1, len(doc.text))
        if value > cfg.fineweb_max_dup_line_chars:
            return Drop("fineweb_dup_line_chars", value, cfg.fineweb_max_dup_line_chars)
    if cfg.fineweb_max_newlines_per_word is not None and doc.n_words:
        value = doc.text.count("\n") / doc.n_words
        if value > cfg.fineweb_max_newlines_per_word:
            return Drop("fineweb_newlines_per_word", value, cfg.fineweb_max_newlines_per_word)
    return None


RULES: list[Callable[[Doc, FilterConfig], Drop | None]] = [
    min_chars,
    word_count,
    mean_word_length,
    symbol_ratios,
    line_shapes,
    alpha_words,
    stop_words,
    repeated_paragraphs_and_lines,
    repeated_ngrams,
    fineweb_quality,
]


def check(text: str, cfg: FilterConfig) -> Drop | None:
    """Why `text` should be dropped under `cfg` (the first rule that fires), or None to keep it.
    Document rules only: see `judge` for the whole stage (language, line rules, then these)."""
    doc = Doc(text, cfg)
    for rule in RULES:
        if (drop := rule(doc, cfg)) is not None:
            return drop
    return None
