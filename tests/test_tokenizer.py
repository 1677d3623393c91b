"""train_tokenizer and tokenize on samples of the real corpora: round trips, ids, splits, shards."""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError
from tokenizers import Tokenizer

from ember.model.tokenizer import EOS_ID, load_tokenizer
from ember.storage.shards import ShardWriter
from ember.storage.tokens import read_token_file
from ember.tasks import tokenize, train_tokenizer
from ember.tasks.stage import Reporter, StageContext
from helpers import stage_context

SAMPLE_CHARS = 150_000  # per corpus directory: enough to train on, fast to encode
DOC_CHARS = 20_000  # books are cut into documents of this size, as chunking upstream would
CORPUS_DIRS = [
    "chinese_classic_novels",
    "chinese_poetry",
    "gutenberg_en",
    "messy_web",
    "mojibake_ftfy",
    "near_duplicates",
    "tinyshakespeare",
    "tinystories_sample",
]


def corpus_sample(folder: Path) -> list[dict]:
    """Up to SAMPLE_CHARS of a corpus directory as text records (top-level .jsonl/.txt files)."""
    records, chars = [], 0
    for path in sorted(folder.glob("*.jsonl")) + sorted(folder.glob("*.txt")):
        for n, text in enumerate(_texts(path)):
            for start in range(0, len(text), DOC_CHARS):
                piece = text[start : start + DOC_CHARS]
                records.append({"id": f"{folder.name}/{path.name}:{n}:{start}", "text": piece, "source": folder.name})
                chars += len(piece)
                if chars >= SAMPLE_CHARS:
                    return records
    return records


def _texts(path: Path) -> Iterator[str]:
    if path.suffix == ".txt":
        yield from path.read_text(encoding="utf-8").split("\n\n")  # keeps \r, tabs and runs of spaces
        return
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            yield json.loads(line)["text"]


def write_shards(folder: Path, records: list[dict], max_chars: int = 200_000) -> Path:
    with ShardWriter(folder / "shards", max_chars=max_chars) as writer:
        writer.write_many(records)
    return folder


def make_ctx(tmp_path: Path, name: str, inputs: dict[str, Path]) -> StageContext:
    return stage_context(
        tmp_path / name,
        "out",
        inputs,
        work=tmp_path / name / "work",
        store_root=tmp_path / "store",
        reporter=Reporter(name),
    )


def train(tmp_path: Path, name: str, dedup: Path, **cfg) -> tuple[Path, dict]:
    ctx = make_ctx(tmp_path, name, {"dedup": dedup})
    metrics = train_tokenizer.run(train_tokenizer.TokenizerConfig(**cfg), ctx)
    return ctx.out, metrics


def run_tokenize(tmp_path: Path, name: str, dedup: Path, tok: Path, **cfg) -> tuple[Path, dict]:
    ctx = make_ctx(tmp_path, name, {"dedup": dedup, "train_tokenizer": tok})
    metrics = tokenize.run(tokenize.TokenizeConfig(**cfg), ctx)
    return ctx.out, metrics


def read_split(folder: Path) -> np.ndarray:
    parts = sorted(folder.glob("part-*.arrow"))
    return np.concatenate([read_token_file(p) for p in parts]) if parts else np.zeros(0, np.uint16)


def docs_of(stream: np.ndarray) -> Counter:
    """The documents of a token stream (split at EOS), as a multiset."""
    ends = np.flatnonzero(stream == EOS_ID)
    return Counter(tuple(doc) for doc in np.split(stream, ends + 1)[:-1])


@pytest.fixture(scope="module")
def samples(corpora) -> dict[str, list[dict]]:
    return {name: corpus_sample(corpora / name) for name in CORPUS_DIRS}


@pytest.fixture(scope="module")
def dedup(tmp_path_factory, samples) -> Path:
    """A dedup-like artifact: every corpus sample, plus documents holding special-token text."""
    records = [r for name in CORPUS_DIRS for r in samples[name]]
    records += [
        {"id": "special/0", "text": "the end <eos> is not <pad> here <bos>", "source": "special"},
        {"id": "special/1", "text": "", "source": "special"},
    ]
    return write_shards(tmp_path_factory.mktemp("dedup"), records)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dedup) -> tuple[Path, dict]:
    return train(tmp_path_factory.mktemp("tok"), "tok", dedup, vocab_size=2048)


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory, dedup, trained) -> tuple[Path, dict]:
    return run_tokenize(tmp_path_factory.mktemp("tks"), "tks", dedup, trained[0], val_fraction=0.1)


# -- train_tokenizer --------------------------------------------------------------------------


@pytest.mark.parametrize("name", CORPUS_DIRS)
def test_round_trip_on_every_corpus(trained, samples, name):
    tok = load_tokenizer(trained[0])
    texts = [r["text"] for r in samples[name]]
    assert texts, f"no sample read from {name}"
    for text, enc in zip(texts, tok.encode_batch(texts, add_special_tokens=False), strict=True):
        # NFC is the tokenizer's only change: exact for NFC text (what ftfy produces upstream).
        assert tok.decode(enc.ids) == unicodedata.normalize("NFC", text)


ROUND_TRIP_CASES = {
    "crlf": "line one\r\nline two\r\n\r\n",
    "spaces": "a  b   c    d     e \n  indented",
    "tabs": "\tcol1\t\tcol2\t",
    "emoji_zwj": "family 👩‍👩‍👧 flag 🇫🇷 skin 👍🏽 ok ✔️",
    "mojibake": "He's Justinâ¤ and CafÃ© Ã  la mode â€œquotedâ€\x9d",
    "chinese": "关关雎鸠，在河之洲。窈窕淑女，君子好逑。\n",
    "japanese_korean": "東京タワーへ行きました。 한국어 문장입니다.",
    "digits": "In 2024, 1234567.89 people paid $3,000,000 (0x1F).",
    "special_text": "<eos><bos><pad> literal tokens <|endoftext|>",
    "control_chars": "nul\x00 bell\x07 del\x7f nbsp\xa0 zwsp\u200b bom\ufeff ls\u2028",
    "leading_space": " starts with a space and ends with one ",
    "empty": "",
}


@pytest.mark.parametrize("text", list(ROUND_TRIP_CASES.values()), ids=list(ROUND_TRIP_CASES))
def test_round_trip_exact(trained, text):
    tok = load_tokenizer(trained[0])
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text
    assert EOS_ID not in ids or text == ""


@pytest.mark.parametrize(
    "normalize_nfc, expected",
    [(True, "Caf\u00e9 Caf\u00e9"), (False, "Cafe\u0301 Caf\u00e9")],
    ids=["nfc_composes", "raw_keeps_bytes"],
)
def test_nfc_option(tmp_path, normalize_nfc, expected):
    # A decomposed é (e + combining acute) comes back composed only when NFC is on.
    records = [{"id": f"d{i}", "text": f"Cafe\u0301 number {i} is open", "source": "t"} for i in range(50)]
    dedup = write_shards(tmp_path / "dedup", records)
    out, _ = train(tmp_path, "tok", dedup, vocab_size=300, normalize_nfc=normalize_nfc)
    tok = load_tokenizer(out)
    assert tok.decode(tok.encode("Cafe\u0301 Caf\u00e9").ids) == expected


def test_special_token_ids_and_files(trained):
    out, metrics = trained
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert [tok.token_to_id(t) for t in ("<pad>", "<bos>", "<eos>")] == [0, 1, 2]
    assert tok.get_vocab_size() == metrics["vocab_size"] == 2048
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == ("<bos>", "<eos>", "<pad>")
    added = {k: v["content"] for k, v in config["added_tokens_decoder"].items()}
    assert added == {"0": "<pad>", "1": "<bos>", "2": "<eos>", **{str(3 + i): f"<reserved_{i}>" for i in range(5)}}
    assert config["model_max_length"] > 0
    special = json.loads((out / "special_tokens_map.json").read_text())
    assert special == {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}
    # No post-processor tokens: a document is encoded as its text only.
    assert tok.encode("hello").ids == tok.encode("hello", add_special_tokens=False).ids


def test_metrics(trained, dedup):
    _, metrics = trained
    assert metrics["chars_trained_on"] > 500_000
    assert metrics["bytes_per_token_on"] == "held_out"
    assert 1.5 < metrics["bytes_per_token"] < 6


def test_report_by_source_and_script(trained):
    out, metrics = trained
    report = json.loads((out / "report.json").read_text())
    scripts = {r["name"]: r for r in report["rows"] if r["by"] == "script"}
    assert set(scripts) == {"CJK", "other"}
    # Each Han character is its own pre-token: at most 3 bytes per token, well above bytes-only 1.0.
    assert 1.5 <= scripts["CJK"]["bytes_per_token"] <= 3.1
    assert metrics["bytes_per_token_cjk"] == scripts["CJK"]["bytes_per_token"]
    sources = [r for r in report["rows"] if r["by"] == "source"]
    assert "chinese_poetry" in {r["name"] for r in sources}
    assert sum(r["docs"] for r in sources) == sum(r["docs"] for r in scripts.values()) == report["rows"][-1]["docs"]
    assert 0 < report["vocab_coverage"] <= 1 and metrics["vocab_coverage"] == report["vocab_coverage"]
    assert "| script | CJK |" in (out / "report.md").read_text()


def test_chinese_bytes_per_token(trained, samples):
    """Compression on Chinese (each Han character is its own pre-token, so at most 3 bytes/token)."""
    tok = load_tokenizer(trained[0])
    texts = [r["text"] for r in samples["chinese_classic_novels"]][-3:]
    n_bytes, n_tokens = train_tokenizer.bytes_per_token(tok, texts)
    ratio = n_bytes / n_tokens
    print(f"\nChinese (红楼梦 sample, vocab 2048 mixed corpus): {ratio:.2f} bytes/token")
    assert 2.0 < ratio <= 3.1


def test_budget_is_respected_and_deterministic(tmp_path, dedup):
    out_a, metrics_a = train(tmp_path, "a", dedup, vocab_size=512, max_chars=60_000)
    out_b, metrics_b = train(tmp_path, "b", dedup, vocab_size=512, max_chars=60_000)
    assert 0 < metrics_a["chars_trained_on"] <= 60_000
    assert (out_a / "tokenizer.json").read_bytes() == (out_b / "tokenizer.json").read_bytes()


@pytest.mark.parametrize(
    "bad",
    [{"vocab_size": 258}, {"min_frequency": 0}, {"max_chars": 0}, {"vocab": 100}],
    ids=["vocab_below_bytes", "zero_frequency", "zero_budget", "unknown_key"],
)
def test_tokenizer_config_rejects(bad):
    with pytest.raises(ValidationError):
        train_tokenizer.TokenizerConfig(**bad)


def test_empty_input_fails_clearly(tmp_path):
    (tmp_path / "dedup" / "shards").mkdir(parents=True)
    with pytest.raises(ValueError, match="no text shards"):
        train(tmp_path, "tok", tmp_path / "dedup")


# -- tokenize ---------------------------------------------------------------------------------


def test_shards_are_uint16_with_one_eos_per_doc(tokenized, dedup, samples):
    out, metrics = tokenized
    meta = json.loads((out / "meta.json").read_text())
    n_docs = sum(len(v) for v in samples.values()) + 2
    assert metrics["docs"] == meta["train_docs"] + meta["val_docs"] == n_docs
    for split in ("train", "val"):
        stream = read_split(out / split)
        assert stream.dtype == np.uint16
        assert len(stream) == meta[f"{split}_tokens"]
        # Literal "<eos>" in a document is text: the only EOS ids are the document ends.
        assert int((stream == 2).sum()) == meta[f"{split}_docs"]
        assert stream[-1] == 2
    assert metrics["tokens"] == meta["train_tokens"] + meta["val_tokens"]


def test_meta_matches_the_split_rule(tokenized, dedup, samples):
    out, _ = tokenized
    meta = json.loads((out / "meta.json").read_text())
    records = [r for name in CORPUS_DIRS for r in samples[name]]
    records += [{"id": "special/0", "text": "the end <eos> is not <pad> here <bos>"}, {"id": "special/1", "text": ""}]
    expected = {"train_docs": 0, "val_docs": 0, "train_bytes": 0, "val_bytes": 0}
    for r in records:
        split = "val" if int(hashlib.sha256(r["id"].encode()).hexdigest()[:8], 16) / 2**32 < 0.1 else "train"
        expected[f"{split}_docs"] += 1
        expected[f"{split}_bytes"] += len(r["text"].encode("utf-8"))
    assert {k: meta[k] for k in expected} == expected
    assert {k: meta[k] for k in ("vocab_size", "dtype", "eos_id", "bos_id", "pad_id")} == {
        "vocab_size": 2048,
        "dtype": "uint16",
        "eos_id": 2,
        "bos_id": 1,
        "pad_id": 0,
    }


def test_split_is_stable_across_runs_and_doc_order(tmp_path, tokenized, dedup, trained, samples):
    out, _ = tokenized
    again, _ = run_tokenize(tmp_path, "again", dedup, trained[0], val_fraction=0.1)
    for split in ("train", "val"):
        assert [p.read_bytes() for p in sorted((out / split).glob("*.arrow"))] == [
            p.read_bytes() for p in sorted((again / split).glob("*.arrow"))
        ]
    # Reversed order and other shard boundaries: the same documents land in the same split.
    records = [r for name in CORPUS_DIRS for r in samples[name]][::-1]
    records += [
        {"id": "special/1", "text": "", "source": "special"},
        {"id": "special/0", "text": "the end <eos> is not <pad> here <bos>", "source": "special"},
    ]
    shuffled = write_shards(tmp_path / "shuffled", records, max_chars=70_000)
    other, _ = run_tokenize(tmp_path, "other", shuffled, trained[0], val_fraction=0.1)
    for split in ("train", "val"):
        assert docs_of(read_split(out / split)) == docs_of(read_split(other / split))


def test_files_are_one_record_batch_and_zero_copy(tokenized):
    out, _ = tokenized
    for path in sorted(out.glob("*/part-*.arrow")):
        with pa.memory_map(str(path)) as source:
            reader = pa.ipc.open_file(source)
            assert reader.num_record_batches == 1
            assert reader.schema.names == ["tokens"] and reader.schema.field("tokens").type == pa.uint16()
            tokens = reader.get_batch(0).column(0).to_numpy(zero_copy_only=True)
            assert tokens.dtype == np.uint16 and not tokens.flags.writeable  # a view of the map, not a copy


def test_rolls_to_new_part_files(tmp_path, tokenized, dedup, trained):
    out, _ = run_tokenize(tmp_path, "small", dedup, trained[0], val_fraction=0.1, shard_tokens=50_000, batch_size=7)
    parts = sorted((out / "train").glob("part-*.arrow"))
    assert len(parts) > 3
    by_shard: dict[str, list[Path]] = {}
    for part in parts:  # part-<text shard>-<k>.arrow: every file but a shard's last is full
        by_shard.setdefault(part.name.rsplit("-", 1)[0], []).append(part)
    assert all(len(read_token_file(p)) >= 50_000 for files in by_shard.values() for p in files[:-1])
    # Smaller batches and more files: the same streams.
    for split in ("train", "val"):
        assert np.array_equal(read_split(out / split), read_split(tokenized[0] / split))


def test_tiny_input_still_gets_a_val_document(tmp_path, trained):
    ids = ["doc-a", "doc-b", "doc-c"]
    fractions = [tokenize.split_fraction(i) for i in ids]
    assert min(fractions) >= 0.01, "the case needs ids that all hash into train"
    dedup = write_shards(tmp_path / "dedup", [{"id": i, "text": f"text of {i}", "source": "t"} for i in ids])
    out, _ = run_tokenize(tmp_path, "tks", dedup, trained[0], val_fraction=0.01)
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["train_docs"], meta["val_docs"]) == (2, 1)
    tok = load_tokenizer(trained[0])
    closest = ids[int(np.argmin(fractions))]
    assert tok.decode(read_split(out / "val").tolist()) == f"text of {closest}"


@pytest.mark.parametrize(
    "bad",
    [{"val_fraction": 0.0}, {"val_fraction": 0.5}, {"batch_size": 0}, {"shard": 1}],
    ids=["zero_val", "half_val", "zero_batch", "unknown_key"],
)
def test_tokenize_config_rejects(bad):
    with pytest.raises(ValidationError):
        tokenize.TokenizeConfig(**bad)


TEXT_FIELDS = {"text", "html", "article_body"}


@pytest.mark.slow
def test_round_trip_on_every_corpus_in_full(trained, corpora):
    """Every document of every corpus beside the repo (about 100 MB) comes back byte for byte."""
    tok = load_tokenizer(trained[0])
    files = sorted(p for p in corpora.rglob("*") if p.suffix in (".jsonl", ".txt") and "raw" not in p.parts)
    assert len(files) >= 10
    checked = 0
    for path in files:
        if path.suffix == ".txt":
            texts = [path.read_text(encoding="utf-8")]
        else:
            records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
            # Most corpora hold `text`; saved web pages hold the page and its marked article body.
            assert all(TEXT_FIELDS & record.keys() for record in records), f"{path}: a record without text"
            texts = [record[key] for record in records for key in sorted(TEXT_FIELDS & record.keys())]
        for start in range(0, len(texts), 2000):
            batch = texts[start : start + 2000]
            ids = [e.ids for e in tok.encode_batch(batch, add_special_tokens=False)]
            decoded = tok.decode_batch(ids, skip_special_tokens=False)
            bad = [i for i, (a, b) in enumerate(zip(batch, decoded, strict=True)) if a != b]
            assert not bad, f"{path}: record {start + bad[0]} does not round-trip"
            checked += len(batch)
    assert checked > 40_000  # 45,966 documents on 2026-11-27
