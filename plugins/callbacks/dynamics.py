"""The seed's "deep bilinear training dynamics" study as a switch: `qtoy train --callback dynamics`.

Every number is read through qtoy's weight views (`model_weights`, the circuits `qtoy analyze` uses),
never by attribute name: every QK pair of an attention (bilinear attention has two), any MLP that
offers bilinear ``W_l``/``W_r``/``W_out`` views (plugins included), and norm gains folded in.
The callback also draws its own panels for `qtoy plot` (`plot_panels`), so core knows nothing of
dynamics.jsonl's keys.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qtoy_core import Callback, mlp_interaction, model_weights, ov_matrix, qk_matrix, read_jsonl, spectrum

FILE_NAME = "dynamics.jsonl"


def _top_singular_values(fm, top_k: int) -> list[list[float]]:
    """(n_head, top_k) largest singular values of a per-head FactoredMatrix (d_model x d_model, low rank)."""
    return torch.linalg.svdvals(fm.AB.double())[:, :top_k].tolist()


@torch.no_grad()
def circuit_spectra(model, top_k: int) -> dict:
    """Top singular values per head of every QK form ``W_Q K W_K^T`` (key ``qk_sv`` for the first pair,
    ``qk2_sv``, ... for more) and of ``W_OV = W_V W_O``; each head's OV copying score (``ov_copying``,
    as `qtoy analyze` reports it: of the OV circuit ``W_E W_V W_O W_U``); and for bilinear MLPs the top
    |eigenvalues| of the interaction matrix along the MLP's dominant output direction u:
    ``Q_u = sym(sum_h (u . W_out[:, h]) W_l[h]^T W_r[h])``."""
    w = model_weights(model)
    out = {}
    for lw in w.layers:
        i = lw.layer
        if lw.has_circuits:
            for f in range(len(lw.qk_pairs)):
                out[f"blocks.{i}.attn.qk{'' if f == 0 else f + 1}_sv"] = _top_singular_values(qk_matrix(w, i, factor=f), top_k)
            ov = ov_matrix(w, i)
            out[f"blocks.{i}.attn.ov_sv"] = _top_singular_values(ov, top_k)
            # the OV circuit W_E (W_V W_O) W_U, kept factored: its spectrum is qtoy analyze's copying score
            out[f"blocks.{i}.attn.ov_copying"] = [s.copying_score for s in spectrum(w.W_E @ ov @ w.W_U)]
        if lw.is_bilinear_mlp:
            u = torch.linalg.svd(lw.mlp["W_out"], full_matrices=False).U[:, 0]
            eig = torch.linalg.eigvalsh(mlp_interaction(w, i, u).double())
            out[f"blocks.{i}.mlp.top_eig"] = eig[eig.abs().argsort(descending=True)][:top_k].tolist()
    return out


class Dynamics(Callback):
    def __init__(self, config):
        self.every, self.top_k = config.every, config.top_k
        self._grads: dict[str, float] | None = None

    def _due(self, step: int) -> bool:
        return step % self.every == 0 or step == 1

    def on_before_optimizer_step(self, trainer) -> None:
        if self._due(trainer.step + 1):
            self._grads = _layer_norms(trainer.model, grads=True)

    def on_step_end(self, trainer, metrics: dict) -> None:
        if not self._due(trainer.step) or not trainer.world.is_main:
            return
        record = {"step": trainer.step, "tokens": trainer.tokens, "loss": metrics["loss"],
                  "weight_norm": _layer_norms(trainer.model, grads=False), "grad_norm": self._grads or {},
                  **circuit_spectra(trainer.model, self.top_k)}
        self._grads = None
        # through the trainer: written to dynamics.jsonl and passed on to the experiment trackers; a
        # resumed run truncates the file after its checkpoint, as it does metrics.jsonl
        trainer.log_record(FILE_NAME, record)

    @staticmethod
    def plot_panels(run: Path) -> list:
        """`Callback.plot_panels`: the top singular values per circuit and the weight norms over steps."""
        records = read_jsonl(Path(run) / FILE_NAME)
        if not records:
            return []
        x = [d["step"] for d in records]

        def spectra(ax) -> None:
            for key in sorted(k for k in records[-1] if k.endswith("_sv")):
                series = [d[key][0][0] if d.get(key) else float("nan") for d in records]  # head 0, top value
                ax.plot(x, series, label=f"{key} (head 0, top)")
            ax.set_ylabel("top singular value")
            ax.legend(fontsize="x-small")

        def norms(ax) -> None:
            for key in sorted(records[-1]["weight_norm"]):
                ax.plot(x, [d["weight_norm"].get(key, float("nan")) for d in records], label=key)
            ax.set_ylabel("weight norm")
            ax.legend(fontsize="x-small")

        return [spectra, norms]


def _layer_norms(model, *, grads: bool) -> dict[str, float]:
    """Frobenius norms grouped by top-level unit: embed, blocks.<i>.attn, blocks.<i>.mlp, ..."""
    sums: dict[str, float] = {}
    for name, p in model.named_parameters():
        t = p.grad if grads else p
        if t is None:
            continue
        parts = name.split(".")
        key = ".".join(parts[:3]) if parts[0] == "blocks" else parts[0]
        sums[key] = sums.get(key, 0.0) + float(t.detach().float().pow(2).sum())
    return {k: v ** 0.5 for k, v in sums.items()}
