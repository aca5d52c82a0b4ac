from torch import Tensor, nn

from qtoy_core.interfaces import HookPoint, ProjectedAttention, append_to_cache
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
        # The second QK pair's hook points (before / after the rotation), as for q and k.
        self.hook_q2, self.hook_rot_q2 = HookPoint(heads_first=True), HookPoint(heads_first=True)
        self.hook_k2, self.hook_rot_k2 = HookPoint(heads_first=True), HookPoint(heads_first=True)
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

    # -- optional capability: exact tensor network (qtoy_core.analysis.tensor_network) -------------
    def tensor_network(self, tn, x, *, positional):
        """z_i = sum_{j<=i} ((q1_i.k1_j) scale)((q2_i.k2_j) scale) v_j with the `TNBuilder` ``tn``."""
        def rotated(proj, label):
            return positional.tensor_network(tn, tn.project(x, proj, label=label), op="rotate")

        q1, k1 = rotated(self.q_proj, "q"), rotated(self.k_proj, "k")
        q2, k2 = rotated(self.q2_proj, "q2"), rotated(self.k2_proj, "k2")
        v = tn.project(x, self.v_proj, label="v")

        def at(i):
            keys = tn.causal_keys(i)
            s1 = tn.head_dot(q1(i), keys(k1), self.n_head, scale=self.scale)
            s2 = tn.head_dot(q2(i), keys(k2), self.n_head, scale=self.scale)
            z = tn.head_scale(tn.mul(s1, s2, label="pattern"), keys(v), self.n_head)
            return tn.linear(keys.sum(z), self.out_proj.weight, self.out_proj.bias, label="attn_out")

        return tn.stream(at, self.out_proj.out_features, "attn_out")

    def qk_factors(self):
        """The (q_proj, k_proj, scale) pairs whose scaled scores multiply into the pattern."""
        return [(self.q_proj, self.k_proj, self.scale), (self.q2_proj, self.k2_proj, self.scale)]

    # -- optional capability: weight views (qtoy_core.analysis.circuits) ---------------------------
    def weight_views(self):
        """The shared views (W_Q, W_K, W_V, W_O; see ProjectedAttention.weight_views) plus the second
        QK pair W_Q2, W_K2 (n_head, d_model, d_head). ``qk`` lists both pairs: the pattern is the
        product (scale q1.k1)(scale q2.k2), so each pair is its own QK circuit."""
        views = super().weight_views()
        for name, proj in (("Q2", self.q2_proj), ("K2", self.k2_proj)):
            views[f"W_{name}"] = proj.weight.detach().view(self.n_head, self.d_head, -1).transpose(1, 2)
            if proj.bias is not None:
                views[f"b_{name}"] = proj.bias.detach().view(self.n_head, self.d_head)
        views["qk"] = [("W_Q", "W_K", self.scale), ("W_Q2", "W_K2", self.scale)]
        return views
