from torch import Tensor

from qtoy_core import ProjectedAttention, QuadraticAttentionState, append_to_cache, causal_pattern, quadratic_attention


class QuadraticAttention(ProjectedAttention):
    """pattern = (q.k / d_head)^2 with a causal mask, z = pattern @ v: no softmax, so the layer is an
    exact polynomial (degree 3 in its input with the value). Long sequences use the linear-time
    form; generation keeps a recurrent state of constant size (or a KV cache when asked)."""

    def __init__(self, model, config, layer):
        super().__init__(model, config, layer)
        self.scale = 1.0 / model.d_head
        self.impl = config.impl

    def mix(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, state: dict | None, **_) -> Tensor:
        if state is not None and state.get("mode", "recurrent") == "recurrent" and not self.wants_pattern():
            return recurrent_mix(self, state, q, k, v, key_mask)
        if state is not None:
            k, v = append_to_cache(state, k=k, v=v)
        if self.wants_pattern():
            scores = self.hook_scores((q @ k.transpose(-1, -2)) * self.scale)
            pattern = self.hook_pattern(causal_pattern(scores.square(), key_mask))
            return pattern @ v
        return quadratic_attention(q, k, v, scale=self.scale, key_mask=key_mask, impl=self.impl)

    # -- optional capability: exact tensor network (qtoy_core.analysis.tensor_network) -------------
    def tensor_network(self, tn, x, *, positional):
        """z_i = sum_{j<=i} ((q_i.k_j) scale)^2 v_j, built with the `TNBuilder` ``tn``: the square is
        two copies of the scores sharing an index; the key sum is one key index over 0..i."""
        q = positional.tensor_network(tn, tn.project(x, self.q_proj, label="q"), op="rotate")
        k = positional.tensor_network(tn, tn.project(x, self.k_proj, label="k"), op="rotate")
        v = tn.project(x, self.v_proj, label="v")

        def at(i):
            keys = tn.causal_keys(i)
            s1 = tn.head_dot(q(i), keys(k), self.n_head, scale=self.scale)
            s2 = tn.head_dot(q(i), keys(k), self.n_head, scale=self.scale)
            z = tn.head_scale(tn.mul(s1, s2, label="pattern"), keys(v), self.n_head)
            return tn.linear(keys.sum(z), self.out_proj.weight, self.out_proj.bias, label="attn_out")

        return tn.stream(at, self.out_proj.out_features, "attn_out")

    def qk_factors(self):
        """The (q_proj, k_proj, scale) pairs whose scaled scores multiply into the pattern."""
        return [(self.q_proj, self.k_proj, self.scale)] * 2


def recurrent_mix(module, state: dict, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None,
                  q2: Tensor | None = None, k2: Tensor | None = None) -> Tensor:
    """Generation through the running state sum_j phi(k_j) v_j^T: constant cost per token."""
    if key_mask is not None:
        key_mask = key_mask[:, -q.shape[2]:]
    if "rnn" not in state:
        b, h, _, d = q.shape
        state["rnn"] = QuadraticAttentionState(b, h, d, bilinear=q2 is not None, dtype=q.dtype, device=q.device)
        return state["rnn"].prefill(q, k, v, scale=module.scale, q2=q2, k2=k2, key_mask=key_mask)
    rnn = state["rnn"]
    outs = []
    for t in range(q.shape[2]):
        sl = slice(t, t + 1)
        kt, vt = k[:, :, sl], v[:, :, sl]
        k2t = k2[:, :, sl] if k2 is not None else None
        if key_mask is not None:  # a padded key adds nothing to the state
            m = key_mask[:, None, sl, None].to(kt.dtype)
            kt, vt = kt * m, vt * m
        outs.append(rnn.step(q[:, :, sl], kt, vt, scale=module.scale,
                             q2=q2[:, :, sl] if q2 is not None else None, k2=k2t))
    import torch

    return torch.cat(outs, dim=2)
