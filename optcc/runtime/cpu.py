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
    model: str = ""  # the vendor's model name, where the system says it

    @classmethod
    def of(cls, machine: str, flags: Iterable[str], model: str = "") -> CpuFeatures:
        return cls(machine.lower(), frozenset(f.lower() for f in flags), model)

    @property
    def x86(self) -> bool:
        return self.machine in _X86

    @property
    def vnni(self) -> bool:
        """Whether the CPU has x86 integer dot-product instructions (AVX512-VNNI or AVX-VNNI)."""
        return self.x86 and bool({"avx512_vnni", "avx_vnni"} & self.flags)


def _cpuinfo() -> tuple[list[str], str] | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    flags: list[str] = []
    model = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features") and not flags:
            flags = value.split()
        elif key == "model name" and not model:
            model = value.strip()
    return (flags, model) if flags else None


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
    found = _cpuinfo()
    flags, model = found if found is not None else (_numpy_flags(), "")
    return CpuFeatures.of(platform.machine(), flags, model)
