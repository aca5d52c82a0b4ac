"""The plugin registry: built-ins through entry points, isolation of broken plugins, duplicates."""

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
