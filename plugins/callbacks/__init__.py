"""Built-in training callbacks: dynamics (weights, gradients and circuit spectra over training) and the
experiment trackers wandb and tensorboard (optional extras `qtoy[wandb]`, `qtoy[tensorboard]`)."""

from typing import Literal

from pydantic import Field

from qtoy_core import CallbackConfig, hookimpl


class DynamicsConfig(CallbackConfig):
    """Record training dynamics every K steps to dynamics.jsonl: per-layer weight and gradient
    norms, each head's top QK and OV singular values, the bilinear MLP's top eigenvalues."""

    name: Literal["dynamics"] = "dynamics"
    every: int = Field(25, gt=0, description="record every this many steps")
    top_k: int = Field(4, gt=0, description="how many singular values / eigenvalues to keep")


class WandbConfig(CallbackConfig):
    """Log metrics, samples, config and summary to Weights & Biases (`pip install "qtoy[wandb]"`);
    WANDB_MODE=offline works without a network. A resumed run continues the same wandb run."""

    name: Literal["wandb"] = "wandb"
    project: str = Field("qtoy", description="wandb project")
    entity: str | None = Field(None, description="wandb entity (user or team); default: yours")
    run_name: str | None = Field(None, description="display name; default: the run folder's name")
    tags: list[str] = Field(default_factory=list)
    mode: Literal["online", "offline", "disabled"] | None = Field(None, description="default: WANDB_MODE or online")


class TensorBoardConfig(CallbackConfig):
    """Write metrics, samples, config and summary as TensorBoard event files under RUN/<log_dir>
    (`pip install "qtoy[tensorboard]"`). A resumed run appends to the same log dir."""

    name: Literal["tensorboard"] = "tensorboard"
    log_dir: str = Field("tensorboard", description="folder inside the run folder")


@hookimpl
def register_callbacks(register):
    register(DynamicsConfig, "qtoy_plugins.callbacks.dynamics:Dynamics")
    register(WandbConfig, "qtoy_plugins.callbacks.trackers:WandbTracker")
    register(TensorBoardConfig, "qtoy_plugins.callbacks.trackers:TensorBoardTracker")
