"""Built-in optimizers: muon (Muon for hidden matrices + AdamW for the rest) and adam (AdamW)."""

from typing import Literal

from pydantic import Field

from qtoy_core import OptimizerConfig, hookimpl


# Why eps is tiny: with the specified init (std 0.02, zero output projections, no norm) a quadratic
# attention pattern starts near 1e-11, so W_O's first gradients are ~1e-12. With the usual
# eps = 1e-8 Adam scales those updates down ~10^4 times and attention never leaves zero (measured on
# a copying task: |W_O| stayed 0.0000 for 300 steps); with eps = 1e-16 the same run learns.
TINY_GRADIENT_EPS = 1e-16


class AdamConfig(OptimizerConfig):
    """AdamW (betas 0.9, 0.95); weight decay on matrices only, never on biases or norm gains."""

    name: Literal["adam"] = "adam"
    lr: float = Field(3e-3, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(TINY_GRADIENT_EPS, gt=0, description="tiny on purpose: see TINY_GRADIENT_EPS")
    weight_decay: float = Field(0.1, ge=0)
    fused: bool | None = Field(None, description="fused AdamW kernel; None: when every parameter is on cpu/cuda")


class MuonConfig(OptimizerConfig):
    """Muon (torch.optim.Muon: Newton-Schulz orthogonalised momentum) on hidden 2-D matrices,
    AdamW on embeddings, unembedding, biases and norm gains, inside one optimizer."""

    name: Literal["muon"] = "muon"
    lr: float = Field(0.02, gt=0, description="Muon learning rate for hidden matrices")
    momentum: float = Field(0.95, ge=0, lt=1)
    nesterov: bool = True
    ns_steps: int = Field(5, ge=1)
    ns_coefficients: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
    # Newton-Schulz normalises the momentum by (norm + eps): tiny for the same reason as Adam's eps.
    eps: float = Field(TINY_GRADIENT_EPS, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adamw_lr: float = Field(3e-3, gt=0, description="AdamW learning rate for the other parameters")
    adamw_betas: tuple[float, float] = (0.9, 0.95)
    adamw_eps: float = Field(TINY_GRADIENT_EPS, gt=0)
    adamw_weight_decay: float = Field(0.0, ge=0)
    fused: bool | None = Field(None, description="fused kernel for the inner AdamW; None: when on cpu/cuda")


@hookimpl
def register_optimizers(register):
    register(AdamConfig, "qtoy_plugins.optim.adam:build_adam")
    register(MuonConfig, "qtoy_plugins.optim.muon:build_muon")
