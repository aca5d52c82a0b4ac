from qtoy_core import QKProductAttention


class QuadraticAttention(QKProductAttention):
    """pattern = (q.k / d_head)^2 with a causal mask, z = pattern @ v: no softmax, so the layer is an
    exact polynomial (degree 3 in its input with the value). Long sequences use the linear-time
    form; generation keeps a recurrent state of constant size (or a KV cache when asked). All of it,
    and the tensor network, comes from `QKProductAttention`: the pattern is the square of one form."""

    def qk_factors(self):
        """The (q_proj, k_proj, scale) pairs whose scaled scores multiply into the pattern: one, twice."""
        return [(self.q_proj, self.k_proj, self.scale)] * 2
