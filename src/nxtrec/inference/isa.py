"""What this CPU can do, read from the operating system (torch-free, for `nxtrec info` and for
the choice of CPU kernels in `nxtrec.inference.cpu`).

The flags come from /proc/cpuinfo (Linux); elsewhere the set is empty and every choice falls
back to what a probe of the kernel itself says. oneDNN's own switch `ONEDNN_MAX_CPU_ISA`
caps what oneDNN uses below what the CPU has (an AVX-512 machine then behaves like an AVX2
one for oneDNN), so it is read too.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from functools import cache

# The flags a user pastes into a bug report: what decides the speed of each dtype.
RELEVANT_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8",
                  "amx_tile", "asimd", "bf16", "i8mm", "sve")  # fmt: skip
# x86 flags that make bfloat16 arithmetic native (Linux names); aarch64 calls it "bf16".
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
# ONEDNN_MAX_CPU_ISA values below AVX512_CORE_BF16: oneDNN then has no native bf16 kernels.
ONEDNN_CAPS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


@dataclass(frozen=True)
class CpuInfo:
    model: str
    machine: str  # x86_64, aarch64, ...
    cores: int  # logical CPUs this process may use
    flags: frozenset[str] = field(default_factory=frozenset)

    @property
    def onednn_cap(self) -> str | None:
        return os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() or None

    @property
    def native_bf16(self) -> bool:
        """bfloat16 has arithmetic instructions here and oneDNN is allowed to use them."""
        return any(f in self.flags for f in BF16_FLAGS) and self.onednn_cap not in ONEDNN_CAPS_WITHOUT_BF16

    def bf16_missing(self) -> str:
        """Why bfloat16 is not native here ("" when it is)."""
        if self.native_bf16:
            return ""
        if any(f in self.flags for f in BF16_FLAGS):
            return f"oneDNN is limited to ONEDNN_MAX_CPU_ISA={self.onednn_cap}"
        return "no avx512_bf16, AMX or bf16 instructions"

    def relevant_flags(self) -> list[str]:
        return [f for f in RELEVANT_FLAGS if f in self.flags]


def _proc_cpuinfo() -> tuple[str, frozenset[str]]:
    try:
        text = open("/proc/cpuinfo", encoding="utf-8", errors="replace").read()
    except OSError:
        return "", frozenset()
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model", "Hardware") and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:  # x86, aarch64
            flags = frozenset(value.split())
    return model, flags


@cache
def cpu_info() -> CpuInfo:
    model, flags = _proc_cpuinfo()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return CpuInfo(model or platform.processor() or "unknown", platform.machine(), cores, flags)
