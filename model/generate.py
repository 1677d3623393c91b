"""Sampling from a model, one token at a time, with a KV cache.

The prompt is run once (prefill); each new token then costs one position. When the context
(max_seq_len) is full, generation slides: the cache is rebuilt from the last half of the
context and continues, so `max_new_tokens` is honoured for any length. A prompt longer than the
context keeps its last max_seq_len - 1 tokens. Works for the fp32 model and the int8 ones.

`generate` yields ids; `generate_text` wraps it for people: it encodes a prompt, decodes the
new ids into text pieces that are always whole characters (a byte-level BPE token can hold half
of one), and ends before a stop string, never showing part of one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from ember.model.transformer import Transformer


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty (Keskar et al. 2019, as Hugging Face applies it): the logit of
    every id already in the context is divided by `penalty` when positive, multiplied when
    negative, so penalty > 1 always makes a seen id less likely. logits (V,), seen (V,) bool."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, generator: torch.Generator
) -> int:
    """One id from logits (V,). temperature <= 0 is greedy."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits.float().cpu() / temperature
    if top_k is not None and 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and 0 < top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Drop the tokens that come after the nucleus; the top token always stays.
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def generate(
    model: Transformer,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    seed: int | None = None,
    repetition_penalty: float = 1.0,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` new ids; stop before yielding `eos_id`.

    temperature <= 0 is greedy; top_k keeps the k likeliest ids, top_p the smallest set whose
    probability reaches p; repetition_penalty > 1 discourages every id seen so far (the prompt
    and the new ids), applied before temperature and also under greedy decoding.
    """
    if not prompt_ids:
        raise ValueError("generate: prompt_ids is empty; start from at least one id (e.g. EOS or BOS)")
    if repetition_penalty <= 0:
        raise ValueError(f"generate: repetition_penalty must be positive, got {repetition_penalty}")
    context = model.config.max_seq_len
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    device = model.tok_embeddings.weight.device
    cache = model.new_kv_cache(batch_size=1)
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(model.config.vocab_size, dtype=torch.bool, device=device)
        seen[torch.tensor(prompt_ids, device=device)] = True

    def prefill(ids: list[int]) -> torch.Tensor:
        logits: torch.Tensor
        logits, _ = model(torch.tensor([ids], device=device), kv_cache=cache, start_pos=0)
        return logits[0, -1]  # (V,)

    ids = list(prompt_ids)[-(context - 1) :] if context > 1 else list(prompt_ids)[-1:]
    logits = prefill(ids)
    pos = len(ids)
    step_input = torch.empty((1, 1), dtype=torch.long, device=device)  # reused: no allocation per token
    for _ in range(max_new_tokens):
        if seen is not None:
            logits = penalize_repeats(logits, seen, repetition_penalty)
        next_id = sample_next(logits, temperature, top_k, top_p, generator)
        if next_id == eos_id:
            return
        yield next_id
        ids.append(next_id)
        if seen is not None:
            seen[next_id] = True
        if pos == context:
            # The cache is full: re-read the last half of the context and carry on from there.
            ids = ids[-max(1, context // 2) :]
            logits = prefill(ids)
            pos = len(ids)
        else:
            step_input.fill_(next_id)
            logits, _ = model(step_input, kv_cache=cache, start_pos=pos)
            logits = logits[0, -1]
            pos += 1


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Ids of `text` without special tokens, from a `tokenizers.Tokenizer` or a transformers one."""
    encoded = tokenizer.encode(text, add_special_tokens=False)
    return list(encoded.ids if hasattr(encoded, "ids") else encoded)


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that begins some stop string: it may yet become one."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


def generate_text(
    model: Transformer, tokenizer: Any, prompt: str, max_new_tokens: int, *, stop: Iterable[str] = (), **sampling: Any
) -> Iterator[str]:
    """Continue `prompt`, yielding the new text in pieces as it is generated (for streaming).

    `tokenizer` is Ember's `tokenizers.Tokenizer` (or a transformers tokenizer); `sampling` are
    `generate`'s keywords (temperature, top_k, top_p, eos_id, seed, repetition_penalty). With
    `eos_id`, the prompt is put after an EOS, as training documents start, which also gives an
    empty prompt something to continue. Every piece is whole characters: ids are decoded
    together and a trailing partial UTF-8 sequence (decoded as U+FFFD) waits for the ids that
    complete it; one still partial when generation ends is dropped. Text ends before the first
    stop string, which is never yielded, nor any part of it: a tail that could begin a stop
    string is held until it cannot.
    """
    stops = tuple(s for s in ((stop,) if isinstance(stop, str) else stop) if s)  # one string or several
    ids = _encode(tokenizer, prompt)
    if sampling.get("eos_id") is not None:
        ids = [sampling["eos_id"]] + ids
    new: list[int] = []
    text, emitted = "", 0  # text decoded so far (whole characters only), and how much was yielded
    for token in generate(model, ids, max_new_tokens, **sampling):
        new.append(token)
        decoded = tokenizer.decode(new)
        # An incomplete multi-byte character at the end decodes to U+FFFD: hold it back. (A byte
        # that can never be valid also decodes to U+FFFD; it goes out once a character follows.)
        text = decoded.rstrip("\ufffd") if decoded.endswith("\ufffd") else decoded
        hits = [i for i in (text.find(s, emitted) for s in stops) if i >= 0]
        if hits:
            if min(hits) > emitted:
                yield text[emitted : min(hits)]
            return
        end = len(text) - _held_back(text[emitted:], stops)
        if end > emitted:
            yield text[emitted:end]
            emitted = end
    if len(text) > emitted:  # no stop string came: the held-back tail is plain text
        yield text[emitted:]
