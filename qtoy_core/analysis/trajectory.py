"""A run's trajectory: metrics per saved checkpoint, the similarity matrix over checkpoints, phases.

    rows = trajectory(run)                           # one dict per checkpoint (qtoy dynamics RUN)
    values, errs, steps = checkpoint_similarity(run) # (K, K) similarity over the run's checkpoints
    change_points(values)                            # indices where the trajectory jumps

Every number comes from the functions `qtoy analyze` and `qtoy eval` use: copying scores from
`spectrum(ov_circuit(...))`, K-composition and the weight-based induction score from
`rank_head_pairs` / `induction_heads`, the behaviour-based induction score and the induction loss
from the report's behaviour section (`report.behaviour_data` -> `detectors.detectors_report`: the
heads' induction score on repeated random sequences, and `induction_loss`), losses from
`optimum.excess_loss` (synthetic) or `evaluation.evaluate`, similarity from `similarity`. More
scores plug in through ``metrics`` (name -> function of the model).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from qtoy_registry import QtoyError

__all__ = ["BEHAVIOUR_KEYS", "FORMATION_KEYS", "behaviour_metrics", "change_points", "checkpoint_models",
           "checkpoint_similarity", "formation_step", "plot_similarity", "plot_trajectory", "trajectory",
           "trajectory_panels", "validation_batches", "weight_metrics"]

#: The row keys `behaviour_metrics` fills (None where a model gives no value).
BEHAVIOUR_KEYS = ("induction (behaviour)", "induction (behaviour) chance", "induction loss (first half)",
                  "induction loss (second half)")


def checkpoint_models(run: str | Path) -> list[tuple[dict, Any]]:
    """(entry of `list_checkpoints`, model) for every saved step of ``run``, in step order."""
    from ..model import ToyTransformer
    from ..training.run_folder import RunFolderError, list_checkpoints

    entries = list_checkpoints(run)
    if not entries:
        raise RunFolderError(f"{run} has no saved checkpoints or snapshots, so it has no trajectory to show. Train "
                             f"with --checkpoint-schedule log to keep weights at steps 1, 2, 4, ... (then qtoy "
                             f"checkpoints RUN lists them).")
    return [(e, ToyTransformer.from_pretrained(run, step=e["step"]).eval()) for e in entries]


def validation_batches(run: str | Path, *, n_batches: int = 4, batch_size: int = 16) -> tuple[list, Any]:
    """(a fixed list of validation Batches with document positions, the dataset) from the run's own
    dataset and tokenizer; every checkpoint is measured on the same batches."""
    from ..checkpoint import read_document
    from ..data import StreamingTextDataset
    from ..run_files import load_run_dataset

    doc = read_document(run)
    data, source = load_run_dataset(run)
    stream = StreamingTextDataset(source, split="validation", n_ctx=doc["model"]["n_ctx"], batch_size=batch_size,
                                  mode=data.mode, seed=doc.get("train", {}).get("seed", 0),
                                  shuffle_buffer=data.shuffle_buffer, tokenize_batch=data.tokenize_batch,
                                  track_documents=True)
    batches = []
    for batch in stream:
        batches.append(batch)
        if len(batches) >= n_batches:
            break
    if not batches:
        raise QtoyError(f"The validation split of {run}'s dataset produced no batch.")
    return batches, source


@torch.no_grad()
def weight_metrics(model: Any) -> dict[str, float]:
    """Weight-based circuit scores of `qtoy analyze`: per layer the best OV copying score over heads;
    the best K- and Q-composition score over head pairs (minus the random-weights baseline); the
    weight-based induction score (the best K-composition pair's score above baseline, times the later
    head's copying score clipped at 0: high only when a head composes with an earlier one and copies)."""
    from .circuits import induction_heads, ov_circuit, rank_head_pairs, spectrum
    from .weights import model_weights

    w = model_weights(model)
    out: dict[str, float] = {}
    for lw in w.layers:
        if lw.has_circuits:
            out[f"copying L{lw.layer}"] = max(s.copying_score for s in spectrum(ov_circuit(w, lw.layer)))
    if sum(lw.has_circuits for lw in w.layers) >= 2:
        for kind in ("k", "q"):
            best = rank_head_pairs(w, kind, top=1)[0]
            out[f"{kind.upper()}-composition"] = best.score - best.baseline
        ind = induction_heads(w, top=None)
        out["induction (weights)"] = max((p.score - p.baseline) * max(p.copying_score_to or 0.0, 0.0) for p in ind)
    return out


@torch.no_grad()
def behaviour_metrics(model: Any, tokenizer: Any = None, **detector_kwargs: Any) -> tuple[dict[str, float | None], list[str]]:
    """Behaviour-based induction, as `qtoy analyze` scores it (`report.behaviour_data`, i.e.
    `detectors_report` on repeated random sequences after the tokenizer's separator), and the notes
    it gives: ``(values, notes)`` with the `BEHAVIOUR_KEYS`:

    ``induction (behaviour)``: the best head's induction score (the share of its pattern's |mass| on
      the token after an earlier copy of the current token; NaN heads left out); None when no layer
      records a pattern (a note says which).
    ``induction (behaviour) chance``: that head's score for a pattern spread evenly over the keys.
    ``induction loss (first half)`` / ``(second half)``: `induction_loss` means; an induction circuit
      at work makes the second half (predictable by copying) far lower than the first (random).
    """
    from .report import behaviour_data

    data = behaviour_data(model, tokenizer, **detector_kwargs)
    if data is None:  # a model without blocks
        return dict.fromkeys(BEHAVIOUR_KEYS), ["the model has no blocks: no behaviour scores"]
    scored = [h for h in data["heads"] if h["induction"] is not None]
    best = max(scored, key=lambda h: h["induction"], default=None)
    il = data["induction_loss"]
    values = {"induction (behaviour)": None if best is None else best["induction"],
              "induction (behaviour) chance": None if best is None else best["induction_uniform"],
              "induction loss (first half)": il["first_half_mean"],
              "induction loss (second half)": il["second_half_mean"]}
    return values, list(data["notes"])


def trajectory(run: str | Path, *, similarity_method: str = "data", n_batches: int = 4, batch_size: int = 16,
               metrics: dict[str, Callable[[Any], float]] | None = None, behaviour: bool = True,
               models: list[tuple[dict, Any]] | None = None) -> list[dict[str, Any]]:
    """One row per saved checkpoint of ``run``: step, tokens, validation loss (and, on a corpus with
    ground truth, entropy and excess loss overall and per label), `weight_metrics`, with ``behaviour``
    the `behaviour_metrics` (its notes under ``notes``), any extra ``metrics``, and ``similarity to
    final`` (`similarity` with the last checkpoint: ``data`` on the same validation sequences, or ``exact``)."""
    from ..evaluation import evaluate
    from .optimum import excess_loss
    from .similarity import similarity

    models = checkpoint_models(run) if models is None else models
    batches, source = validation_batches(run, n_batches=n_batches, batch_size=batch_size)
    truth = getattr(source, "batch_ground_truth", None)
    labels = getattr(source, "LABELS", None) or ("fixed", "copyable", "free")
    tokenizer = source.tokenizer()  # the separator the behaviour tokens start with, as in qtoy analyze
    final = models[-1][1]
    rows = []
    for entry, model in models:
        row: dict[str, Any] = {"step": entry["step"], "tokens": entry["tokens"], "kind": entry["kind"]}
        if callable(truth):
            o = excess_loss(model, batches, truth, labels=labels)
            row.update({"loss": o["loss"], "entropy": o["entropy"], "excess": o["excess"]})
            for label, e in o["by_label"].items():
                row[f"excess {label}"] = e["excess"]
        else:
            row["loss"] = evaluate(model, batches, None).loss
        row.update(weight_metrics(model))
        if behaviour:
            values, notes = behaviour_metrics(model, tokenizer)
            row.update(values)
            if notes:
                row["notes"] = notes
        for name, fn in (metrics or {}).items():
            row[name] = float(fn(model))
        sim = similarity(model, final, similarity_method, batches=batches if similarity_method == "data" else None,
                         samples=0)
        row["similarity to final"] = sim.value
        row["similarity to final stderr"] = sim.stderr
        rows.append(row)
    return rows


def checkpoint_similarity(run: str | Path, *, method: str = "data", n_ctx: int | None = None,
                          positions: str = "last", n_batches: int = 4, batch_size: int = 16,
                          models: list[tuple[dict, Any]] | None = None,
                          optimize: Any = "greedy") -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(values, stderrs, steps): `similarity_matrix` over the run's checkpoints (``data``: on the
    run's validation sequences; ``exact``: uniform sequences of length ``n_ctx``, contraction paths
    from ``optimize``)."""
    from .similarity import similarity_matrix

    models = checkpoint_models(run) if models is None else models
    batches = None
    if method == "data":
        batches, _ = validation_batches(run, n_batches=n_batches, batch_size=batch_size)
    values, errs = similarity_matrix([m for _, m in models], method, n_ctx=n_ctx, positions=positions,
                                     batches=batches, samples=0, optimize=optimize)
    return values, errs, [e["step"] for e, _ in models]


def change_points(values: np.ndarray) -> list[int]:
    """Indices k (checkpoint k -> k+1) where the trajectory jumps: the dissimilarity of consecutive
    checkpoints, ``1 - S[k, k+1]``, is a local maximum and above median + 3 MAD of all of them (a
    robust outlier rule). Returns the index of the checkpoint *after* the jump."""
    d = 1.0 - np.diag(values, 1)
    if len(d) < 3:
        return []
    med = float(np.median(d))
    mad = float(np.median(np.abs(d - med))) or 1e-12
    out = []
    for k in range(len(d)):
        left = d[k - 1] if k > 0 else -math.inf
        right = d[k + 1] if k + 1 < len(d) else -math.inf
        if d[k] >= left and d[k] >= right and d[k] > med + 3 * mad:
            out.append(k + 1)
    return out


def plot_similarity(values: np.ndarray, steps: list[int], out: str | Path, *, title: str = "") -> Path:
    """Heatmap of the similarity matrix (checkpoints by step), change points marked by lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 5.5), constrained_layout=True)
    im = ax.imshow(values, cmap="viridis", vmin=min(0.0, float(np.nanmin(values))), vmax=1.0)
    labels = [str(s) for s in steps]
    every = max(1, len(steps) // 16)
    ax.set_xticks(range(0, len(steps), every), labels[::every], rotation=90, fontsize="x-small")
    ax.set_yticks(range(0, len(steps), every), labels[::every], fontsize="x-small")
    for k in change_points(values):
        ax.axhline(k - 0.5, color="red", lw=1)
        ax.axvline(k - 0.5, color="red", lw=1)
    ax.set_xlabel("checkpoint step")
    ax.set_ylabel("checkpoint step")
    ax.set_title(title or "functional similarity (red: change points)", fontsize="small")
    fig.colorbar(im, ax=ax, label="cosine similarity of output functions")
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def trajectory_panels(rows: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """The panels `plot_trajectory` draws, top to bottom: (y label, row keys drawn in it). A numeric
    key no panel takes (a ``metrics`` entry) gets a panel of its own."""
    keys = set().union(*rows) if rows else set()
    panels = [
        ("loss (nats)", sorted(k for k in keys if k in ("loss", "entropy") or k.startswith("excess"))),
        ("copying score", sorted(k for k in keys if k.startswith("copying"))),
        ("composition (above baseline)", sorted(k for k in keys if k.endswith("composition"))),
        ("induction score", sorted(k for k in keys if k.startswith("induction ("))),
        ("induction loss (nats,\nrepeated random tokens)", sorted(k for k in keys if k.startswith("induction loss"))),
        ("similarity to final", ["similarity to final"] if "similarity to final" in keys else []),
    ]
    shown = set().union(*(ks for _, ks in panels)) | {"step", "tokens", "kind", "notes", "similarity to final stderr"}
    for k in sorted(keys - shown):
        if any(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) for r in rows):
            panels.append((k, [k]))
    return [(name, ks) for name, ks in panels if ks]


def formation_step(rows: list[dict[str, Any]], key: str) -> int | None:
    """The step at which metric ``key`` formed: the first checkpoint from which it stays at or above
    half of its final rise, the rise measured above the row's ``"{key} chance"`` where it has one (a
    behaviour score starts at its chance level, not at 0). None when the final value does not rise
    above that baseline, or no row has the key.

    "Stays" (not "first reaches") because a score wobbling at its baseline before the circuit forms
    would otherwise be reported as formed at step 1."""
    scored = [r for r in rows if r.get(key) is not None]
    if not scored:
        return None

    def rise(r: dict[str, Any]) -> float:
        return float(r[key]) - float(r.get(f"{key} chance") or 0.0)

    half = 0.5 * rise(scored[-1])
    if not half > 0:
        return None
    formed = None
    for r in scored:
        if rise(r) >= half:
            formed = r["step"] if formed is None else formed
        else:
            formed = None
    return formed


#: The metrics whose formation step `plot_trajectory` marks (and `qtoy dynamics` prints).
FORMATION_KEYS = ("induction (weights)", "induction (behaviour)")


def plot_trajectory(rows: list[dict[str, Any]], out: str | Path, *, title: str = "") -> Path:
    """One picture of when each circuit forms: loss / excess per label, copying and composition
    scores, the induction scores (weight-based and behaviour-based, with the behaviour score's chance
    level dashed), the induction loss (first vs second half of repeated random sequences), the
    similarity to the final model, and one panel per extra metric; x = step (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    panels = trajectory_panels(rows)
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.4 * len(panels)), sharex=True, constrained_layout=True,
                             squeeze=False)
    for ax, (name, ks) in zip(axes[:, 0], panels):
        for k in ks:
            y = [r.get(k, float("nan")) for r in rows]
            y = [float("nan") if v is None else v for v in y]
            style = dict(ls="--", color="grey", lw=1) if k.endswith("chance") else dict(marker="o", ms=3)
            ax.plot(steps, y, label=k, **style)
            if k == "similarity to final":
                err = [r.get("similarity to final stderr", 0.0) or 0.0 for r in rows]
                ax.fill_between(steps, np.array(y) - 2 * np.array(err), np.array(y) + 2 * np.array(err), alpha=0.2)
        ax.set_ylabel(name, fontsize="small")
        ax.legend(fontsize="x-small", loc="best")
        ax.grid(alpha=0.3)
    # The step each induction score formed at, as a vertical line through every panel (labelled in the
    # induction panel), so the other rows can be read at that step.
    formed = [(k, formation_step(rows, k)) for k in FORMATION_KEYS]
    formed = [(k, s) for k, s in formed if s is not None]
    for i, (k, s) in enumerate(formed):
        for ax, (name, ks) in zip(axes[:, 0], panels):
            ax.axvline(s, color=("tab:red", "tab:purple")[i % 2], ls=":", lw=1.2)
            if k in ks:
                ax.annotate(f"{k} formed: step {s}", xy=(s, 1.0), xycoords=("data", "axes fraction"),
                            xytext=(-4, -4 - 11 * i), textcoords="offset points", ha="right", va="top",
                            fontsize="x-small", color=("tab:red", "tab:purple")[i % 2])
    ax = axes[-1, 0]
    ax.set_xscale("log")
    ax.set_xlabel("step (log scale)")
    axes[0, 0].set_title(title or "training dynamics", fontsize="small")
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
