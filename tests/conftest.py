import os
import sys
import textwrap
from pathlib import Path

import pytest

# The hub is unreachable in tests; without this a hub call retries for minutes.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_runtest_setup(item):
    """Tests marked `cuda` run where torch sees a CUDA device and skip cleanly elsewhere."""
    if item.get_closest_marker("cuda") is not None:
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")


@pytest.fixture(autouse=True)
def _fresh_registry(monkeypatch, tmp_path_factory):
    """Every test starts with the plugins as installed and the environment's plugin switches unset,
    and leaves no in-process plugin behind; in-process CLI runs leave malloc alone."""
    from qtoy_registry import reset_registry

    for var in ("QTOY_LOAD_PLUGINS", "QTOY_STRICT_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    # a CLI run in-process (CliRunner) would otherwise set the process-wide malloc switch for every
    # later test of this worker; subprocesses still run as users do (tests/test_host_memory.py)
    monkeypatch.setattr("qtoy_core.host_memory._glibc", lambda: None)
    monkeypatch.setenv("QTOY_CACHE", str(tmp_path_factory.getbasetemp() / "qtoy-cache"))
    reset_registry()
    yield
    reset_registry()


@pytest.fixture
def make_plugin_dist(tmp_path, monkeypatch):
    """Install a throwaway plugin distribution on sys.path: a module plus a real .dist-info folder
    with a `qtoy` entry point, found by importlib.metadata exactly like a pip-installed package."""

    def make(dist_name: str, module_source: str, version: str = "0.1.0") -> str:
        module = dist_name.replace("-", "_")
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(module_source))
        info = tmp_path / f"{module}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[qtoy]\n{module} = {module}\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        sys.modules.pop(module, None)
        import importlib

        importlib.invalidate_caches()
        return module

    return make


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


@pytest.fixture
def one_thread():
    """One torch thread: on a shared, loaded 2-core machine this is far faster than two, and exact."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
