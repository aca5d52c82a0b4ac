"""Cubic attention: pattern = (q.k / d_head)^3 with a causal mask and no softmax.

Beware the sign. An even power (quadratic attention) gives a pattern >= 0; the cube keeps the sign
of the score, so a key can *subtract* its value. Two consequences:

* mask with zeros *after* the power (`causal_pattern`), never with -inf before it as softmax
  attention does: (-inf)^3 is -inf, and -inf * 0 is nan;
* the tensor network must multiply three copies of the signed score; |q.k|^3 would not be a
  polynomial at all.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qtoy_core import ProjectedAttention, append_to_cache, causal_pattern


def window_mask(t_q: int, t_k: int, window: int, device: torch.device) -> Tensor:
    """(t_q, t_k) bool: the query at absolute position p (queries are the last t_q of t_k
    positions) sees keys p - window + 1 .. p."""
    q_pos = torch.arange(t_k - t_q, t_k, device=device)[:, None]
    k_pos = torch.arange(t_k, device=device)[None, :]
    return (k_pos <= q_pos) & (k_pos > q_pos - window)


class CubicAttention(ProjectedAttention):
    """z_i = sum_{j <= i} ((q_i . k_j) / d_head)^3 v_j (within the window, when one is set).

    `ProjectedAttention` provides q_proj, k_proj, v_proj, out_proj, the hook points and forward();
    this class only mixes the heads' queries, keys and values.
    """

    def __init__(self, model, config, layer):
        super().__init__(model, config, layer)
        self.scale = 1.0 / model.d_head
        self.window = config.window

    def mix(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, state: dict | None, **_) -> Tensor:
        if state is not None:  # cached generation: keep every key and value (no recurrent form here)
            k, v = append_to_cache(state, k=k, v=v)
        scores = self.hook_scores((q @ k.transpose(-1, -2)) * self.scale)
        pattern = causal_pattern(scores * scores * scores, key_mask)  # zeros after the power
        if self.window is not None:
            pattern = pattern * window_mask(q.shape[2], k.shape[2], self.window, q.device).to(pattern.dtype)
        return self.hook_pattern(pattern) @ v

    # -- optional capability: the exact tensor network (qtoy_core.TNBuilder) ----------------------
    def tensor_network(self, tn, x, *, positional):
        """The same sum as a network: three fresh copies of the scaled score per (query, key) share
        one key index and multiply (a shared index, no tensor); the product scales the value."""
        q = positional.tensor_network(tn, tn.project(x, self.q_proj, label="q"), op="rotate")
        k = positional.tensor_network(tn, tn.project(x, self.k_proj, label="k"), op="rotate")
        v = tn.project(x, self.v_proj, label="v")

        def at(i):
            first = 0 if self.window is None else max(0, i - self.window + 1)
            keys = tn.key_sum(range(first, i + 1))
            scores = [tn.head_dot(q(i), keys(k), self.n_head, scale=self.scale) for _ in range(3)]
            z = tn.head_scale(tn.mul(*scores, label="pattern"), keys(v), self.n_head)
            return tn.linear(keys.sum(z), self.out_proj.weight, self.out_proj.bias, label="attn_out")

        return tn.stream(at, self.out_proj.out_features, "attn_out")

    def qk_factors(self):
        """The (q_proj, k_proj, scale) factors whose scaled scores multiply into the pattern: the
        same pair three times (used by the QK / full circuits)."""
        return [(self.q_proj, self.k_proj, self.scale)] * 3
