"""qtoy-example-plugin: one component of four kinds, added through qtoy's public hooks only.

This module is what the `qtoy` entry point names. It holds only the config classes (pydantic, no
torch) and the hook implementations; the implementations are registered as lazy
``"module:attr"`` references, so `qtoy list` and `qtoy plugins` import neither torch nor the
modules below.

* attention ``cubic``      pattern = (q.k / d_head)^3, causal, optional local window  (attention.py)
* mlp ``trilinear``        out_proj((W_a x) * (W_b x) * (W_c x))                      (mlp.py)
* dataset ``sums``         a tiny offline corpus of additions, "17+25=42"             (dataset.py)
* callback ``loss_trace``  the training loss every N steps to loss_trace.jsonl       (callback.py)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from qtoy_core import AttentionConfig, CallbackConfig, MLPConfig, TextDatasetConfig, hookimpl

if TYPE_CHECKING:
    from qtoy_core import ModelConfig

__version__ = "0.1.0"


class CubicAttentionConfig(AttentionConfig):
    """Cubic attention: pattern = (q.k / d_head)^3, causal, no softmax; the odd power keeps the score's sign."""

    name: Literal["cubic"] = "cubic"
    bias: bool = False
    # Each query sees only the last `window` keys (itself included); None: every earlier key.
    window: int | None = Field(None, ge=1)

    @property
    def is_polynomial(self) -> bool:
        return True  # degree 4 in the layer input: three copies of the scores, one of the value

    def check_model(self, model: "ModelConfig") -> None:
        if self.window is not None and self.window > model.n_ctx:
            raise ValueError(f"attention.window {self.window} is longer than n_ctx {model.n_ctx}: drop the "
                             f"window (every key is seen) or make it at most {model.n_ctx}")


class TrilinearMLPConfig(MLPConfig):
    """Trilinear MLP: W_out((W_a x) * (W_b x) * (W_c x)), a cubic form per output, no activation."""

    name: Literal["trilinear"] = "trilinear"
    bias: bool = False

    @property
    def is_polynomial(self) -> bool:
        return True


class SumsDatasetConfig(TextDatasetConfig):
    """Tiny offline corpus of additions ("17+25=42"), one equation a line; a 300-token BPE; for quick tests."""

    name: Literal["sums"] = "sums"
    seed: int = 0
    n_documents: int = Field(2000, ge=1, description="documents in the corpus (looped over epochs)")
    sums_per_document: int = Field(8, ge=1)
    max_operand: int = Field(99, ge=1)
    vocab_size: int = Field(300, ge=260, description="size of the byte-level BPE trained on the corpus")
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0)


class LossTraceConfig(CallbackConfig):
    """Write the training loss every N steps to loss_trace.jsonl in the run folder (and a summary at the end)."""

    name: Literal["loss_trace"] = "loss_trace"
    every: int = Field(1, gt=0, description="record every this many steps")


@hookimpl
def register_attentions(register):
    register(CubicAttentionConfig, "qtoy_example_plugin.attention:CubicAttention")


@hookimpl
def register_mlps(register):
    register(TrilinearMLPConfig, "qtoy_example_plugin.mlp:TrilinearMLP")


@hookimpl
def register_datasets(register):
    register(SumsDatasetConfig, "qtoy_example_plugin.dataset:SumsDataset")


@hookimpl
def register_callbacks(register):
    register(LossTraceConfig, "qtoy_example_plugin.callback:LossTrace")
