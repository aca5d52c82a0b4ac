"""Entry point of the `qtoy` command. Subcommands load lazily, so `qtoy --help` imports no torch."""

from __future__ import annotations

import importlib
import os
import sys
import warnings

import click

# The hub is unreachable on many machines; without this a hub call retries for minutes. Users who
# want the hub set HF_HUB_OFFLINE=0 explicitly.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SUBCOMMANDS = {
    "list": ("qtoy_cli.components", "list_command"),
    "plugins": ("qtoy_cli.components", "plugins_command"),
    "config": ("qtoy_cli.components", "config_command"),
    "data": ("qtoy_cli.data", "data_group"),
    "train": ("qtoy_cli.train", "train_command"),
    "eval": ("qtoy_cli.use", "eval_command"),
    "generate": ("qtoy_cli.use", "generate_command"),
    "plot": ("qtoy_cli.plot", "plot_command"),
    "visualize": ("qtoy_cli.analysis", "visualize_command"),
    "analyze": ("qtoy_cli.analysis", "analyze_command"),
    "patch": ("qtoy_cli.patch", "patch_command"),
    "attribute": ("qtoy_cli.attribute", "attribute_command"),
    "attention": ("qtoy_cli.analysis", "attention_command"),
    "new-plugin": ("qtoy_cli.new_plugin", "new_plugin_command"),
    "checkpoints": ("qtoy_cli.dynamics", "checkpoints_command"),
    "similarity": ("qtoy_cli.dynamics", "similarity_command"),
    "dynamics": ("qtoy_cli.dynamics", "dynamics_command"),
    "push": ("qtoy_cli.push", "push_command"),
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported only when used (or when help lists them)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(SUBCOMMANDS))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in SUBCOMMANDS:
            module, attr = SUBCOMMANDS[name]
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="qtoy", prog_name="qtoy")
def cli() -> None:
    """qtoy: train, swap and read polynomial toy transformers.

    Components (attention, MLP, positional encoding, norm, optimizer, dataset, callback) come from
    plugins; `qtoy list` shows them and `qtoy plugins` shows which packages provide them.

    Environment: HF_HUB_OFFLINE=0 lets qtoy reach the Hugging Face hub (off by default);
    QTOY_MALLOC=system leaves glibc's malloc alone (by default qtoy keeps freed host memory for
    reuse, which makes eager CPU steps 15-45% faster; see docs/training.md).
    """
    # runs before any subcommand (not for --help): keep freed host memory for reuse, so eager steps do
    # not fault in and zero their large tensors again every step (QTOY_MALLOC=system to opt out)
    from qtoy_core.host_memory import apply_from_environment

    apply_from_environment()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    click.secho(f"Warning: {message}", fg="yellow", err=True)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; qtoy's own errors print as one clear message, never a traceback."""
    from qtoy_registry import QtoyError

    warnings.showwarning = _show_warning
    try:
        cli.main(args=argv, prog_name="qtoy", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except QtoyError as exc:
        click.secho(f"Error: {exc}", fg="red", err=True)
        sys.exit(2)
    except Exception as exc:
        from pydantic import ValidationError

        if isinstance(exc, ValidationError):
            from qtoy_core.errors import format_validation_error

            click.secho(f"Error: {format_validation_error(exc, exc.title)}", fg="red", err=True)
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
