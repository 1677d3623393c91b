"""Which scripts a text is written in, and so which languages a model writes.

The Unicode ranges of the CJK scripts are named pieces, for use inside a regex character class;
each user composes the class it needs (the filter and dedup count kana, Han and hangul as CJK;
language id also looks at jamo and half-width kana; normalize lists what ftfy never reacts to;
the demo tells a model's language from its tokenizer). One place, so that a range fixed here is
fixed for every stage and for the demo. Plain `re`: no torch.
"""

from __future__ import annotations

import re

from tokenizers import Tokenizer

KANA = "\u3040-\u30ff"  # hiragana and katakana
KANA_EXTENSIONS = "\u31f0-\u31ff"  # katakana phonetic extensions
HALFWIDTH_KANA = "\uff66-\uff9f"
HAN = "\u3400-\u4dbf\u4e00-\u9fff"  # CJK unified ideographs and extension A
HAN_COMPATIBILITY = "\uf900-\ufaff"
HAN_SUPPLEMENTARY = "\U00020000-\U0002fa1f"  # extensions B-F and the compatibility supplement
HANGUL = "\uac00-\ud7af"  # syllables
HANGUL_JAMO = "\u1100-\u11ff\u3130-\u318f"
CJK_PUNCTUATION = "\u3001-\u303f"  # 、。「」 and the like
FULLWIDTH_PUNCTUATION = "\uff01-\uff0f\uff1a-\uff1f"  # ！，：？ and the like

SCRIPTS = {
    "ja": re.compile(f"[{KANA}]"),
    "ko": re.compile(f"[{HANGUL}{HANGUL_JAMO}]"),
    "zh": re.compile(f"[{HAN}{HAN_COMPATIBILITY}{HAN_SUPPLEMENTARY}]"),
    "en": re.compile("[A-Za-z]"),
}
# A language the model writes holds at least this share of the vocabulary's tokens that carry letters.
VOCAB_SHARE = 0.2


def text_languages(text: str) -> set[str]:
    """The languages a text is written in, as far as its script tells: Latin letters count as
    English (the one Latin-script language the demo has examples for), Han as Chinese unless kana
    say Japanese."""
    found = {lang for lang, pattern in SCRIPTS.items() if pattern.search(text)}
    if "ja" in found:
        found.discard("zh")  # Japanese is written with Han characters too
    return found


def model_languages(tokenizer: Tokenizer) -> list[str]:
    """The languages a model writes, most of its vocabulary first, from its tokenizer alone.

    A byte-level BPE vocabulary is the merges its training text made most often, so the scripts
    of the merged tokens are the scripts of that text; every release has its tokenizer, old ones
    included. Single ASCII characters are skipped: they are the byte alphabet every such
    vocabulary starts with, whatever it was trained on. Tokens that decode to half a character
    (a merge inside a multi-byte UTF-8 character) carry no letters and do not count.
    """
    pieces = tokenizer.decode_batch([[i] for i in range(tokenizer.get_vocab_size())], skip_special_tokens=True)
    counts: dict[str, int] = {}
    letters = 0
    for piece in pieces:
        piece = piece.strip()
        if not piece or (len(piece) == 1 and piece.isascii()):
            continue
        found = text_languages(piece)
        letters += bool(found)
        for lang in found:
            counts[lang] = counts.get(lang, 0) + 1
    if "ja" in counts:  # Japanese vocabularies hold many Han tokens: they belong to Japanese
        counts["ja"] += counts.pop("zh", 0)
    return [lang for lang, n in sorted(counts.items(), key=lambda kv: -kv[1]) if n >= VOCAB_SHARE * letters]
