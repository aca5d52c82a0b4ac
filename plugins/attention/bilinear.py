from torch import Tensor, nn

from qtoy_core.interfaces import ProjectedAttention, append_to_cache
from qtoy_core.ops.masks import causal_pattern
from qtoy_core.ops.quadratic import quadratic_attention

from .quadratic import recurrent_mix


class BilinearAttention(ProjectedAttention):
    """pattern = (q1.k1)(q2.k2) / d_head^2, causal, no softmax. Two QK circuits: (q_proj, k_proj)
    and (q2_proj, k2_proj). With q2 = q and k2 = k it is exactly quadratic attention."""

    def __init__(self, model, config, layer):
        super().__init__(model, config, layer)
        inner = model.n_head * model.d_head
        self.q2_proj = nn.Linear(model.d_model, inner, bias=config.bias)
        self.k2_proj = nn.Linear(model.d_model, inner, bias=config.bias)
        self.scale = 1.0 / model.d_head
        self.impl = config.impl

    def mix(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, state: dict | None, *, x: Tensor,
            positional, positions, **_) -> Tensor:
        q2 = self.heads(self.q2_proj, x, positional, positions)
        k2 = self.heads(self.k2_proj, x, positional, positions)
        if state is not None and state.get("mode", "recurrent") == "recurrent" and not self.wants_pattern():
            return recurrent_mix(self, state, q, k, v, key_mask, q2=q2, k2=k2)
        if state is not None:
            k, k2, v = append_to_cache(state, k=k, k2=k2, v=v)
        if self.wants_pattern():
            scores = self.hook_scores(((q @ k.transpose(-1, -2)) * self.scale) * ((q2 @ k2.transpose(-1, -2)) * self.scale))
            return self.hook_pattern(causal_pattern(scores, key_mask)) @ v
        return quadratic_attention(q, k, v, scale=self.scale, q2=q2, k2=k2, key_mask=key_mask, impl=self.impl)
