"""Built-in norms: none (default: keeps the model an exact polynomial) and rmsnorm."""

from typing import Literal

from pydantic import Field

from qtoy_core import NormConfig, hookimpl


class NoNormConfig(NormConfig):
    """No normalisation: the model stays an exact polynomial of its input."""

    name: Literal["none"] = "none"

    @property
    def is_polynomial(self) -> bool:
        return True


class RMSNormConfig(NormConfig):
    """RMSNorm (torch.nn.RMSNorm) with a learned gain."""

    name: Literal["rmsnorm"] = "rmsnorm"
    eps: float = Field(1e-6, gt=0.0)


@hookimpl
def register_norms(register):
    register(NoNormConfig, "qtoy_plugins.norm.modules:NoNorm")
    register(RMSNormConfig, "qtoy_plugins.norm.modules:RMSNorm")
