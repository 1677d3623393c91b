"""Shingles, exact keys and MinHash signatures of dedup, over whole batches of texts at once.

Shingles: `ngram` consecutive words for spaced languages (lowercased; a word is a whitespace
token with its punctuation removed, so quote style and line wrapping do not matter), or
`char_ngram` consecutive characters for CJK-heavy text, which has no spaces between words
(punctuation and spaces dropped). n = 4 for CJK was measured on the two 红楼梦 editions
(../shared/corpora/near_duplicates): chapter pairs at Jaccard >= 0.8 number 42 / 35 / 28 / 23
for n = 3 / 4 / 5 / 6, while unrelated consecutive chapters of the same novel reach at most
0.044 / 0.012 / 0.004 / 0.000; 4 tolerates variant characters and keeps unrelated text far
below 0.8.

MinHash: `bands * rows` 32-bit hashes a_i * x + b_i mod 2^32 (a_i odd) of the high half of
the 64-bit shingle hashes, which splitmix64 has already mixed, so the affine map suffices
(measured: no bias in the Jaccard estimate). Numpy over blocks of many documents at once.
Measured on one core: about 12 MB of English text per CPU second for the whole stage.
"""

from __future__ import annotations

import hashlib
import re
from itertools import pairwise
from typing import Any, TypeVar, cast

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from ember.tasks.dedup.config import DedupConfig
from ember.tasks.text import CJK_CHAR

# The blanks not counted when deciding whether a text is CJK-heavy (CJK_CHAR: tasks/text.py).
BLANK_CLASS = "[\\s\u3000\ufeff]"
WORD = re.compile(r"\w+")
_MUL = np.uint64(0x9E3779B97F4A7C15)
_MIX = np.uint64(0xBF58476D1CE4E5B9)
NOT_WORD_CLASS = r"[^\p{L}\p{N}]+"  # what a token loses to become a word (RE2: \W would be ASCII-only)
_POLY = np.uint64(0x100000001B3)
_SHORT = 64  # strings up to this many bytes are hashed by numpy; longer ones (rare) by blake2b
_POWERS = np.cumprod(np.concatenate([[1], np.full(_SHORT - 1, _POLY)]).astype(np.uint64))

StringsT = TypeVar("StringsT", bound="pa.StringArray | pa.LargeStringArray")


def fill_empty(texts: StringsT) -> StringsT:
    """`texts` with "" for each null."""
    # pyarrow-stubs cannot type a Python str as the fill value (it gives Any): the result is an
    # array of the input's type.
    return cast(StringsT, pc.fill_null(texts, ""))


def hash_strings(strings: pa.StringArray | pa.LargeStringArray) -> npt.NDArray[np.uint64]:
    """A 64-bit hash per string (0 for ""), computed on Arrow's buffers without a Python object
    per string: a polynomial over the UTF-8 bytes mod 2^64, then splitmix64's finalizer. Arrow
    hands the distinct tokens of a batch here, so each is hashed once per batch."""
    n = len(strings)
    out = np.zeros(n, dtype=np.uint64)
    if n == 0 or strings.null_count == n:
        return out
    kind = np.int64 if pa.types.is_large_string(strings.type) else np.int32
    # Arrow leaves out the offsets only when every string is null, the data when every one is empty.
    offsets_buffer, data_buffer = strings.buffers()[1:3]
    assert offsets_buffer is not None
    offsets = np.frombuffer(
        memoryview(offsets_buffer), dtype=kind, count=n + 1, offset=strings.offset * kind().itemsize
    )
    base = int(offsets[0])
    offsets = offsets.astype(np.int64) - base
    lengths = np.diff(offsets)
    if offsets[-1] == 0:
        return out
    assert data_buffer is not None  # some string is not empty
    raw = np.frombuffer(memoryview(data_buffer), dtype=np.uint8, count=int(offsets[-1]), offset=base)
    # byte i of a string of length L weighs POLY^(L - 1 - i); sums per string from a cumulative sum
    exponent = np.repeat(offsets[1:], lengths) - np.arange(len(raw)) - 1
    terms = (raw.astype(np.uint64) + np.uint64(1)) * _POWERS[np.minimum(exponent, _SHORT - 1)]
    cumulative = np.concatenate([np.zeros(1, np.uint64), np.cumsum(terms, dtype=np.uint64)])
    h = cumulative[offsets[1:]] - cumulative[offsets[:-1]]  # wraps mod 2^64, on purpose
    h += lengths.astype(np.uint64) * _MUL
    h ^= h >> np.uint64(31)
    h *= _MIX
    h ^= h >> np.uint64(29)
    out[:] = h | np.uint64(1)
    out[lengths == 0] = 0
    for i in np.flatnonzero(lengths > _SHORT).tolist():
        out[i] = (
            int.from_bytes(hashlib.blake2b(strings[i].as_py().encode("utf-8"), digest_size=8).digest(), "little") | 1
        )
    return out


def _ngrams(ids: npt.NDArray[np.uint64], n: int) -> npt.NDArray[np.uint64]:
    if len(ids) == 0:
        return ids
    n = min(n, len(ids))  # a text shorter than one shingle is one shingle
    keys = ids[: len(ids) - n + 1].copy()
    for k in range(1, n):
        keys = keys * _MUL + ids[k : len(ids) - n + 1 + k]  # wraps mod 2^64, on purpose
    # splitmix64's finalizer: neighbouring keys must not share their high bits.
    keys ^= keys >> np.uint64(31)
    keys *= _MIX
    keys ^= keys >> np.uint64(29)
    keys.sort()
    unique: npt.NDArray[np.uint64] = keys[np.concatenate(([True], keys[1:] != keys[:-1]))]
    return unique


def analyze(
    texts: pa.StringArray | pa.LargeStringArray, cfg: DedupConfig, keys: bool = True, sets: bool = True
) -> tuple[npt.NDArray[np.uint64] | None, list[npt.NDArray[np.uint64]]]:
    """Texts -> (128-bit exact keys as (n, 2) uint64, or None; sorted unique 64-bit shingle hashes per text).

    Arrow's compute kernels lowercase, split and dictionary-encode the whole batch without a
    Python object per word; numpy hashes each distinct token once, from Arrow's buffers. The
    exact key hashes the sequence of the lowercased tokens: the text with its case and
    whitespace normalized. The same on every run and machine.
    """
    texts = fill_empty(texts)
    lower = pc.utf8_lower(texts)
    tokens = pc.utf8_split_whitespace(lower)
    flat = tokens.flatten()
    # pyarrow-stubs type dictionary_encode's result as its input: it is a DictionaryArray.
    encoded = cast("pa.DictionaryArray[Any, Any]", pc.dictionary_encode(flat))
    if len(flat):
        # Per distinct token: its hash (for the exact key) and its word's, its letters and digits
        # only (for shingles; 0 for a token of punctuation only, which is then skipped).
        # The stubs lose the value type of `flatten` and `dictionary`: the tokens are strings.
        distinct = cast("pa.StringArray | pa.LargeStringArray", encoded.dictionary)
        at = encoded.indices.to_numpy()
        token_ids = hash_strings(distinct)[at]
        word_ids = hash_strings(pc.replace_substring_regex(distinct, NOT_WORD_CLASS, ""))[at]
    else:
        token_ids = word_ids = np.zeros(0, np.uint64)
    bounds = tokens.offsets.to_numpy()
    exact: npt.NDArray[np.uint64] | None = None
    if keys:
        exact = np.frombuffer(
            b"".join(
                hashlib.blake2b(seg[seg != 0].tobytes(), digest_size=16).digest()
                for seg in (token_ids[a:b] for a, b in pairwise(bounds.tolist()))
            ),
            dtype=np.uint64,
        ).reshape(len(texts), 2)
    if not sets:
        return exact, []
    # CJK-heavy: more than cjk_fraction of the non-blank characters (ASCII texts skip the count).
    cjk = np.zeros(len(texts), dtype=bool)
    wide = np.flatnonzero(~pc.string_is_ascii(texts).to_numpy(zero_copy_only=False))
    if len(wide):
        n_cjk = pc.count_substring_regex(texts.take(pa.array(wide, type=pa.int64())), CJK_CHAR).to_numpy()
        wide = wide[n_cjk > 0]
    if len(wide):
        some = texts.take(pa.array(wide, type=pa.int64()))
        n_cjk = pc.count_substring_regex(some, CJK_CHAR).to_numpy()
        n_chars = pc.utf8_length(some).to_numpy() - pc.count_substring_regex(some, BLANK_CLASS).to_numpy()
        cjk[wide] = (n_chars > 0) & (n_cjk > cfg.cjk_fraction * np.maximum(n_chars, 1))
    out: list[npt.NDArray[np.uint64]] = []
    for i in range(len(texts)):
        if cjk[i]:
            # Characters, not words: CJK characters are \w; spaces and punctuation go.
            chars = "".join(WORD.findall(lower[i].as_py()))
            out.append(
                _ngrams(np.frombuffer(chars.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64), cfg.char_ngram)
            )
        else:
            doc = word_ids[bounds[i] : bounds[i + 1]]
            out.append(_ngrams(doc[doc != 0], cfg.ngram))
    return exact, out


def shingles(text: str, cfg: DedupConfig) -> npt.NDArray[np.uint64]:
    """One text's sorted unique 64-bit shingle hashes."""
    return analyze(pa.array([text], type=pa.string()), cfg, keys=False)[1][0]


def jaccard(a: npt.NDArray[np.uint64], b: npt.NDArray[np.uint64]) -> float:
    """Jaccard similarity of two sorted unique arrays."""
    if len(a) < len(b):
        a, b = b, a
    if len(b) == 0:
        return 1.0 if len(a) == 0 else 0.0
    at = np.searchsorted(a, b)
    at[at == len(a)] = 0
    inter = int(np.count_nonzero(a[at] == b))
    return inter / (len(a) + len(b) - inter)


def _permutations(cfg: DedupConfig) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.uint32]]:
    rng = np.random.default_rng(cfg.seed)
    n = cfg.bands * cfg.rows
    seeds = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)[:, None]
    mults = (rng.integers(0, 2**32, n, dtype=np.uint64) | 1).astype(np.uint32)[:, None]
    return seeds, mults


BLOCK = 16_384  # shingles hashed per numpy call: (bands * rows) x BLOCK uint32 stays in cache-sized MBs


def minhash(sets: list[npt.NDArray[np.uint64]], cfg: DedupConfig) -> npt.NDArray[np.uint32]:
    """Signatures (len(sets), bands * rows) uint32 of non-empty shingle sets, many sets per call."""
    seeds, mults = _permutations(cfg)
    out = np.empty((len(sets), len(seeds)), dtype=np.uint32)

    def hashed(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint32]:
        # a_i * x + b_i mod 2^32 on the high half of splitmix-mixed shingle hashes: measured
        # unbiased (Jaccard estimate error +0.0002 +- 0.0008 at s = 0.8), and two passes only.
        h: npt.NDArray[np.uint32] = (x >> np.uint64(32)).astype(np.uint32)[None, :] * mults
        h += seeds
        return h

    i = 0
    while i < len(sets):
        if len(sets[i]) >= BLOCK:  # a long document alone, in slices
            out[i] = np.min([hashed(sets[i][j : j + BLOCK]).min(axis=1) for j in range(0, len(sets[i]), BLOCK)], axis=0)
            i += 1
            continue
        j, size = i, 0
        while j < len(sets) and len(sets[j]) < BLOCK and size + len(sets[j]) <= BLOCK:
            size += len(sets[j])
            j += 1
        starts = np.cumsum([0] + [len(s) for s in sets[i : j - 1]])
        out[i:j] = np.minimum.reduceat(hashed(np.concatenate(sets[i:j])), starts, axis=1).T
        i = j
    return out


def band_keys(signatures: npt.NDArray[np.uint32], cfg: DedupConfig) -> npt.NDArray[np.uint64]:
    """(n, bands * rows) signatures -> (bands, n) uint64 keys: equal keys = equal band."""
    parts = signatures.reshape(len(signatures), cfg.bands, cfg.rows).astype(np.uint64)
    keys = parts[:, :, 0].copy()
    for k in range(1, cfg.rows):
        keys = keys * _MUL + parts[:, :, k]
    keys ^= keys >> np.uint64(31)
    keys *= _MIX
    keys ^= keys >> np.uint64(29)
    return np.ascontiguousarray(keys.T)
