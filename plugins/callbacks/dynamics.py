"""The seed's "deep bilinear training dynamics" study as a switch: `qtoy train --callback dynamics`."""

from __future__ import annotations

import json

import torch

from qtoy_core import Callback

FILE_NAME = "dynamics.jsonl"


def head_matrices(attn, weight_name: str) -> torch.Tensor:
    """(n_head, d_head, d_model) per-head rows of a projection's weight."""
    w = getattr(attn, weight_name).weight
    return w.view(attn.n_head, attn.d_head, -1)


@torch.no_grad()
def circuit_spectra(model, top_k: int) -> dict:
    """Top singular values per head of W_QK = W_Q^T W_K and W_OV = W_O W_V (d_model x d_model, low rank),
    and for bilinear MLPs the top |eigenvalues| of the interaction matrix along the MLP's dominant
    output direction u: Q_u = sum_h (u . W_out[:, h]) sym(W_l[h]^T W_r[h])."""
    out = {}
    for i, block in enumerate(model.blocks):
        attn = block.attn
        if all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "out_proj", "n_head")):
            wq, wk, wv = (head_matrices(attn, n).float() for n in ("q_proj", "k_proj", "v_proj"))
            wo = attn.out_proj.weight.float().view(-1, attn.n_head, attn.d_head).transpose(0, 1)  # (H, d_model, d_head)
            qk = torch.linalg.svdvals(wq.transpose(1, 2) @ wk)[:, :top_k]
            ov = torch.linalg.svdvals(wo @ wv)[:, :top_k]
            out[f"blocks.{i}.attn.qk_sv"] = qk.tolist()
            out[f"blocks.{i}.attn.ov_sv"] = ov.tolist()
        mlp = getattr(block, "mlp", None)
        if mlp is not None and all(hasattr(mlp, n) for n in ("w_left", "w_right", "out_proj")):
            w_out = mlp.out_proj.weight.float()
            u = torch.linalg.svd(w_out, full_matrices=False).U[:, 0]
            coeff = u @ w_out                                          # (d_mlp,)
            q = torch.einsum("h,hi,hj->ij", coeff, mlp.w_left.weight.float(), mlp.w_right.weight.float())
            eig = torch.linalg.eigvalsh(0.5 * (q + q.T))
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
        with open(trainer.run.path / FILE_NAME, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_start(self, trainer) -> None:
        # A resumed run rewrites what came after its checkpoint, like metrics.jsonl.
        path = trainer.run.path / FILE_NAME
        if path.exists():
            kept = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line)["step"] <= trainer.step:
                        kept.append(line + "\n")
                except (json.JSONDecodeError, KeyError):
                    continue
            path.write_text("".join(kept), encoding="utf-8")


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
