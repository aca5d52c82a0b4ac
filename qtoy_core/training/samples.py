"""Samples while training: short continuations of fixed prompts at every evaluation.

Greedy by default, so the samples of a step depend only on the weights at that step: a resumed run
writes the same samples.jsonl as an uninterrupted one. With a temperature, the sampling generator is
seeded by (run seed, step) for the same reason.
"""

from __future__ import annotations

from contextlib import closing
from typing import Any

import torch

from ..data import Tokenizer
from ..generate import generate
from ..model import ToyTransformer

SAMPLES_NAME = "samples.jsonl"
PROMPT_WORDS = 5  # how much of a document's opening makes a default prompt


def default_prompts(dataset: Any, n: int = 3) -> list[str]:
    """The dataset's own prompts: its `sample_prompts()` if it has one, else the openings (first
    few words) of its first validation documents, so the prompts fit whatever the corpus is."""
    own = getattr(dataset, "sample_prompts", None)
    if callable(own):
        prompts = own()
        if prompts is not None:
            return list(prompts)[:n]
    prompts: list[str] = []
    with closing(dataset.documents("validation")) as texts:
        for text in texts:
            opening = " ".join(text.split()[:PROMPT_WORDS])
            if opening and opening not in prompts:
                prompts.append(opening)
            if len(prompts) == n:
                break
    return prompts


@torch.no_grad()
def continue_prompts(model: ToyTransformer, tokenizer: Tokenizer, prompts: list[str], *, max_new_tokens: int,
                   temperature: float = 0.0, seed: int = 0, device: torch.device | str = "cpu") -> list[dict]:
    """[{"prompt", "text"}] with `text` the prompt's continuation (prompt excluded), one per prompt.

    Each prompt is generated on its own (prompts differ in length and padding would change what a
    polynomial attention sees). The continuation stops early at the end-of-text token; prompts are
    cut to leave room for the continuation within a learned positional encoding's n_ctx.
    """
    eos = tokenizer.eos_id if hasattr(tokenizer, "eos_id") else None
    room = max(1, model.config.n_ctx - max_new_tokens) if getattr(model.positional, "max_positions", None) else None
    out = []
    for i, prompt in enumerate(prompts):
        ids = tokenizer.encode(prompt)
        if room is not None:
            ids = ids[-room:]
        if not ids:
            continue
        tokens = torch.tensor([ids], dtype=torch.long, device=device)
        new = max_new_tokens if room is None else min(max_new_tokens, model.config.n_ctx - len(ids))
        result = generate(model, tokens, new, temperature=temperature, seed=seed * 1000 + i, eos_id=eos)
        continuation = result[0, len(ids):].tolist()
        if eos is not None and continuation and continuation[-1] == eos:
            continuation = continuation[:-1]
        out.append({"prompt": prompt, "text": tokenizer.decode(continuation)})
    return out
