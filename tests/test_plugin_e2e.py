"""Third-party plugins end to end, the way a stranger uses them: real `pip install`s into a fresh
virtual environment, and the installed `qtoy` command in separate processes.

The environment reuses this interpreter's installed packages (torch and the other heavy
dependencies) through a folder of links added as a site directory; qtoy itself is left out of that
folder and installed into the new environment from a copy of this repository (non-editable,
`--no-deps --no-build-isolation`, no index), so what runs is the installed package. Plugin
packages are installed the same way, from copies, so no build output lands in the repository.

Marked slow (it is the longest part of the suite) but part of the default run.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import textwrap
import tomllib
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import repo_root

EXAMPLE = repo_root() / "examples" / "qtoy-example-plugin"
QTOY_VERSION = tomllib.loads((repo_root() / "pyproject.toml").read_text())["project"]["version"]
QTOY_SOURCES = ("pyproject.toml", "setup.py", "README.md", "qtoy_core", "registry", "plugins", "cli")
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist", ".pytest_cache")
# Small, fast training flags (the model is tiny; fp32 and no compile keep it quick on any CPU).
TINY = ["--d-model", "32", "--n-head", "2", "--n-ctx", "32", "--batch-size", "4", "--eval-interval", "5",
        "--eval-iters", "2", "--warmup", "1", "--precision", "fp32", "--no-compile", "--device", "cpu"]


# ------------------------------------------------------------------------------------------------
# A fresh environment
# ------------------------------------------------------------------------------------------------
class Env:
    """A virtual environment with qtoy installed, and helpers to run pip and qtoy in it."""

    def __init__(self, root: Path):
        self.root = root
        self.bin = root / "venv" / ("Scripts" if os.name == "nt" else "bin")
        self.python = self.bin / ("python.exe" if os.name == "nt" else "python")
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("QTOY_", "PYTEST_", "PIP_")) and k not in ("PYTHONPATH", "PYTHONHOME")}
        self.env.update({
            "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}", "VIRTUAL_ENV": str(root / "venv"),
            "QTOY_CACHE": str(root / "qtoy-cache"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1",
            "PYTHONDONTWRITEBYTECODE": "1", "COLUMNS": "200", "NO_COLOR": "1", "OMP_NUM_THREADS": "1",
        })

    def run(self, *args: str | Path, check: bool = True, env: dict | None = None, cwd: Path | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd or self.root,
                              env={**self.env, **(env or {})}, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, args))} exited {proc.returncode}\n"
                                 f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
        return proc

    def pip(self, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess:
        return self.run(self.python, "-m", "pip", *args, check=check)

    def install(self, *folders: Path) -> None:
        """Non-editable installs of local packages, from copies (the build writes into its source)."""
        copies = []
        for folder in folders:
            copy = self.root / "sources" / folder.name
            if not copy.exists():
                shutil.copytree(folder, copy, ignore=IGNORE)
            copies.append(copy)
        self.pip("install", "--no-deps", "--no-build-isolation", "--no-index", "--no-compile", "-q", *copies)

    def qtoy(self, *args: str | Path, check: bool = True, **env: str) -> subprocess.CompletedProcess:
        return self.run(self.bin / "qtoy", *args, check=check, env=env)


def _site_dirs() -> list[Path]:
    dirs = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()]
    return [Path(d) for d in dict.fromkeys(dirs) if Path(d).is_dir()]


def make_env(root: Path) -> Env:
    """venv without pip (fast) + this interpreter's packages, qtoy excepted, as a site directory."""
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True,
                   capture_output=True)
    env = Env(root)
    deps = root / "deps"
    deps.mkdir()
    for site_dir in _site_dirs():
        for entry in sorted(os.listdir(site_dir)):
            if "qtoy" in entry.lower() or (deps / entry).exists() or entry == "__pycache__":
                continue  # qtoy (and any editable hook of it) comes from the real install below
            (deps / entry).symlink_to(site_dir / entry, target_is_directory=(site_dir / entry).is_dir())
    purelib = env.run(env.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    # an `import` line in a .pth runs at startup: addsitedir also processes the deps' own .pth files
    (Path(purelib) / "_qtoy_test_deps.pth").write_text(f"import site; site.addsitedir({str(deps)!r})\n")
    return env


@pytest.fixture(scope="session")
def qtoy_wheel(tmp_path_factory) -> Path:
    """qtoy's wheel, built once per test process from a copy of the repository."""
    out = tmp_path_factory.mktemp("qtoy-wheel")
    src = out / "qtoy-src"
    src.mkdir()
    for name in QTOY_SOURCES:
        path = repo_root() / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=IGNORE)
        else:
            shutil.copy2(path, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                           "--no-index", "-q", "-w", str(out)], capture_output=True, text=True,
                          env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert proc.returncode == 0, f"building qtoy's wheel failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    (wheel,) = out.glob("qtoy-*.whl")
    return wheel


@pytest.fixture
def env(tmp_path, qtoy_wheel) -> Env:
    env = make_env(tmp_path / "e2e")
    env.pip("install", "--no-deps", "--no-index", "-q", qtoy_wheel)
    where = env.run(env.python, "-c", "import qtoy_core; print(qtoy_core.__file__)").stdout
    assert str(tmp_path) in where and str(repo_root()) not in where  # the installed copy, not the repository
    return env


def _no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr


def _warnings(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("Warning:")]


# ------------------------------------------------------------------------------------------------
# The example plugin: install, list, train, load, analyse, uninstall
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_example_plugin_from_install_to_uninstall(env):
    env.install(EXAMPLE)

    plugins = {p["name"]: p for p in json.loads(env.qtoy("plugins").stdout)}
    example = plugins["qtoy-example-plugin"]
    assert example["version"] == "0.1.0"
    assert example["entry_points"] == ["qtoy_example_plugin"]
    assert example["hooks"] == ["register_attentions", "register_callbacks", "register_datasets", "register_mlps"]

    table = env.qtoy("list", "attention")
    row = next(line for line in table.stdout.splitlines() if " cubic " in line)
    assert "qtoy-example-plugin 0.1.0" in row
    rows = {(r["kind"], r["name"]): r for r in json.loads(env.qtoy("list", "--json").stdout)}
    for key in [("attention", "cubic"), ("mlp", "trilinear"), ("dataset", "sums"), ("callback", "loss_trace")]:
        assert rows[key]["provider"] == "qtoy-example-plugin" and rows[key]["description"]
    assert rows[("attention", "quadratic")]["provider"] == "qtoy"
    # listing reads the plugin's configs only: its lazy "module:attr" references keep torch out
    probe = "import sys; from qtoy_registry import get_registry; get_registry().table; print('torch' in sys.modules)"
    assert env.run(env.python, "-c", probe).stdout.strip() == "False"

    # a run made of the plugin's components: attention, MLP, dataset and callback
    run = env.root / "runs" / "cubic"
    env.qtoy("train", "--attn", "cubic", "--mlp", "trilinear", "--dataset", "sums", "--callback", "loss_trace",
             "--max-iters", "5", *TINY, "--set", "dataset.n_documents=300", "--out", run, "--quiet")
    document = json.loads((run / "config.json").read_text())
    assert document["plugins"]["attention"] == {"name": "cubic", "distribution": "qtoy-example-plugin",
                                                "version": "0.1.0"}
    assert document["plugins"]["mlp"]["distribution"] == "qtoy-example-plugin"
    trace = [json.loads(line) for line in (run / "loss_trace.jsonl").read_text().splitlines()]
    assert [r["step"] for r in trace if "step" in r] == [1, 2, 3, 4, 5]

    result = json.loads(env.qtoy("eval", run, "--eval-iters", "2", "--json").stdout)
    assert result["dataset"] == "sums" and result["loss"] == result["loss"]  # finite, not nan

    # `qtoy analyze` is another engineer's command: checked here as soon as it exists
    if "analyze" in env.qtoy("--help").stdout:
        out = env.root / "analysis.json"
        env.qtoy("analyze", run, "--json", out, "--out", env.root / "report.html", "--no-plots")
        report = json.loads(out.read_text())
        assert report["model"]["attention"] == "cubic" and report["model"]["mlp"] == "trilinear"
        assert (env.root / "report.html").exists()
    else:
        warnings.warn("`qtoy analyze` does not exist yet: its end-to-end check on a plugin run was not made")

    # the example's own tests pass against the installed package
    tests = env.root / "sources" / EXAMPLE.name / "tests"
    env.run(env.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", tests)

    env.pip("uninstall", "-y", "qtoy-example-plugin")
    proc = env.qtoy("eval", run, check=False)
    assert proc.returncode != 0
    _no_traceback(proc)
    assert proc.stderr.startswith("Error: ") and "needs the attention 'cubic'" in proc.stderr
    assert "provided by the package 'qtoy-example-plugin' (version 0.1.0)" in proc.stderr
    assert "pip install qtoy-example-plugin" in proc.stderr
    listed = json.loads(env.qtoy("list", "--json").stdout)
    assert "cubic" not in {r["name"] for r in listed} and "quadratic" in {r["name"] for r in listed}


# ------------------------------------------------------------------------------------------------
# Broken plugins: one clear warning each, the CLI keeps working; strict mode makes them errors
# ------------------------------------------------------------------------------------------------
ATTENTION_PLUGIN = """
from typing import Literal
from qtoy_core import AttentionConfig, hookimpl

class Config(AttentionConfig):
    '''An attention from a test package.'''
    name: Literal["{name}"] = "{name}"

@hookimpl
def register_attentions(register):
    register(Config, "qtoy_plugins.attention.softmax:SoftmaxAttention")
"""

BROKEN = {
    # distribution: (module source, entry-point name or None for the module name, what the message says)
    "qtoy-broken-import": ("import qtoy_no_such_dependency\n", None,
                           "importing qtoy_broken_import raised ModuleNotFoundError"),
    "qtoy-bad-signature": ("from qtoy_core import hookimpl\n\n@hookimpl\ndef register_mlps(register, extra):\n"
                           "    pass\n", None, "do not match qtoy's hook specifications"),
    "qtoy-hook-raises": ("from qtoy_core import hookimpl\n\n@hookimpl\ndef register_norms(register):\n"
                         "    raise RuntimeError('norms are not ready')\n", None,
                         "register_norms hook raised RuntimeError: norms are not ready"),
    "qtoy-name-taken": (ATTENTION_PLUGIN.format(name="quadratic"), None,
                        f"registered by more than one plugin: qtoy {QTOY_VERSION} and qtoy-name-taken 0.1.0"),
    "qtoy-entry-point-taken": (ATTENTION_PLUGIN.format(name="echo"), "attention",
                               "entry-point name 'attention' is already used by the package 'qtoy'"),
}


def write_package(root: Path, dist: str, source: str, entry_point: str | None = None) -> Path:
    module = dist.replace("-", "_")
    folder = root / dist
    (folder / module).mkdir(parents=True)
    (folder / module / "__init__.py").write_text(textwrap.dedent(source))
    (folder / "pyproject.toml").write_text(textwrap.dedent(f"""\
        [build-system]
        requires = ["setuptools>=69"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "{dist}"
        version = "0.1.0"

        [project.entry-points.qtoy]
        {entry_point or module} = "{module}"

        [tool.setuptools]
        packages = ["{module}"]
        """))
    return folder


@pytest.mark.slow
def test_broken_plugins_cost_one_warning_each_and_strict_mode_fails(env):
    packages = [write_package(env.root / "broken", dist, source, ep) for dist, (source, ep, _) in BROKEN.items()]
    env.install(*packages)

    for dist, (_, _, message) in BROKEN.items():
        proc = env.qtoy("list", "--json", QTOY_LOAD_PLUGINS=dist)  # only this third-party package loads
        assert [w for w in _warnings(proc)] and all(dist in w for w in _warnings(proc)), proc.stderr
        assert len(_warnings(proc)) == 1, proc.stderr
        assert message in proc.stderr
        names = {(r["kind"], r["name"]) for r in json.loads(proc.stdout)}
        assert {("attention", "quadratic"), ("mlp", "bilinear"), ("norm", "rmsnorm")} <= names
        _no_traceback(proc)

        strict = env.qtoy("list", check=False, QTOY_LOAD_PLUGINS=dist, QTOY_STRICT_PLUGINS="1")
        assert strict.returncode != 0
        assert strict.stderr.startswith("Error: ") and dist in strict.stderr and message in strict.stderr
        _no_traceback(strict)

    # the duplicate name is an error where it is used, naming both providers
    proc = env.qtoy("config", "--attn", "quadratic", check=False, QTOY_LOAD_PLUGINS="qtoy-name-taken")
    assert proc.returncode != 0 and f"qtoy {QTOY_VERSION} and qtoy-name-taken 0.1.0" in proc.stderr
    _no_traceback(proc)
    assert json.loads(env.qtoy("config", "--attn", "softmax", QTOY_LOAD_PLUGINS="qtoy-name-taken").stdout)

    # all of them at once: one warning each, and the CLI still works
    proc = env.qtoy("list")
    assert len(_warnings(proc)) == len(BROKEN), proc.stderr
    assert " quadratic " in proc.stdout and " softmax " in proc.stdout
    assert json.loads(env.qtoy("plugins").stdout)[0]["name"] == "qtoy"


# ------------------------------------------------------------------------------------------------
# `qtoy new-plugin`: every kind's skeleton installs, registers, and passes its own tests
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_new_plugin_skeletons_install_register_and_pass_their_tests(env):
    from qtoy_cli.new_plugin import KINDS

    folders = []
    for kind in KINDS:
        folder = env.root / "new" / f"qtoy-e2e-{kind}"
        out = env.qtoy("new-plugin", f"qtoy-e2e-{kind}", "--kind", kind, "--out", folder).stdout
        assert f"the {kind} 'e2e_{kind}'" in out
        folders.append(folder)
    env.install(*folders)

    listed = {(r["kind"], r["name"]): r["provider"] for r in json.loads(env.qtoy("list", "--json").stdout)}
    for kind in KINDS:
        assert listed[(kind, f"e2e_{kind}")] == f"qtoy-e2e-{kind}"
    env.run(env.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(env.root / "sources" / f.name for f in folders))


# ------------------------------------------------------------------------------------------------
# `qtoy new-plugin`, in process (fast)
# ------------------------------------------------------------------------------------------------
def test_new_plugin_refuses_bad_names_taken_names_and_full_folders(tmp_path):
    from qtoy_cli.main import cli

    def invoke(*args):
        return CliRunner().invoke(cli, ["new-plugin", *map(str, args)])

    assert "not a valid package name" in invoke("9lives", "--out", tmp_path / "a").output
    taken = invoke("qtoy-quadratic", "--kind", "attention", "--out", tmp_path / "b")
    assert taken.exit_code != 0 and "already provided by qtoy" in taken.output and "--component" in taken.output
    ok = invoke("qtoy-quadratic", "--component", "quad2", "--out", tmp_path / "c")
    assert ok.exit_code == 0, ok.output
    init = (tmp_path / "c" / "src" / "qtoy_quadratic" / "__init__.py").read_text()
    assert 'name: Literal["quad2"] = "quad2"' in init and "\nimport torch" not in init
    again = invoke("qtoy-quadratic", "--component", "quad2", "--out", tmp_path / "c")
    assert again.exit_code != 0 and "not empty" in again.output
    assert invoke("qtoy-quadratic", "--component", "quad2", "--out", tmp_path / "c", "--force").exit_code == 0


def test_new_plugin_covers_every_kind_and_its_files_compile(tmp_path):
    from qtoy_cli.new_plugin import KINDS, names_for, render
    from qtoy_registry import KIND_HOOKS

    assert set(KINDS) == set(KIND_HOOKS)
    for kind in KINDS:
        files = render(kind, names_for(f"qtoy-x-{kind}", None))
        for path, text in files.items():
            assert "__" + "DIST__" not in text and "__" + "NAME__" not in text and "__" + "IMPL" not in text, path
            if path.endswith(".py"):
                compile(text, path, "exec")
        pyproject = files["pyproject.toml"]
        assert f'[project.entry-points.qtoy]\nqtoy_x_{kind} = "qtoy_x_{kind}"' in pyproject


# ------------------------------------------------------------------------------------------------
# The example plugin and the new-plugin templates share one structure (they cannot drift apart)
# ------------------------------------------------------------------------------------------------
def _without_docstrings(tree):
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def _registrations(source: str) -> dict[str, tuple[str, str]]:
    """hook name -> (base of the config class it registers, module of the lazy reference)."""
    tree = ast.parse(source)
    bases = {c.name: c.bases[0].id for c in tree.body if isinstance(c, ast.ClassDef)}
    out = {}
    for fn in tree.body:
        if isinstance(fn, ast.FunctionDef) and [d.id for d in fn.decorator_list] == ["hookimpl"]:
            assert [a.arg for a in fn.args.args] == ["register"], fn.name
            (stmt,) = fn.body
            config, reference = stmt.value.args
            out[fn.name] = (bases[config.id], reference.value.partition(":")[0])
    return out


def _jsonl_calls(source: str) -> dict[str, str]:
    """method -> the run-folder JSONL call it makes (helper, file argument, keywords)."""
    out = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef):
            for call in ast.walk(node):
                if isinstance(call, ast.Call) and getattr(call.func, "id", "") in ("append_jsonl", "truncate_jsonl"):
                    out[node.name] = ast.dump(ast.Call(call.func, call.args[:1], call.keywords))
    return out


def test_the_example_plugin_keeps_the_structure_of_the_new_plugin_templates():
    from qtoy_cli.new_plugin import KINDS, names_for, render

    names = names_for("qtoy-example-plugin", None)
    src = EXAMPLE / "src" / "qtoy_example_plugin"
    example_pyproject = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())
    example_hooks = _registrations((src / "__init__.py").read_text())
    kinds = ["attention", "mlp", "dataset", "callback"]
    assert len(example_hooks) == len(kinds)
    for kind in kinds:
        skeleton = render(kind, names)
        # pyproject: build backend, the `qtoy` entry point named by the import name, src layout, tests
        pyproject = tomllib.loads(skeleton["pyproject.toml"])
        assert pyproject["build-system"] == example_pyproject["build-system"]
        assert pyproject["project"]["entry-points"] == example_pyproject["project"]["entry-points"]
        for key in ("requires-python", "dependencies", "optional-dependencies"):
            assert pyproject["project"][key] == example_pyproject["project"][key], key
        assert pyproject["tool"] == example_pyproject["tool"]
        # the hook: its name, the config base, the lazy reference into <impl_module>.py
        (hook,) = _registrations(skeleton[f"src/{names['__MODULE__']}/__init__.py"]).items()
        assert example_hooks[hook[0]] == hook[1], kind
        assert (src / f"{KINDS[kind]['impl_module']}.py").is_file()
        # the test fixtures, statement for statement
        assert _without_docstrings(ast.parse(skeleton["tests/conftest.py"])) == \
            _without_docstrings(ast.parse((EXAMPLE / "tests" / "conftest.py").read_text())), kind
    callback = render("callback", names)[f"src/{names['__MODULE__']}/callback.py"]
    assert _jsonl_calls(callback) == {k: v for k, v in _jsonl_calls((src / "callback.py").read_text()).items()
                                      if k in ("on_train_start", "on_step_end")}
    assert set(_jsonl_calls(callback)) == {"on_train_start", "on_step_end"}
