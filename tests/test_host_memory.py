"""Host memory: the qtoy command keeps freed memory for reuse, so eager steps stop faulting in pages.

Page faults are counted (getrusage), not timed: the count is deterministic where a time is not.
Each check runs in a fresh interpreter, since the setting is process-wide and one-way.
"""

import json
import os
import subprocess
import sys

import pytest

from qtoy_core.host_memory import _glibc

needs_glibc = pytest.mark.skipif(_glibc() is None, reason="mallopt is glibc's (Linux); elsewhere it is a no-op")

# allocate and free a 64 MiB tensor (above glibc's largest automatic mmap threshold, like the logits
# of a training step), writing every page: three times to settle the heap, then eight times counting the
# page faults
FAULTS = """
import ctypes, json, resource, sys
# no transparent huge pages in this process: they would cut the fault count of plain malloc 512x
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE
import torch
{setup}
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():
    torch.empty(16 * 2**20).fill_(1.0)
for _ in range(3):
    step()
before = faults()
for _ in range(8):
    step()
print(json.dumps({{"faults": faults() - before, "tuned": tuned, "kept_up_to": kept_up_to}}))
"""


def _faults(setup: str) -> dict:
    # PyTorch's own huge-page switch off too, for the same reason
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", FAULTS.format(setup=setup)], capture_output=True, text=True,
                         check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_glibc
def test_keep_freed_memory_stops_page_faults_of_repeated_large_tensors():
    plain = _faults("tuned, kept_up_to = False, 0")
    kept = _faults("from qtoy_core.host_memory import keep_freed_memory, kept_block_bytes\n"
                   "tuned = keep_freed_memory(); kept_up_to = kept_block_bytes()")
    pages = 8 * 64 * 2**20 // 4096  # what mmap + munmap every time costs: every page faulted again
    assert plain["faults"] > pages // 2, plain
    assert kept["tuned"] is True
    if kept["kept_up_to"] < 64 * 2**20:
        pytest.skip("this glibc caps the mmap threshold at 32 MiB: 64 MiB blocks are still mapped")
    assert kept["faults"] < pages // 50, kept


def _qtoy_then_report(args, env_extra=None):
    code = ("import sys; from qtoy_cli.main import main; main(sys.argv[1:]); "
            "from qtoy_core.host_memory import kept_block_bytes; print('TUNED', kept_block_bytes() > 0)")
    env = {k: v for k, v in os.environ.items() if k != "QTOY_MALLOC"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True, env=env)


@needs_glibc
def test_the_qtoy_command_turns_it_on_and_QTOY_MALLOC_system_leaves_malloc_alone():
    assert "TUNED True" in _qtoy_then_report(["list", "attention"]).stdout
    assert "TUNED False" in _qtoy_then_report(["list", "attention"], {"QTOY_MALLOC": "system"}).stdout


@needs_glibc
def test_an_unknown_QTOY_MALLOC_value_warns_and_keeps_the_default():
    out = _qtoy_then_report(["list", "attention"], {"QTOY_MALLOC": "jemalloc"})
    assert "TUNED True" in out.stdout
    assert "QTOY_MALLOC='jemalloc'" in out.stderr and "system" in out.stderr


def test_help_does_not_touch_malloc():
    # `qtoy --help` runs no subcommand: nothing to tune, and qtoy_core stays unimported (fast help)
    code = "import sys; from qtoy_cli.main import main; main(['--help']); print('CORE', 'qtoy_core' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "CORE False" in out.stdout


class _FakeGlibc:
    """A stand-in glibc whose mallopt refuses mmap thresholds above ``mmap_cap`` (an older glibc: 32 MiB
    on 64-bit systems) and records its calls."""

    def __init__(self, mmap_cap: int):
        self.calls = []
        self.mmap_cap = mmap_cap
        self.mallopt = self  # a callable that takes ctypes' argtypes/restype like the real function

    def __call__(self, param, value):
        self.calls.append((param, value))
        return 0 if param == -3 and value > self.mmap_cap else 1


def test_an_older_glibc_that_caps_the_mmap_threshold_gets_the_cap(monkeypatch):
    from qtoy_core import host_memory

    fake = _FakeGlibc(mmap_cap=32 * 2**20)
    monkeypatch.setattr(host_memory, "_glibc", lambda: fake)
    monkeypatch.setattr(host_memory, "_kept_up_to", 0)
    assert host_memory.keep_freed_memory() is True
    assert fake.calls == [(-3, 2**30), (-3, 32 * 2**20), (-1, 2**31 - 1)]
    assert host_memory.kept_block_bytes() == 32 * 2**20
    assert host_memory.keep_freed_memory() is True and len(fake.calls) == 3  # once per process


def test_a_glibc_that_refuses_every_threshold_is_left_as_it_was(monkeypatch):
    from qtoy_core import host_memory

    fake = _FakeGlibc(mmap_cap=0)
    monkeypatch.setattr(host_memory, "_glibc", lambda: fake)
    monkeypatch.setattr(host_memory, "_kept_up_to", 0)
    assert host_memory.keep_freed_memory() is False
    assert all(p == -3 for p, _ in fake.calls)  # the trim threshold was not touched


def test_without_glibc_it_is_a_no_op(monkeypatch):
    from qtoy_core import host_memory

    monkeypatch.setattr(host_memory, "_glibc", lambda: None)
    monkeypatch.setattr(host_memory, "_kept_up_to", 0)
    assert host_memory.keep_freed_memory() is False
    assert host_memory.kept_block_bytes() == 0


def test_windows_has_no_process_wide_c_library_and_gets_none(monkeypatch):
    # ctypes.CDLL(None) raises TypeError on Windows (Python 3.10-3.12) rather than OSError
    import ctypes

    def no_handle(name, *args, **kwargs):
        raise TypeError("argument of type 'NoneType' is not iterable")

    monkeypatch.setattr(ctypes, "CDLL", no_handle)
    assert _glibc() is None  # the real function (conftest stands one in for the in-process CLI runs)
