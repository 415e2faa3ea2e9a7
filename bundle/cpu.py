"""Which instruction set this CPU offers, as far as the integer kernels of a bundle care.

Quantized kernels pick their code path by ISA at run time (onnxruntime's MLAS, XNNPACK), and the
paths do not all compute the same (see :mod:`hartkit.quantize.schemes`): the manifest records the
exporting machine's ISA and the load-time self-check names both when a graph computes differently.

numpy asks the CPU itself (cpuid), so the answer is right under an emulator too, where
``/proc/cpuinfo`` shows the host; ``/proc/cpuinfo`` is the fallback.
"""

from __future__ import annotations

import functools
import platform

# The ISA classes whose integer dot products differ, most capable first: (label, features needed).
_X86_CLASSES = (
    ("avx512_vnni", ("AVX512F", "AVX512BW", "AVX512VNNI")),
    ("avx512", ("AVX512F", "AVX512BW")),
    ("avx2", ("AVX2",)),
    ("avx", ("AVX",)),
    ("sse4", ("SSE41",)),
)
_ARM_CLASSES = (
    ("arm64_dotprod", ("ASIMDDP",)),
    ("arm64", ("ASIMD",)),
)
_PROC_FLAGS = {"avx512f": "AVX512F", "avx512bw": "AVX512BW", "avx512_vnni": "AVX512VNNI", "avx_vnni": "AVXVNNI",
               "avx2": "AVX2", "avx": "AVX", "sse4_1": "SSE41", "asimddp": "ASIMDDP", "asimd": "ASIMD"}


@functools.lru_cache(maxsize=1)
def cpu_features() -> frozenset[str]:
    """numpy's names of the features this CPU has (``AVX2``, ``AVX512VNNI``, ``ASIMDDP``, ...)."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__  # cpuid, as numpy dispatches on it
        return frozenset(k for k, v in __cpu_features__.items() if v)
    except ImportError:  # a numpy without the private table: read what the kernel reports
        pass
    found: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    found.update(_PROC_FLAGS[w] for w in line.split(":", 1)[1].split() if w in _PROC_FLAGS)
                    break
    except OSError:
        pass
    return frozenset(found)


def cpu_isa() -> str:
    """One label for the integer-kernel class of this CPU, e.g. ``avx512_vnni``, ``avx2``, ``arm64_dotprod``."""
    feats = cpu_features()
    machine = platform.machine().lower()
    classes = _ARM_CLASSES if machine in ("arm64", "aarch64") else _X86_CLASSES
    for label, needed in classes:
        if all(f in feats for f in needed):
            return label
    return machine or "unknown"


def cpu_description() -> dict:
    """What the manifest records about the exporting machine."""
    return {"machine": platform.machine(), "isa": cpu_isa()}
