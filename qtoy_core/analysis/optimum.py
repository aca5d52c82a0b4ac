"""Distance to the optimum: a model's loss against a corpus' exact entropy, overall and per label.

A dataset that knows its ground truth (the built-in ``synthetic`` corpus: ``batch_ground_truth(batch)``
gives each token's label code and the nats the generator spent on it) lets the loss be split into
the part no model can remove (the entropy) and the rest, the **excess loss**:

    excess = mean over predicted tokens of (loss - nats),  overall and per label (fixed / copyable / free).

A perfect model of the generator has excess 0 (given the whole story as context: a model whose
context window cuts a story keeps a positive floor on copyable tokens whose source fell out of the
window). Per token the excess can be negative, since a span's nats are charged to its first token;
summed over a label it is not.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

__all__ = ["excess_loss"]


@torch.no_grad()
def excess_loss(model: Any, batches: Iterable, ground_truth: Callable[[Any], tuple[torch.Tensor, torch.Tensor]], *,
                labels: Sequence[str] = ("fixed", "copyable", "free"), max_batches: int | None = None) -> dict[str, Any]:
    """Token-weighted loss, entropy and excess loss of ``model`` on ``batches`` (Batches with
    ``tokens`` (B, n_ctx + 1), ``attention_mask`` and document positions), overall and per label.

    ``ground_truth(batch) -> (codes, nats)``, both shaped like ``batch.tokens``: the label index into
    ``labels`` (-1: no label, e.g. padding) and the generator's nats of each token. Token ``i + 1`` is
    predicted from tokens ``0..i``, so its loss is compared with its own nats.
    Returns ``{"tokens", "loss", "entropy", "excess", "by_label": {label: {"tokens", "fraction",
    "loss", "entropy", "excess"}}}`` (nats per token; None where a label has no token).
    """
    model.eval()
    device = next(iter(model.parameters())).device
    n = len(labels)
    count = torch.zeros(n, dtype=torch.float64)
    loss_sum = torch.zeros(n, dtype=torch.float64)
    nats_sum = torch.zeros(n, dtype=torch.float64)
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        codes, nats = ground_truth(batch)
        tokens, mask = batch.tokens, getattr(batch, "attention_mask", None)
        logits = model(tokens[:, :-1].to(device), None if mask is None else mask[:, :-1].to(device))
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten().to(device),
                               reduction="none").double().cpu()
        code, nat = codes[:, 1:].flatten(), nats[:, 1:].flatten().double()
        valid = code >= 0
        if mask is not None:
            valid &= mask[:, 1:].flatten().bool().cpu()
        code, loss, nat = code[valid], loss[valid], nat[valid]
        count += torch.bincount(code, minlength=n).double()
        loss_sum += torch.bincount(code, weights=loss, minlength=n)
        nats_sum += torch.bincount(code, weights=nat, minlength=n)
    total = float(count.sum())
    if total == 0:
        raise ValueError("no labelled token to score: the batches are empty or carry no ground truth")

    def entry(c: float, loss: float, nats: float) -> dict[str, Any]:
        if c == 0:
            return {"tokens": 0, "fraction": 0.0, "loss": None, "entropy": None, "excess": None}
        return {"tokens": int(c), "fraction": c / total, "loss": loss / c, "entropy": nats / c,
                "excess": (loss - nats) / c}

    overall = entry(total, float(loss_sum.sum()), float(nats_sum.sum()))
    overall.pop("fraction")
    overall["perplexity"] = math.exp(min(overall["loss"], 50))
    overall["by_label"] = {lab: entry(float(count[k]), float(loss_sum[k]), float(nats_sum[k]))
                           for k, lab in enumerate(labels)}
    return overall
