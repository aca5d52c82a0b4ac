"""The plugin registry: built-ins through entry points, isolation of broken plugins, duplicates."""

import json
import warnings

import pytest

from qtoy_registry import (
    DuplicateComponentError,
    PluginError,
    PluginWarning,
    UnknownComponentError,
    get_registry,
    reset_registry,
)

EXTRA_ATTENTION = """
from typing import Literal
from qtoy_core import AttentionConfig, hookimpl

class EchoConfig(AttentionConfig):
    '''Test attention.'''
    name: Literal["{name}"] = "{name}"

@hookimpl
def register_attentions(register):
    register(EchoConfig, "qtoy_plugins.attention.softmax:SoftmaxAttention")
"""


def test_builtins_register_through_entry_points_with_provider():
    registry = get_registry()
    assert {"quadratic", "bilinear", "softmax"} <= set(registry.names("attention"))
    assert {"bilinear", "gelu", "none"} <= set(registry.names("mlp"))
    assert {"rope", "learned", "none"} <= set(registry.names("positional"))
    assert {"none", "rmsnorm"} <= set(registry.names("norm"))
    assert {"muon", "adam"} <= set(registry.names("optimizer"))
    quadratic = registry.get("attention", "quadratic")
    assert quadratic.provider.distribution == "qtoy"
    assert quadratic.provider.version
    assert "qtoy" in {p.distribution for p in registry.plugins()}


def test_unknown_name_lists_available_and_points_at_plugins():
    with pytest.raises(UnknownComponentError) as info:
        get_registry().get("attention", "foo")
    msg = str(info.value)
    assert "Unknown attention 'foo'" in msg
    assert "quadratic" in msg and "softmax" in msg
    assert "qtoy plugins" in msg


def test_wildcard_listing():
    names = [c.name for c in get_registry().components("attention", "*linear")]
    assert names == ["bilinear"]
    kinds = {c.kind for c in get_registry().components(None, "bilinear")}
    assert kinds == {"attention", "mlp"}


def test_third_party_entry_point_registers_with_its_distribution(make_plugin_dist):
    make_plugin_dist("qtoy-echo", EXTRA_ATTENTION.format(name="echo"), version="2.3.4")
    comp = get_registry().get("attention", "echo")
    assert (comp.provider.distribution, comp.provider.version) == ("qtoy-echo", "2.3.4")
    assert comp.description == "Test attention."


def _load_with_warning(match: str):
    with pytest.warns(PluginWarning, match=match) as record:
        registry = get_registry()
        registry.table
    # the built-ins keep working
    assert "quadratic" in registry.names("attention")
    return registry, record


def test_plugin_that_fails_to_import_warns_once_and_the_rest_works(make_plugin_dist):
    make_plugin_dist("qtoy-broken", "raise ImportError('needs a missing library')")
    _, record = _load_with_warning("qtoy-broken.*needs a missing library")
    assert len([w for w in record if issubclass(w.category, PluginWarning)]) == 1


def test_hookimpl_with_wrong_signature_is_skipped(make_plugin_dist):
    make_plugin_dist("qtoy-badsig", """
from qtoy_core import hookimpl
@hookimpl
def register_attentions(register, surprise):
    pass
""")
    _load_with_warning("qtoy-badsig.*hook specifications")


def test_misspelled_hook_is_caught(make_plugin_dist):
    make_plugin_dist("qtoy-typo", """
from qtoy_core import hookimpl
@hookimpl
def register_attention(register):
    pass
""")
    _load_with_warning("qtoy-typo.*unknown hook.*register_attention")


def test_hook_that_raises_costs_only_its_own_components(make_plugin_dist):
    make_plugin_dist("qtoy-raises", """
from typing import Literal
from qtoy_core import MLPConfig, hookimpl
class HalfConfig(MLPConfig):
    name: Literal["half"] = "half"
@hookimpl
def register_mlps(register):
    register(HalfConfig, "x:y")
    raise RuntimeError("boom")
""")
    registry, _ = _load_with_warning("qtoy-raises.*register_mlps hook raised RuntimeError: boom")
    assert "half" not in registry.names("mlp")  # registrations of a failed hook are rolled back


def test_duplicate_name_is_an_error_naming_both_providers(make_plugin_dist):
    make_plugin_dist("qtoy-dupe", EXTRA_ATTENTION.format(name="quadratic"), version="9.9")
    with pytest.warns(PluginWarning, match="quadratic"):
        get_registry().table
    with pytest.raises(DuplicateComponentError) as info:
        get_registry().get("attention", "quadratic")
    assert "qtoy 0.1.0" in str(info.value) and "qtoy-dupe 9.9" in str(info.value)
    assert "softmax" in get_registry().names("attention")


def test_strict_mode_raises(make_plugin_dist, monkeypatch):
    make_plugin_dist("qtoy-broken2", "import not_a_module_anywhere")
    monkeypatch.setenv("QTOY_STRICT_PLUGINS", "1")
    reset_registry()
    with pytest.raises(PluginError, match="qtoy-broken2"):
        get_registry().table


def test_load_plugins_env_limits_third_party(make_plugin_dist, monkeypatch):
    make_plugin_dist("qtoy-echo2", EXTRA_ATTENTION.format(name="echo2"))
    monkeypatch.setenv("QTOY_LOAD_PLUGINS", "")
    reset_registry()
    assert "echo2" not in get_registry().names("attention")
    assert "quadratic" in get_registry().names("attention")  # built-ins always load
    monkeypatch.setenv("QTOY_LOAD_PLUGINS", "qtoy-echo2")
    reset_registry()
    assert "echo2" in get_registry().names("attention")


def test_in_process_plugin_and_removal():
    import types
    from typing import Literal

    from qtoy_core import AttentionConfig, hookimpl

    class TmpConfig(AttentionConfig):
        name: Literal["tmp"] = "tmp"

    plugin = types.SimpleNamespace(register_attentions=hookimpl(lambda register: register(TmpConfig, object)))
    registry = get_registry()
    registry.add_plugin(plugin, name="tmp-plugin")
    assert registry.get("attention", "tmp").provider.distribution == "<in-process>"
    registry.remove_plugin("tmp-plugin")
    assert "tmp" not in registry.names("attention")


def test_config_class_contract_is_checked(make_plugin_dist):
    make_plugin_dist("qtoy-loose", """
from qtoy_core import hookimpl
from pydantic import BaseModel
class Loose(BaseModel):
    name: str = "loose"
@hookimpl
def register_norms(register):
    register(Loose, "x:y")
""")
    with pytest.warns(PluginWarning, match="Literal"):
        get_registry().table


# ------------------------------------------------------------------------------------------------
# Built-ins without (or with stale) install metadata
# ------------------------------------------------------------------------------------------------
def _builtin_plugins(registry):
    return sorted(p.name for p in registry.plugins() if p.distribution == "qtoy")


def test_the_builtin_table_is_what_pyproject_declares():
    import tomllib

    from conftest import repo_root
    from qtoy_registry.registry import BUILTIN_PLUGINS

    declared = tomllib.loads((repo_root() / "pyproject.toml").read_text())["project"]["entry-points"]["qtoy"]
    assert declared == BUILTIN_PLUGINS


def test_with_metadata_each_builtin_registers_once():
    from qtoy_registry.registry import BUILTIN_PLUGINS

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second registration of a module would warn
        registry = get_registry()
        registry.table
    assert _builtin_plugins(registry) == sorted(BUILTIN_PLUGINS)
    modules = [m for m in registry.pm.get_plugins() if getattr(m, "__name__", "").startswith("qtoy_plugins.")]
    assert sorted(m.__name__ for m in modules) == sorted(BUILTIN_PLUGINS.values())


def test_without_entry_point_metadata_qtoy_list_still_lists_the_builtins(monkeypatch):
    """A source checkout on sys.path with no installed metadata: entry points find nothing."""
    import importlib.metadata
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "helpers"))
    from in_process import qtoy

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **_: [])
    code, output = qtoy("list", "--json")
    assert code == 0, output
    rows = {(r["kind"], r["name"]): r["provider"] for r in json.loads(output)}
    for key in [("attention", "quadratic"), ("attention", "bilinear"), ("mlp", "bilinear"), ("norm", "rmsnorm")]:
        assert rows[key] == "qtoy", key
    registry = get_registry()
    assert {"rope", "learned"} <= set(registry.names("positional")) and "adam" in registry.names("optimizer")
    assert "synthetic" in registry.names("dataset") and "dynamics" in registry.names("callback")


def test_stale_metadata_neither_hides_nor_doubles_a_builtin(tmp_path, monkeypatch):
    """Metadata of an older qtoy found first on sys.path: one entry point under an old module
    name, the rest missing. Every built-in is there once, and nothing warns about the old name."""
    import importlib

    from qtoy_registry.registry import BUILTIN_PLUGINS

    info = tmp_path / "qtoy-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: qtoy\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text("[qtoy]\nattention = qtoy_plugins.attention_renamed_away\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    assert importlib.metadata.distribution("qtoy").version == "0.0.1"  # the stale metadata is what is seen
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        registry = get_registry()
        assert "quadratic" in registry.names("attention")
    assert _builtin_plugins(registry) == sorted(BUILTIN_PLUGINS)
    assert registry.get("attention", "quadratic").provider.version == "0.0.1"
