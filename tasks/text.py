"""What the text stages agree on: the Unicode ranges of the CJK scripts, and what a paragraph break is.

The ranges are named pieces, for use inside a regex character class; each stage composes the
class it needs (the filter and dedup count kana, Han and hangul as CJK; language id also looks
at jamo and half-width kana; normalize lists what ftfy never reacts to). One place, so that a
range fixed here is fixed for every stage.
"""

from __future__ import annotations

import re

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

# A character of a script written without spaces between words: where the filter and dedup
# count characters instead of words.
CJK_CHAR = f"[{KANA}{HAN}{HANGUL}{HAN_COMPATIBILITY}{HAN_SUPPLEMENTARY}]"

# One or more blank lines (a blank line may hold spaces or tabs), LF or CRLF. A match starts at
# the line break that ends the paragraph, its \r included: the chunker keeps text exactly.
PARAGRAPH_BREAK = re.compile(r"\r?\n(?:[ \t]*\r?\n)+")
# The same breaks, for text split into paragraphs that are then stripped (a \r may stay on the
# paragraph before a break). Starting with a plain \n lets the regex engine scan for it: 6x
# faster than PARAGRAPH_BREAK, which the filter's per-document statistics notice.
PARAGRAPH_SPLIT = re.compile(r"\n(?:[ \t]*\r?\n)+")
