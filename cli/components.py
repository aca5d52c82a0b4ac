"""`qtoy list`, `qtoy plugins`, `qtoy config`: what is registered and what a config resolves to."""

from __future__ import annotations

import json

import click

from .options import component_options, set_option


def _kind_of(word: str) -> str | None:
    from qtoy_registry import KIND_HOOKS

    word = word.lower()
    for kind in KIND_HOOKS:
        if word in (kind, kind + "s", "optim" if kind == "optimizer" else kind):
            return kind
    return None


@click.command("list")
@click.argument("kind", required=False)
@click.argument("pattern", required=False)
@click.option("--json", "as_json", is_flag=True, help="print JSON for scripts")
def list_command(kind: str | None, pattern: str | None, as_json: bool) -> None:
    """List registered components, optionally of one KIND, filtered by a wildcard PATTERN.

    Examples: `qtoy list`, `qtoy list attention`, `qtoy list attention 'quad*'`, `qtoy list '*linear'`.
    """
    from qtoy_registry import KIND_HOOKS, get_registry

    if kind is not None and _kind_of(kind) is None:
        if pattern is not None:
            raise click.BadParameter(f"unknown kind {kind!r}; kinds are: {', '.join(KIND_HOOKS)}", param_hint="KIND")
        kind, pattern = None, kind  # `qtoy list 'quad*'`: a pattern across all kinds
    kind = _kind_of(kind) if kind else None
    components = get_registry().components(kind, pattern)
    rows = [{"kind": c.kind, "name": c.name, "provider": c.provider.distribution, "version": c.provider.version,
             "description": c.description} for c in components]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="qtoy components" + (f" ({kind})" if kind else ""), title_justify="left")
    for col in ("kind", "name", "provider", "description"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["kind"], r["name"], f"{r['provider']} {r['version']}", r["description"])
    Console().print(table)
    if not rows:
        click.echo("No component matches.", err=True)


@click.command("plugins")
def plugins_command() -> None:
    """Show the loaded plugin packages (JSON): name, version, entry points and hooks."""
    from qtoy_registry import get_registry

    registry = get_registry()
    registry.table  # calling the hooks surfaces plugins whose hooks fail
    by_dist: dict[str, dict] = {}
    for p in registry.plugins():
        entry = by_dist.setdefault(p.distribution, {"name": p.distribution, "version": p.version,
                                                    "entry_points": [], "hooks": []})
        entry["entry_points"].append(p.name)
        entry["hooks"] = sorted(set(entry["hooks"]) | set(p.hooks))
    click.echo(json.dumps(list(by_dist.values()), indent=2))


@click.command("config")
@click.argument("model_type", required=False)
@component_options
@set_option
def config_command(model_type, attention, mlp, positional, norm, assignments) -> None:
    """Print the fully resolved, validated model config for MODEL_TYPE as JSON.

    MODEL_TYPE is attention_only_<N>L or transformer_<N>L (default: from the MLP, or attention_only_1L).
    """
    from qtoy_core.config import make_model_config
    from qtoy_core.overrides import apply_overrides

    options = {k: v for k, v in dict(attention=attention, mlp=mlp, positional=positional, norm=norm).items() if v}
    base = {"model_type": model_type} if model_type else {}
    data = apply_overrides({**base, **options}, assignments)
    config = make_model_config(data.pop("model_type", None), **data)
    click.echo(config.model_dump_json(indent=2))
