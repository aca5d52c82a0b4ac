"""Built-in training callbacks: dynamics (weights, gradients and circuit spectra over training)."""

from typing import Literal

from pydantic import Field

from qtoy_core import CallbackConfig, hookimpl


class DynamicsConfig(CallbackConfig):
    """Record training dynamics every K steps to dynamics.jsonl: per-layer weight and gradient
    norms, each head's top QK and OV singular values, the bilinear MLP's top eigenvalues."""

    name: Literal["dynamics"] = "dynamics"
    every: int = Field(25, gt=0, description="record every this many steps")
    top_k: int = Field(4, gt=0, description="how many singular values / eigenvalues to keep")


@hookimpl
def register_callbacks(register):
    register(DynamicsConfig, "qtoy_plugins.callbacks.dynamics:Dynamics")
