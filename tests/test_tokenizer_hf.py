"""transformers loads the tokenizer that train_tokenizer writes and agrees with Ember on every id.

A small BPE (vocab 2048) is trained by the stage on a sample of every corpus beside the repo;
`AutoTokenizer.from_pretrained(artifact_dir)` (a local folder, offline) must then give the ids
that `load_tokenizer(dir).encode(text, add_special_tokens=False)` gives, the same decoded text,
and the fixed special ids <pad>=0, <bos>=1, <eos>=2. Users of the released model load it this way.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.model.tokenizer import TOKENIZER_FILES, load_tokenizer
from ember.storage.shards import ShardWriter
from ember.tasks import train_tokenizer
from ember.tasks.download import chunk_text
from ember.tasks.stage import Reporter
from helpers import run_stage_in

transformers = pytest.importorskip("transformers")

CORPUS_DIRS = [
    "gutenberg_en",
    "tinyshakespeare",
    "tinystories_sample",
    "chinese_poetry",
    "chinese_classic_novels",
    "messy_web",
    "mojibake_ftfy",
    "near_duplicates",
]
SAMPLE_CHARS = 40_000  # per corpus: about 320 KB in all, trains in well under a second
CHUNK_CHARS = 4000  # the download stage's default chunk size
COMPARE_DOCS = 25  # per corpus, compared id by id
VOCAB_SIZE = 2048


def _texts(path: Path) -> Iterator[str]:
    if path.suffix == ".txt":
        yield path.read_text(encoding="utf-8")
        return
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            yield json.loads(line)["text"]


def corpus_sample(folder: Path) -> list[str]:
    """About SAMPLE_CHARS of a corpus, spread over its top-level files, in download-sized chunks."""
    files = sorted(folder.glob("*.jsonl")) + sorted(folder.glob("*.txt"))
    budget = SAMPLE_CHARS // len(files)
    sample = []
    for path in files:
        chars = 0
        for text in _texts(path):
            for chunk in chunk_text(text, CHUNK_CHARS):
                if chars >= budget:
                    break
                sample.append(chunk)
                chars += len(chunk)
            if chars >= budget:
                break
    return sample


@pytest.fixture(scope="module")
def samples(corpora: Path) -> dict[str, list[str]]:
    return {name: corpus_sample(corpora / name) for name in CORPUS_DIRS}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, samples) -> Path:
    root = tmp_path_factory.mktemp("hf-tokenizer")
    with ShardWriter(root / "dedup" / "shards", max_chars=100_000) as writer:
        for name, texts in samples.items():
            writer.write_many({"id": f"{name}:{n}", "text": text, "source": name} for n, text in enumerate(texts))
    out, _ = run_stage_in(
        root,
        train_tokenizer.STAGE,
        train_tokenizer.TokenizerConfig(vocab_size=VOCAB_SIZE),
        {"dedup": root / "dedup"},
        name="out",
        work=root / "work",
        store_root=root / "store",
        reporter=Reporter("train_tokenizer"),
    )
    return out


@pytest.fixture(scope="module")
def ember_tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def hf_tok(tokenizer_dir):
    return transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)


def test_autotokenizer_loads_with_fixed_special_ids(hf_tok, tokenizer_dir):
    assert hf_tok.is_fast
    assert (hf_tok.pad_token, hf_tok.bos_token, hf_tok.eos_token) == ("<pad>", "<bos>", "<eos>")
    assert (hf_tok.pad_token_id, hf_tok.bos_token_id, hf_tok.eos_token_id) == (0, 1, 2)
    assert hf_tok.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "<bos>", "<eos>"]
    assert hf_tok.unk_token_id is None  # byte-level: nothing is unknown
    assert len(hf_tok) == VOCAB_SIZE
    assert all((tokenizer_dir / name).is_file() for name in TOKENIZER_FILES)


@pytest.mark.parametrize("corpus", CORPUS_DIRS)
def test_same_ids_as_ember(corpus, samples, ember_tok, hf_tok):
    texts = samples[corpus][:COMPARE_DOCS]
    assert texts, f"{corpus}: empty sample"
    expected = [ember_tok.encode(text, add_special_tokens=False).ids for text in texts]
    assert hf_tok(texts, add_special_tokens=False)["input_ids"] == expected
    # The default call must not add BOS/EOS either (add_bos_token/add_eos_token are false and the
    # post-processor is ByteLevel, which adds nothing): `tokenizer(text)` gives what the trainer saw,
    # minus the EOS that the tokenize stage appends.
    assert [hf_tok(text)["input_ids"] for text in texts] == expected
    assert [hf_tok.encode(text, add_special_tokens=False) for text in texts] == expected


@pytest.mark.parametrize("corpus", CORPUS_DIRS)
def test_same_decoding_as_ember(corpus, samples, ember_tok, hf_tok):
    nfc = train_tokenizer.TokenizerConfig().normalize_nfc  # the fixture trains with the defaults
    for text in samples[corpus][:COMPARE_DOCS]:
        ids = ember_tok.encode(text, add_special_tokens=False).ids
        assert hf_tok.decode(ids) == ember_tok.decode(ids) == (unicodedata.normalize("NFC", text) if nfc else text)
        # With special ids around a document: transformers keeps them by default, `tokenizers` skips them;
        # with the flag spelled out both agree.
        framed = [1, *ids, 2]
        for skip in (True, False):
            assert hf_tok.decode(framed, skip_special_tokens=skip) == ember_tok.decode(framed, skip_special_tokens=skip)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("The end.<eos>Next <bos> doc <pad>", id="literal-special-tokens"),
        pytest.param("<eos>", id="only-eos"),
    ],
)
def test_literal_special_token_text_is_text(text, ember_tok, hf_tok):
    """load_tokenizer sets `encode_special_tokens`: "<eos>" written inside a document is text, not id 2.

    transformers must do the same, or a user's prompt (or a scraped page) containing "<eos>" gets a
    different id sequence from the one the model was trained on. transformers does it when
    tokenizer_config.json has `"split_special_tokens": true` (it then sets the backend's
    `encode_special_tokens`; the setting survives `save_pretrained`).
    """
    expected = ember_tok.encode(text, add_special_tokens=False).ids
    assert 2 not in expected
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == expected
