"""Long documents cut into chunks of at most `chunk_chars` characters on paragraph boundaries
(then lines, then spaces), streaming: the result does not depend on how the text arrives."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from ember.tasks.text import PARAGRAPH_BREAK

LINE_BREAK = re.compile(r"\r?\n")
BLANK_TAIL = re.compile(r"[ \t]*\r?\Z")  # what may still grow into a paragraph break


def chunk_text(text: str, max_chars: int) -> list[str]:
    """Split `text` into pieces of at most `max_chars` characters (see `iter_chunks`)."""
    return list(iter_chunks([text], max_chars))


def iter_chunks(parts: Iterable[str], max_chars: int) -> Iterator[str]:
    """Chunks of at most `max_chars` characters of the text made of `parts`, streaming.

    Whole paragraphs are packed greedily; a paragraph too long on its own is packed by lines,
    and a line too long on its own is cut, at a space when there is one in its second half.
    Text inside a chunk is kept exactly (its separators included); the breaks between chunks
    are dropped. A text of at most `max_chars` is one chunk, as it is.

    The result does not depend on how the text is split into parts: a piece is decided only
    once the text that could change it has arrived (at most about `max_chars` ahead), and
    packing restarts from the start of the open chunk, so memory stays near one part plus
    two chunks however long the text or its lines.
    """
    parts = iter(parts)
    head: list[str] = []
    size = 0
    for part in parts:
        head.append(part)
        size += len(part)
        if size > max_chars:
            break
    else:
        text = "".join(head)
        if text:
            yield text
        return

    buf = "".join(head)
    pos = 0  # where the text not yet cut into pieces starts
    long_para = False  # inside a paragraph longer than max_chars: cut by lines
    start = end = -1  # the open chunk
    done: list[str] = []

    def pack(a: int, b: int) -> None:
        nonlocal start, end
        if b <= a:
            return
        if start >= 0 and b - start > max_chars:
            done.append(buf[start:end])
            start = -1
        if start < 0:
            start = a
        end = b

    final = False
    while True:
        n = len(buf)
        while pos < n:
            if not long_para:
                m = PARAGRAPH_BREAK.search(buf, pos)
                if m and (final or not BLANK_TAIL.match(buf, m.end())):
                    if m.start() - pos <= max_chars:
                        pack(pos, m.start())
                        pos = m.end()
                        continue
                elif final:
                    if n - pos <= max_chars:
                        pack(pos, n)
                        pos = n
                        continue
                else:
                    # The paragraph ends at this break, or at one still to come that cannot
                    # start before `bound`: long for sure past max_chars, else wait for text.
                    bound = m.start() if m else _earliest_break(buf, pos)
                    if bound - pos <= max_chars:
                        break
                long_para = True
            m = LINE_BREAK.search(buf, pos)
            para = PARAGRAPH_BREAK.match(buf, m.start()) if m else None
            line_end = m.start() if m else (n if final else -1)
            known = line_end if line_end >= 0 else n - 1 if buf.endswith("\r") else n  # the line ends at or after
            while known - pos > max_chars:
                space = buf.rfind(" ", pos + max_chars // 2, pos + max_chars)
                cut = space if space > pos else pos + max_chars
                pack(pos, cut)
                pos = cut + (space > pos)  # the space at a cut goes with the break
            if line_end < 0:
                break
            if not final and m and BLANK_TAIL.match(buf, para.end() if para else m.end()):
                break  # the break may still grow into (a longer) paragraph break
            pack(pos, line_end)
            if m is None:
                pos = n
            elif para:
                pos, long_para = para.end(), False
            else:
                pos = m.end()
        for chunk in done:
            chunk = chunk.strip("\r\n")
            if chunk.strip():
                yield chunk
        done.clear()
        if final:
            break
        following = next(parts, None)
        if following is None:
            final = True
        else:
            keep = min(pos, start) if start >= 0 else pos
            buf = buf[keep:] + following
            pos -= keep
            if start >= 0:
                start, end = start - keep, end - keep
    if start >= 0:
        chunk = buf[start:end].strip("\r\n")
        if chunk.strip():
            yield chunk


def _earliest_break(buf: str, pos: int) -> int:
    """Where a paragraph break not yet complete at the end of `buf` could start."""
    i = buf.rfind("\n", pos)
    if i >= 0 and BLANK_TAIL.match(buf, i + 1):
        return i - 1 if i > pos and buf[i - 1] == "\r" else i
    return len(buf) - 1 if buf.endswith("\r") else len(buf)
