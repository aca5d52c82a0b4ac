"""docs/plugins.md is a contract (datasette style): every hook is documented and tested, and the
documented examples are working plugins.

* each hook specification in registry/hookspecs.py has a section in docs/plugins.md (a heading
  naming the hook);
* each hook is implemented by at least one test under tests/ (a `@hookimpl` function, or a
  `hookimpl(...)`-wrapped attribute, named after it), other than this file;
* every public name of qtoy_core and both plugin environment variables are documented;
* the `# file:` examples of the docs are written to disk, registered in-process and exercised:
  each component builds and runs (and polynomial ones have an exact tensor network).
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest
import torch

import qtoy_core
from conftest import repo_root
from qtoy_registry import KIND_HOOKS, hookspecs

DOCS = repo_root() / "docs" / "plugins.md"
TESTS = Path(__file__).parent
FILE_BLOCK = re.compile(r"```python\n# file: (\S+)\n(.*?)```", re.S)


def hook_names() -> list[str]:
    spec_attr = f"{hookspecs.PROJECT_NAME}_spec"
    return sorted(name for name, obj in vars(hookspecs).items() if callable(obj) and hasattr(obj, spec_attr))


def test_hookspecs_are_the_kind_hooks():
    assert hook_names() == sorted(KIND_HOOKS.values())


@pytest.mark.parametrize("hook", hook_names())
def test_every_hook_has_a_documented_section(hook):
    headings = [line for line in DOCS.read_text(encoding="utf-8").splitlines() if line.startswith("#")]
    assert any(hook in h for h in headings), f"docs/plugins.md has no section (heading) for the hook {hook}"


@pytest.mark.parametrize("hook", hook_names())
def test_every_hook_is_implemented_by_a_test(hook):
    pattern = re.compile(rf"@hookimpl\s*\n\s*def {hook}\(|\b{hook}\s*=\s*hookimpl\(")
    users = [p.name for p in sorted(TESTS.rglob("*.py")) if p.name != Path(__file__).name
             and pattern.search(p.read_text(encoding="utf-8"))]
    assert users, f"no test under tests/ implements the hook {hook} (a @hookimpl def {hook}(register): ...)"


def test_public_names_and_switches_are_documented():
    text = DOCS.read_text(encoding="utf-8")
    missing = [name for name in qtoy_core.__all__ if f"`{name}`" not in text]
    assert not missing, f"public names not documented in docs/plugins.md: {missing}"
    for word in ("QTOY_LOAD_PLUGINS", "QTOY_STRICT_PLUGINS", "add_plugin", "remove_plugin", "module:attr",
                 "extra=\"forbid\"", "check_model", "is_polynomial", "qtoy new-plugin", "twine upload"):
        assert word in text, word


# ------------------------------------------------------------------------------------------------
# The documented examples run
# ------------------------------------------------------------------------------------------------
def doc_packages(root: Path) -> dict[str, str]:
    """Write every `# file:` block of the docs under root; return {package: the hook its section is about}."""
    text = DOCS.read_text(encoding="utf-8")
    packages: dict[str, str] = {}
    sections = re.split(r"^### ", text, flags=re.M)
    for section in sections[1:]:
        hook = next((h for h in KIND_HOOKS.values() if h in section.splitlines()[0]), None)
        for path, code in FILE_BLOCK.findall(section):
            target = root / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(code, encoding="utf-8")
            if hook is not None:
                packages[Path(path).parts[0]] = hook
    return packages


@pytest.fixture
def documented(tmp_path, monkeypatch):
    """The docs' example packages, importable and registered in-process."""
    packages = doc_packages(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    registry = qtoy_core.get_registry()
    for package in packages:
        registry.add_plugin(importlib.import_module(package), name=package, distribution=f"docs:{package}")
    yield registry, packages
    for package in packages:
        registry.remove_plugin(package)
        for module in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
            del sys.modules[module]


def _randomised(model):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model


def test_every_hook_section_has_a_working_example(documented, tmp_path):
    registry, packages = documented
    assert sorted(set(packages.values())) == sorted(KIND_HOOKS.values())
    kind_of = {hook: kind for kind, hook in KIND_HOOKS.items()}
    for package, hook in packages.items():
        kind = kind_of[hook]
        (component,) = [c for c in registry.components(kind) if c.provider.plugin == package]
        name = component.name
        assert component.description, (package, name)
        torch.manual_seed(0)
        if kind in ("attention", "mlp", "positional", "norm"):
            model = qtoy_core.build_model("transformer_1L", **{kind: name}, d_model=8, n_head=2, d_mlp=8,
                                          vocab_size=16, n_ctx=8).double()
            tokens = torch.randint(0, 16, (2, 5))
            model.loss(tokens).backward()
            if model.config.is_polynomial:
                _randomised(model)
                network = qtoy_core.to_tensor_network(model, n_ctx=3)
                torch.testing.assert_close(qtoy_core.contract_logits(network, tokens[:, :3]),
                                           model(tokens[:, :3]).detach())
            else:
                with pytest.raises(qtoy_core.NotPolynomialError):
                    qtoy_core.to_tensor_network(model, n_ctx=3)
        elif kind == "optimizer":
            model = qtoy_core.build_model("transformer_1L", d_model=16, n_head=2, vocab_size=32, n_ctx=16)
            optimizer = qtoy_core.build_optimizer(model, name)
            tokens = torch.randint(0, 32, (4, 13))
            first = None
            for _ in range(10):
                optimizer.zero_grad()
                loss = model.loss(tokens)
                loss.backward()
                optimizer.step()
                first = loss.item() if first is None else first
            assert loss.item() < first
        elif kind == "dataset":
            dataset = qtoy_core.build_dataset(name)
            train, validation = list(dataset.documents("train")), list(dataset.documents("validation"))
            assert train and validation and not set(train) & set(validation)
            tok = dataset.tokenizer()
            assert tok.decode(tok.encode(train[0])) == train[0]
        elif kind == "callback":
            config = qtoy_core.RunConfig.model_validate({
                "model": {"d_model": 16, "n_head": 2, "n_ctx": 8, "vocab_size": 32}, "callbacks": [name],
                "train": {"max_iters": 2, "batch_size": 2, "eval_interval": 2, "eval_iters": 1, "warmup": 1,
                          "precision": "fp32", "compile": False, "device": "cpu"}})
            batches = [torch.randint(0, 32, (2, 9)) for _ in range(3)]
            qtoy_core.Trainer(config, tmp_path / "run", train_batches=batches, val_batches=batches[:1]).fit()
            assert len((tmp_path / "run" / "lr.jsonl").read_text().splitlines()) == 2
