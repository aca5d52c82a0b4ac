"""The plugin contract, pinned: qtoy_core's public API and the hook specifications.

`tests/snapshots/public_api.json` records what plugin packages rely on: the names in
`qtoy_core.__all__`, each hook's name and arguments, the entry-point group, and the signatures
(parameter names, kinds and defaults; not annotations) of the public functions and of the methods
and fields of the public classes. A name or hook that disappears, or a recorded signature that
changes, fails here: such a change breaks installed plugins. New names and hooks fail too, so that
each addition to the contract is deliberate; new methods on existing classes do not.

After a deliberate change, regenerate the snapshot and review its diff:

    QTOY_UPDATE_SNAPSHOTS=1 python -m pytest tests/test_public_api.py
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pluggy
import pytest

import qtoy_core
from conftest import repo_root

SNAPSHOT = Path(__file__).parent / "snapshots" / "public_api.json"
EXAMPLE = repo_root() / "examples" / "qtoy-example-plugin"
UPDATE = os.environ.get("QTOY_UPDATE_SNAPSHOTS", "").lower() in {"1", "true", "yes"}


# ------------------------------------------------------------------------------------------------
# What the snapshot records
# ------------------------------------------------------------------------------------------------
def _signature(obj) -> str:
    """Parameters with kinds and defaults, without annotations: what callers and overriders rely on."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return "<no signature>"
    params = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
    text = str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))
    return re.sub(r" at 0x[0-9a-fA-F]+", "", text)  # sentinel objects' addresses


def _own_classes(cls: type) -> list[type]:
    """cls and its bases defined by qtoy (not pydantic's BaseModel, torch's nn.Module, object...)."""
    return [c for c in inspect.getmro(cls) if c.__module__.split(".")[0].startswith("qtoy")]


def _class_api(cls: type) -> dict[str, str]:
    out: dict[str, str] = {}
    fields = getattr(cls, "model_fields", None)
    if isinstance(fields, dict):  # pydantic: fields with their type and default
        for name, field in fields.items():
            default = "<factory>" if field.default_factory is not None else repr(field.default)
            if field.is_required():
                default = "<required>"
            out[f"field {name}"] = f"{_type_name(field.annotation)} = {default}"
        extra = cls.model_config.get("extra")
        if extra:
            out["model_config extra"] = str(extra)
        if isinstance(getattr(cls, "kind", None), str):
            out["classvar kind"] = repr(cls.kind)
    for owner in _own_classes(cls):
        for name, member in vars(owner).items():
            if (name.startswith("_") and name != "__init__") or f"method {name}" in out or name in (fields or {}):
                continue
            if isinstance(member, property):
                out.setdefault(f"property {name}", "property")
            elif isinstance(member, (staticmethod, classmethod)):
                out.setdefault(f"method {name}", _signature(getattr(cls, name)))
            elif inspect.isfunction(member) and member.__module__.split(".")[0].startswith("qtoy"):
                out.setdefault(f"method {name}", _signature(member))
        if fields is None:  # attributes an implementation must provide (e.g. Attention.out_proj)
            for name in vars(owner).get("__annotations__", {}):
                if not name.startswith("_"):
                    out.setdefault(f"attribute {name}", "attribute")
    return dict(sorted(out.items()))


def _type_name(annotation) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    text = text or repr(annotation)
    return re.sub(r"\b(typing|pydantic\.functional_serializers|qtoy_core(\.\w+)*)\.", "", text)


def current_api() -> dict:
    from qtoy_registry import hookspecs

    names = sorted(qtoy_core.__all__)
    members = {}
    for name in names:
        obj = getattr(qtoy_core, name)
        if isinstance(obj, pluggy.HookimplMarker):  # its call signature is pluggy's, not qtoy's
            members[name] = {"hookimpl marker": obj.project_name}
        elif isinstance(obj, type):
            members[name] = {"class": _class_api(obj)}
        elif callable(obj):
            members[name] = {"function": _signature(obj)}
        else:
            members[name] = {"value": repr(obj)}
    hooks = {}
    for hook_name in sorted(n for n in dir(hookspecs) if n.startswith("register_")):
        fn = getattr(hookspecs, hook_name)
        opts = getattr(fn, f"{hookspecs.PROJECT_NAME}_spec", None)
        if opts is None:
            continue
        hooks[hook_name] = {"signature": _signature(fn),
                            "options": {k: v for k, v in sorted(opts.items()) if v not in (False, None)}}
    return {
        "entry_point_group": hookspecs.ENTRY_POINT_GROUP,
        "kind_hooks": hookspecs.KIND_HOOKS,
        "hooks": hooks,
        "__all__": names,
        "members": members,
    }


# ------------------------------------------------------------------------------------------------
# The snapshot
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def api() -> dict:
    return current_api()


@pytest.fixture(scope="module")
def snapshot(api) -> dict:
    if UPDATE or not SNAPSHOT.exists():
        SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
        SNAPSHOT.write_text(json.dumps(api, indent=1, sort_keys=False) + "\n", encoding="utf-8")
        if not UPDATE:
            pytest.fail(f"{SNAPSHOT} did not exist; it was written now: review and commit it")
    return json.loads(SNAPSHOT.read_text(encoding="utf-8"))


HOW = "If the change is deliberate, run QTOY_UPDATE_SNAPSHOTS=1 python -m pytest tests/test_public_api.py"


def test_hook_names_and_signatures_are_the_snapshot(api, snapshot):
    assert api["entry_point_group"] == snapshot["entry_point_group"], HOW
    assert api["kind_hooks"] == snapshot["kind_hooks"], f"the kinds or their hook names changed. {HOW}"
    assert api["hooks"] == snapshot["hooks"], f"a hook specification changed: installed plugins break. {HOW}"


def test_public_names_are_the_snapshot(api, snapshot):
    removed = sorted(set(snapshot["__all__"]) - set(api["__all__"]))
    added = sorted(set(api["__all__"]) - set(snapshot["__all__"]))
    assert not removed, f"names removed from qtoy_core.__all__ (plugins importing them break): {removed}. {HOW}"
    assert not added, f"names added to qtoy_core.__all__: {added}; record them in the snapshot. {HOW}"


def test_recorded_signatures_are_unchanged(api, snapshot):
    changed = []
    for name, recorded in snapshot["members"].items():
        now = api["members"].get(name)
        if now is None:
            continue  # reported by test_public_names_are_the_snapshot
        if set(recorded) != set(now):
            changed.append(f"{name}: was a {next(iter(recorded))}, is a {next(iter(now))}")
        elif "class" in recorded:
            for member, value in recorded["class"].items():
                if now["class"].get(member) != value:
                    changed.append(f"{name}.{member}: {value} -> {now['class'].get(member, 'removed')}")
        elif recorded != now:
            changed.append(f"{name}: {recorded} -> {now}")
    assert not changed, "the public API changed (plugins may break):\n  " + "\n  ".join(changed) + f"\n{HOW}"


def test_every_public_name_resolves_and_import_stays_torch_free():
    for name in qtoy_core.__all__:
        assert getattr(qtoy_core, name) is not None, name
    assert sorted(qtoy_core.__all__) == sorted(set(qtoy_core.__all__))
    code = ("import sys, qtoy_core\n"
            "from qtoy_core import hookimpl, AttentionConfig, TextDatasetConfig, CallbackConfig, KIND_HOOKS\n"
            "print(sorted(m for m in ('torch', 'numpy', 'quimb', 'tokenizers', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------------------------------------
# Plugins use the public API only
# ------------------------------------------------------------------------------------------------
def qtoy_imports(source: str, own: str) -> list[str]:
    """Imports of qtoy modules other than `qtoy_core` itself, or of names qtoy_core does not export."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            targets = [(node.module or "", alias.name) for alias in node.names]
        else:
            continue
        for module, name in targets:
            root = module.split(".")[0]
            if not root.startswith("qtoy") or root == own:
                continue
            if module != "qtoy_core":
                bad.append(f"import of {module}")
            elif name is not None and name not in qtoy_core.__all__:
                bad.append(f"qtoy_core.{name} is not public")
    return bad


def test_the_example_plugin_imports_only_the_public_api():
    files = sorted(EXAMPLE.rglob("*.py"))
    assert len(files) >= 6
    for path in files:
        assert not qtoy_imports(path.read_text(), own="qtoy_example_plugin"), path


def test_the_built_in_plugins_import_only_the_public_api():
    """qtoy's own components are written as a third party must write them: every module under
    plugins/ imports qtoy only as `from qtoy_core import <name in qtoy_core.__all__>` (its own
    modules relatively), so whatever a built-in can do, a plugin package can do too."""
    files = sorted((repo_root() / "plugins").rglob("*.py"))
    assert len(files) >= 20
    found = {str(path.relative_to(repo_root())): qtoy_imports(path.read_text(), own="qtoy_plugins")
             for path in files}
    assert {path: bad for path, bad in found.items() if bad} == {}
    assert qtoy_imports("from qtoy_core.ops.quadratic import quadratic_attention\n", own="x") \
        == ["import of qtoy_core.ops.quadratic"]  # the check sees what it forbids
    assert qtoy_imports("from qtoy_core import no_such_name\nimport qtoy_registry\n", own="x") \
        == ["qtoy_core.no_such_name is not public", "import of qtoy_registry"]


def test_new_plugin_skeletons_import_only_the_public_api():
    from qtoy_cli.new_plugin import KINDS, names_for, render

    for kind in KINDS:
        names = names_for(f"qtoy-x-{kind}", None)
        for path, text in render(kind, names).items():
            if path.endswith(".py"):
                assert not qtoy_imports(text, own=names["__MODULE__"]), (kind, path)


# ------------------------------------------------------------------------------------------------
# A plugin written against the public API alone, one component of every kind, in process
# ------------------------------------------------------------------------------------------------
def _public_api_plugin() -> types.ModuleType:
    """Built from source text so that it sees nothing but what it imports, like a real module."""
    source = '''
from typing import Literal

import torch
from torch import nn

from qtoy_core import (
    AttentionConfig, Callback, CallbackConfig, MLPConfig, NormConfig, OptimizerConfig, Positional,
    PositionalConfig, ProjectedAttention, TextDataset, TextDatasetConfig, append_to_cache, cached_tokenizer,
    causal_pattern, hookimpl, train_bpe,
)


class LinearAttention(ProjectedAttention):
    def mix(self, q, k, v, key_mask, state, **_):
        if state is not None:
            k, v = append_to_cache(state, k=k, v=v)
        return causal_pattern(q @ k.transpose(-1, -2) / self.d_head, key_mask) @ v


class LinAttnConfig(AttentionConfig):
    """Linear attention (pattern = q.k / d_head)."""
    name: Literal["api_linear"] = "api_linear"


class ReluMLP(nn.Module):
    def __init__(self, model, config):
        super().__init__()
        self.w_in = nn.Linear(model.d_model, model.d_mlp)
        self.out_proj = nn.Linear(model.d_mlp, model.d_model)

    def forward(self, x):
        return self.out_proj(torch.relu(self.w_in(x)))


class ReluConfig(MLPConfig):
    """ReLU MLP."""
    name: Literal["api_relu"] = "api_relu"


class NoPos(Positional):
    def __init__(self, model, config):
        super().__init__()


class NoPosConfig(PositionalConfig):
    """No positions."""
    name: Literal["api_nopos"] = "api_nopos"


class Scale(nn.Module):
    def __init__(self, model, config):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(model.d_model))

    def forward(self, x):
        return x * self.gain


class ScaleConfig(NormConfig):
    """A learned gain."""
    name: Literal["api_scale"] = "api_scale"


def build_sgd(named_parameters, config):
    return torch.optim.SGD([p for _, p in named_parameters], lr=config.lr)


class SGDConfig(OptimizerConfig):
    """Plain SGD."""
    name: Literal["api_sgd"] = "api_sgd"
    lr: float = 0.5


class WordsSource:
    finite = True

    def open(self, *, start=0, state=None):
        for i in range(start, 300):
            yield i, " ".join(["red", "green", "blue"][(i + j) % 3] for j in range(i % 7 + 3))

    def describe(self):
        return {"source": "words"}


class Words(TextDataset):
    def make_source(self):
        return WordsSource()

    def load_tokenizer(self):
        texts = [text for _, text in WordsSource().open()]
        return cached_tokenizer("api-words-v280", lambda: train_bpe(texts, vocab_size=280))


class WordsConfig(TextDatasetConfig):
    """Colour words."""
    name: Literal["api_words"] = "api_words"
    val_fraction: float = 0.1


class Steps(Callback):
    def __init__(self, config):
        self.seen = []

    def on_step_end(self, trainer, metrics):
        self.seen.append(trainer.step)
        (trainer.run.path / "api_steps.txt").write_text(repr(self.seen))


class StepsConfig(CallbackConfig):
    """Record the steps."""
    name: Literal["api_steps"] = "api_steps"


@hookimpl
def register_attentions(register):
    register(LinAttnConfig, LinearAttention)


@hookimpl
def register_mlps(register):
    register(ReluConfig, ReluMLP)


@hookimpl
def register_positionals(register):
    register(NoPosConfig, NoPos)


@hookimpl
def register_norms(register):
    register(ScaleConfig, Scale)


@hookimpl
def register_optimizers(register):
    register(SGDConfig, build_sgd)


@hookimpl
def register_datasets(register):
    register(WordsConfig, Words)


@hookimpl
def register_callbacks(register):
    register(StepsConfig, Steps)
'''
    assert not qtoy_imports(source, own="")
    module = types.ModuleType("qtoy_api_plugin")
    exec(compile(source, "<qtoy_api_plugin>", "exec", dont_inherit=True), module.__dict__)
    return module


@pytest.fixture
def api_plugin():
    registry = qtoy_core.get_registry()
    name = registry.add_plugin(_public_api_plugin(), name="qtoy_api_plugin")
    yield registry
    registry.remove_plugin(name)


def test_a_public_api_plugin_registers_and_trains_with_every_kind(api_plugin, tmp_path):
    from qtoy_registry import KIND_HOOKS

    names = {kind: f"api_{word}" for kind, word in zip(
        KIND_HOOKS, ["linear", "relu", "nopos", "scale", "sgd", "words", "steps"])}
    for kind, name in names.items():
        assert api_plugin.get(kind, name).provider.distribution == "<in-process>"
    assert {p.name for p in api_plugin.plugins()} >= {"qtoy_api_plugin"}
    config = qtoy_core.RunConfig.model_validate({
        "model": {"model_type": "transformer_1L", "attention": names["attention"], "mlp": names["mlp"],
                  "positional": names["positional"], "norm": names["norm"], "d_model": 16, "n_head": 2, "n_ctx": 16},
        "optimizer": names["optimizer"],
        "data": {"dataset": names["dataset"]},
        "callbacks": [names["callback"]],
        "train": {"max_iters": 3, "batch_size": 2, "eval_interval": 3, "eval_iters": 1, "warmup": 1,
                  "precision": "fp32", "compile": False, "device": "cpu"},
    })
    summary = qtoy_core.Trainer(config, tmp_path / "run").fit()
    assert summary["steps"] == 3 and summary["val_loss"] == summary["val_loss"]
    assert (tmp_path / "run" / "api_steps.txt").read_text() == "[1, 2, 3]"
    model = qtoy_core.ToyTransformer.from_pretrained(tmp_path / "run")
    assert type(model.blocks[0].attn).__name__ == "LinearAttention"
    assert json.loads((tmp_path / "run" / "config.json").read_text())["plugins"]["norm"]["name"] == "api_scale"
