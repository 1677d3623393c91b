"""Sampling from a model, one token at a time, with a KV cache.

The prompt is run once (prefill); each new token then costs one position. When the context
(max_seq_len) is full, generation slides: the cache is rebuilt from the last half of the
context and continues, so `max_new_tokens` is honoured for any length. A prompt longer than the
context keeps its last max_seq_len - 1 tokens. Works for the fp32 model and the int8 one.
"""

from __future__ import annotations

from typing import Iterator

import torch

from ember.model.transformer import Transformer


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator) -> int:
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
def generate(model: Transformer, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.8,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
             seed: int | None = None) -> Iterator[int]:
    """Yield up to `max_new_tokens` new ids; stop before yielding `eos_id`."""
    if not prompt_ids:
        raise ValueError("generate: prompt_ids is empty; start from at least one id (e.g. EOS or BOS)")
    context = model.config.max_seq_len
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    device = model.tok_embeddings.weight.device
    cache = model.new_kv_cache(batch_size=1)

    def prefill(ids: list[int]) -> torch.Tensor:
        logits, _ = model(torch.tensor([ids], device=device), kv_cache=cache, start_pos=0)
        return logits[0, -1]  # (V,)

    ids = list(prompt_ids)[-(context - 1):] if context > 1 else list(prompt_ids)[-1:]
    logits = prefill(ids)
    pos = len(ids)
    for _ in range(max_new_tokens):
        next_id = sample_next(logits, temperature, top_k, top_p, generator)
        if next_id == eos_id:
            return
        yield next_id
        ids.append(next_id)
        if pos == context:
            # The cache is full: re-read the last half of the context and carry on from there.
            ids = ids[-max(1, context // 2):]
            logits = prefill(ids)
            pos = len(ids)
        else:
            logits, _ = model(torch.tensor([[next_id]], device=device), kv_cache=cache, start_pos=pos)
            logits = logits[0, -1]
            pos += 1
