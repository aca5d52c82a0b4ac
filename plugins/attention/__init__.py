"""Built-in attention mechanisms: quadratic (the polynomial default), bilinear, softmax (baseline)."""

from typing import Literal

from qtoy_core import AttentionConfig, hookimpl


class _QKProductConfig(AttentionConfig):
    """Options of the built-in attentions on `qtoy_core.QKProductAttention` (pattern = a product of
    two QK forms, run by the kernels of qtoy_core.ops.quadratic)."""

    bias: bool = False
    # plain: materialise the (T, T) pattern (blocked kernel); chunked: the linear-time form; auto:
    # whichever is faster for the sequence length (measured crossover, see qtoy_core.ops.quadratic);
    # fused: the Triton kernel (CUDA; auto picks it there); autograd: the plain form as plain tensor
    # ops (slower; for experiments on the kernel itself)
    impl: Literal["auto", "plain", "chunked", "fused", "autograd"] = "auto"

    @property
    def is_polynomial(self) -> bool:
        return True


class QuadraticAttentionConfig(_QKProductConfig):
    """Quadratic attention: pattern = (q.k / d_head)^2 with a causal mask, no softmax."""

    name: Literal["quadratic"] = "quadratic"


class BilinearAttentionConfig(_QKProductConfig):
    """Bilinear attention: pattern = (q1.k1)(q2.k2) / d_head^2, causal; quadratic is q1=q2, k1=k2."""

    name: Literal["bilinear"] = "bilinear"


class SoftmaxAttentionConfig(AttentionConfig):
    """Standard softmax attention (scaled dot product, causal): the baseline for comparison."""

    name: Literal["softmax"] = "softmax"
    bias: bool = False


@hookimpl
def register_attentions(register):
    register(QuadraticAttentionConfig, "qtoy_plugins.attention.quadratic:QuadraticAttention")
    register(BilinearAttentionConfig, "qtoy_plugins.attention.bilinear:BilinearAttention")
    register(SoftmaxAttentionConfig, "qtoy_plugins.attention.softmax:SoftmaxAttention")
