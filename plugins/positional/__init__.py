"""Built-in positional encodings: rope (default), learned, none."""

from typing import Literal

from pydantic import Field

from qtoy_core import PositionalConfig, hookimpl


class RoPEConfig(PositionalConfig):
    """Rotary position embedding on queries and keys (rotate-half convention)."""

    name: Literal["rope"] = "rope"
    base: float = Field(10000.0, gt=1.0)

    def check_model(self, model) -> None:
        if model.d_head % 2:
            raise ValueError(f"rope needs an even d_head, but d_head is {model.d_head}: change d_model/n_head "
                             f"(or d_head), or use positional 'learned' or 'none'")

    @property
    def is_polynomial(self) -> bool:
        return True  # a fixed linear map per position


class LearnedPositionalConfig(PositionalConfig):
    """Learned absolute position embeddings added to the residual stream (n_ctx positions)."""

    name: Literal["learned"] = "learned"

    @property
    def is_polynomial(self) -> bool:
        return True


class NoPositionalConfig(PositionalConfig):
    """No positional information (the causal mask alone)."""

    name: Literal["none"] = "none"

    @property
    def is_polynomial(self) -> bool:
        return True


@hookimpl
def register_positionals(register):
    register(RoPEConfig, "qtoy_plugins.positional.rope:RoPE")
    register(LearnedPositionalConfig, "qtoy_plugins.positional.learned:LearnedPositional")
    register(NoPositionalConfig, "qtoy_plugins.positional.none:NoPositional")
