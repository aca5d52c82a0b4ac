"""`qtoy new-plugin NAME --kind KIND`: write a skeleton plugin package that installs and registers as is.

The skeleton is the smallest complete plugin: a `pyproject.toml` with the `qtoy` entry point, a
config class and its hook (no torch import), the implementation (a lazy "module:attr"
reference), and a pytest test that passes both installed and from the source folder. Templates are
inline strings with `__PLACEHOLDERS__` (plain replacement: the Python inside keeps its braces).
"""

from __future__ import annotations

import keyword
import re
from pathlib import Path

import click

# ------------------------------------------------------------------------------------------------
# Files common to every kind
# ------------------------------------------------------------------------------------------------
PYPROJECT = '''[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "__DIST__"
version = "0.1.0"
description = "A qtoy plugin: the __KIND__ __NAME__."
readme = "README.md"
requires-python = ">=3.10"
dependencies = ["qtoy>=__QTOY_MIN__"]

[project.optional-dependencies]
test = ["pytest>=8"]

# The contract with qtoy: an entry point in the `qtoy` group naming the module with the hooks.
# The entry-point name must be unique among installed plugins: the import name is.
[project.entry-points.qtoy]
__MODULE__ = "__MODULE__"

[tool.setuptools.packages.find]
where = ["src"]

[tool.pytest.ini_options]
testpaths = ["tests"]
'''

README = '''# __DIST__

A [qtoy](https://pypi.org/project/qtoy/) plugin adding the __KIND__ `__NAME__`.

```bash
pip install -e ".[test]"     # install (the `qtoy` entry point makes qtoy find it)
qtoy plugins                 # __DIST__ 0.1.0, hook __HOOK__
qtoy list __KIND__           # ... __NAME__  __DIST__ 0.1.0 ...
pytest                       # the tests (they also run without installing)
```

__USAGE__

Layout: `src/__MODULE__/__init__.py` holds the config class and the `@hookimpl` (pydantic only,
so `qtoy list` never imports torch); `src/__MODULE__/__IMPL_MODULE__.py` the implementation,
registered as the lazy reference `"__MODULE__.__IMPL_MODULE__:__IMPL__"`. Import only from
`qtoy_core` (qtoy's public API). See qtoy's docs/plugins.md for the hook, the config-class
contract and how to publish.
'''

INIT = '''"""__DIST__: a qtoy plugin adding the __KIND__ `__NAME__`.

The `qtoy` entry point names this module. It holds the config class (pydantic: no torch) and the
hook; the implementation is registered as a lazy "module:attr" reference, so `qtoy list` and
`qtoy plugins` never import torch or __IMPL_MODULE__.py.
"""

from typing import Literal

from pydantic import Field

from qtoy_core import __BASE__, hookimpl

__version__ = "0.1.0"


class __CONFIG__(__BASE__):
    """__DESCRIPTION__"""

    name: Literal["__NAME__"] = "__NAME__"
__FIELDS__

@hookimpl
def __HOOK__(register):
    register(__CONFIG__, "__MODULE__.__IMPL_MODULE__:__IMPL__")
'''

CONFTEST = '''"""Fixtures: the tests run with the package installed (the `qtoy` entry point loads it) or from
this folder (the plugin module is then registered in-process for each test, and removed after)."""

import sys
from pathlib import Path

import pytest

try:
    import __MODULE__  # noqa: F401  (installed)
except ImportError:  # a source checkout: import it from src/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

DISTRIBUTION = "__DIST__"


@pytest.fixture(autouse=True)
def _offline_cache(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("QTOY_CACHE", str(tmp_path_factory.getbasetemp() / "qtoy-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def registry():
    """qtoy's registry with this plugin in it."""
    import __MODULE__
    from qtoy_core import get_registry, reset_registry

    reset_registry()
    registry = get_registry()
    installed = DISTRIBUTION in {p.distribution for p in registry.plugins()}
    if not installed:
        registry.add_plugin(__MODULE__, name="__MODULE__", distribution=DISTRIBUTION)
    yield registry
    if not installed:
        registry.remove_plugin("__MODULE__")
    reset_registry()
'''

TEST_HEADER = '''"""Tests of the __KIND__ `__NAME__`."""

__TEST_MODULES__
from qtoy_core import __TEST_IMPORTS__

KIND, NAME = "__KIND__", "__NAME__"


def test_registered_with_this_package_as_provider(registry):
    component = registry.get(KIND, NAME)
    assert component.provider.distribution == "__DIST__"
    assert component.config_class().name == NAME  # the defaults validate
'''

# ------------------------------------------------------------------------------------------------
# Model components (attention, mlp, positional, norm): shared test
# ------------------------------------------------------------------------------------------------
MODULE_TEST = TEST_HEADER + '''

def _model(**sizes):
    return build_model("transformer_1L", __KIND__=NAME, **sizes)


def test_builds_runs_and_learns(registry):
    torch.manual_seed(0)
    model = _model(d_model=32, n_head=2, vocab_size=64, n_ctx=32)
    tokens = torch.randint(0, 64, (4, 17))
    assert model(tokens).shape == (4, 17, 64)
    optimizer = build_optimizer(model, {"name": "adam", "lr": 1e-2})
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = model.loss(tokens)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_tensor_network(registry):
    """A polynomial component has an exact tensor network; any other is refused by name."""
    torch.manual_seed(0)
    model = _model(d_model=8, n_head=2, d_mlp=8, vocab_size=16, n_ctx=4).double()
    with torch.no_grad():  # fresh models write nothing to the residual stream: give every weight a value
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    if not model.config.is_polynomial:
        with pytest.raises(NotPolynomialError):
            to_tensor_network(model, n_ctx=3)
        return
    tn = to_tensor_network(model, n_ctx=3)
    tokens = torch.randint(0, 16, (2, 3))
    torch.testing.assert_close(contract_logits(tn, tokens), model(tokens).detach())
'''
MODULE_TEST_IMPORTS = "NotPolynomialError, build_model, build_optimizer, contract_logits, to_tensor_network"

ATTENTION_IMPL = '''"""The attention `__NAME__`: pattern = (q.k / d_head)^power, causal, no softmax.

Built as `__IMPL__(model_config, attention_config, layer)`; `ProjectedAttention` provides q_proj,
k_proj, v_proj, out_proj, the hook points and forward(), so only `mix` is written here.
An odd power keeps the score's sign: mask with zeros *after* the power (`causal_pattern`).
"""

from torch import Tensor

from qtoy_core import ProjectedAttention, append_to_cache, causal_pattern


class __IMPL__(ProjectedAttention):
    def __init__(self, model, config, layer):
        super().__init__(model, config, layer)
        self.scale = 1.0 / model.d_head
        self.power = config.power

    def mix(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, state: dict | None, **_) -> Tensor:
        """q, k, v: (batch, heads, time, d_head) -> z (batch, heads, time, d_head)."""
        if state is not None:  # cached generation: keep every key and value
            k, v = append_to_cache(state, k=k, v=v)
        scores = self.hook_scores((q @ k.transpose(-1, -2)) * self.scale)
        pattern = self.hook_pattern(causal_pattern(scores ** self.power, key_mask))
        return pattern @ v

    # optional capability: the exact tensor network (see qtoy's docs/plugins.md)
    def tensor_network(self, tn, x, *, positional):
        q = positional.tensor_network(tn, tn.project(x, self.q_proj, label="q"), op="rotate")
        k = positional.tensor_network(tn, tn.project(x, self.k_proj, label="k"), op="rotate")
        v = tn.project(x, self.v_proj, label="v")

        def at(i):
            keys = tn.causal_keys(i)  # one key index over positions 0..i
            scores = [tn.head_dot(q(i), keys(k), self.n_head, scale=self.scale) for _ in range(self.power)]
            pattern = tn.mul(*scores, label="pattern") if self.power > 1 else scores[0]
            z = tn.head_scale(pattern, keys(v), self.n_head)
            return tn.linear(keys.sum(z), self.out_proj.weight, self.out_proj.bias, label="attn_out")

        return tn.stream(at, self.out_proj.out_features, "attn_out")

    def qk_factors(self):
        """The (q_proj, k_proj, scale) factors whose scaled scores multiply into the pattern."""
        return [(self.q_proj, self.k_proj, self.scale)] * self.power
'''

MLP_IMPL = '''"""The MLP `__NAME__`: out_proj((W_in x)^2), a quadratic form per output, no activation function.

Built as `__IMPL__(model_config, mlp_config)`; forward(x) keeps x's shape. It owns `out_proj`, which
the model zero-initialises (a new block starts as the identity).
"""

from torch import Tensor, nn

from qtoy_core import MLP, HookPoint


class __IMPL__(MLP):
    def __init__(self, model, config):
        super().__init__()
        self.w_in = nn.Linear(model.d_model, model.d_mlp, bias=config.bias)
        self.out_proj = nn.Linear(model.d_mlp, model.d_model, bias=config.bias)
        self.hook_pre, self.hook_hidden = HookPoint(), HookPoint()

    def forward(self, x: Tensor) -> Tensor:
        pre = self.hook_pre(self.w_in(x))
        return self.out_proj(self.hook_hidden(pre * pre))

    # optional capability: the exact tensor network (see qtoy's docs/plugins.md)
    def tensor_network(self, tn, x):
        pre = tn.project(x, self.w_in, label="pre")

        def at(t):
            hidden = tn.mul(pre(t), pre(t), label="hidden")  # two fresh copies: a network cannot copy a value
            return tn.linear(hidden, self.out_proj.weight, self.out_proj.bias, label="mlp_out")

        return tn.stream(at, self.out_proj.out_features, "mlp_out")
'''

POSITIONAL_IMPL = '''"""The positional encoding `__NAME__`: fixed sinusoidal vectors added to the residual stream.

Built as `__IMPL__(model_config, positional_config)`. `embed(positions)` returns what is added to
the embedded tokens (or None); `rotate(x, positions)` transforms queries and keys (identity here).
"""

import math

import torch
from torch import Tensor

from qtoy_core import Positional


class __IMPL__(Positional):
    def __init__(self, model, config):
        super().__init__()
        self.max_positions = model.n_ctx  # forward refuses longer inputs with a clear message
        pos = torch.arange(model.n_ctx, dtype=torch.float32)[:, None]
        freq = torch.exp(torch.arange(0, model.d_model, 2, dtype=torch.float32) * (-math.log(config.base) / model.d_model))
        table = torch.zeros(model.n_ctx, model.d_model)
        table[:, 0::2] = torch.sin(pos * freq)
        table[:, 1::2] = torch.cos(pos * freq)
        self.register_buffer("table", table * config.amplitude, persistent=False)

    def embed(self, positions: Tensor) -> Tensor:
        return self.table[positions]

    # optional capability: the exact tensor network (see qtoy's docs/plugins.md)
    def tensor_network(self, tn, x, *, op):
        if op != "embed":
            return x  # nothing to rotate
        rows = list(self.table)  # one object per position, shared by every copy
        return x.map(lambda wire, t: tn.add_constant(wire, rows[t], label="resid"))
'''

NORM_IMPL = '''"""The norm `__NAME__`: LayerNorm (mean and variance over d_model, learned gain and bias).

Built as `__IMPL__(model_config, norm_config)`; forward(x) keeps x's shape. Not a polynomial, so it
has no tensor-network form (the config says is_polynomial False).
"""

from torch import nn


class __IMPL__(nn.LayerNorm):
    def __init__(self, model, config):
        super().__init__(model.d_model, eps=config.eps)
'''

OPTIMIZER_IMPL = '''"""The optimizer `__NAME__`: SGD with momentum.

A factory, called as `__IMPL__(named_parameters, optimizer_config)` with the model's
(name, parameter) pairs (tied weights once); it returns a torch.optim.Optimizer.
"""

import torch


def __IMPL__(named_parameters, config) -> torch.optim.Optimizer:
    decay = [p for _, p in named_parameters if p.ndim >= 2]
    no_decay = [p for _, p in named_parameters if p.ndim < 2]  # no weight decay on biases and gains
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=config.lr, momentum=config.momentum,
                           nesterov=config.nesterov and config.momentum > 0)
'''

OPTIMIZER_TEST = TEST_HEADER + '''

def test_trains_a_model(registry):
    torch.manual_seed(0)
    model = build_model("transformer_1L", d_model=32, n_head=2, vocab_size=64, n_ctx=32)
    optimizer = build_optimizer(model, {"name": NAME, "lr": 0.5})
    tokens = torch.randint(0, 64, (4, 17))
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = model.loss(tokens)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3
'''

DATASET_IMPL = '''"""The dataset `__NAME__`: a small offline corpus, and a byte-level BPE trained on it.

Registered as a factory `factory(dataset_config) -> qtoy_core.TextDataset` (the class itself). It
implements `make_source()` and `load_tokenizer()`; qtoy does the deterministic train/validation
split (a hash of each text), rank sharding, shuffling, tokenising and batching.
"""

import random
from typing import Any, Iterator

from qtoy_core import TextDataset, Tokenizer, cached_tokenizer, train_bpe

ANIMALS = ["cat", "dog", "fox", "owl", "hen", "bee", "ant", "elk"]
PLACES = ["the mat", "the hill", "the barn", "the pond", "the tree", "the box"]
VERBS = ["sat on", "ran to", "looked at", "jumped over", "slept by"]
RECIPE = 1  # bump when the corpus or the tokenizer recipe changes: it is part of the cache key


class __IMPL__Source:
    """Documents 0..n_documents-1 as (key, text) records (a `qtoy_core.DocumentSource`)."""

    finite = True

    def __init__(self, config):
        self.config = config

    def document(self, index: int) -> str:
        rng = random.Random(f"__NAME__-{self.config.seed}-{index}")  # str seeds are stable everywhere
        return " ".join(f"The {rng.choice(ANIMALS)} {rng.choice(VERBS)} {rng.choice(PLACES)}."
                        for _ in range(self.config.sentences))

    def open(self, *, start: int = 0, state: dict | None = None) -> Iterator[tuple[int, str]]:
        for index in range(start, self.config.n_documents):
            yield index, self.document(index)

    def describe(self) -> dict[str, Any]:
        return {"source": "generated sentences", "seed": self.config.seed, "n_documents": self.config.n_documents}


class __IMPL__(TextDataset):
    def make_source(self) -> __IMPL__Source:
        return __IMPL__Source(self.config)

    def load_tokenizer(self) -> Tokenizer:
        c = self.config
        key = f"__NAME__-s{c.seed}-v{c.vocab_size}-r{RECIPE}"
        source = self.make_source()
        texts = (source.document(i) for i in range(min(c.n_documents, 500)))
        return cached_tokenizer(key, lambda: train_bpe(texts, vocab_size=c.vocab_size))
'''

DATASET_TEST = TEST_HEADER + '''

def test_documents_split_and_tokenize(registry):
    dataset = build_dataset({"name": NAME, "n_documents": 200})
    train, validation = list(dataset.documents("train")), list(dataset.documents("validation"))
    assert train and validation and not set(train) & set(validation)
    tokenizer = dataset.tokenizer()
    assert tokenizer.vocab_size == dataset.config.vocab_size
    assert tokenizer.decode(tokenizer.encode(train[0])) == train[0]


def test_a_model_trains_on_it(registry, tmp_path):
    config = RunConfig.model_validate({
        "model": {"d_model": 16, "n_head": 2, "n_ctx": 16},
        "data": {"dataset": {"name": NAME, "n_documents": 200}},
        "train": {"max_iters": 2, "batch_size": 2, "eval_interval": 2, "eval_iters": 1, "warmup": 1,
                  "precision": "fp32", "compile": False, "device": "cpu"},
    })
    summary = Trainer(config, tmp_path / "run").fit()
    assert summary["steps"] == 2 and summary["val_loss"] is not None
'''

CALLBACK_IMPL = '''"""The callback `__NAME__`: the training loss every N steps, to __NAME__.jsonl in the run folder.

Built as `__IMPL__(callback_config)`; override any of the `qtoy_core.Callback` methods. `trainer`
exposes `step`, `tokens`, `model`, `optimizer`, `config`, `run.path` and `world.is_main`.
"""

from qtoy_core import Callback, append_jsonl, truncate_jsonl

FILE_NAME = "__NAME__.jsonl"


class __IMPL__(Callback):
    def __init__(self, config):
        self.every = config.every

    def on_train_start(self, trainer) -> None:
        """A fresh run starts an empty log; a resumed one keeps the records up to its checkpoint."""
        if trainer.world.is_main:
            truncate_jsonl(trainer.run.path / FILE_NAME, after_step=trainer.step)

    def on_step_end(self, trainer, metrics: dict) -> None:
        if trainer.step % self.every == 0 and trainer.world.is_main:
            append_jsonl(trainer.run.path / FILE_NAME, {"step": trainer.step, "loss": metrics["loss"]})
'''

CALLBACK_TEST = TEST_HEADER + '''

def _batches(n, vocab=32, n_ctx=16):
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        yield torch.randint(0, vocab, (2, n_ctx + 1), generator=g)


def test_runs_in_training(registry, tmp_path):
    config = RunConfig.model_validate({
        "model": {"d_model": 16, "n_head": 2, "n_ctx": 16, "vocab_size": 32},
        "callbacks": [{"name": NAME, "every": 2}],
        "train": {"max_iters": 4, "batch_size": 2, "eval_interval": 4, "eval_iters": 1, "warmup": 1,
                  "precision": "fp32", "compile": False, "device": "cpu"},
    })
    Trainer(config, tmp_path / "run", train_batches=_batches(10), val_batches=list(_batches(1))).fit()
    records = read_jsonl(tmp_path / "run" / f"{NAME}.jsonl")
    assert [r["step"] for r in records] == [2, 4]
    assert all(r["loss"] > 0 for r in records)
'''

POLY = '''
    @property
    def is_polynomial(self) -> bool:
        return True  # it has an exact tensor-network form (tensor_network() in __IMPL_MODULE__.py)
'''

# kind -> what differs. "fields": the config body after `name` (4-space indented lines).
KINDS: dict[str, dict[str, str]] = {
    "attention": {
        "test_modules": "import pytest\nimport torch\n",
        "base": "AttentionConfig", "impl_module": "attention", "impl": "__CLASS__Attention", "code": ATTENTION_IMPL,
        "description": "Polynomial attention: pattern = (q.k / d_head)^power, causal, no softmax.",
        "fields": '''    bias: bool = False
    power: int = Field(2, ge=1, le=4, description="the exponent of the scaled score")
''' + POLY + '''
    def check_model(self, model) -> None:
        """Raise ValueError, with the fix, when this component cannot work in `model` (an example: edit it)."""
        degree = (2 * self.power + 1) ** model.n_layers  # per layer: `power` scores of degree 2, times v
        if self.power > 2 and degree > 10_000:
            raise ValueError(f"attention power {self.power} in {model.n_layers} layers makes the model a polynomial "
                             f"of degree {degree}: use fewer layers or power <= 2")
''',
        "test": MODULE_TEST, "test_imports": MODULE_TEST_IMPORTS,
        "usage": "Train with it: `qtoy train --attn __NAME__`, options with `--set attention.power=3`.",
    },
    "mlp": {
        "test_modules": "import pytest\nimport torch\n",
        "base": "MLPConfig", "impl_module": "mlp", "impl": "__CLASS__MLP", "code": MLP_IMPL,
        "description": "Squared MLP: W_out((W_in x)^2), a quadratic form per output, no activation function.",
        "fields": "    bias: bool = False\n" + POLY,
        "test": MODULE_TEST, "test_imports": MODULE_TEST_IMPORTS,
        "usage": "Train with it: `qtoy train --mlp __NAME__` (a transformer_<N>L model type).",
    },
    "positional": {
        "test_modules": "import pytest\nimport torch\n",
        "base": "PositionalConfig", "impl_module": "positional", "impl": "__CLASS__Positional", "code": POSITIONAL_IMPL,
        "description": "Fixed sinusoidal position vectors added to the residual stream.",
        "fields": '''    base: float = Field(10000.0, gt=1.0)
    amplitude: float = Field(0.1, gt=0.0, description="scale of the added vectors")
''' + POLY + '''
    def check_model(self, model) -> None:
        if model.d_model % 2:
            raise ValueError(f"__NAME__ needs an even d_model (sin/cos pairs), but d_model is {model.d_model}")
''',
        "test": MODULE_TEST, "test_imports": MODULE_TEST_IMPORTS,
        "usage": "Train with it: `qtoy train --pos __NAME__`.",
    },
    "norm": {
        "test_modules": "import pytest\nimport torch\n",
        "base": "NormConfig", "impl_module": "norm", "impl": "__CLASS__Norm", "code": NORM_IMPL,
        "description": "LayerNorm over d_model with a learned gain and bias (not a polynomial).",
        "fields": "    eps: float = Field(1e-5, gt=0.0)\n",
        "test": MODULE_TEST, "test_imports": MODULE_TEST_IMPORTS,
        "usage": "Train with it: `qtoy train --norm __NAME__`.",
    },
    "optimizer": {
        "test_modules": "import torch\n",
        "base": "OptimizerConfig", "impl_module": "optimizer", "impl": "build___NAME__", "code": OPTIMIZER_IMPL,
        "description": "SGD with momentum; weight decay on matrices only.",
        "fields": '''    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
''',
        "test": OPTIMIZER_TEST, "test_imports": "build_model, build_optimizer",
        "usage": "Train with it: `qtoy train --optimizer __NAME__ --set optimizer.lr=0.5`.",
    },
    "dataset": {
        "test_modules": "",
        "base": "TextDatasetConfig", "impl_module": "dataset", "impl": "__CLASS__Dataset", "code": DATASET_IMPL,
        "description": "A small offline corpus of generated sentences, with a 300-token byte-level BPE.",
        "fields": '''    seed: int = 0
    n_documents: int = Field(2000, ge=1)
    sentences: int = Field(4, ge=1, description="sentences per document")
    vocab_size: int = Field(300, ge=260, description="size of the BPE trained on the corpus")
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0)
''',
        "test": DATASET_TEST, "test_imports": "RunConfig, Trainer, build_dataset",
        "usage": "Train on it: `qtoy train --dataset __NAME__`; preview it: `qtoy data preview --dataset __NAME__`.",
    },
    "callback": {
        "test_modules": "import torch\n",
        "base": "CallbackConfig", "impl_module": "callback", "impl": "__CLASS__Callback", "code": CALLBACK_IMPL,
        "description": "Write the training loss every N steps to __NAME__.jsonl in the run folder.",
        "fields": '    every: int = Field(10, gt=0, description="record every this many steps")\n',
        "test": CALLBACK_TEST, "test_imports": "RunConfig, Trainer, read_jsonl",
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


def render(kind: str, names: dict[str, str]) -> dict[str, str]:
    """Relative path -> text of every file of the skeleton."""
    from qtoy_registry import KIND_HOOKS

    spec = KINDS[kind]
    subs = {**names, "__KIND__": kind, "__HOOK__": KIND_HOOKS[kind], "__BASE__": spec["base"],
            "__IMPL_MODULE__": spec["impl_module"], "__QTOY_MIN__": QTOY_MIN,
            "__TEST_IMPORTS__": spec["test_imports"], "__TEST_MODULES__": spec["test_modules"]}
    subs["__IMPL__"] = _fill(spec["impl"], subs)
    subs["__CONFIG__"] = subs["__CLASS__"] + "Config"
    subs["__DESCRIPTION__"] = _fill(spec["description"], subs)
    subs["__FIELDS__"] = _fill(spec["fields"], subs)
    subs["__USAGE__"] = _fill(spec["usage"], subs)
    module = names["__MODULE__"]
    files = {
        "pyproject.toml": PYPROJECT,
        "README.md": README,
        f"src/{module}/__init__.py": INIT,
        f"src/{module}/{spec['impl_module']}.py": spec["code"],
        "tests/conftest.py": CONFTEST,
        f"tests/test_{module}.py": spec["test"],
    }
    out = {path: _fill(text, subs).replace('"""\n\n\nfrom', '"""\n\nfrom') for path, text in files.items()}
    if "Field(" not in out[f"src/{module}/__init__.py"].split("class ", 1)[1]:
        out[f"src/{module}/__init__.py"] = out[f"src/{module}/__init__.py"].replace("from pydantic import Field\n\n", "")
    return out


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
