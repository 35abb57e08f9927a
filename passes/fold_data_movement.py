"""Constant folding without an onnxruntime session, for the nodes whose result NumPy
gives bit for bit: Reshape, Squeeze and Unsqueeze (they only relabel the dimensions of
their input's elements, in order) and a Cast that converts exactly (a widening integer
cast, or integers to floats that hold every value exactly: the float converts back to
the same integer). ``fold-constants`` evaluates these first and runs a session only for
the rest of a wave; a model of shape constants and per-channel parameters (Unsqueezed
BatchNorm factors, Reshaped weights, Cast index tables) then needs no session at all.

Anything outside the plain cases (an attribute missing or unexpected, a shape that does
not fit, an axis out of range, a Cast that rounds) gives None and is left to onnxruntime,
which also reports errors as the runtime would.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

import optcc

__all__ = ["evaluate"]

# integer source dtypes of an exact Cast, and the targets each may be cast to
_INTS = frozenset({ir.DataType.INT8, ir.DataType.INT16, ir.DataType.INT32, ir.DataType.INT64,
                   ir.DataType.UINT8, ir.DataType.UINT16, ir.DataType.UINT32, ir.DataType.UINT64})
_FLOATS = frozenset({ir.DataType.FLOAT, ir.DataType.DOUBLE})


def evaluate(node: ir.Node, opset: int, inputs: Sequence[np.ndarray | None]) -> list[np.ndarray] | None:
    """The node's outputs computed with NumPy (``inputs``: its input arrays, None for an
    omitted optional input), or None when it is not one of the plain cases."""
    if len(node.outputs) != 1 or not inputs or inputs[0] is None:
        return None
    compute = _OPS.get(node.op_type)
    if compute is None or node.domain not in ("", "ai.onnx"):
        return None
    try:
        result = compute(node, opset, inputs)
    except (ValueError, TypeError, IndexError, OverflowError):
        return None
    return None if result is None else [result]


def _axes(node: ir.Node, opset: int, inputs: Sequence[np.ndarray | None]) -> list[int] | None:
    """The ``axes`` operand (an attribute before opset 13, the second input from 13 on);
    None when absent."""
    if opset < 13:
        if len(inputs) != 1 or set(node.attributes) - {"axes"}:
            raise ValueError("unexpected inputs or attributes")
        attr = node.attributes.get("axes")
        return None if attr is None else [int(a) for a in attr.as_ints()]
    if node.attributes:
        raise ValueError("unexpected attributes")
    if len(inputs) < 2 or inputs[1] is None:
        return None
    if len(inputs) > 2 or inputs[1].dtype != np.int64 or inputs[1].ndim != 1:
        raise ValueError("unexpected axes")
    return [int(a) for a in inputs[1]]


def _unsqueeze(node: ir.Node, opset: int, inputs: Sequence[np.ndarray | None]) -> np.ndarray | None:
    axes = _axes(node, opset, inputs)
    return None if axes is None else optcc.ir.unsqueezed(inputs[0], axes)  # axes are required


def _squeeze(node: ir.Node, opset: int, inputs: Sequence[np.ndarray | None]) -> np.ndarray | None:
    return optcc.ir.squeezed(inputs[0], _axes(node, opset, inputs))


def _reshape(node: ir.Node, opset: int, inputs: Sequence[np.ndarray | None]) -> np.ndarray | None:
    if opset < 5 or len(inputs) != 2 or inputs[1] is None:
        return None  # before opset 5 the shape is an attribute
    data, shape = inputs
    if set(node.attributes) - {"allowzero"} or shape.dtype != np.int64 or shape.ndim != 1:
        return None
    allowzero = node.attributes.get_int("allowzero", 0) if opset >= 14 else 0
    return optcc.ir.reshaped(data, [int(d) for d in shape], bool(allowzero))


def _cast(node: ir.Node, opset: int, inputs: Sequence[np.ndarray | None]) -> np.ndarray | None:
    if len(inputs) != 1 or set(node.attributes) != {"to"}:
        return None
    data = inputs[0]
    target = ir.DataType(node.attributes.get_int("to"))
    source = ir.DataType.from_numpy(data.dtype)
    if source not in _INTS or (target not in _INTS and target not in _FLOATS):
        return None
    if target in _INTS:
        # a widening cast keeps every value: the same number in a wider type
        return data.astype(target.numpy()) if np.can_cast(data.dtype, target.numpy(), "safe") else None
    with np.errstate(invalid="ignore", over="ignore"):
        converted = data.astype(target.numpy())
        back = converted.astype(data.dtype)
    if not np.all(np.isfinite(converted)) or not np.array_equal(back, data):
        return None  # a value the float cannot hold exactly: rounding is left to the kernel
    return converted


_OPS: dict[str, Callable[[ir.Node, int, Sequence[np.ndarray | None]], np.ndarray | None]] = {
    "Reshape": _reshape,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Cast": _cast,
}
