"""Cubic attention: pattern = (q.k / d_head)^3 with a causal mask and no softmax.

Beware the sign. An even power (quadratic attention) gives a pattern >= 0; the cube keeps the sign
of the score, so a key can *subtract* its value. Two consequences, both taken care of by
`QKProductAttention`, which this class inherits everything from but its factors:

* mask with zeros *after* the power (`causal_pattern`), never with -inf before it as softmax
  attention does: (-inf)^3 is -inf, and -inf * 0 is nan;
* the tensor network must multiply three copies of the signed score; |q.k|^3 would not be a
  polynomial at all.
"""

from __future__ import annotations

from qtoy_core import QKProductAttention


class CubicAttention(QKProductAttention):
    """z_i = sum_{j <= i} ((q_i . k_j) / d_head)^3 v_j (within the window, when one is set).

    `ProjectedAttention` provides q_proj, k_proj, v_proj, out_proj, the hook points and forward();
    `QKProductAttention` the mix for training, hooks and generation (a recurrent state of d_head^3
    features up to d_head 16, a KV cache beyond or with a window), the exact tensor network and the
    weight views. This class only says what multiplies into the pattern.
    """

    def __init__(self, model, config, layer):
        super().__init__(model, config, layer)
        self.window = config.window  # each query sees its last `window` keys; None: every earlier key

    def qk_factors(self):
        """The (q_proj, k_proj, scale) factors whose scaled scores multiply into the pattern: the
        same pair three times (a cube)."""
        return [(self.q_proj, self.k_proj, self.scale)] * 3
