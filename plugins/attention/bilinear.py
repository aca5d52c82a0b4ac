from torch import nn

from qtoy_core import HookPoint, QKProductAttention


class BilinearAttention(QKProductAttention):
    """pattern = (q1.k1)(q2.k2) / d_head^2, causal, no softmax. Two QK circuits: (q_proj, k_proj)
    and (q2_proj, k2_proj). With q2 = q and k2 = k it is exactly quadratic attention. The forward,
    the recurrent state, the tensor network and the weight views (W_Q2, W_K2) come from
    `QKProductAttention`."""

    def __init__(self, model, config, layer):
        super().__init__(model, config, layer)
        inner = model.n_head * model.d_head
        self.q2_proj = nn.Linear(model.d_model, inner, bias=config.bias)
        self.k2_proj = nn.Linear(model.d_model, inner, bias=config.bias)
        # The second QK pair's hook points (before / after the rotation), as for q and k: the base's
        # `heads` finds them by the projection's name.
        self.hook_q2, self.hook_rot_q2 = HookPoint(heads_first=True), HookPoint(heads_first=True)
        self.hook_k2, self.hook_rot_k2 = HookPoint(heads_first=True), HookPoint(heads_first=True)

    def qk_factors(self):
        """The (q_proj, k_proj, scale) pairs whose scaled scores multiply into the pattern."""
        return [(self.q_proj, self.k_proj, self.scale), (self.q2_proj, self.k2_proj, self.scale)]
