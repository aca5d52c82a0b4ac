"""bf16 on CPUs that only emulate it: detected from the CPU flags, `auto` picks fp32 there, and an
explicit bf16 warns once, naming --precision auto (the detection is monkeypatched both ways)."""

import warnings

import pytest
import torch

from qtoy_core.training import precision

CPU = torch.device("cpu")


@pytest.fixture
def flags(monkeypatch):
    monkeypatch.setattr(precision, "_warned", set())

    def set_flags(value):
        monkeypatch.setattr(precision, "cpu_flags", lambda: value)

    return set_flags


def _resolve(name):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = precision.resolve_precision(name, CPU).name
    return result, [w for w in caught if issubclass(w.category, precision.SlowPrecisionWarning)]


def test_avx2_only_cpu_emulates_bf16_auto_is_fp32_and_bf16_warns_once(flags):
    flags({"fpu", "sse4_2", "avx", "avx2", "fma"})
    assert precision.cpu_bf16_matmuls() == "emulated" and not precision.cpu_supports_fast_bf16()
    assert _resolve("auto") == ("fp32", [])
    name, first = _resolve("bf16")
    assert name == "bf16" and len(first) == 1  # bf16 as asked, with the warning
    message = str(first[0].message)
    assert "tens of times slower" in message and "--precision auto" in message
    assert _resolve("bf16")[1] == []  # once per process
    assert _resolve("fp32") == ("fp32", [])


@pytest.mark.parametrize("native", ["avx512_bf16", "amx_bf16"])
def test_native_bf16_cpu_auto_is_bf16_without_warning(flags, native):
    flags({"avx2", "avx512f", native})
    assert precision.cpu_bf16_matmuls() == "native"
    assert _resolve("auto") == ("bf16", [])
    assert _resolve("bf16") == ("bf16", [])


def test_without_cpuinfo_onednn_decides(flags, monkeypatch):
    flags(None)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert precision.cpu_bf16_matmuls() == "emulated"
