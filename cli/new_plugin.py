"""`qtoy new-plugin NAME --kind KIND`: write a skeleton plugin package that installs and registers as is.

The skeleton is the smallest complete plugin: a `pyproject.toml` with the `qtoy` entry point, a
config class and its hook (no torch import), the implementation (a lazy "module:attr"
reference), and a pytest test that passes both installed and from the source folder. The files are
templates in `templates/new_plugin/` (package data), filled by plain replacement of `__NAME__`-style
placeholders (so the Python inside keeps its braces); tests/test_cli_basics.py checks the example
plugin (examples/qtoy-example-plugin) against them.
"""

from __future__ import annotations

import keyword
import re
from importlib.resources import files
from pathlib import Path

import click

TEMPLATES = files(__package__ or "qtoy_cli") / "templates" / "new_plugin"

# kind -> what differs: the config base, the implementation's module (<impl_module>.py.tmpl) and
# name, the config body (fields/<kind>.py.tmpl, after `name`), the test body (<test>.py.tmpl, after
# test_header.py.tmpl) with what it imports, and the README's usage line.
COMPONENT_TEST = {"test": "test_component", "test_modules": "import pytest\nimport torch\n",
                  "test_imports": "NotPolynomialError, build_model, build_optimizer, contract_logits, to_tensor_network"}
KINDS: dict[str, dict[str, str]] = {
    "attention": {
        "base": "AttentionConfig", "impl_module": "attention", "impl": "__CLASS__Attention", **COMPONENT_TEST,
        "description": "Polynomial attention: pattern = (q.k / d_head)^power, causal, no softmax.",
        "usage": "Train with it: `qtoy train --attn __NAME__`, options with `--set attention.power=3`.",
    },
    "mlp": {
        "base": "MLPConfig", "impl_module": "mlp", "impl": "__CLASS__MLP", **COMPONENT_TEST,
        "description": "Squared MLP: W_out((W_in x)^2), a quadratic form per output, no activation function.",
        "usage": "Train with it: `qtoy train --mlp __NAME__` (a transformer_<N>L model type).",
    },
    "positional": {
        "base": "PositionalConfig", "impl_module": "positional", "impl": "__CLASS__Positional", **COMPONENT_TEST,
        "description": "Fixed sinusoidal position vectors added to the residual stream.",
        "usage": "Train with it: `qtoy train --pos __NAME__`.",
    },
    "norm": {
        "base": "NormConfig", "impl_module": "norm", "impl": "__CLASS__Norm", **COMPONENT_TEST,
        "description": "LayerNorm over d_model with a learned gain and bias (not a polynomial).",
        "usage": "Train with it: `qtoy train --norm __NAME__`.",
    },
    "optimizer": {
        "base": "OptimizerConfig", "impl_module": "optimizer", "impl": "build___NAME__",
        "test": "test_optimizer", "test_modules": "import torch\n", "test_imports": "build_model, build_optimizer",
        "description": "SGD with momentum; weight decay on matrices only.",
        "usage": "Train with it: `qtoy train --optimizer __NAME__ --set optimizer.lr=0.5`.",
    },
    "dataset": {
        "base": "TextDatasetConfig", "impl_module": "dataset", "impl": "__CLASS__Dataset",
        "test": "test_dataset", "test_modules": "", "test_imports": "RunConfig, Trainer, build_dataset",
        "description": "A small offline corpus of generated sentences, with a 300-token byte-level BPE.",
        "usage": "Train on it: `qtoy train --dataset __NAME__`; preview it: `qtoy data preview --dataset __NAME__`.",
    },
    "callback": {
        "base": "CallbackConfig", "impl_module": "callback", "impl": "__CLASS__Callback",
        "test": "test_callback", "test_modules": "import torch\n", "test_imports": "RunConfig, Trainer, read_jsonl",
        "description": "Write the training loss every N steps to __NAME__.jsonl in the run folder.",
        "usage": "Train with it: `qtoy train --callback __NAME__`.",
    },
}

NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9._-]*$")
COMPONENT_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")
QTOY_MIN = "0.1"


def names_for(name: str, component: str | None) -> dict[str, str]:
    """The distribution, import, component and class names derived from NAME (and --component)."""
    if not NAME_PATTERN.match(name):
        raise click.BadParameter(f"{name!r} is not a valid package name: use letters, digits, '-', '_' and '.', "
                                 f"starting with a letter (e.g. qtoy-cubic)", param_hint="NAME")
    dist = re.sub(r"[-_.]+", "-", name).lower()
    module = dist.replace("-", "_")
    if keyword.iskeyword(module) or not module.isidentifier():
        raise click.BadParameter(f"{name!r} gives the import name {module!r}, which is not a Python identifier",
                                 param_hint="NAME")
    if component is None:
        component = re.sub(r"^qtoy_", "", module) or module
    if not COMPONENT_PATTERN.match(component):
        raise click.BadParameter(f"{component!r} is not a valid component name: use lowercase letters, digits and "
                                 f"'_', starting with a letter", param_hint="--component")
    cls = "".join(part.capitalize() for part in component.split("_") if part) or "Component"
    return {"__DIST__": dist, "__MODULE__": module, "__NAME__": component, "__CLASS__": cls}


def template(name: str) -> str:
    """The text of templates/new_plugin/<name>.tmpl."""
    return (TEMPLATES / f"{name}.tmpl").read_text(encoding="utf-8")


def render(kind: str, names: dict[str, str]) -> dict[str, str]:
    """Relative path -> text of every file of the skeleton."""
    from qtoy_registry import KIND_HOOKS

    spec = KINDS[kind]
    fields = template(f"fields/{kind}.py")
    subs = {**names, "__KIND__": kind, "__HOOK__": KIND_HOOKS[kind], "__BASE__": spec["base"],
            "__IMPL_MODULE__": spec["impl_module"], "__QTOY_MIN__": QTOY_MIN,
            "__TEST_IMPORTS__": spec["test_imports"],
            "__TEST_MODULES__": spec["test_modules"] + "\n" if spec["test_modules"] else "",
            "__PYDANTIC_IMPORT__": "from pydantic import Field\n\n" if "Field(" in fields else ""}
    subs["__IMPL__"] = _fill(spec["impl"], subs)
    subs["__CONFIG__"] = subs["__CLASS__"] + "Config"
    subs["__DESCRIPTION__"] = _fill(spec["description"], subs)
    subs["__FIELDS__"] = _fill(fields, subs)
    subs["__USAGE__"] = _fill(spec["usage"], subs)
    module = names["__MODULE__"]
    files = {
        "pyproject.toml": template("pyproject.toml"),
        "README.md": template("README.md"),
        f"src/{module}/__init__.py": template("package_init.py"),
        f"src/{module}/{spec['impl_module']}.py": template(f"{spec['impl_module']}.py"),
        "tests/conftest.py": template("conftest.py"),
        f"tests/test_{module}.py": template("test_header.py") + template(f"{spec['test']}.py"),
    }
    return {path: _fill(text, subs) for path, text in files.items()}


def _fill(text: str, subs: dict[str, str]) -> str:
    # longest placeholders first, so __IMPL_MODULE__ is not read as __IMPL__ + "MODULE__"
    for key in sorted(subs, key=len, reverse=True):
        text = text.replace(key, subs[key])
    return text


def write_plugin(name: str, kind: str, out: Path | None = None, component: str | None = None,
                 force: bool = False) -> tuple[Path, dict[str, str]]:
    """Write the skeleton; returns its folder and the derived names."""
    names = names_for(name, component)
    folder = Path(out) if out is not None else Path(names["__DIST__"])
    if folder.exists() and not folder.is_dir():
        raise click.UsageError(f"{folder} exists and is not a folder: choose another --out.")
    if folder.is_dir() and any(folder.iterdir()) and not force:
        raise click.UsageError(f"{folder} already exists and is not empty: choose another --out, or pass --force "
                               f"to overwrite the skeleton's files in it.")
    for path, text in render(kind, names).items():
        target = folder / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    return folder, names


@click.command("new-plugin")
@click.argument("name")
@click.option("--kind", type=click.Choice(list(KINDS)), default="attention", show_default=True,
              help="the kind of component the skeleton adds")
@click.option("--component", help="the component's name (default: NAME as an identifier, without 'qtoy-')")
@click.option("--out", type=click.Path(file_okay=False), help="folder to write (default: ./NAME)")
@click.option("--force", is_flag=True, help="write into a non-empty folder, overwriting the skeleton's files")
def new_plugin_command(name: str, kind: str, component: str | None, out: str | None, force: bool) -> None:
    """Write a skeleton plugin package NAME adding one component of --kind.

    The package installs and registers as is: a pyproject.toml with the `qtoy` entry point, the
    config class and hook, the implementation, and a passing pytest test. Example:

      qtoy new-plugin qtoy-cubic --kind attention && pip install -e ./qtoy-cubic && qtoy list attention
    """
    from qtoy_registry import QtoyError, get_registry

    names = names_for(name, component)
    try:
        existing = get_registry().get(kind, names["__NAME__"])
    except QtoyError:
        existing = None
    if existing is not None:
        raise click.UsageError(f"the {kind} {names['__NAME__']!r} is already provided by {existing.provider}; two "
                               f"plugins cannot register one name. Pick another with --component NAME.")
    folder, names = write_plugin(name, kind, Path(out) if out else None, component, force)
    click.echo(f"Wrote {names['__DIST__']} in {folder}: the {kind} {names['__NAME__']!r}.")
    click.echo("Next:")
    click.echo(f"  pip install -e {folder}        # or without -e, or `python -m build` to publish")
    click.echo(f"  qtoy list {kind} {names['__NAME__']}")
    click.echo(f"  pytest {folder}")
