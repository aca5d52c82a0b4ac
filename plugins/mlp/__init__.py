"""Built-in MLPs: bilinear (the polynomial default), gelu (baseline), none."""

from typing import Literal

from qtoy_core import MLPConfig, hookimpl


class BilinearMLPConfig(MLPConfig):
    """Bilinear MLP: W_out((W_l x) * (W_r x)), no activation function."""

    name: Literal["bilinear"] = "bilinear"
    bias: bool = False

    @property
    def is_polynomial(self) -> bool:
        return True


class GeluMLPConfig(MLPConfig):
    """Standard MLP: W_out gelu(W_in x), the baseline for comparison."""

    name: Literal["gelu"] = "gelu"
    bias: bool = True


class NoMLPConfig(MLPConfig):
    """No MLP (attention-only models)."""

    name: Literal["none"] = "none"

    @property
    def is_polynomial(self) -> bool:
        return True


@hookimpl
def register_mlps(register):
    register(BilinearMLPConfig, "qtoy_plugins.mlp.bilinear:BilinearMLP")
    register(GeluMLPConfig, "qtoy_plugins.mlp.gelu:GeluMLP")
    register(NoMLPConfig, "qtoy_plugins.mlp.none:NoMLP")
