"""Offline language identification for the filter stage.

lingua ships its n-gram models inside the wheel, so nothing is downloaded at run time (the
language filters of datatrove and NeMo fetch fastText's lid.176 and fail offline). lingua is
accurate but costs 3-8 ms per 500-1,000 characters here, so two exact-enough shortcuts go first:
- text whose letters are mostly CJK is Chinese, Japanese (kana among them) or Korean (hangul),
  which the script alone decides;
- ASCII-lettered text in which English function words make up a good share of the words is
  English (a fifth of the tokens of running English are among these 40 words; no other
  language written in ASCII comes close).
Everything else goes to lingua, on a bounded prefix of the document.

lingua's high-accuracy mode (1- to 5-gram models) loads about 1 GB of models into each process
and takes 7-8 s to do so on this machine, for the handful of title pages and tables of contents
per shard of books that reach it; its low-accuracy mode (trigram models only) takes 0.3 s and
about 60 MB. On every document of the sample corpora that reaches lingua (157 messy_web pages,
16 gutenberg_en and tinyshakespeare chunks), the two modes name the same language and make the
same keep-or-drop decision at the filter's default 0.65 threshold; low accuracy is weaker on
texts under about 120 characters, where the confidence values also differ more.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import TYPE_CHECKING, NamedTuple

from ember.model import scripts

if TYPE_CHECKING:
    from lingua import LanguageDetector

ENGLISH_FUNCTION_WORDS = frozenset(
    "the of and to a in is was that it he i for on with as his her be at by you had not but from "
    "this have they she which or were are an my all so said one".split()
)
_ENGLISH_BYTES = frozenset(w.encode() for w in ENGLISH_FUNCTION_WORDS)
_ASCII_NON_LETTERS = bytes(c for c in range(128) if not chr(c).isalpha())
NON_ASCII = re.compile(r"[^\x00-\x7f]+")
HAN = re.compile(f"[{scripts.HAN}{scripts.HAN_COMPATIBILITY}{scripts.HAN_SUPPLEMENTARY}]")
KANA = re.compile(f"[{scripts.KANA}{scripts.KANA_EXTENSIONS}{scripts.HALFWIDTH_KANA}]")
HANGUL = re.compile(f"[{scripts.HANGUL}{scripts.HANGUL_JAMO}]")
CJK_ANY = re.compile(
    f"[{scripts.HAN}{scripts.HAN_COMPATIBILITY}{scripts.HAN_SUPPLEMENTARY}{scripts.KANA}{scripts.KANA_EXTENSIONS}"
    f"{scripts.HALFWIDTH_KANA}{scripts.HANGUL}{scripts.HANGUL_JAMO}]"
)


class Language(NamedTuple):
    code: str  # ISO 639-1 ("en", "zh"), or "unknown" when the text has too few letters
    score: float  # confidence in [0, 1]
    method: str  # "script", "function-words", "lingua" or "too-short"


def detect(text: str, prefix_chars: int = 500, min_letters: int = 20, low_accuracy: bool = True) -> Language:
    """The language of `text`, judged on its first `prefix_chars` characters (`low_accuracy`:
    lingua's trigram-only mode, for the few texts the shortcuts do not decide)."""
    sample = text[:prefix_chars]
    ascii_part = sample.encode("ascii", "ignore")
    ascii_letters = len(ascii_part.translate(None, _ASCII_NON_LETTERS))
    other = 0
    if len(ascii_part) < len(sample):
        others = "".join(NON_ASCII.findall(sample))
        other = sum(map(str.isalpha, others))
        if other and CJK_ANY.search(others):
            han, kana, hangul = len(HAN.findall(others)), len(KANA.findall(others)), len(HANGUL.findall(others))
            cjk = han + kana + hangul
            if cjk >= min(min_letters, 8) and cjk > 0.5 * (ascii_letters + other):
                if hangul > han + kana:
                    return Language("ko", round(hangul / cjk, 4), "script")
                if kana >= 0.05 * cjk:  # Japanese mixes kana into its kanji; Chinese has none
                    return Language("ja", round((han + kana) / cjk, 4), "script")
                return Language("zh", round(han / cjk, 4), "script")
    letters = ascii_letters + other
    if letters < min_letters:
        return Language("unknown", 0.0, "too-short")
    if other <= 0.02 * letters:
        words = ascii_part.lower().split()
        share = sum(map(_ENGLISH_BYTES.__contains__, words)) / max(1, len(words))
        if share >= 0.2 and len(words) >= 8:
            return Language("en", 1.0, "function-words")
    best = _detector(low_accuracy).compute_language_confidence_values(sample)[0]
    return Language(best.language.iso_code_639_1.name.lower(), round(float(best.value), 4), "lingua")


@lru_cache(maxsize=2)
def _detector(low_accuracy: bool = True) -> LanguageDetector:
    # Built once per process (the models load lazily, per language, on first use).
    from lingua import LanguageDetectorBuilder

    builder = LanguageDetectorBuilder.from_all_languages()
    return (builder.with_low_accuracy_mode() if low_accuracy else builder).build()
