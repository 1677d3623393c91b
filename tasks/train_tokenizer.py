"""train_tokenizer: a byte-level BPE (HF `tokenizers`) trained on the deduplicated text shards.

Byte-level means every string has an encoding and `decode(encode(x)) == x` byte for byte:
there is no unknown token, and mojibake, emoji or `\\r\\n` come back as they were. The text is
already NFC when it gets here (the normalize stage does it), so the tokenizer itself applies no
normalizer by default: NFC inside the tokenizer would rewrite the 5 documents of the shared
corpora that are not NFC and break the round trip for any text given directly. Before the GPT-2
pre-tokenizer regex, a Split isolates each CJK character and runs of at most three digits:
Chinese has no spaces, so without it a whole clause would be one pre-token and the merges
would be spent on rare phrases; capped digit groups (as in Llama 3) keep numbers from eating
the vocabulary.

Outputs: `tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`, which
`transformers.PreTrainedTokenizerFast` loads, and `report.json` / `report.md` (bytes per token by
source and by script, vocabulary coverage). Special tokens have fixed ids: <pad>=0, <bos>=1,
<eos>=2, then <reserved_0>..<reserved_4> (3..7) for later uses (chat turns, fill-in-the-middle)
that must not shift the ids of a released vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from ember.model.scripts import HAN, HAN_COMPATIBILITY, KANA
from ember.model.tokenizer import SPECIAL_TOKENS, TOKENIZER_JSON, load_tokenizer
from ember.storage.shards import document_ids, list_shards, read_shard
from ember.tasks.stage import Stage, StageContext

# Han ideographs and kana one per pre-token; digits in groups of up to three (with the space
# before them, so " 2024" stays one GPT-2 style piece).
SPLIT_PATTERN = r"[\p{Han}\p{Hiragana}\p{Katakana}]| ?\p{N}{1,3}"
HELD_FRACTION = 0.01  # documents kept out of training to measure bytes per token honestly
HELD_MAX_CHARS = 2_000_000
MODEL_MAX_LENGTH = int(1e30)  # transformers' "no limit"; publish sets the model's context


class TokenizerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(
        8192,
        ge=256 + len(SPECIAL_TOKENS),
        description="Total vocabulary, special tokens and the 256 byte tokens included.",
    )
    min_frequency: int = Field(2, ge=1, description="A pair must occur this often to be merged.")
    max_chars: int = Field(
        50_000_000,
        ge=1,
        description="Budget of text fed to training; documents are sampled by a hash of "
        "their id (deterministic), so memory and time stay bounded.",
    )
    normalize_nfc: bool = Field(
        False,
        description="NFC-normalize inside the tokenizer too (as Qwen2 does). Off by "
        "default: the normalize stage already gives NFC text, and off "
        "the round trip is byte-exact for any text; on, it gives NFC(x).",
    )


def build_tokenizer(normalize_nfc: bool = False) -> Tokenizer:
    """An untrained byte-level BPE with Ember's normalizer, pre-tokenizer and decoder."""
    tokenizer = Tokenizer(models.BPE())
    if normalize_nfc:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            # add_prefix_space=False: a prefix space would not survive decoding, breaking the round trip.
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    # Adds no tokens; keeps offsets right for transformers users (GPT-2 ships the same).
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def sample_fraction(doc_id: str) -> float:
    """A uniform number in [0, 1) fixed by the id: the same documents are sampled on every run."""
    return int(hashlib.blake2b(doc_id.encode(), digest_size=8).hexdigest(), 16) / 2**64


def _scan(shards: list[Path]) -> list[tuple[npt.NDArray[np.float64], npt.NDArray[np.integer[Any]]]]:
    """Per shard: each document's sample fraction and length in characters."""
    scanned = []
    for path in shards:
        table = read_shard(path, columns=["id", "text"])
        ids = document_ids(table, path)
        fractions = np.fromiter((sample_fraction(i) for i in ids), dtype=np.float64, count=table.num_rows)
        lengths = pc.fill_null(pc.utf8_length(table["text"]), 0).to_numpy()
        scanned.append((fractions, lengths))
    return scanned


def _iter_texts(shards: list[Path], masks: list[npt.NDArray[np.bool_]], max_chars: int) -> Iterator[str]:
    """The texts selected by `masks`, one shard in memory at a time, stopping at `max_chars`."""
    fed = 0
    for path, mask in zip(shards, masks, strict=True):
        if not mask.any():
            continue
        texts = read_shard(path, columns=["text"])["text"].to_pylist()
        for keep, text in zip(mask, texts, strict=True):
            if keep and text:
                text = text[: max_chars - fed]  # the budget is a hard cap, even for one huge document
                fed += len(text)
                yield text
                if fed >= max_chars:
                    return


def bytes_per_token(tokenizer: Tokenizer, texts: list[str]) -> tuple[int, int]:
    """(UTF-8 bytes, tokens) of `texts`."""
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
    return sum(len(t.encode("utf-8")) for t in texts), sum(len(e.ids) for e in encodings)


def write_transformers_files(out: Path, model_max_length: int = MODEL_MAX_LENGTH) -> None:
    """tokenizer_config.json and special_tokens_map.json as `PreTrainedTokenizerFast` expects them."""
    added = {
        str(i): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, token in enumerate(SPECIAL_TOKENS)
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": None,  # byte-level: nothing is unknown
        "model_max_length": model_max_length,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # would change the text and break the round trip
        # As `load_tokenizer` does: "<eos>" written inside a document is text, not a special token.
        "split_special_tokens": True,
        "added_tokens_decoder": added,
    }
    special = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def run(cfg: TokenizerConfig, ctx: StageContext) -> dict[str, Any]:
    started = time.monotonic()
    shard_dir = ctx.inputs["dedup"] / "shards"
    shards = list_shards(shard_dir)
    if not shards:
        raise ValueError(f"{shard_dir}: no text shards to train the tokenizer on")

    scanned = _scan(shards)
    held = [f >= 1.0 - HELD_FRACTION for f, _ in scanned]
    n_held, n_docs = sum(int(h.sum()) for h in held), sum(len(h) for h in held)
    hold_out = 0 < n_held < n_docs  # a tiny input may have none (or only) held-out documents
    if not hold_out:
        held = [np.zeros_like(h) for h in held]
    trainable_chars = int(sum(n[~h].sum() for (_, n), h in zip(scanned, held, strict=True)))
    if trainable_chars == 0:
        raise ValueError(f"{shard_dir}: the shards hold no text")
    # Documents with fraction < take are used: the cheapest rule that is the same on every run
    # and does not depend on shard order. The iterator's hard stop covers an unlucky draw.
    take = min(1.0, cfg.max_chars / trainable_chars)
    masks = [(f < take) & ~h for (f, _), h in zip(scanned, held, strict=True)]
    selected_docs = int(sum(m.sum() for m in masks))

    tokenizer = build_tokenizer(cfg.normalize_nfc)
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    fed = {"chars": 0, "docs": 0}

    def counted(texts: Iterator[str]) -> Iterator[str]:
        for text in texts:
            fed["chars"] += len(text)
            fed["docs"] += 1
            ctx.report.progress(fed["docs"], selected_docs, "train_tokenizer: documents fed")
            yield text

    ctx.log.info(
        "training a %d-token BPE on %d documents (%.1f%% of %s chars)",
        cfg.vocab_size,
        selected_docs,
        100 * take,
        f"{trainable_chars:,}",
    )
    train_started = time.monotonic()
    tokenizer.train_from_iterator(
        counted(_iter_texts(shards, masks, cfg.max_chars)), trainer=trainer, length=selected_docs
    )
    train_seconds = time.monotonic() - train_started

    tokenizer.save(str(ctx.out / TOKENIZER_JSON))
    write_transformers_files(ctx.out)
    tokenizer = load_tokenizer(ctx.out)  # measure what was saved, as the next stages will load it

    report = held_out_report(tokenizer, shards, held if hold_out else masks)
    ctx.report.table(
        "tokenizer-bytes-per-token",
        report["rows"],
        "Bytes per token by source and script on held-out documents (higher = better compression)"
        if hold_out
        else "Bytes per token (on training text: input too small to hold some out)",
    )
    by_script = {r["name"]: r["bytes_per_token"] for r in report["rows"] if r["by"] == "script"}
    metrics = {
        "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
        "docs_trained_on": fed["docs"],
        "chars_trained_on": fed["chars"],
        "bytes_per_token": report["rows"][-1]["bytes_per_token"],
        "bytes_per_token_cjk": by_script.get("CJK"),
        "bytes_per_token_on": "held_out" if hold_out else "train",
        "vocab_coverage": report["vocab_coverage"],
        "train_seconds": round(train_seconds, 3),
        "seconds": round(time.monotonic() - started, 3),
    }
    # The artifact's files hold no timings: the same input then gives the same bytes, so a
    # rebuilt tokenizer keeps its digest and the stages after it stay cached. Timings live in
    # the metrics (the manifest, outside the digest) and the summary table.
    timeless = {k: v for k, v in metrics.items() if k not in ("train_seconds", "seconds")}
    (ctx.out / "report.json").write_text(json.dumps({"metrics": timeless, **report}, indent=2) + "\n")
    markdown = _report_markdown(report, metrics)
    (ctx.out / "report.md").write_text(markdown)
    ctx.report.markdown("tokenizer-report", markdown, "Tokenizer report")
    ctx.report.table("tokenizer-summary", [{"metric": k, "value": v} for k, v in metrics.items()], "Tokenizer training")
    return metrics


CJK_CHAR = re.compile(f"[{KANA}{HAN}{HAN_COMPATIBILITY}]")


def script_of(text: str) -> str:
    """ "CJK" when at least 30% of the characters are Han or kana, else "other": enough to tell
    whether Chinese and Japanese get their own figures, without a language model."""
    head = text[:2000]
    return "CJK" if head and len(CJK_CHAR.findall(head)) >= 0.3 * len(head) else "other"


def held_out_report(tokenizer: Tokenizer, shards: list[Path], masks: list[npt.NDArray[np.bool_]]) -> dict[str, Any]:
    """Bytes per token by source, by script and over all, and the share of the vocabulary used,
    on up to HELD_MAX_CHARS of the masked documents."""
    docs: list[tuple[str, str]] = []  # (source, text)
    chars = 0
    for path, mask in zip(shards, masks, strict=True):
        if chars >= HELD_MAX_CHARS:
            break
        if not mask.any():
            continue
        table = read_shard(path, columns=["text", "source"])
        for keep, text, source in zip(mask, table["text"].to_pylist(), table["source"].to_pylist(), strict=True):
            if keep and text and chars < HELD_MAX_CHARS:
                text = text[: HELD_MAX_CHARS - chars]
                docs.append((source or "", text))
                chars += len(text)
    encodings = tokenizer.encode_batch([text for _, text in docs], add_special_tokens=False)
    groups: dict[tuple[str, str], list[int]] = {}
    used: set[int] = set()
    for i, ((source, text), encoding) in enumerate(zip(docs, encodings, strict=True)):
        used.update(encoding.ids)
        for group in (("source", source), ("script", script_of(text)), ("all", "(all)")):
            groups.setdefault(group, []).append(i)

    def row(kind: str, name: str, members: list[int]) -> dict[str, str | int | float]:
        n_bytes = sum(len(docs[i][1].encode("utf-8")) for i in members)
        n_tokens = sum(len(encodings[i].ids) for i in members)
        return {
            "by": kind,
            "name": name,
            "docs": len(members),
            "bytes": n_bytes,
            "tokens": n_tokens,
            "bytes_per_token": round(n_bytes / max(n_tokens, 1), 3),
        }

    rows = [row(kind, name, members) for (kind, name), members in sorted(groups.items()) if kind != "all"] + [
        row("all", "(all)", groups.get(("all", "(all)"), []))
    ]
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    return {"rows": rows, "vocab_used": len(used), "vocab_coverage": round(len(used) / vocab, 4)}


def _report_markdown(report: dict[str, Any], metrics: dict[str, Any]) -> str:
    lines = [
        "# Tokenizer report",
        "",
        f"Byte-level BPE, {metrics['vocab_size']:,} tokens, trained on {metrics['chars_trained_on']:,} "
        f"characters of {metrics['docs_trained_on']:,} documents.",
        "",
        f"Measured on {'held-out' if metrics['bytes_per_token_on'] == 'held_out' else 'training'} documents. "
        f"Vocabulary coverage: {report['vocab_used']:,} of {metrics['vocab_size']:,} tokens used "
        f"({100 * report['vocab_coverage']:.1f}%).",
        "",
        "| by | name | docs | bytes | tokens | bytes per token |",
        "|---|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['by']} | {r['name']} | {r['docs']:,} | {r['bytes']:,} | {r['tokens']:,} | {r['bytes_per_token']} |"
        for r in report["rows"]
    ]
    return "\n".join(lines) + "\n"


STAGE = Stage(name="train_tokenizer", version=2, run=run, inputs=("dedup",))
