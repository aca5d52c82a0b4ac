"""The `synthetic` dataset: procedurally generated children's stories with exact ground truth.

`generator.py` makes the stories (`StoryGenerator`, `Story`, `Span`, `describe_structure`; see its
README.md for the planted structure); `dataset.py` wraps it as a qtoy dataset (`SyntheticDataset`)
with its cached BPE tokenizer, per-token labels and the corpus entropy per token. Nothing is imported
here, so registering the dataset stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"SyntheticDataset": ".dataset", "StoryGenerator": ".generator", "Story": ".generator",
         "Span": ".generator", "describe_structure": ".generator", "GENERATOR_VERSION": ".generator"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
