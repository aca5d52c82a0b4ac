"""Device and mixed-precision choices."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from qtoy_registry import QtoyError


class DeviceError(QtoyError):
    pass


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"--device {name!r} is not a device name: use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {name} asked for CUDA, but this torch has no usable GPU: use --device cpu "
                          f"(or auto), or install a CUDA build of torch.")
    return device


def cpu_supports_fast_bf16() -> bool:
    """True on CPUs with native bf16 matmul (AVX512-BF16 or AMX): there bf16 matmuls are ~2x (AVX512-BF16,
    measured on a 2-core AMD EPYC) to several times (AMX) faster than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


@dataclass(frozen=True)
class Precision:
    name: str                 # fp32 | bf16 | fp16
    device_type: str

    @property
    def dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler(self.device_type) if self.name == "fp16" else None


def resolve_precision(name: str, device: torch.device) -> Precision:
    """auto: bf16 autocast where the hardware runs it fast (AMX/AVX512-BF16 CPUs, bf16 GPUs), else fp32."""
    if name == "auto":
        if device.type == "cuda":
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        elif device.type == "cpu":
            name = "bf16" if cpu_supports_fast_bf16() else "fp32"
        else:
            name = "fp32"
    return Precision(name, device.type)
