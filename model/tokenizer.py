"""Ember's tokenizer as every reader of it loads it: the trainer, evaluate, publish and the demo.

A byte-level BPE (Hugging Face `tokenizers`) with fixed special ids: <pad>=0, <bos>=1, <eos>=2,
then <reserved_0>..<reserved_4> (3..7) for later uses (chat turns, fill-in-the-middle) that must
not shift the ids of a released vocabulary. The train_tokenizer stage builds and trains it.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

# ids 0, 1, 2, then 3..7: the BPE trainer gives ids in this order
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>") + tuple(f"<reserved_{i}>" for i in range(5))
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
SPECIAL_IDS = {"bos_id": BOS_ID, "eos_id": EOS_ID, "pad_id": PAD_ID}
# What a tokenizer folder holds: the tokenizer, and the two files `transformers` also reads.
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_FILES = (TOKENIZER_JSON, "tokenizer_config.json", "special_tokens_map.json")


def load_tokenizer(path: Path | str) -> Tokenizer:
    """Load `tokenizer.json` (or the folder holding it) the way Ember's stages and demo use it.

    `encode_special_tokens` is not saved in tokenizer.json, so it is set here: a literal
    "<eos>" inside a document is text, not the end of the document.
    """
    path = Path(path)
    tokenizer = Tokenizer.from_file(str(path / TOKENIZER_JSON if path.is_dir() else path))
    tokenizer.encode_special_tokens = True
    for expected, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != expected:
            raise ValueError(
                f"{path}: special token {token} has id {tokenizer.token_to_id(token)}, expected {expected}"
            )
    return tokenizer
