"""normalize: raw text shards -> clean text shards (same ids, same order).

First ftfy undoes mojibake (UTF-8 decoded as cp1252, Latin-1, MacRoman...), then line breaks,
control characters, the Unicode form and runs of blank lines are made uniform. It runs before
filter and dedup, so that a damaged copy of a text is judged and deduplicated as the text.

As datatrove's FTFYFormatter argues: fixing unreadable text is good, enforcing one way of
writing is not. Curly quotes, ligatures and full-width CJK punctuation are kept by default, so
the model learns the text as people write it.
"""

from __future__ import annotations

import re
import time
import unicodedata
from typing import Literal

import ftfy
from ftfy.chardata import CONTROL_CHARS
from pydantic import BaseModel, ConfigDict, Field

from ember.storage.shards import ShardWriter, input_shards, read_shard
from ember.tasks.stage import Stage, StageContext


class NormalizeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ftfy: bool = Field(True, description="run ftfy.fix_text with the options below")
    # The options that repair broken encodings, all on as in ftfy and datatrove:
    fix_encoding: bool = Field(True,
                               description="undo mojibake: UTF-8 bytes decoded in a legacy encoding ('Ã©' -> 'é')")
    restore_byte_a0: bool = Field(True, description="also when the mojibake lost a 0xA0 byte to a plain space")
    replace_lossy_sequences: bool = Field(True, description="replace mojibake that lost bytes for good by U+FFFD")
    decode_inconsistent_utf8: bool = Field(True, description="fix mojibake that appears in only part of a text")
    fix_c1_controls: bool = Field(
        True,
        description="read stray C1 controls (U+0080-U+009F) as the cp1252 characters they were")
    fix_surrogates: bool = Field(True, description="join UTF-16 surrogate pairs left in the text")
    # Display-related: they mostly remove what no reader sees.
    unescape_html: bool | Literal["auto"] = Field(
        "auto",
        description="'&amp;' -> '&'; 'auto' leaves text that contains '<' (real HTML) alone")
    remove_terminal_escapes: bool = Field(True, description="remove ANSI colour codes ('\\x1b[36m')")
    # These enforce one way of writing, so they are off (datatrove's choice): the model should
    # see curly quotes, ligatures and full-width punctuation as they are written.
    fix_latin_ligatures: bool = Field(False, description="'ﬁ' -> 'fi'")
    fix_character_width: bool = Field(False, description="full-width to half-width: would turn Chinese '，' into ','")
    uncurl_quotes: bool = Field(False, description="curly quotes to straight ones")

    unicode_form: Literal["NFC", "NFKC", "NFD", "NFKD"] | None = Field(
        "NFC", description="Unicode normalization form (None: leave as is); NFKC also folds ligatures and widths")
    remove_control_chars: bool = Field(
        True,
        description="drop control characters (ftfy's list, and C1 controls left after ftfy); keeps tab and newline")
    # U+0085 (NEL) is also the C1 byte of cp1252's '…': with fix_c1_controls on, ftfy reads it so first.
    normalize_newlines: bool = Field(True, description="CRLF, CR, U+2028, U+2029 and U+0085 become LF")
    max_blank_lines: int | None = Field(2, ge=0,
                                        description="collapse longer runs of blank lines to this many (None: keep)")
    examples: int = Field(5, ge=0, description="how many ftfy repairs to show in the report")


def ftfy_config(cfg: NormalizeConfig) -> ftfy.TextFixerConfig:
    # Line breaks, control characters and the Unicode form are done below for every document,
    # including those that skip ftfy; `explain=False` skips building explanations we never read.
    return ftfy.TextFixerConfig(
        unescape_html=cfg.unescape_html, remove_terminal_escapes=cfg.remove_terminal_escapes,
        fix_encoding=cfg.fix_encoding, restore_byte_a0=cfg.restore_byte_a0,
        replace_lossy_sequences=cfg.replace_lossy_sequences, decode_inconsistent_utf8=cfg.decode_inconsistent_utf8,
        fix_c1_controls=cfg.fix_c1_controls, fix_latin_ligatures=cfg.fix_latin_ligatures,
        fix_character_width=cfg.fix_character_width, uncurl_quotes=cfg.uncurl_quotes,
        fix_line_breaks=False, fix_surrogates=cfg.fix_surrogates, remove_control_chars=False,
        normalization=None, explain=False,
    )


def ftfy_can_change(text: str, cfg: NormalizeConfig) -> bool:
    """False when ftfy provably leaves `text` alone, which saves most of its cost.

    Every ftfy fix needs a non-ASCII character, except HTML unescaping (needs '&') and terminal
    escapes (need ESC); line breaks and control characters are not ftfy's job here. Measured on
    gutenberg_en: ftfy changed none of the 4,966 pure-ASCII chunks without '&'.
    """
    if not text.isascii():
        return True
    return (cfg.unescape_html is not False and "&" in text) or (cfg.remove_terminal_escapes and "\x1b" in text)


NEWLINES = re.compile(r"\r\n?|[\u2028\u2029\x85]")
# ftfy's list (C0 but tab/LF/FF/CR, DEL, BOM, deprecated format chars, interlinear annotation)
# plus the C1 range, which fix_c1_controls has already turned into text where it was mojibake.
CONTROL = re.compile("[" + "".join(re.escape(chr(c)) for c in sorted(CONTROL_CHARS)) + "\x80-\x84\x86-\x9f]")


def normalize_other(text: str, cfg: NormalizeConfig) -> str:
    """Everything but ftfy: line breaks, control characters, Unicode form, blank lines."""
    if cfg.normalize_newlines:
        text = NEWLINES.sub("\n", text)
    if cfg.remove_control_chars:
        text = CONTROL.sub("", text)
    if cfg.unicode_form and not unicodedata.is_normalized(cfg.unicode_form, text):
        text = unicodedata.normalize(cfg.unicode_form, text)
    if cfg.max_blank_lines is not None:
        # A blank line may hold spaces; more than N of them in a row become exactly N.
        text = re.sub(r"\n(?:[ \t]*\n){%d,}" % (cfg.max_blank_lines + 1), "\n" * (cfg.max_blank_lines + 1), text)
    return text


def normalize_text(text: str, cfg: NormalizeConfig, fixer: ftfy.TextFixerConfig | None = None) -> str:
    """The whole normalization of one text (what `run` does to each document)."""
    if cfg.ftfy and ftfy_can_change(text, cfg):
        text = ftfy.fix_text(text, config=fixer or ftfy_config(cfg))
    return normalize_other(text, cfg)


def _difference(before: str, after: str, width: int = 40) -> tuple[str, str]:
    start = next((i for i, (a, b) in enumerate(zip(before, after)) if a != b), min(len(before), len(after)))
    lo = max(0, start - width // 2)
    return before[lo: lo + width], after[lo: lo + width]


def run(cfg: NormalizeConfig, ctx: StageContext) -> dict:
    started = time.monotonic()
    shards, total = input_shards(ctx.inputs["download"], "download")
    fixer = ftfy_config(cfg)
    docs = ftfy_changed = other_changed = ftfy_skipped = chars_in = chars_out = 0
    examples = []
    with ShardWriter(ctx.out / "shards") as writer:
        for shard in shards:
            for record in read_shard(shard, columns=["id", "text", "source"]).to_pylist():
                text = record["text"] or ""
                chars_in += len(text)
                fixed = text
                if cfg.ftfy and ftfy_can_change(text, cfg):
                    fixed = ftfy.fix_text(text, config=fixer)
                    if fixed != text:
                        ftfy_changed += 1
                        if len(examples) < cfg.examples:
                            before, after = _difference(text, fixed)
                            examples.append({"id": record["id"], "before": before, "after": after})
                elif cfg.ftfy:
                    ftfy_skipped += 1
                out = normalize_other(fixed, cfg)
                other_changed += out != fixed
                chars_out += len(out)
                docs += 1
                writer.write({"id": record["id"], "text": out, "source": record["source"]})
                ctx.report.progress(docs, total, "normalize")
    if examples:
        ctx.report.table("normalize-ftfy-examples", examples, "Text that ftfy repaired (first differences)")
    seconds = time.monotonic() - started
    return {
        "docs": docs,
        "ftfy_changed": ftfy_changed,
        "other_changed": other_changed,
        "ftfy_skipped_ascii": ftfy_skipped,
        "chars_in": chars_in,
        "chars_out": chars_out,
        "seconds": round(seconds, 2),
        "mb_per_s": round(chars_in / 1e6 / seconds, 2) if seconds > 0 else None,
    }


STAGE = Stage(name="normalize", version=1, run=run, unkeyed=("examples",))
