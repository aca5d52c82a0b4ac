"""Sampling from a trained model with a cache: each new token costs one position, not the prefix."""

from __future__ import annotations

import torch
from torch import Tensor

from .model import ToyTransformer


@torch.no_grad()
def generate(model: ToyTransformer, prompt: Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, seed: int | None = None, cache_mode: str | None = "recurrent",
             eos_id: int | None = None) -> Tensor:
    """Continue `prompt` (batch, time) by up to `max_new_tokens` tokens.

    temperature 0 is greedy. cache_mode "recurrent" (constant-size state for polynomial attention,
    KV for others), "kv", or None (recompute the whole prefix each token: the slow reference).
    """
    if prompt.ndim == 1:
        prompt = prompt[None]
    if prompt.shape[1] == 0:
        raise ValueError("the prompt is empty: give at least one token (e.g. the tokenizer's bos token)")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, not {temperature}")
    generator = torch.Generator(device=prompt.device)
    generator.manual_seed(seed if seed is not None else torch.seed())
    was_training = model.training
    model.eval()
    cache = model.new_cache(cache_mode) if cache_mode else None
    tokens = prompt
    logits = model(prompt, cache=cache)[:, -1]
    for _ in range(max_new_tokens):
        next_token = _sample(logits.float(), temperature, top_k, generator)
        tokens = torch.cat((tokens, next_token), dim=1)
        if eos_id is not None and bool((next_token == eos_id).all()):
            break
        logits = model(next_token, cache=cache)[:, -1] if cache is not None else model(tokens)[:, -1]
    model.train(was_training)
    return tokens


def _sample(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator) -> Tensor:
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)
