"""The example notebooks run from top to bottom without errors (on the offline synthetic data).

Each notebook executes with nbclient in a fresh temporary working directory, with QTOY_CACHE in a
temporary folder shared by all of them (the synthetic tokenizer is trained once), on a kernel that
runs this very interpreter. Notebooks are stored without outputs.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
KERNEL = "qtoy-test-python"
CELL_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def notebook_env(tmp_path_factory):
    """A kernelspec that starts this interpreter, and a shared QTOY_CACHE."""
    base = tmp_path_factory.mktemp("notebooks")
    spec = base / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "qtoy tests", "language": "python"}))
    cache = base / "qtoy-cache"
    cache.mkdir()
    return {"jupyter_path": str(base / "jupyter"), "cache": str(cache)}


def test_there_are_four_notebooks_stored_without_outputs():
    assert [p.name for p in NOTEBOOKS] == ["01_train_and_loss_view.ipynb", "02_mathematical_framework.ipynb",
                                           "03_bilinear_dynamics.ipynb", "04_a_circuit_tested.ipynb"]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.get("outputs") and cell.get("execution_count") is None, f"{path.name} has outputs"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_without_errors(path, notebook_env, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("JUPYTER_PATH", notebook_env["jupyter_path"] + os.pathsep + os.environ.get("JUPYTER_PATH", ""))
    monkeypatch.setenv("QTOY_CACHE", notebook_env["cache"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    # notebook 4 trains for minutes by default; a few steps run every cell (its final checks then only print)
    monkeypatch.setenv("QTOY_EXAMPLE_ITERS", "20")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=CELL_TIMEOUT_S, allow_errors=False,
                                     resources={"metadata": {"path": str(work)}})
    start = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as exc:  # show the failing cell, not nbclient's internals
        pytest.fail(f"{path.name}: a cell failed:\n{exc}", pytrace=False)
    seconds = time.perf_counter() - start
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors
    print(f"{path.name}: {seconds:.1f} s")
