"""The wheel installs only namespaced import names, and carries the built-ins' entry points."""

import subprocess
import sys
import zipfile

import pytest

from conftest import repo_root


@pytest.mark.slow
def test_wheel_top_level_names_and_entry_points(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(repo_root()), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("qtoy-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"qtoy_core", "qtoy_registry", "qtoy_plugins", "qtoy_cli"}
    for generic in ("cli", "registry", "plugins", "tests"):
        assert generic not in top
    assert "qtoy_plugins/attention/quadratic.py" in names
    from qtoy_cli.new_plugin import KINDS

    for kind, spec in KINDS.items():  # `qtoy new-plugin`'s templates are package data
        assert f"qtoy_cli/templates/new_plugin/{spec['impl_module']}.py.tmpl" in names
        assert f"qtoy_cli/templates/new_plugin/fields/{kind}.py.tmpl" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[qtoy]" in text and "qtoy_plugins.attention" in text
    assert "qtoy = qtoy_cli.main:main" in text
