"""The CPU onnxruntime runs on, as its feature flags say (never by timing it).

``this_cpu()`` reads the flags once per call: on Linux the ``flags`` (x86) or ``Features``
(ARM) line of ``/proc/cpuinfo``, which names every instruction-set extension the kernel
enables; elsewhere numpy's record of the features it detected at import (lower-cased,
``AVX512VNNI`` read as ``avx512_vnni``; it does not name AVX-VNNI).
"""

from __future__ import annotations

import dataclasses
import platform
from collections.abc import Iterable

__all__ = ["CpuFeatures", "this_cpu"]

_X86 = ("x86_64", "amd64", "x86-64", "i386", "i686", "x86")
_NUMPY_NAMES = {"avx512vnni": "avx512_vnni"}


@dataclasses.dataclass(frozen=True)
class CpuFeatures:
    """A CPU's architecture (``platform.machine()``, lower-cased) and feature flags."""

    machine: str
    flags: frozenset[str]

    @classmethod
    def of(cls, machine: str, flags: Iterable[str]) -> CpuFeatures:
        return cls(machine.lower(), frozenset(f.lower() for f in flags))

    @property
    def x86(self) -> bool:
        return self.machine in _X86

    @property
    def vnni(self) -> bool:
        """Whether the CPU has x86 integer dot-product instructions (AVX512-VNNI or AVX-VNNI)."""
        return self.x86 and bool({"avx512_vnni", "avx_vnni"} & self.flags)


def _cpuinfo() -> list[str] | None:
    """The first non-empty ``flags`` (x86) or ``Features`` (ARM) line of ``/proc/cpuinfo``, split."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features") and value.split():
            return value.split()
    return None


def _numpy_flags() -> list[str]:
    try:
        from numpy._core._multiarray_umath import __cpu_features__  # type: ignore[import-not-found]
    except ImportError:  # numpy 1
        try:
            from numpy.core._multiarray_umath import __cpu_features__  # type: ignore[import-not-found,no-redef]
        except ImportError:
            return []
    names = [name.lower() for name, present in __cpu_features__.items() if present]
    return [_NUMPY_NAMES.get(name, name) for name in names]


def this_cpu() -> CpuFeatures:
    """The features of the CPU this process runs on (module doc)."""
    flags = _cpuinfo()
    return CpuFeatures.of(platform.machine(), flags if flags is not None else _numpy_flags())
