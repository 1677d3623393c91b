"""How well a model predicts text: the loss on token windows, and bits per byte of raw text.

Used by training (validation loss), evaluate (validation windows, external texts) and publish's
gate (the candidate and the published model scored on the same text, each with its own tokenizer,
so that models with different vocabularies compare fairly).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from tokenizers import Tokenizer

from ember.model.device import autocast
from ember.model.tokenizer import EOS_ID
from ember.model.transformer import Transformer


@torch.no_grad()
def eval_loss(
    model: torch.nn.Module,
    windows: npt.NDArray[np.integer[Any]] | torch.Tensor,
    batch_size: int,
    device: torch.device | str = "cpu",
    precision: str | None = None,
) -> float:
    """Mean cross-entropy (nats per token) over fixed windows (n, T + 1)."""
    windows = torch.as_tensor(windows)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size].to(device)
        with autocast(torch.device(device), precision):
            _, loss = model(batch[:, :-1], batch[:, 1:])
        total += loss.item() * len(batch)
        count += len(batch)
    model.train(was_training)
    return total / count


def token_stream(texts: list[str], tokenizer: Tokenizer, eos_id: int, max_tokens: int) -> tuple[list[int], int, int]:
    """EOS, doc, EOS, doc, EOS... with at most `max_tokens` tokens after the first EOS; returns the
    stream, the UTF-8 bytes of the text it covers and the documents it holds (a cut one included).
    A document cut by the budget gets no EOS, and only its covered text's bytes count."""
    stream, n_bytes, docs = [eos_id], 0, 0
    for text in texts:
        room = max_tokens - (len(stream) - 1)
        if room <= 0:
            break
        encoding = tokenizer.encode(text, add_special_tokens=False)
        if not encoding.ids:
            continue
        docs += 1
        if len(encoding.ids) + 1 <= room:
            stream += encoding.ids + [eos_id]
            n_bytes += len(text.encode("utf-8"))
        else:
            stream += encoding.ids[:room]
            n_bytes += len(text[: encoding.offsets[room - 1][1]].encode("utf-8"))
            break
    return stream, n_bytes, docs


def stream_windows(stream: list[int], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping (inputs, targets) windows (n, seq_len) that predict every token after the
    first once; the last window is padded (input 0, target -1, which the loss ignores)."""
    predicted = len(stream) - 1
    n = math.ceil(predicted / seq_len)
    ids = torch.tensor(stream, dtype=torch.long)
    x = torch.zeros(n * seq_len, dtype=torch.long)
    y = torch.full((n * seq_len,), -1, dtype=torch.long)
    x[:predicted], y[:predicted] = ids[:-1], ids[1:]
    return x.view(n, seq_len), y.view(n, seq_len)


@torch.no_grad()
def total_nats(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    """Summed cross-entropy (nats) of every target that is not -1."""
    total = 0.0
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        _, loss = model(xb, yb)  # the mean over the batch's scored targets
        total += loss.item() * int((yb != -1).sum())
    return total


def text_bits_per_byte(model: Transformer, tokenizer: Tokenizer, texts: list[str], batch_size: int = 8) -> float:
    """Bits per UTF-8 byte of `texts` under `model` with its own tokenizer: documents joined by
    EOS, every token predicted once (as evaluate scores external texts)."""
    stream, n_bytes, _ = token_stream(texts, tokenizer, EOS_ID, max_tokens=2**62)
    if n_bytes == 0:
        raise ValueError("no text to score: the texts are empty")
    x, y = stream_windows(stream, model.config.max_seq_len)
    return total_nats(model, x, y, batch_size) / math.log(2) / n_bytes
