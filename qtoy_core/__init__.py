"""qtoy: polynomial toy transformers you can train, swap and read.

This is the public API: plugin packages import only from here. Names that need torch are loaded
on first use, so `import qtoy_core` (and `qtoy --help`, `qtoy list`) stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from qtoy_registry import (
    ENTRY_POINT_GROUP,
    KIND_HOOKS,
    DuplicateComponentError,
    PluginError,
    PluginWarning,
    QtoyError,
    UnknownComponentError,
    get_registry,
    hookimpl,
    reset_registry,
)

from .components import (
    AttentionConfig,
    CallbackConfig,
    ComponentConfig,
    DatasetConfig,
    MLPConfig,
    NormConfig,
    OptimizerConfig,
    PositionalConfig,
    parse_component,
)
from .config import ModelConfig, make_model_config, parse_model_type

# name -> module holding it; imported lazily (these modules import torch, numpy, quimb or the
# data machinery). Plugin packages import these names from `qtoy_core`, never from the submodules.
_LAZY = {
    # the model and its pieces
    "ToyTransformer": ".model",
    "GenerationCache": ".model",
    "cross_entropy": ".model",
    # what a component implementation subclasses or calls (qtoy_core.interfaces)
    "Attention": ".interfaces",
    "ProjectedAttention": ".interfaces",
    "MLP": ".interfaces",
    "Positional": ".interfaces",
    "Callback": ".interfaces",
    "HookPoint": ".interfaces",
    "split_heads": ".interfaces",
    "merge_heads": ".interfaces",
    "key_padding_mask": ".interfaces",
    "append_to_cache": ".interfaces",
    "causal_pattern": ".ops.masks",
    # document masking (packed rows): each token's document, and the same-document mask
    "document_ids": ".ops.masks",
    "same_document": ".ops.masks",
    # the fast kernels of polynomial attention (qtoy_core.ops): what the built-in quadratic and
    # bilinear attentions call, open to any attention plugin
    "quadratic_attention": ".ops.quadratic",
    "QuadraticAttentionState": ".ops.quadratic",
    # the base of attentions whose pattern is a product of QK forms (quadratic, bilinear, cubic, ...)
    "QKProductAttention": ".qk_product",
    # optimizers
    "build_optimizer": ".optim",
    "is_hidden_matrix": ".optim",
    "use_fused_adamw": ".optim",
    # model files
    "CheckpointError": ".checkpoint",
    "MissingPluginError": ".checkpoint",
    # run-folder files: atomic writes, JSON Lines logs (what a callback writes), opening a trained folder
    "write_atomic": ".run_files",
    "atomic_path": ".run_files",
    "read_jsonl": ".run_files",
    "append_jsonl": ".run_files",
    "truncate_jsonl": ".run_files",
    "load_run": ".run_files",
    # datasets: configs, the TextDataset a dataset factory returns, tokenizers (no torch)
    "TextDatasetConfig": ".data",
    "HubDatasetConfig": ".data",
    "TextSplit": ".data.config",
    "TextDataset": ".data",
    "HubTextDataset": ".data",
    "DocumentSource": ".data",
    "Batch": ".data",
    "Tokenizer": ".data",
    "MappedTokenizer": ".data",
    "END_OF_TEXT": ".data",
    "train_bpe": ".data",
    "cached_tokenizer": ".data",
    "build_dataset": ".data",
    "DataError": ".data",
    "EmptySplitError": ".data",
    "TokenizerError": ".data",
    # reading local files and the hub into a dataset (datasets and huggingface_hub load on first use)
    "HFSource": ".data.sources",
    "resolve_data_files": ".data.sources",
    "hub_file": ".data.hub",
    "url_file": ".data.hub",
    "hash_files": ".data.cache",
    # training (what a callback receives, and how to run one in a test)
    "Trainer": ".training.trainer",
    "RunConfig": ".training.config",
    "evaluate": ".evaluation",
    # the optional tensor-network capability (qtoy_core.analysis.tensor_network)
    "TNBuilder": ".analysis.tensor_network",
    "Stream": ".analysis.tensor_network",
    "Wire": ".analysis.tensor_network",
    "CausalKeys": ".analysis.tensor_network",
    "TensorNetworkAttention": ".analysis.tensor_network",
    "TensorNetworkMLP": ".analysis.tensor_network",
    "TensorNetworkPositional": ".analysis.tensor_network",
    "TensorNetworkNorm": ".analysis.tensor_network",
    "NotPolynomialError": ".analysis.tensor_network",
    "to_tensor_network": ".analysis.tensor_network",
    "contract_logits": ".analysis.tensor_network",
    "rotation_matrices": ".analysis.tensor_network",
    # weight views and circuits a callback or plugin may read (the ones `qtoy analyze` uses)
    "model_weights": ".analysis.weights",
    "qk_matrix": ".analysis.circuits",
    "ov_matrix": ".analysis.circuits",
    "spectrum": ".analysis.circuits",
    "mlp_interaction": ".analysis.circuits",
    # functional similarity of two models (qtoy_core.analysis.similarity)
    "similarity": ".analysis.similarity",
    "SimilarityError": ".analysis.similarity",
    # the host process: keep freed memory for reuse, as the qtoy command does (no torch)
    "keep_freed_memory": ".host_memory",
}

# The public API: what plugin packages may import (tests/test_public_api.py keeps a snapshot of it).
__all__ = sorted([
    # plugin contract: hook marker, registry, errors
    "hookimpl", "get_registry", "reset_registry", "ENTRY_POINT_GROUP", "KIND_HOOKS",
    "QtoyError", "PluginError", "PluginWarning", "DuplicateComponentError", "UnknownComponentError",
    # component configs (pydantic, no torch)
    "ComponentConfig", "AttentionConfig", "MLPConfig", "PositionalConfig", "NormConfig", "OptimizerConfig",
    "DatasetConfig", "CallbackConfig", "parse_component",
    # model config and model
    "ModelConfig", "make_model_config", "parse_model_type", "build_model",
    *_LAZY,
])


def build_model(model_type: str | ModelConfig | dict | None = None, **options: Any) -> "ToyTransformer":
    """One line from a description to a model.

    `build_model("transformer_2L", attn="quadratic", mlp="bilinear", d_model=256)` or
    `build_model(ModelConfig(...))`. The config validates completely before any tensor is made.
    """
    from .model import ToyTransformer

    return ToyTransformer(make_model_config(model_type, **options))


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qtoy_core' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from .analysis.tensor_network import (
        CausalKeys,
        NotPolynomialError,
        Stream,
        TensorNetworkAttention,
        TensorNetworkMLP,
        TensorNetworkNorm,
        TensorNetworkPositional,
        TNBuilder,
        Wire,
        contract_logits,
        rotation_matrices,
        to_tensor_network,
    )
    from .checkpoint import CheckpointError, MissingPluginError
    from .data import (
        END_OF_TEXT,
        Batch,
        DataError,
        DocumentSource,
        EmptySplitError,
        HubDatasetConfig,
        HubTextDataset,
        MappedTokenizer,
        TextDataset,
        TextDatasetConfig,
        Tokenizer,
        TokenizerError,
        build_dataset,
        cached_tokenizer,
        train_bpe,
    )
    from .data.cache import hash_files
    from .data.config import TextSplit
    from .data.hub import hub_file, url_file
    from .data.sources import HFSource, resolve_data_files
    from .evaluation import evaluate
    from .interfaces import (
        MLP,
        Attention,
        Callback,
        HookPoint,
        Positional,
        ProjectedAttention,
        append_to_cache,
        key_padding_mask,
        merge_heads,
        split_heads,
    )
    from .model import GenerationCache, ToyTransformer, cross_entropy
    from .ops.masks import causal_pattern, document_ids, same_document
    from .ops.quadratic import QuadraticAttentionState, quadratic_attention
    from .optim import build_optimizer, is_hidden_matrix, use_fused_adamw
    from .qk_product import QKProductAttention
    from .run_files import append_jsonl, atomic_path, load_run, read_jsonl, truncate_jsonl, write_atomic
    from .training.config import RunConfig
    from .training.trainer import Trainer
