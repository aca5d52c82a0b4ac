"""Click option helpers shared by commands: component choices come from the registry, lazily."""

from __future__ import annotations

from typing import Any

import click


class RegistryChoice(click.ParamType):
    """A component name of one kind; the valid names are read from the registry when first needed."""

    def __init__(self, kind: str):
        self.kind = kind
        self.name = kind

    @property
    def choices(self) -> list[str]:
        from qtoy_registry import get_registry

        return get_registry().names(self.kind)

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "[" + "|".join(self.choices) + "]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from qtoy_registry import QtoyError, get_registry

        try:
            get_registry().get(self.kind, value)
        except QtoyError as exc:
            self.fail(str(exc), param, ctx)
        return value

    def shell_complete(self, ctx, param, incomplete):
        from click.shell_completion import CompletionItem

        return [CompletionItem(c) for c in self.choices if c.startswith(incomplete)]


def component_options(func):
    """--attn/--mlp/--pos/--norm with registry choices (plugins appear automatically)."""
    for flag, kind, help_text in reversed([
        ("--attn", "attention", "attention mechanism"),
        ("--mlp", "mlp", "MLP ('none' for attention-only)"),
        ("--pos", "positional", "positional encoding"),
        ("--norm", "norm", "normalisation"),
    ]):
        func = click.option(flag, kind, type=RegistryChoice(kind), default=None, help=help_text)(func)
    return func


def set_option(func):
    return click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
                        help="override any option, e.g. --set d_model=128 --set attention.impl=plain")(func)
