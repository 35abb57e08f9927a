"""The contract every optcc pass follows: an onnx-ir in-place pass that also reports stats."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from typing import Any, ClassVar

import onnx_ir as ir

from optcc.numerics.kinds import NUMERICS_ORDER, Numerics

__all__ = ["Pass", "PassResult", "Numerics", "NUMERICS_ORDER"]


@dataclasses.dataclass
class PassResult(ir.passes.PassResult):
    """onnx-ir's PassResult plus ``stats``: what the pass rewrote, and how many times."""

    stats: dict[str, Any] = dataclasses.field(default_factory=dict)


class Pass(ir.passes.InPlacePass):
    """Base class for optcc passes.

    Subclasses implement ``call(model) -> PassResult`` and set, as class attributes:

    - ``name``: the registry name (kebab-case, e.g. ``"eliminate-identities"``);
    - ``numerics``: "exact", "fusion", "fp16" or "int8" (selects the verification tolerance);
    - ``float16_interface``: True for a pass that may turn float32 graph inputs/outputs into
      float16 (names and shapes must still stay); any other change of the interface is
      reverted;
    - ``triggers``: op types (keys of ``optcc.ir.op_histogram``: a default-domain op by its
      name, another as ``"domain::op"``) such that the pass changes nothing in a model
      holding no node of any of them, in any graph; the pass manager does not run it on
      such a model. None (the default): no such set is claimed.

    A pass's -O level is not its own: the table in ``optcc.infra.levels`` places it.
    Options go in the constructor. A pass must not modify tensor data in place (tensors
    are shared with the pass manager's checkpoints used for reverting); it builds new tensors.
    The class docstring states the rewrite, its preconditions, and why it is exact.
    """

    name: ClassVar[str] = ""
    numerics: ClassVar[Numerics] = "exact"
    float16_interface: bool = False
    triggers: ClassVar[frozenset[str] | None] = None

    def changes_nothing(self, ops: Collection[str]) -> bool:
        """Whether the pass would change nothing in a model whose op histogram (in every
        graph) has the keys ``ops``; the pass manager does not run it on such a model. By
        default: the model holds no node of its ``triggers``."""
        triggers = self.triggers
        return triggers is not None and triggers.isdisjoint(ops)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
