"""What a rewrite may do to the numbers a model computes."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

__all__ = ["Numerics", "NUMERICS_ORDER", "loosest"]

# From strictest to loosest. The verifier's tolerance is chosen by the loosest kind among
# the passes whose changes were kept.
Numerics = Literal["exact", "fusion", "fp16", "int8"]
NUMERICS_ORDER: tuple[Numerics, ...] = ("exact", "fusion", "fp16", "int8")


def loosest(kinds: Iterable[Numerics]) -> Numerics:
    """The loosest numerics kind among ``kinds`` ("exact" when empty)."""
    return max(kinds, key=NUMERICS_ORDER.index, default="exact")
