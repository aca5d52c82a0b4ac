"""What machine a benchmark ran on: CPU model and the instruction sets that decide its matmul speed.

Figures from different CPUs are not comparable: with AMX (Intel Sapphire Rapids and later) bf16
matmuls run several times faster than fp32; with AVX-512 BF16 but no AMX (e.g. AMD Zen 4) about 2x.
Every benchmark records this next to its figures; the timing and memory ones also record how host
memory was allocated (``--malloc``).
"""

from __future__ import annotations

import os
import platform

# the flags (from /proc/cpuinfo) that matter for torch's CPU matmuls
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def describe() -> dict:
    """{"cpu": model name, "cpus": count, "isa": {flag: present}, "bf16_matmul_units": "AMX" / "AVX-512 BF16" / ...}."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key == "flags":
                    flags = set(value.split())
                if model and flags:
                    break
    except OSError:
        pass
    isa = {f: f in flags for f in ISA_FLAGS}
    units = ("AMX" if isa["amx_bf16"] else "AVX-512 BF16" if isa["avx512_bf16"]
             else "none (bf16 emulated)" if flags else "unknown")
    return {"cpu": model, "cpus": os.cpu_count(), "isa": isa, "bf16_matmul_units": units}


MALLOC_CHOICES = ("qtoy", "system")


def add_malloc_option(parser) -> None:
    parser.add_argument("--malloc", choices=MALLOC_CHOICES, default="qtoy",
                        help="qtoy (default): keep freed host memory for reuse, as the `qtoy` command does "
                             "(qtoy_core.host_memory); system: glibc's defaults, as a plain script runs. "
                             "Applies to every variant of the run (one process)")


def apply_malloc(choice: str) -> int:
    """Set up host memory as ``--malloc`` says. Returns the largest block size now kept for reuse
    (1 GiB, or 32 MiB on an older glibc), 0 when none is (``system``, or no glibc)."""
    if choice == "system":
        return 0
    from qtoy_core.host_memory import keep_freed_memory, kept_block_bytes

    keep_freed_memory()
    return kept_block_bytes()


def page_faults() -> int:
    """Minor page faults of this process so far: pages the kernel had to map (and zero) on first touch."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def one_line(info: dict | None = None) -> str:
    info = info or describe()
    return f"{info['cpu']}, {info['cpus']} cpus, bf16 matmuls on: {info['bf16_matmul_units']}"


if __name__ == "__main__":
    print(one_line())
