"""download's chunker: paragraphs packed, long paragraphs cut by lines and long lines at spaces,
and the streaming chunker equal to the whole-text one however the text arrives."""

from __future__ import annotations

import pytest

from ember.tasks.download import chunk_text, iter_chunks

PARA = "word " * 19 + "end."  # 99 characters


@pytest.mark.parametrize(
    "text, max_chars, expected",
    [
        pytest.param("short text", 100, ["short text"], id="short_unchanged"),
        pytest.param("\n\n".join([PARA] * 3), 250, ["\n\n".join([PARA] * 2), PARA], id="packs_paragraphs"),
        pytest.param("\r\n\r\n".join([PARA] * 3), 250, ["\r\n\r\n".join([PARA] * 2), PARA], id="crlf_paragraphs"),
        pytest.param("\n\n\n\n".join([PARA] * 2), 150, [PARA, PARA], id="many_blank_lines"),
        pytest.param("\n".join([PARA] * 3), 250, ["\n".join([PARA] * 2), PARA], id="long_paragraph_by_lines"),
        pytest.param("abcdefghij" * 25, 100, ["abcdefghij" * 10, "abcdefghij" * 10, "abcdefghij" * 5], id="hard_split"),
    ],
)
def test_chunk_text_cases(text, max_chars, expected):
    assert chunk_text(text, max_chars) == expected


@pytest.mark.parametrize("max_chars", [100, 500, 4000])
def test_chunks_are_bounded_and_lose_no_words(corpora, max_chars):
    text = (corpora / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:60_000]
    chunks = chunk_text(text, max_chars)
    assert all(0 < len(c) <= max_chars for c in chunks)
    assert " ".join(chunks).split() == text.split()
    # A cut falls between speeches (at a blank line) unless the speech is longer than a chunk.
    position = 0
    for chunk in chunks:
        position = text.index(chunk, position) + len(chunk)
        if text[position : position + 2] not in ("\n\n", ""):
            speech_start = text.rfind("\n\n", 0, position) + 2
            speech_end = text.find("\n\n", position) % (len(text) + 1)  # -1: the end
            assert speech_end - speech_start > max_chars


def test_long_line_is_cut_at_a_space():
    text = " ".join(["lorem"] * 100)  # 599 characters, one line
    chunks = chunk_text(text, 100)
    assert all(len(c) <= 100 for c in chunks)
    assert not any(c.startswith(" ") or c.endswith(" ") for c in chunks)
    assert "".join(chunks).replace(" ", "") == text.replace(" ", "")
    assert all(w == "lorem" for c in chunks for w in c.split())  # no word cut in two


# --- streaming chunker ----------------------------------------------------------------------


def reference_chunks(text: str, max_chars: int) -> list[str]:
    """The whole-text chunker of download v1, the oracle for the streaming one."""
    import re

    def spans(start, end, sep):
        out, pos = [], start
        for m in sep.finditer(text, start, end):
            out.append((pos, m.start()))
            pos = m.end()
        out.append((pos, end))
        return [(a, b) for a, b in out if b > a]

    if len(text) <= max_chars:
        return [text]
    pieces = []
    for a, b in spans(0, len(text), re.compile(r"\r?\n(?:[ \t]*\r?\n)+")):
        if b - a <= max_chars:
            pieces.append((a, b))
            continue
        for la, lb in spans(a, b, re.compile(r"\r?\n")):
            while lb - la > max_chars:
                space = text.rfind(" ", la + max_chars // 2, la + max_chars)
                cut = space if space > la else la + max_chars
                pieces.append((la, cut))
                la = cut + (space > la)
            pieces.append((la, lb))
    chunks, start, end = [], None, None
    for a, b in pieces:
        if start is not None and b - start > max_chars:
            chunks.append(text[start:end])
            start = None
        if start is None:
            start = a
        end = b
    if start is not None:
        chunks.append(text[start:end])
    return [c for c in (c.strip("\r\n") for c in chunks) if c.strip()]


def split_into_parts(text: str, sizes: list[int], seed: int) -> list[str]:
    import random

    rng, parts, i = random.Random(seed), [], 0
    while i < len(text):
        n = rng.choice(sizes)
        parts.append(text[i : i + n])
        i += n
    return parts


def test_streaming_chunks_equal_whole_text_chunks_however_the_text_arrives(corpora):
    import random

    rng = random.Random(7)
    alphabet = ["a", "b", " ", "\n", "\r\n", "\n\n", " \n", "\t", "\n \n", "word ", "\r", "xyz" * 40]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 1500))) for _ in range(80)]
    shakespeare = (corpora / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:30_000]
    texts += [shakespeare, shakespeare.replace("\n", "\r\n"), " ".join(["lorem"] * 3000)]
    for n, text in enumerate(texts):
        for max_chars in (100, 137, 500):
            expected = reference_chunks(text, max_chars) if text else []
            tiny = ([1, 2, 3],) if n % 5 == 0 or n >= 80 else ()  # a round per part: the slow case, sampled
            for sizes in ([len(text) + 1], [40, 300], [7, 1000], *tiny):
                assert list(iter_chunks(split_into_parts(text, sizes, n), max_chars)) == expected, (n, max_chars, sizes)
