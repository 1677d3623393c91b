"""Generation: repetition penalty, and `generate_text`'s streaming (whole characters, stop strings).

Cached vs uncached greedy decoding, seeds, EOS and the sliding context are in test_model.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch
from tokenizers import pre_tokenizers, trainers

import ember.model.generate as gen
from ember.model.generate import generate, generate_text, penalize_repeats
from ember.model.tokenizer import EOS_ID, SPECIAL_TOKENS
from ember.model.transformer import PRESETS, ModelConfig, Transformer
from ember.tasks.train_tokenizer import build_tokenizer
from test_model import lively

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CJK_TEXT = "宝玉笑道：“你好，世界。” Then 黛玉 left 😀 at 3 o'clock."


def byte_tokenizer(texts: Sequence[str] = (), vocab_size: int = 256 + len(SPECIAL_TOKENS)):
    """Ember's byte-level BPE; at the default size it has no merges: one token per byte, so every
    Han character is three tokens and the emoji four."""
    tokenizer = build_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(list(texts) or ["x"], trainer=trainer)
    return tokenizer


def lively_model(vocab_size: int) -> Transformer:
    """Tiny model with weights large enough that greedy decoding does not just repeat one token."""
    torch.manual_seed(0)
    return lively(Transformer(ModelConfig(vocab_size=vocab_size, **PRESETS["tiny"])).eval())


@pytest.fixture
def scripted(monkeypatch):
    """Make `generate` yield the ids of a given text, so decoding is tested on known bytes; returns
    the model to pass, which is never run."""

    def use(ids: list[int]) -> Transformer:
        monkeypatch.setattr(gen, "generate", lambda model, prompt_ids, max_new_tokens, **kw: iter(ids[:max_new_tokens]))
        return Transformer(ModelConfig(vocab_size=256 + len(SPECIAL_TOKENS), **PRESETS["tiny"]))

    return use


# -- repetition penalty ---------------------------------------------------------------------------


def test_penalty_matches_transformers_processor():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(0)
    logits = torch.randn(50) * 3
    context = [3, 7, 7, 12, 40, 3]
    seen = torch.zeros(50, dtype=torch.bool)
    seen[context] = True
    theirs = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([context]), logits[None].clone())[0]
    ours = penalize_repeats(logits, seen, 1.7)
    assert torch.allclose(ours, theirs)
    assert not torch.equal(ours, logits) and torch.equal(ours[~seen], logits[~seen])


def test_repetition_penalty_changes_greedy_output_on_a_repetitive_prompt():
    model = lively_model(512)
    prompt = [5, 17, 99, 3] * 8
    plain = list(generate(model, prompt, 40, temperature=0))
    assert plain == list(generate(model, prompt, 40, temperature=0, repetition_penalty=1.0))
    penalized = list(generate(model, prompt, 40, temperature=0, repetition_penalty=2.0))
    assert penalized != plain
    # The same start (nothing seen yet repeats), then fewer repeats: more distinct ids.
    assert penalized[:3] == plain[:3]
    assert len(set(penalized)) > len(set(plain))
    # Seeded sampling with a penalty is still reproducible.
    kw: dict[str, Any] = dict(temperature=1.0, top_k=50, seed=3, repetition_penalty=1.3)
    assert list(generate(model, prompt, 30, **kw)) == list(generate(model, prompt, 30, **kw))
    with pytest.raises(ValueError, match="repetition_penalty"):
        list(generate(model, prompt, 5, repetition_penalty=0))


# -- generate_text ---------------------------------------------------------------------------------


def test_cjk_and_emoji_stream_as_whole_characters(scripted):
    tokenizer = byte_tokenizer()
    ids = tokenizer.encode(CJK_TEXT).ids
    assert len(ids) == len(CJK_TEXT.encode("utf-8"))  # one token per byte: characters are split
    model = scripted(ids)
    pieces = list(generate_text(model, tokenizer, "", len(ids)))
    assert "".join(pieces) == CJK_TEXT
    assert pieces == list(CJK_TEXT)  # each character as soon as its last byte arrives, never a half
    # Cut inside the emoji's four bytes: the half character is never shown.
    cut = len("宝玉笑道：“你好，世界。” Then 黛玉 left ".encode()) + 2
    assert "".join(generate_text(model, tokenizer, "", cut)) == "宝玉笑道：“你好，世界。” Then 黛玉 left "


@pytest.mark.parametrize(
    "stop, expected",
    [
        (("世界",), "宝玉笑道：“你好，"),
        (("left", "Then"), "宝玉笑道：“你好，世界。” "),  # the earliest of several
        (("o'clock.",), "宝玉笑道：“你好，世界。” Then 黛玉 left 😀 at 3 "),
        (("宝",), ""),
        (("not there",), CJK_TEXT),
        (("k.!",), CJK_TEXT),  # the text ends with the start of a stop string: held, then given out
    ],
    ids=["cjk", "earliest", "at_end", "at_start", "absent", "prefix_at_end"],
)
def test_stop_strings_end_the_text(scripted, stop, expected):
    tokenizer = byte_tokenizer()
    model = scripted(tokenizer.encode(CJK_TEXT).ids)
    pieces = list(generate_text(model, tokenizer, "", 500, stop=stop))
    assert "".join(pieces) == expected
    # No piece ever held part of a stop string, even one later found not to be one.
    shown = ""
    for piece in pieces:
        shown += piece
        assert not any(s in shown for s in stop)


def test_stop_string_prefix_is_held_until_it_cannot_be_one(scripted):
    tokenizer = byte_tokenizer()
    model = scripted(tokenizer.encode("abc abd").ids)
    pieces = list(generate_text(model, tokenizer, "", 100, stop=("abd!",)))
    assert "".join(pieces) == "abc abd"
    # "a", "ab" wait for the next character; "abc" cannot begin "abd!" and goes out; "abd" waits
    # for a "!" that never comes and goes out when generation ends.
    assert pieces == ["abc", " ", "abd"]
    # One stop string may be given bare, not in a tuple.
    assert "".join(generate_text(model, tokenizer, "", 100, stop="c a")) == "ab"


def test_generate_text_with_a_real_model_and_tokenizer(corpora):
    text = (corpora / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:50_000]
    tokenizer = byte_tokenizer(text.split("\n\n"), vocab_size=400)
    model = lively_model(400)
    prompt = "ROMEO: 宝玉"
    kw: dict[str, Any] = dict(temperature=0.9, top_k=40, seed=11, eos_id=EOS_ID)
    ids = [EOS_ID] + tokenizer.encode(prompt, add_special_tokens=False).ids  # an EOS before the prompt
    expected = tokenizer.decode(list(generate(model, ids, 60, **kw)))
    streamed = "".join(generate_text(model, tokenizer, prompt, 60, **kw))
    assert streamed == expected.rstrip("\ufffd") and len(streamed) > 10
    # A stop string taken from the middle of that text ends it right there.
    stop = streamed[20:24]
    assert "".join(generate_text(model, tokenizer, prompt, 60, stop=(stop,), **kw)) == streamed[: streamed.index(stop)]
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        list(generate_text(model, tokenizer, "", 5))  # no prompt and no EOS to start from
