"""Axis maps of layout ops (Transpose, Squeeze, Unsqueeze) and operands carried through them.

An axis map of a layout change from rank ``r`` to rank ``len(src)``: output axis ``i``
holds input axis ``src[i]``, or is an inserted unit axis where ``src[i] == -1``; input
axes absent from ``src`` are unit axes removed. An elementwise op's constant operand, or
a constant-mode Pad's pads, carried back through such a map pair every element of the
map's input with the same constant element (or pad) as before: the sink-layout-ops pass
moves ops before a layout change with them, and the proof of equivalence keys an op after
a layout change as that change after the op carried back (the same function, so both
agree to the byte).
"""

from __future__ import annotations

import numpy as np

__all__ = ["LAYOUT_FREE_BINARY", "LAYOUT_FREE_UNARY", "AxisMap", "broadcasts", "carried_back", "carried_pads", "compose",
           "full_pads", "same_operand", "squeeze_map"]

# f(x)[i] depends on x[i] alone, and no attribute names an axis
LAYOUT_FREE_UNARY = frozenset({
    "Abs", "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "Cast", "Ceil", "Celu", "Cos", "Cosh",
    "Elu", "Erf", "Exp", "Floor", "Gelu", "HardSigmoid", "HardSwish", "Identity", "IsInf", "IsNaN",
    "LeakyRelu", "Log", "Mish", "Neg", "Not", "Reciprocal", "Relu", "Round", "Selu", "Sigmoid",
    "Sign", "Sin", "Sinh", "Softplus", "Softsign", "Sqrt", "Tan", "Tanh", "ThresholdedRelu",
})
# f(a, b)[i] depends on a[i] and b[i] alone (after broadcasting)
LAYOUT_FREE_BINARY = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "PRelu", "And", "Or", "Xor", "Equal", "Less",
    "LessOrEqual", "Greater", "GreaterOrEqual",
})

AxisMap = list[int]


def squeeze_map(op: str, axes: list[int] | tuple[int, ...], rank: int) -> AxisMap | None:
    """The axis map of a Squeeze or Unsqueeze at ``axes`` reading a value of rank ``rank``;
    None where an axis is out of range or repeats, or no axis is given."""
    if not axes:
        return None
    out_rank = rank - len(axes) if op == "Squeeze" else rank + len(axes)
    limit = rank if op == "Squeeze" else out_rank
    if any(not -limit <= a < limit for a in axes) or out_rank < 0:
        return None
    positions = {a % limit for a in axes}
    if len(positions) != len(axes):
        return None
    if op == "Squeeze":
        return [j for j in range(rank) if j not in positions]
    inputs = iter(range(rank))
    return [-1 if i in positions else next(inputs) for i in range(out_rank)]


def compose(first: AxisMap, second: AxisMap) -> AxisMap:
    """The map of ``second`` applied after ``first``."""
    return [-1 if s == -1 else first[s] for s in second]


def carried_back(array: np.ndarray, src: AxisMap, rank: int) -> np.ndarray | None:
    """``array`` (broadcast against a value of rank ``len(src)``) in the layout of the map's
    input of rank ``rank``, leading 1s dropped; None when ``array`` has more axes than the
    value or a dim other than 1 on an inserted axis. Its dims on removed axes are 1."""
    if array.ndim > len(src):
        return None
    full = array.reshape((1,) * (len(src) - array.ndim) + array.shape)
    if any(s == -1 and d != 1 for s, d in zip(src, full.shape)):
        return None
    kept = [i for i, s in enumerate(src) if s != -1]
    order = sorted(kept, key=lambda i: src[i])
    moved = full.transpose(order + [i for i in range(len(src)) if src[i] == -1])
    dims = [full.shape[src.index(j)] if j in src else 1 for j in range(rank)]
    while dims and dims[0] == 1:
        dims.pop(0)
    return moved.reshape(dims)


def same_operand(array: np.ndarray | None, carried: np.ndarray) -> bool:
    """Whether a carried constant is ``array`` (an operand's own) to the byte: the operand is
    then kept as it is, else replaced by one holding ``carried``."""
    return array is not None and array.shape == carried.shape and array.dtype == carried.dtype \
        and array.tobytes() == carried.tobytes()


def carried_pads(pads: list[int], src: AxisMap, rank: int) -> np.ndarray | None:
    """A constant-mode Pad's begin and end pads for every axis of a value of rank
    ``len(src)`` (``2 * len(src)`` entries), moved to the axes of the map's input of rank
    ``rank`` they come from (int64); None where an inserted axis is padded. Removed axes
    get no pads."""
    half = len(src)
    if len(pads) != 2 * half or any(s == -1 and (pads[i] or pads[half + i]) for i, s in enumerate(src)):
        return None
    begins = [pads[src.index(j)] if j in src else 0 for j in range(rank)]
    ends = [pads[half + src.index(j)] if j in src else 0 for j in range(rank)]
    return np.array(begins + ends, dtype=np.int64)


def broadcasts(op: str, opset: int) -> bool:
    """Whether the ``LAYOUT_FREE_BINARY`` op ``op`` broadcasts its operands at ``opset`` as
    numpy does (PRelu its slope one way), which carrying a constant back needs: from opset 7
    on, Max and Min from 8 (Max-6 and Min-6 take inputs of one shape; earlier binary ops
    broadcast by their own ``broadcast``/``axis`` attributes)."""
    return opset >= (8 if op in ("Max", "Min") else 7)


def full_pads(pads: list[int], axes: list[int] | None, rank: int) -> list[int] | None:
    """A Pad's begin and end pads (opset 11 on: its ``pads`` input, and ``axes`` where
    given) for every axis of its rank-``rank`` input; None where they do not fit."""
    if axes is None:
        return pads if len(pads) == 2 * rank else None
    if 2 * len(axes) != len(pads) or any(not -rank <= a < rank for a in axes) \
            or len({a % rank for a in axes}) != len(axes):  # an axis named twice
        return None
    full = [0] * (2 * rank)
    for k, axis in enumerate(a % rank for a in axes):
        full[axis], full[rank + axis] = pads[k], pads[len(axes) + k]
    return full
