"""filter: clean text shards -> kept shards + removed documents + removed lines (each with its rule).

What happens to each document, in order (the first rule that fires names the drop):
1. `min_chars`, then the language (`languages`, `min_language_score`; ember/tasks/langid.py,
   offline, on a prefix of the document; documents too short to tell are kept as "unknown").
2. C4's line rules (Raffel et al. 2020, as datatrove's C4QualityFilter): lines without terminal
   punctuation, with fewer than 3 words, with "javascript", with cookie/policy phrases, with a
   word over 1,000 characters are dropped; citation markers ([1], [edit]) are stripped. Books
   are hard-wrapped, so the rules judge *paragraphs*: a line that does not end a sentence and
   is long (a wrapped line) or ends in , ; : or a dash is joined with the next line of its
   block first. Judged line by line, C4 drops 82% of the lines of gutenberg_en; judged so, well
   under 1% (benchmarks/filter_quality.py). Closing quotes count as terminal punctuation
   (“Yes,” she said.” ends a sentence), as do CJK full stops.
3. C4's document rules on what is left: "lorem ipsum", a curly bracket, fewer than 5 sentences.
4. Gopher quality and repetition (Rae et al. 2021, Table A1), as datatrove sets them, with
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

import re
import string
import time
from functools import cached_property, partial
from itertools import filterfalse, islice, repeat
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from ember.storage.shards import TEXT_SCHEMA, input_shards
from ember.tasks import langid
from ember.tasks.stage import Stage, StageContext

REMOVED_SCHEMA = TEXT_SCHEMA.append(pa.field("rule", pa.string())).append(pa.field("value", pa.float64())) \
    .append(pa.field("threshold", pa.float64())).append(pa.field("detail", pa.string()))
REMOVED_LINES_SCHEMA = pa.schema([("id", pa.string()), ("line", pa.int32()), ("text", pa.string()),
                                  ("source", pa.string()), ("rule", pa.string()), ("value", pa.float64()),
                                  ("threshold", pa.float64())])

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})  # Gopher's list
# C4's policy substrings (datatrove's POLICY_SUBSTRINGS), lowercase.
POLICY_PHRASES = ["terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies",
                  "use cookies"]


# Page furniture that ends like a sentence ("© 2019 Dow Jones & Company, Inc. All Rights
# Reserved."), so the punctuation rule keeps it. Each phrase was checked against the lines of
# gutenberg_en (none has them) and of messy_web (they are in boilerplate lines 10-60 times as
# often as in article bodies), so the messy_web figures they improve are not an unseen test.
# ("share this" was dropped from the list: TinyStories says "Let's share this ice cream!").
BOILERPLATE_PHRASES = ["all rights reserved", "©", "newsletter", "terms of service", "click here", "skip to",
                       "contact us", "your email", "email address"]


class FilterConfig(BaseModel):
    """Every threshold can be set to null (and every switch to false) to turn its rule off."""

    model_config = ConfigDict(extra="forbid")

    min_chars: int | None = Field(100, ge=0, description="drop documents shorter than this many characters (not CJK)")
    # Language
    languages: list[str] | None = Field(
        ["en", "zh", "ja"],
        description="ISO 639-1 codes of the languages to keep (null: keep every language)")
    min_language_score: float = Field(0.65, ge=0, le=1,
                                      description="drop when the detected language's confidence is below this")
    langid_chars: int = Field(500, ge=50, description="the language is judged on this many leading characters")
    langid_min_letters: int = Field(
        20, ge=0, description="documents with fewer letters in that prefix are kept (language 'unknown')")
    langid_low_accuracy: bool = Field(
        True, description="lingua's trigram-only mode (about 60 MB and 0.3 s to load per process, against 1 GB "
                          "and 7 s; same decisions on the sample corpora, weaker under ~120 characters)")
    # C4 line rules, judged per paragraph (wrapped lines joined)
    join_wrapped_lines: bool = Field(True, description="judge hard-wrapped paragraphs, not single lines")
    # 25, not the ~70 of a typical wrap: verse goes on in lines of 25-40 characters (judged
    # with 40, 16% of tinyshakespeare's lines were dropped; with 25, under 2%).
    wrap_min_chars: int = Field(
        25, ge=1, description="a line this long that does not end a sentence is a wrapped line (CJK: a quarter)")
    line_terminal_punct: bool = Field(
        True, description="drop paragraphs that do not end in . ! ? or a closing quote (not CJK: Chinese verse "
                          "ends its lines without punctuation)")
    line_min_words: int | None = Field(3, ge=0, description="drop paragraphs with fewer words (CJK: characters)")
    line_min_words_unless_sentence: bool = Field(
        True, description="the word minimum spares paragraphs that end a sentence (“No.” in a novel)")
    line_max_word_chars: int | None = Field(1000, ge=1, description="drop lines with a longer word")
    line_javascript: bool = Field(True, description="drop lines that mention javascript")
    line_policy_phrases: list[str] | None = Field(
        POLICY_PHRASES, description="drop lines with any of these phrases (lowercase; C4's list)")
    line_boilerplate_phrases: list[str] | None = Field(
        BOILERPLATE_PHRASES,
        description="drop lines with any of these phrases too (footers, sign-up boxes; lowercase)")
    strip_citations: bool = Field(True, description="remove Wikipedia markers [1], [edit], [citation needed]")
    # Pages repeat their headline, teasers and "Got a Tip?" boxes; judged whole, such a page fails
    # FineWeb's 1% duplicated-line rule and loses its article too. Dropping the later copies
    # keeps the article (books rarely repeat a paragraph of 4+ words within a chunk).
    line_drop_repeats: bool = Field(
        True, description="drop later copies of a paragraph (of `repeat_min_words`+ words) seen earlier in the text")
    # C4 document rules
    drop_lorem_ipsum: bool = Field(True, description="drop documents with 'lorem ipsum'")
    drop_curly_bracket: bool = Field(True, description="drop documents with '{' (code, templates)")
    min_sentences: int | None = Field(5, ge=0, description="fewer sentences left after the line rules (not CJK)")
    # Gopher quality
    min_words: int | None = Field(50, ge=0, description="fewer words than this")
    max_words: int | None = Field(100_000, ge=1, description="more words (CJK: characters) than this")
    cjk_min_words: int | None = Field(
        16, ge=0, description="CJK text: fewer characters than this (in place of min_chars and min_words)")
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
    # FineWeb quality
    fineweb_min_punct_paragraphs: float | None = Field(
        0.12, ge=0, le=1, description="share of paragraphs ending in terminal punctuation below this (not CJK)")
    fineweb_max_short_lines: float | None = Field(
        0.67, ge=0, le=1, description="share of lines of at most `fineweb_short_line_chars` above this (not CJK)")
    fineweb_short_line_chars: int = Field(30, ge=1, description="a short line has at most this many characters")
    fineweb_max_dup_line_chars: float | None = Field(
        0.01, ge=0, le=1, description="characters in repeated lines (of `repeat_min_words` or more) above this share")
    fineweb_max_newlines_per_word: float | None = Field(0.3, ge=0, description="newlines per word above this")
    # Script heuristics
    cjk_fraction: float = Field(0.3, ge=0, le=1,
                                description="above this share of CJK characters, count characters instead of words")
    english_fraction: float = Field(
        0.9, ge=0, le=1,
        description="the stop-word rule applies when at least this share of letters is ASCII")


class Drop(NamedTuple):
    rule: str
    value: float
    threshold: float
    detail: str = ""  # e.g. the language detected


# Edge punctuation stripped from words: ASCII plus the quotes, dashes and marks of books and CJK.
PUNCTUATION = string.punctuation + "“”‘’«»„‚‹›—–―…¡¿·•†‡§¶" + "。，、！？：；「」『』（）《》【】〔〕〈〉・～"
CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0002fa1f]")
WORD = re.compile(r"\w+")
LETTER = re.compile(r"[^\W\d_]")
NON_ASCII_RUN = re.compile(r"[^\x00-\x7f]+")
PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
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


# ---------------------------------------------------------------------------------------------
# The rules, cheapest first. Each returns why the document goes, or None.

def min_chars(doc: Doc, cfg: FilterConfig) -> Drop | None:
    if cfg.min_chars is not None and len(doc.text.strip()) < cfg.min_chars and not doc.is_cjk:
        return Drop("min_chars", len(doc.text.strip()), cfg.min_chars)


def word_count(doc: Doc, cfg: FilterConfig) -> Drop | None:
    least = cfg.cjk_min_words if doc.is_cjk else cfg.min_words
    if least is not None and doc.n_words < least:
        return Drop("min_words", doc.n_words, least)
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
    # Counted up to the minimum only: the value matters only when the rule fires.
    count = sum(1 for _ in islice(filter(STOP_WORDS.__contains__, doc.words), cfg.min_stop_words))
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


# ---------------------------------------------------------------------------------------------
# C4 line rules, judged per paragraph.

# A paragraph ends a sentence when it ends in terminal punctuation (closing brackets after it
# allowed) or, as C4 counts it, in a closing quote; a trailing "..." does not end one.
TERMINAL = ".!?。！？．"
CLOSING_QUOTES = "\"'”’»」』"
CLOSERS = ")]）】》〉"
CONTINUE_CHARS = ",;:-–—(，、：；"
INTRODUCES = (":", "—", "--", "：")  # a paragraph ending so goes on after a blank line (a quote)
CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]", re.IGNORECASE)
SENTENCE_END = re.compile(r"[.!?。！？．]+[\"'”’»」』)\]]*(?=\s|$)")


def ends_sentence(line: str) -> bool:
    """`line` (stripped, not empty) ends a sentence."""
    last = line[-1]
    if last in CLOSING_QUOTES:
        return True
    if last in TERMINAL:
        return not line.endswith("...")
    if last in CLOSERS:
        core = line.rstrip(CLOSERS)
        return bool(core) and core[-1] in TERMINAL and not core.endswith("...")
    return False


class LineDrop(NamedTuple):
    line: int  # index in text.split("\n")
    text: str
    rule: str
    value: float
    threshold: float


class Unit(NamedTuple):
    """Lines first..last (indices in text.split("\n")) that the line rules judge together."""
    first: int
    last: int
    ends: bool  # its last line ends a sentence
    goes_on: bool  # it was cut by a blank line or the end of the text while still going on


def paragraphs_of(lines: list[str], cfg: FilterConfig, cjk: bool) -> list[Unit]:
    """Group the non-blank lines into the units the line rules judge.

    Within a block of lines (no blank line between), a line that does not end a sentence and
    is long enough to be a wrapped line, or ends in a comma, colon, dash..., goes on into the
    next line. Web pages put each paragraph on one line, so their menus stay single lines.
    """
    wrap = max(1, cfg.wrap_min_chars // 4) if cjk else cfg.wrap_min_chars
    join = cfg.join_wrapped_lines
    units: list[Unit] = []
    append = units.append
    start = -1
    for i, raw in enumerate(lines):
        line = raw.rstrip()
        if not line:
            if start >= 0:
                append(Unit(start, i - 1, False, True))
                start = -1
            continue
        if start < 0:
            start = i
        last = line[-1]
        if (last in CLOSING_QUOTES or last in TERMINAL or last in CLOSERS) and ends_sentence(line):
            append(Unit(start, i, True, False))
            start = -1
        elif not join or not (len(line.lstrip()) >= wrap or last in CONTINUE_CHARS):
            append(Unit(start, i, False, False))
            start = -1
    if start >= 0:
        append(Unit(start, len(lines) - 1, False, True))
    return units


def _count_words(text: str, cjk: bool) -> int:
    if cjk:
        return sum(1 for c in "".join(text.split()) if c not in PUNCTUATION)
    return len(text.split())


def line_rules(text: str, cfg: FilterConfig, cjk: bool, words: list[str] | None = None,
               units: list[Unit] | None = None) -> tuple[str, list[LineDrop]]:
    """Apply C4's line rules: (the text left, the lines dropped). `words`, `units`: if known."""
    # Rules that need a substring are skipped for the whole text when it has none.
    lower = text.lower() if cfg.line_javascript or cfg.line_policy_phrases else ""
    javascript = cfg.line_javascript and "javascript" in lower
    phrases = [p for p in cfg.line_policy_phrases or () if p in lower]
    boilerplate = [p for p in cfg.line_boilerplate_phrases or () if p in lower]
    long_words = (cfg.line_max_word_chars is not None and not cjk and len(text) > cfg.line_max_word_chars
                  and max(map(len, text.split() if words is None else words), default=0) > cfg.line_max_word_chars)
    lines = text.split("\n")
    changed: dict[int, str] = {}
    if cfg.strip_citations and "[" in text:
        for i, line in enumerate(lines):
            if "[" in line and (stripped := CITATION.sub("", line)) != line:
                changed[i] = stripped
    if changed:  # judge the lines without their markers ("...agree.[1]" ends a sentence)
        units = paragraphs_of([changed.get(i, line) for i, line in enumerate(lines)], cfg, cjk)
    elif units is None:
        units = paragraphs_of(lines, cfg, cjk)
    dropped: dict[int, LineDrop] = {}
    seen: set[str] = set()
    for n, unit in enumerate(units):
        verdict = None
        if not unit.ends and cfg.line_terminal_punct and not cjk:
            last = changed.get(unit.last, lines[unit.last]).strip()
            # A paragraph cut by the end of a chunk, or one that introduces a quote after a
            # blank line ("...and then he said:"), goes on: it is not a line without an end.
            if not (unit.goes_on and (n == len(units) - 1 or last.endswith(INTRODUCES))):
                verdict = ("line_terminal_punct", 0.0, 1.0)
        if verdict is None and (long_words or javascript or phrases or boilerplate or (
                cfg.line_min_words is not None and not (cfg.line_min_words_unless_sentence and unit.ends))):
            joined = " ".join(changed.get(i, lines[i]).strip() for i in range(unit.first, unit.last + 1))
            if long_words and (longest := max(map(len, joined.split()), default=0)) > cfg.line_max_word_chars:
                verdict = ("line_max_word_chars", longest, cfg.line_max_word_chars)
            elif cfg.line_min_words is not None and not (cfg.line_min_words_unless_sentence and unit.ends) and (
                    (words := _count_words(joined, cjk)) < cfg.line_min_words):
                verdict = ("line_min_words", words, cfg.line_min_words)
            elif javascript or phrases or boilerplate:
                low = joined.lower()
                if javascript and "javascript" in low:
                    verdict = ("line_javascript", 1.0, 1.0)
                elif any(p in low for p in phrases):
                    verdict = ("line_policy", 1.0, 1.0)
                elif any(p in low for p in boilerplate):
                    verdict = ("line_boilerplate", 1.0, 1.0)
        if verdict is None and cfg.line_drop_repeats and unit.ends:
            key = "\n".join(lines[unit.first: unit.last + 1]).strip()
            if key in seen:
                if _count_words(key, cjk) >= max(1, cfg.repeat_min_words):
                    verdict = ("line_repeated", 1.0, 1.0)
            else:
                seen.add(key)
        if verdict is not None:
            for i in range(unit.first, unit.last + 1):
                if lines[i].strip():
                    dropped[i] = LineDrop(i, lines[i], *verdict)
    if not dropped and not changed:
        return text, []
    out: list[str] = []
    gap = False  # a line was dropped since the last line written
    for i, line in enumerate(lines):
        if i in dropped:
            gap = True
            continue
        blank = not line.strip()
        if blank and gap and (not out or not out[-1].strip()):
            continue  # no run of blank lines where paragraphs were taken out
        out.append(changed.get(i, line))
        gap = gap and blank
    return "\n".join(out).strip("\n"), list(dropped.values())


def count_sentences(text: str, at_most: int) -> int:
    """Sentence ends in `text`, counted up to `at_most`."""
    return sum(1 for _ in islice(SENTENCE_END.finditer(text), at_most))


def c4_document(text: str, cfg: FilterConfig, cjk: bool) -> Drop | None:
    if cfg.drop_lorem_ipsum and "lorem ipsum" in text.lower():
        return Drop("lorem_ipsum", 1.0, 1.0)
    if cfg.drop_curly_bracket and "{" in text:
        return Drop("curly_bracket", float(text.count("{")), 1.0)
    if cfg.min_sentences is not None and not cjk and (sentences := count_sentences(text, cfg.min_sentences)) < cfg.min_sentences:
        return Drop("min_sentences", sentences, cfg.min_sentences)
    return None


# ---------------------------------------------------------------------------------------------
# FineWeb's quality rules.

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
    min_chars, word_count, mean_word_length, symbol_ratios, line_shapes, alpha_words, stop_words,
    repeated_paragraphs_and_lines, repeated_ngrams, fineweb_quality,
]


def check(text: str, cfg: FilterConfig) -> Drop | None:
    """Why `text` should be dropped under `cfg` (the first rule that fires), or None to keep it.
    Document rules only: see `judge` for the whole stage (language, line rules, then these)."""
    doc = Doc(text, cfg)
    for rule in RULES:
        if (drop := rule(doc, cfg)) is not None:
            return drop
    return None


class Verdict(NamedTuple):
    text: str  # what is kept (the line rules may have removed lines)
    drop: Drop | None
    lines: list[LineDrop]
    language: langid.Language


def judge(text: str, cfg: FilterConfig) -> Verdict:
    """Everything the stage decides about one document."""
    doc = Doc(text, cfg)
    no_language = langid.Language("-", 0.0, "off")
    if (drop := min_chars(doc, cfg)) is not None:
        return Verdict(text, drop, [], no_language)
    language = no_language
    if cfg.languages is not None:
        language = langid.detect(text, cfg.langid_chars, cfg.langid_min_letters, cfg.langid_low_accuracy)
        if language.code != "unknown":
            if language.code not in cfg.languages:
                return Verdict(text, Drop("language", language.score, cfg.min_language_score, language.code), [],
                               language)
            if language.score < cfg.min_language_score:
                return Verdict(text, Drop("min_language_score", language.score, cfg.min_language_score,
                                          language.code), [], language)
    # The words only serve line_rules' longest-word gate (not for CJK), and the words of a text
    # whose lines change are never used again (the rules below judge the kept text). Without a
    # whitespace token of half that length (str.lower can double a token: 'İ' is two code points
    # lowercased) no word is that long, and a plain split is a fifth of the cost of the words.
    limit = cfg.line_max_word_chars
    long_token = (limit is not None and not doc.is_cjk and len(text) > limit
                  and max(map(len, text.split()), default=0) > limit // 2)
    kept, dropped_lines = line_rules(text, cfg, doc.is_cjk, doc.words if long_token else [], doc.c4_units)
    if (drop := c4_document(kept, cfg, doc.is_cjk)) is not None:
        return Verdict(kept, drop, dropped_lines, language)
    drop = check(kept, cfg) if kept is not text else next(
        (d for rule in RULES if (d := rule(doc, cfg)) is not None), None)
    return Verdict(kept, drop, dropped_lines, language)


# ---------------------------------------------------------------------------------------------
# The stage: one unit of work per input shard.

# A shard is read and written in batches of about this many characters, so a worker holds a
# few MB of text rather than a whole 16 M-character shard (and its Python copies) at once.
BATCH_CHARS = 2_000_000


class _Output:
    """Rows of one output file, written a batch at a time; the file appears (renamed from its
    temporary name) only when the unit finishes, and not at all when it has no rows."""

    def __init__(self, schema: pa.Schema, path: Path):
        self.schema, self.path = schema, path
        self.rows: dict[str, list] = {k: [] for k in schema.names}
        self.count = 0
        self._writer: pq.ParquetWriter | None = None
        self._tmp = path.with_name(path.name + ".partial")

    def flush(self) -> None:
        if not self.rows[self.schema.names[0]]:
            return
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(self._tmp, self.schema, compression="zstd")
        self._writer.write_table(pa.Table.from_pydict(self.rows, schema=self.schema))
        self.count += len(self.rows[self.schema.names[0]])
        self.rows = {k: [] for k in self.schema.names}

    def close(self) -> None:
        self.flush()
        if self._writer is not None:
            self._writer.close()
            self._tmp.replace(self.path)


def _batches(path: Path, columns: list[str]):
    """The shard's rows in record batches of about BATCH_CHARS characters."""
    shard = pq.ParquetFile(path)
    meta = shard.metadata
    size = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    rows = max(1, round(meta.num_rows * BATCH_CHARS / max(1, size)))
    return shard.iter_batches(batch_size=rows, columns=columns)


def filter_shard(cfg: FilterConfig, src_dir: str, out_dir: str, name: str) -> dict:
    """Filter the input shard `src_dir/name` into `out_dir/{shards,removed,removed_lines}/name`.

    Runs in a worker process under a parallel `ctx.map`: plain arguments, a small dict back.
    """
    started = time.monotonic()
    out = Path(out_dir)
    kept = _Output(TEXT_SCHEMA, out / "shards" / name)
    removed = _Output(REMOVED_SCHEMA, out / "removed" / name)
    removed_lines = _Output(REMOVED_LINES_SCHEMA, out / "removed_lines" / name)
    rules: dict[str, list] = {}  # rule -> [docs, chars, threshold, example id, example value]
    line_rules_seen: dict[str, list] = {}  # rule -> [lines, chars, docs]
    languages: dict[str, int] = {}
    docs = chars_in = kept_chars = 0
    for batch in _batches(Path(src_dir) / name, ["id", "text", "source"]):
        for doc_id, text, source in zip(*(batch.column(c).to_pylist() for c in ("id", "text", "source"))):
            docs += 1
            text = text or ""
            chars_in += len(text)
            verdict = judge(text, cfg)
            languages[verdict.language.code] = languages.get(verdict.language.code, 0) + 1
            for line in verdict.lines:
                for key, value in zip(REMOVED_LINES_SCHEMA.names, (doc_id, line.line, line.text, source, line.rule,
                                                                   float(line.value), float(line.threshold))):
                    removed_lines.rows[key].append(value)
                row = line_rules_seen.setdefault(line.rule, [0, 0, set()])
                row[0] += 1
                row[1] += len(line.text) + 1
                row[2].add(doc_id)
            if verdict.drop is None:
                kept.rows["id"].append(doc_id)
                kept.rows["text"].append(verdict.text)
                kept.rows["source"].append(source)
                kept_chars += len(verdict.text)
                continue
            drop = verdict.drop
            for key, value in zip(REMOVED_SCHEMA.names, (doc_id, text, source, drop.rule, float(drop.value),
                                                         float(drop.threshold), drop.detail)):
                removed.rows[key].append(value)
            row = rules.setdefault(drop.rule, [0, 0, float(drop.threshold), doc_id, round(float(drop.value), 4)])
            row[0] += 1
            row[1] += len(text)
        for output in (kept, removed, removed_lines):
            output.flush()
        del batch
    for output in (kept, removed, removed_lines):
        output.close()
    return {"shard": name, "docs": docs, "kept": kept.count, "chars_in": chars_in,
            "kept_chars": kept_chars, "rules": rules, "languages": languages,
            "line_rules": {k: [v[0], v[1], len(v[2])] for k, v in line_rules_seen.items()},
            "seconds": round(time.monotonic() - started, 3)}


def run(cfg: FilterConfig, ctx: StageContext) -> dict:
    started = time.monotonic()
    shards, total = input_shards(ctx.inputs["normalize"], "normalize")
    src = Path(ctx.inputs["normalize"]) / "shards"
    # One unit per input shard, each writing files named after its input shard: the artifact
    # does not depend on the order (or the processes) the units run in.
    units = ctx.map(partial(filter_shard, cfg, str(src), str(ctx.out)), [p.name for p in shards], "filter-shard")
    (ctx.out / "shards").mkdir(parents=True, exist_ok=True)
    ctx.report.progress(total, total, "filter")

    docs = sum(u["docs"] for u in units)
    kept = sum(u["kept"] for u in units)
    chars_in = sum(u["chars_in"] for u in units)
    kept_chars = sum(u["kept_chars"] for u in units)
    per_rule: dict[str, dict] = {}
    for unit in units:  # in shard order, so the example of each rule is the first one
        for rule, (n, chars, threshold, example, value) in unit["rules"].items():
            row = per_rule.setdefault(rule, {"rule": rule, "docs": 0, "chars": 0, "threshold": threshold,
                                             "example_id": example, "example_value": value})
            row["docs"] += n
            row["chars"] += chars
    per_line_rule: dict[str, dict] = {}
    for unit in units:
        for rule, (n, chars, in_docs) in unit["line_rules"].items():
            row = per_line_rule.setdefault(rule, {"rule": rule, "lines": 0, "chars": 0, "docs": 0})
            row["lines"] += n
            row["chars"] += chars
            row["docs"] += in_docs
    languages: dict[str, int] = {}
    for unit in units:
        for code, n in unit["languages"].items():
            languages[code] = languages.get(code, 0) + n
    rows = sorted(per_rule.values(), key=lambda r: (-r["docs"], r["rule"]))
    line_rows = sorted(per_line_rule.values(), key=lambda r: (-r["lines"], r["rule"]))
    ctx.report.table("filter-removed", rows or [{"rule": "(none)", "docs": 0, "chars": 0}],
                     f"Documents removed per rule ({docs - kept} of {docs}; chars = characters removed)")
    ctx.report.table("filter-removed-lines", line_rows or [{"rule": "(none)", "lines": 0, "chars": 0}],
                     "Lines removed per line rule (from documents kept or not)")
    ctx.report.markdown("filter-summary", "\n".join([
        f"**{kept} of {docs} documents kept** ({kept_chars:,} of {chars_in:,} characters).", "",
        "Languages: " + ", ".join(f"{code} {n}" for code, n in sorted(languages.items(), key=lambda kv: -kv[1])),
        "", "Every removed document is in `removed/` (rule, value, threshold) and every removed line "
        "in `removed_lines/` (id, line); `ember audit DOC_ID` explains one document."]))
    seconds = time.monotonic() - started
    return {
        "docs": docs,
        "kept": kept,
        "removed": docs - kept,
        "removed_fraction": round((docs - kept) / docs, 4) if docs else 0.0,
        "removed_per_rule": {r["rule"]: r["docs"] for r in rows},
        "removed_chars_per_rule": {r["rule"]: r["chars"] for r in rows},
        "removed_lines_per_rule": {r["rule"]: r["lines"] for r in line_rows},
        "languages": dict(sorted(languages.items())),
        "shards": len(units),
        "chars_in": chars_in,
        "kept_chars": kept_chars,
        "removed_chars": chars_in - kept_chars,
        "seconds": round(seconds, 2),
        "mb_per_s": round(chars_in / 1e6 / seconds, 2) if seconds > 0 else None,
    }


STAGE = Stage(name="filter", version=3, run=run)
