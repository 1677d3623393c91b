"""C4's line rules (Raffel et al. 2020, as datatrove's C4QualityFilter), judged per paragraph, and
C4's document rules on what the line rules leave.

Books are hard-wrapped, so the rules judge *paragraphs*: within a block of lines, a line that does
not end a sentence and is long (a wrapped line) or ends in , ; : or a dash is joined with the next
line first. Judged line by line, C4 drops 82% of the lines of gutenberg_en; judged so, well under
1% (benchmarks/filter_quality.py). Closing quotes count as terminal punctuation (“Yes,” she
said.” ends a sentence), as do CJK full stops.
"""

from __future__ import annotations

import re
import string
from itertools import islice
from typing import NamedTuple

from ember.tasks.filter.config import FilterConfig


class Drop(NamedTuple):
    rule: str
    value: float
    threshold: float
    detail: str = ""  # e.g. the language detected


# Edge punctuation stripped from words: ASCII plus the quotes, dashes and marks of books and CJK.
PUNCTUATION = string.punctuation + "“”‘’«»„‚‹›—–―…¡¿·•†‡§¶" + "。，、！？：；「」『』（）《》【】〔〕〈〉・～"


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


def line_rules(
    text: str, cfg: FilterConfig, cjk: bool, words: list[str] | None = None, units: list[Unit] | None = None
) -> tuple[str, list[LineDrop]]:
    """Apply C4's line rules: (the text left, the lines dropped). `words`, `units`: if known."""
    # Rules that need a substring are skipped for the whole text when it has none.
    lower = text.lower() if cfg.line_javascript or cfg.line_policy_phrases else ""
    javascript = cfg.line_javascript and "javascript" in lower
    phrases = [p for p in cfg.line_policy_phrases or () if p in lower]
    boilerplate = [p for p in cfg.line_boilerplate_phrases or () if p in lower]
    long_words = (
        cfg.line_max_word_chars is not None
        and not cjk
        and len(text) > cfg.line_max_word_chars
        and max(map(len, text.split() if words is None else words), default=0) > cfg.line_max_word_chars
    )
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
        verdict: tuple[str, float, float] | None = None  # (rule, value, threshold)
        if not unit.ends and cfg.line_terminal_punct and not cjk:
            last = changed.get(unit.last, lines[unit.last]).strip()
            # A paragraph cut by the end of a chunk, or one that introduces a quote after a
            # blank line ("...and then he said:"), goes on: it is not a line without an end.
            if not (unit.goes_on and (n == len(units) - 1 or last.endswith(INTRODUCES))):
                verdict = ("line_terminal_punct", 0.0, 1.0)
        if verdict is None and (
            long_words
            or javascript
            or phrases
            or boilerplate
            or (cfg.line_min_words is not None and not (cfg.line_min_words_unless_sentence and unit.ends))
        ):
            joined = " ".join(changed.get(i, lines[i]).strip() for i in range(unit.first, unit.last + 1))
            if (
                long_words
                and cfg.line_max_word_chars is not None  # long_words says so already
                and (longest := max(map(len, joined.split()), default=0)) > cfg.line_max_word_chars
            ):
                verdict = ("line_max_word_chars", longest, cfg.line_max_word_chars)
            elif (
                cfg.line_min_words is not None
                and not (cfg.line_min_words_unless_sentence and unit.ends)
                and ((n_words := _count_words(joined, cjk)) < cfg.line_min_words)
            ):
                verdict = ("line_min_words", n_words, cfg.line_min_words)
            elif javascript or phrases or boilerplate:
                low = joined.lower()
                if javascript and "javascript" in low:
                    verdict = ("line_javascript", 1.0, 1.0)
                elif any(p in low for p in phrases):
                    verdict = ("line_policy", 1.0, 1.0)
                elif any(p in low for p in boilerplate):
                    verdict = ("line_boilerplate", 1.0, 1.0)
        if verdict is None and cfg.line_drop_repeats and unit.ends:
            key = "\n".join(lines[unit.first : unit.last + 1]).strip()
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
    if (
        cfg.min_sentences is not None
        and not cjk
        and (sentences := count_sentences(text, cfg.min_sentences)) < cfg.min_sentences
    ):
        return Drop("min_sentences", sentences, cfg.min_sentences)
    return None
