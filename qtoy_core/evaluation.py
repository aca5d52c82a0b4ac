"""Validation loss: one token-weighted mean, used by the Trainer and by `qtoy eval`.

The loss of a set of batches is the mean next-token cross-entropy over every real (unpadded)
target token in them, not the mean of per-batch means: with padding, batches hold different
numbers of real tokens, and a batch with one real token must not count as much as a full one.
"""

from __future__ import annotations

import itertools
import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterable

import torch

from .model import cross_entropy


def tokens_and_mask(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A batch as (tokens (batch, n_ctx + 1), attention_mask of that shape or None): a token tensor,
    a `Batch` (tokens, attention_mask), or a (tokens, mask) pair."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if hasattr(batch, "tokens"):
        return batch.tokens, batch.attention_mask
    tokens, mask = batch
    return tokens, mask


@dataclass(frozen=True)
class Evaluation:
    """`loss_sum` (nats) over `tokens` real target tokens in `batches` batches."""

    loss_sum: float
    tokens: int
    batches: int

    @property
    def loss(self) -> float:
        """Mean loss per real target token (nan when no token was scored)."""
        return self.loss_sum / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[Any], n: int | None, *,
             device: torch.device | str | None = None,
             autocast: Callable[[], ContextManager] = nullcontext) -> Evaluation:
    """Token-weighted next-token loss of `model` over the first `n` batches (all when n is None).

    Batches: see `tokens_and_mask`; each is (batch, n_ctx + 1), the model reads the first n_ctx
    tokens and is scored on the last n_ctx where the mask is 1. `device`: where to move batches
    (default: the model's). `autocast`: a context factory for the forward (the loss is float32).
    The model is put in eval mode for the pass and given back in the mode it was in. One host
    sync at the end, not one per batch.
    """
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    try:
        for batch in itertools.islice(batches, n):  # no batch is drawn beyond the n-th
            tokens, mask = tokens_and_mask(batch)
            tokens = tokens.to(device, non_blocking=True)
            mask = None if mask is None else mask.to(device, non_blocking=True)
            with autocast():
                logits = model(tokens[:, :-1], None if mask is None else mask[:, :-1])
            target_mask = None if mask is None else mask[:, 1:]
            weight = (torch.tensor(float(tokens[:, 1:].numel()), dtype=torch.float64, device=device)
                      if target_mask is None else target_mask.sum().double())
            loss_sum += cross_entropy(logits, tokens[:, 1:], target_mask).double() * weight
            count += weight
            seen += 1
    finally:
        model.train(was_training)
    total, tokens_seen = torch.stack([loss_sum, count]).tolist()
    return Evaluation(loss_sum=total, tokens=int(round(tokens_seen)), batches=seen)
