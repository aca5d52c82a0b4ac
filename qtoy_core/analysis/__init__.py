"""Analysis of qtoy models: weight views, factored circuits, the activation cache, tensor networks.

    from qtoy_core.analysis import analyze_model, qk_circuit, ov_circuit, model_weights
    report = analyze_model(model, tokenizer, top_k=10)     # one JSON-able dict
    logits, cache = model.run_with_cache(tokens)            # or run_with_cache(model, tokens)

Modules: `weights` (per-head weight views through the components' ``weight_views()``), `circuits`
(direct path, QK/OV circuits as `FactoredMatrix`, RoPE kernels, composition, bilinear MLP
eigendecomposition, `analyze_model`), `cache` (`run_with_cache`, `ActivationCache`, hook names, in
TransformerLens's names and layouts), `hooks` (`run_with_hooks`, `hooks`: interventions), `ablation`
(zero / mean / resample ablations, `ablation_scan`), `patching` (activation patching, TL's
``get_act_patch_*``, heat maps), `factored` (`FactoredMatrix`), `tensor_network` (exact quimb
networks), `attribution` (exact logit attribution, the path expansion of polynomial attention),
`detectors` (heads scored on behaviour, `induction_loss`), `attention_view` (the attention viewer
page), `similarity` (functional similarity of two models). Names load lazily on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    # weights
    "ModelWeights": ".weights", "LayerWeights": ".weights", "model_weights": ".weights",
    "component_views": ".weights", "relative_rotations": ".weights",
    # circuits
    "analyze_model": ".circuits", "analyze_layer_heads": ".circuits", "direct_path": ".circuits",
    "direct_path_top": ".circuits", "embeddings_tied": ".circuits", "DOMINANT_EIGENVALUE_SHARE": ".circuits", "qk_circuit": ".circuits", "qk_matrix": ".circuits",
    "qk_kernel": ".circuits", "ov_circuit": ".circuits", "ov_matrix": ".circuits",
    "positional_qk": ".circuits", "spectrum": ".circuits", "search_topk": ".circuits", "top_pairs": ".circuits",
    "composition_scores": ".circuits", "composition_baseline": ".circuits", "rank_head_pairs": ".circuits",
    "induction_heads": ".circuits", "mlp_interaction": ".circuits", "mlp_eigen": ".circuits",
    "TokenPair": ".circuits", "TopPairs": ".circuits", "Spectrum": ".circuits", "PositionalKernel": ".circuits",
    "QKCircuit": ".circuits", "OVCircuit": ".circuits", "HeadCircuits": ".circuits",
    "CompositionScores": ".circuits", "HeadPair": ".circuits", "MLPEigen": ".circuits",
    "EigenDirection": ".circuits",
    # attribution
    "logit_attribution": ".attribution", "path_expansion": ".attribution", "top_paths": ".attribution",
    "residual_parts": ".attribution", "LogitAttribution": ".attribution", "PathExpansion": ".attribution",
    "PathGroup": ".attribution", "ResidualParts": ".attribution", "AttributionError": ".attribution",
    # cache
    "run_with_cache": ".cache", "hook_names": ".cache", "ActivationCache": ".cache", "act_name": ".cache",
    # interventions
    "run_with_hooks": ".hooks", "hooks": ".hooks", "add_hook": ".hooks", "reset_hooks": ".hooks",
    "UnknownHookError": ".hooks",
    "ablate": ".ablation", "ablation_hooks": ".ablation", "ablation_scan": ".ablation", "Head": ".ablation",
    "AttnLayer": ".ablation", "MLPLayer": ".ablation", "Neuron": ".ablation", "ResidPosition": ".ablation",
    "activation_patching": ".patching", "PatchResult": ".patching", "patching_html": ".patching",
    "logit_diff_metric": ".patching", "loss_metric": ".patching",
    "get_act_patch_resid_pre": ".patching", "get_act_patch_attn_head_out_by_pos": ".patching",
    # detectors (heads scored on behaviour)
    "head_detectors": ".detectors", "induction_loss": ".detectors", "weight_head_scores": ".detectors",
    "repeated_random_tokens": ".detectors", "detection_targets": ".detectors", "pattern_target_share": ".detectors",
    "spearman": ".detectors", "HeadDetectors": ".detectors", "InductionLoss": ".detectors",
    # attention viewer
    "attention_view": ".attention_view", "AttentionView": ".attention_view",
    # similarity
    "similarity": ".similarity", "similarity_matrix": ".similarity", "Similarity": ".similarity",
    "SimilarityError": ".similarity",
    # factored
    "FactoredMatrix": ".factored", "composition_score": ".factored",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
