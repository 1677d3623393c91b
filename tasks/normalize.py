"""normalize: raw text shards -> clean text shards (same ids, same order).

First ftfy undoes mojibake (UTF-8 decoded as cp1252, Latin-1, MacRoman...), then line breaks,
control characters, the Unicode form and runs of blank lines are made uniform. It runs before
filter and dedup, so that a damaged copy of a text is judged and deduplicated as the text.

As datatrove's FTFYFormatter argues: fixing unreadable text is good, enforcing one way of
writing is not. Curly quotes, ligatures and full-width CJK punctuation are kept by default, so
the model learns the text as people write it.

One unit of work per input shard, each writing the output shard of the same name (the shard-stage
base, shard_stage.py); the report counts the documents changed by each kind of change (CHANGES).
"""

from __future__ import annotations

import re
import unicodedata
from typing import Literal

import ftfy
from ftfy.chardata import CONTROL_CHARS
from pydantic import BaseModel, ConfigDict, Field

from ember.model.scripts import CJK_PUNCTUATION, FULLWIDTH_PUNCTUATION, HAN, KANA
from ember.storage.shards import ShardFileWriter
from ember.tasks.shard_stage import Document, ShardStage, Stats
from ember.tasks.stage import Metrics, Stage, StageContext


class NormalizeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ftfy: bool = Field(True, description="run ftfy.fix_text with the options below")
    # The options that repair broken encodings, all on as in ftfy and datatrove:
    fix_encoding: bool = Field(
        True, description="undo mojibake: UTF-8 bytes decoded in a legacy encoding ('Ã©' -> 'é')"
    )
    restore_byte_a0: bool = Field(True, description="also when the mojibake lost a 0xA0 byte to a plain space")
    replace_lossy_sequences: bool = Field(True, description="replace mojibake that lost bytes for good by U+FFFD")
    decode_inconsistent_utf8: bool = Field(True, description="fix mojibake that appears in only part of a text")
    fix_c1_controls: bool = Field(
        True, description="read stray C1 controls (U+0080-U+009F) as the cp1252 characters they were"
    )
    fix_surrogates: bool = Field(True, description="join UTF-16 surrogate pairs left in the text")
    # Display-related: they mostly remove what no reader sees.
    unescape_html: bool | Literal["auto"] = Field(
        "auto", description="'&amp;' -> '&'; 'auto' leaves text that contains '<' (real HTML) alone"
    )
    remove_terminal_escapes: bool = Field(True, description="remove ANSI colour codes ('\\x1b[36m')")
    # These enforce one way of writing, so they are off (datatrove's choice): the model should
    # see curly quotes, ligatures and full-width punctuation as they are written.
    fix_latin_ligatures: bool = Field(False, description="'ﬁ' -> 'fi'")
    fix_character_width: bool = Field(False, description="full-width to half-width: would turn Chinese '，' into ','")
    uncurl_quotes: bool = Field(False, description="curly quotes to straight ones")

    unicode_form: Literal["NFC", "NFKC", "NFD", "NFKD"] | None = Field(
        "NFC", description="Unicode normalization form (None: leave as is); NFKC also folds ligatures and widths"
    )
    remove_control_chars: bool = Field(
        True, description="drop control characters (ftfy's list: C0 but tab/LF/FF/CR, DEL, BOM...); keeps tab, LF"
    )
    # After fix_c1_controls only the five C1 code points that cp1252 leaves undefined remain; ftfy
    # keeps them (its test cases call them intentional), so by default this stage does too.
    remove_c1_controls: bool = Field(False, description="also drop C1 controls (U+0080-U+009F but U+0085)")
    # U+0085 (NEL) is also the C1 byte of cp1252's '…': with fix_c1_controls on, ftfy reads it so first.
    normalize_newlines: bool = Field(True, description="CRLF, CR, U+2028, U+2029 and U+0085 become LF")
    max_blank_lines: int | None = Field(
        2, ge=0, description="collapse longer runs of blank lines to this many (None: keep)"
    )
    examples: int = Field(5, ge=0, description="how many ftfy repairs to show in the report")


def ftfy_config(cfg: NormalizeConfig) -> ftfy.TextFixerConfig:
    # Line breaks, control characters and the Unicode form are done below for every document,
    # including those that skip ftfy; `explain=False` skips building explanations we never read.
    # But ftfy 6.3 without explanations calls `fix_encoding` with its default options, so when
    # an encoding sub-option is switched off the explaining path (which honours it) is taken.
    encoding_defaults = cfg.restore_byte_a0 and cfg.replace_lossy_sequences and cfg.decode_inconsistent_utf8
    return ftfy.TextFixerConfig(
        unescape_html=cfg.unescape_html,
        remove_terminal_escapes=cfg.remove_terminal_escapes,
        fix_encoding=cfg.fix_encoding,
        restore_byte_a0=cfg.restore_byte_a0,
        replace_lossy_sequences=cfg.replace_lossy_sequences,
        decode_inconsistent_utf8=cfg.decode_inconsistent_utf8,
        fix_c1_controls=cfg.fix_c1_controls,
        fix_latin_ligatures=cfg.fix_latin_ligatures,
        fix_character_width=cfg.fix_character_width,
        uncurl_quotes=cfg.uncurl_quotes,
        fix_line_breaks=False,
        fix_surrogates=cfg.fix_surrogates,
        remove_control_chars=False,
        normalization=None,
        explain=not encoding_defaults,
    )


# Characters that ftfy's mojibake detector (`ftfy.badness.is_bad`) never reacts to: curly
# quotes, dashes, the ellipsis, the no-break space, and CJK text with its punctuation. Checked by
# brute force against ftfy 6.3: no string of up to 4 characters over these (one CJK ideograph
# standing for all) and ASCII is "bad", nor any of these next to any ASCII character; the tests
# compare the shortcut with full ftfy on the mojibake cases and on real corpora. A text made only
# of ASCII and these is left alone by every fix enabled by default, so books and Chinese skip
# most of ftfy's cost (3.5 MB/s on gutenberg_en's non-ASCII chunks).
SAFE_NON_ASCII = f"\u2018\u2019\u201c\u201d\u2013\u2014\u2026\u00a0{CJK_PUNCTUATION}{KANA}{HAN}{FULLWIDTH_PUNCTUATION}"
NEEDS_FTFY = re.compile(f"[^\\x00-\\x7f{SAFE_NON_ASCII}]")


def ftfy_can_change(text: str, cfg: NormalizeConfig) -> bool:
    """False when ftfy provably leaves `text` alone, which saves most of its cost.

    ftfy fixes a segment only when its badness heuristic fires (which needs a character outside
    ASCII and SAFE_NON_ASCII), when there are C1 controls or surrogates (also outside that set),
    or for HTML entities (need '&') and terminal escapes (need ESC).
    """
    if cfg.fix_latin_ligatures or cfg.fix_character_width or cfg.uncurl_quotes:
        if not text.isascii():  # these change characters the shortcut calls safe
            return True
    elif NEEDS_FTFY.search(text) is not None:
        return True
    return (cfg.unescape_html is not False and "&" in text) or (cfg.remove_terminal_escapes and "\x1b" in text)


NEWLINES = re.compile(r"\r\n?|[\u2028\u2029\x85]")
# ftfy's list (C0 but tab/LF/FF/CR, DEL, BOM, deprecated format chars, interlinear annotation),
# optionally with the C1 range.
_FTFY_CONTROL = "".join(re.escape(chr(c)) for c in sorted(CONTROL_CHARS))
CONTROL = re.compile(f"[{_FTFY_CONTROL}]")
CONTROL_C1 = re.compile(f"[{_FTFY_CONTROL}\x80-\x84\x86-\x9f]")


BLANK_RUN = "\n(?:[ \t]*\n){%d,}"

# The kinds of change counted per document, in the order they are applied.
CHANGES = ("ftfy", "newlines", "control_chars", "unicode_form", "blank_lines")


def normalize_steps(
    text: str, cfg: NormalizeConfig, fixer: ftfy.TextFixerConfig | None = None, can_change: bool | None = None
) -> tuple[str, tuple[str, ...]]:
    """The whole normalization of one text, and which kinds of change (CHANGES) it made.
    `can_change`: `ftfy_can_change(text, cfg)` when the caller has it already (a fifth of the cost)."""
    changed = []
    if cfg.ftfy and (ftfy_can_change(text, cfg) if can_change is None else can_change):
        fixed = ftfy.fix_text(text, config=fixer or ftfy_config(cfg))
        if fixed != text:
            changed.append("ftfy")
            text = fixed
    if cfg.normalize_newlines and ("\r" in text or not text.isascii()):
        text, n = NEWLINES.subn("\n", text)
        if n:
            changed.append("newlines")
    if cfg.remove_control_chars:
        text, n = (CONTROL_C1 if cfg.remove_c1_controls else CONTROL).subn("", text)
        if n:
            changed.append("control_chars")
    if cfg.unicode_form and not text.isascii() and not unicodedata.is_normalized(cfg.unicode_form, text):
        text = unicodedata.normalize(cfg.unicode_form, text)
        changed.append("unicode_form")
    if cfg.max_blank_lines is not None and "\n\n" in text:
        # A blank line may hold spaces; more than N of them in a row become exactly N.
        text, n = re.subn(BLANK_RUN % (cfg.max_blank_lines + 1), "\n" * (cfg.max_blank_lines + 1), text)
        if n:
            changed.append("blank_lines")
    return text, tuple(changed)


def normalize_text(text: str, cfg: NormalizeConfig, fixer: ftfy.TextFixerConfig | None = None) -> str:
    """The whole normalization of one text (what the stage does to each document)."""
    return normalize_steps(text, cfg, fixer)[0]


def _difference(before: str, after: str, width: int = 40) -> tuple[str, str]:
    start = next(
        (i for i, (a, b) in enumerate(zip(before, after, strict=False)) if a != b), min(len(before), len(after))
    )
    lo = max(0, start - width // 2)
    return before[lo : lo + width], after[lo : lo + width]


class Normalize(ShardStage[NormalizeConfig]):
    name = "normalize"

    def setup(self) -> None:
        self.fixer = ftfy_config(self.cfg)

    def process(self, doc: Document, out: dict[str, ShardFileWriter], stats: Stats) -> None:
        cfg = self.cfg
        can_change = cfg.ftfy and ftfy_can_change(doc.text, cfg)
        if cfg.ftfy and not can_change:
            stats.add("ftfy_skipped")
        fixed, changes = normalize_steps(doc.text, cfg, self.fixer, can_change)
        if changes:
            stats.add("changed_docs")
            stats.add("other_changed", changes != ("ftfy",))
            for kind in changes:
                stats.add("changes", key=kind)
            if "ftfy" in changes and len(stats.firsts.get("examples", {})) < cfg.examples:
                before, after = _difference(doc.text, fixed)
                stats.first("examples", doc.id, {"id": doc.id, "before": before, "after": after})
        stats.add("chars_out", len(fixed))
        out["shards"].add({"id": doc.id, "text": fixed, "source": doc.source})

    def summarize(self, stats: Stats, ctx: StageContext) -> Metrics:
        docs, changed = int(stats.total("docs")), int(stats.total("changed_docs"))
        counts = {kind: int(stats.keyed("changes").get(kind, 0)) for kind in CHANGES}
        examples = list(stats.firsts.get("examples", {}).values())[: self.cfg.examples]
        ctx.report.table(
            "normalize-changes",
            [{"change": kind, "docs": n, "share": round(n / docs, 4) if docs else 0.0} for kind, n in counts.items()]
            + [{"change": "any", "docs": changed, "share": round(changed / docs, 4) if docs else 0.0}],
            f"Documents changed by each normalization step ({changed} of {docs})",
        )
        if examples:
            ctx.report.table("normalize-ftfy-examples", examples, "Text that ftfy repaired (first differences)")
        return {
            "docs": docs,
            "changed_docs": changed,
            "changed_per_kind": counts,
            "ftfy_changed": counts["ftfy"],
            "other_changed": int(stats.total("other_changed")),
            "ftfy_skipped_ascii": int(stats.total("ftfy_skipped")),
            "chars_in": int(stats.total("chars_in")),
            "chars_out": int(stats.total("chars_out")),
        }


def run(cfg: NormalizeConfig, ctx: StageContext) -> Metrics:
    return Normalize(cfg).run(ctx)


STAGE = Stage(name=Normalize.name, version=2, run=run, inputs=("download",), unkeyed=("examples",))
