"""Test fixtures for the example plugin.

The tests run both ways: with the package installed (`pip install .`: the `qtoy` entry point loads
it, exactly as for users) and from a source checkout (the plugin module is then registered
in-process for each test, and removed after it).
"""

import sys
from pathlib import Path

import pytest

try:
    import qtoy_example_plugin  # noqa: F401  (installed)
except ImportError:  # a source checkout: import it from src/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

DISTRIBUTION = "qtoy-example-plugin"


@pytest.fixture(autouse=True)
def _offline_cache(monkeypatch, tmp_path_factory):
    """Trained tokenizers go to a temporary cache, not the user's."""
    monkeypatch.setenv("QTOY_CACHE", str(tmp_path_factory.getbasetemp() / "qtoy-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def registry():
    """qtoy's registry with this plugin's components in it."""
    import qtoy_example_plugin
    from qtoy_core import get_registry, reset_registry

    reset_registry()
    registry = get_registry()
    installed = DISTRIBUTION in {p.distribution for p in registry.plugins()}
    if not installed:
        registry.add_plugin(qtoy_example_plugin, name="qtoy_example_plugin", distribution=DISTRIBUTION)
    yield registry
    if not installed:
        registry.remove_plugin("qtoy_example_plugin")
    reset_registry()
