"""What the text stages agree on: what a CJK character is (from the script ranges of
model/scripts.py, which the demo shares) and what a paragraph break is."""

from __future__ import annotations

import re

from ember.model.scripts import HAN, HAN_COMPATIBILITY, HAN_SUPPLEMENTARY, HANGUL, KANA

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
