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


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (Linux), None where there is no such file."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        return None
    return None


def cpu_bf16_matmuls() -> str:
    """How this CPU runs bf16 matmuls: "native" (AMX or AVX512-BF16 instructions) or "emulated"
    (converted to fp32 inside the kernels: on a 2-core AVX2-only AMD EPYC ~1 GFLOP/s against ~100
    for fp32). Read from /proc/cpuinfo where it exists, else from oneDNN's own check."""
    flags = cpu_flags()
    if flags is not None and ({"avx2", "avx512f", "asimd"} & flags):  # an x86 or ARM flags line
        return "native" if {"amx_bf16", "avx512_bf16", "bf16"} & flags else "emulated"
    try:
        return "native" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "emulated"
    except Exception:
        return "emulated"


def cpu_supports_fast_bf16() -> bool:
    """True on CPUs with native bf16 matmul (AVX512-BF16 or AMX): there bf16 matmuls are ~2x (AVX512-BF16,
    measured on a 2-core AMD EPYC) to several times (AMX) faster than fp32. On other CPUs (AVX2 only)
    they are emulated and tens of times slower than fp32."""
    return cpu_bf16_matmuls() == "native"


class SlowPrecisionWarning(UserWarning):
    """A precision the hardware only emulates (bf16 on a CPU without AVX512-BF16 or AMX)."""


_warned: set[str] = set()


def warn_if_emulated(name: str, device: torch.device) -> None:
    """Warn once per process that bf16 on a CPU without native bf16 runs tens of times slower."""
    if name != "bf16" or device.type != "cpu" or "bf16" in _warned or cpu_supports_fast_bf16():
        return
    _warned.add("bf16")
    import warnings

    warnings.warn(
        f"--precision bf16 on this CPU ({torch.backends.cpu.get_cpu_capability()}, no AVX512-BF16 or AMX): bf16 "
        f"matmuls are emulated here and the run will be tens of times slower than fp32 (~1 against ~100 GFLOP/s "
        f"on a 2-core AVX2 EPYC). Use --precision auto, which picks fp32 on this CPU.",
        SlowPrecisionWarning, stacklevel=3)


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
    """auto: bf16 autocast where the hardware runs it fast (AMX/AVX512-BF16 CPUs, bf16 GPUs), else fp32.
    An explicit bf16 on a CPU that only emulates it warns once (`SlowPrecisionWarning`)."""
    warn_if_emulated(name, device)
    if name == "auto":
        if device.type == "cuda":
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        elif device.type == "cpu":
            name = "bf16" if cpu_supports_fast_bf16() else "fp32"
        else:
            name = "fp32"
    return Precision(name, device.type)
