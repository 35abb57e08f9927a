"""DropZeroRnnStatesPass: drop the initial states of LSTM/GRU/RNN nodes that are all zeros.

Rewrite: an ``initial_h`` (input 5) or LSTM ``initial_c`` (input 6) that is zero in every
element becomes an absent input (an empty name); the nodes that computed it are left to
eliminate-dead-nodes. Exporters write such states as a zero scalar broadcast to a shape
computed at run time (tf2onnx: ``Expand(0, Concat(Slice(Shape(x)), [hidden]))`` then
``Unsqueeze`` and ``Concat`` per direction), which keeps a chain of shape nodes alive.

A value is all zeros when it is a constant whose elements all equal 0 (``-0.0``
included), a ConstantOfShape of a zero value (or none: float 0), or made from such values
only by ops that move, repeat or select elements: Expand, Tile, Reshape, Flatten,
Squeeze, Unsqueeze, Transpose, Identity, Slice (of its data), Cast (of a zero) and Concat
(every input all zeros), followed back at most ``MAX_DEPTH`` producers. PyTorch exports a
stacked GRU/LSTM's zero state so: one ``ConstantOfShape([layers * directions, batch,
hidden])`` sliced per layer.

Preconditions: a default-domain LSTM, GRU or RNN whose recurrence weight ``R`` (and an
LSTM's peepholes ``P``, when given) is a constant of finite values, so that ``R`` times
the zero state is zero (an infinite weight times zero would be NaN).

Exact: ONNX defines an absent initial state as zero, so the node computes the same
recurrence from the same values; at most a zero's sign may differ where the first step's
pre-activation sums to a signed zero, and the node's outputs compare equal.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

import optcc

MAX_DEPTH = 16
_STATE_INPUTS = {"LSTM": (5, 6), "GRU": (5,), "RNN": (5,)}
_MOVES = frozenset({"Expand", "Tile", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Cast",
                    "Slice"})  # each output element is one of input 0's


def all_zeros(value: ir.Value | None, depth: int = 0) -> bool:
    """Whether every element of ``value`` is zero (see the module docstring)."""
    if value is None or value.is_graph_input() or depth > MAX_DEPTH:
        return False
    try:
        array = optcc.ir.as_numpy(value)
    except ValueError:  # a malformed Constant
        return False
    if array is not None:
        return array.dtype.kind in "fiub" and not np.any(array)
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx") or not node.inputs:
        return False
    if node.op_type == "ConstantOfShape":
        fill = node.attributes.get("value")
        return fill is None or (fill.type == ir.AttributeType.TENSOR and not np.any(fill.as_tensor().numpy()))
    if node.op_type in _MOVES:
        return all_zeros(node.inputs[0], depth + 1)
    if node.op_type == "Concat":
        return all(all_zeros(v, depth + 1) for v in node.inputs)
    return False


def _finite_constant(value: ir.Value | None) -> bool:
    if value is None or value.is_graph_input():
        return False
    try:
        array = optcc.ir.as_numpy(value)
    except ValueError:  # a malformed Constant
        return False
    return array is not None and array.dtype.kind == "f" and bool(np.isfinite(array).all())


def _droppable(node: ir.Node) -> list[int]:
    """The state inputs of ``node`` that may be dropped."""
    slots = _STATE_INPUTS.get(node.op_type)
    if slots is None or node.domain not in ("", "ai.onnx") or len(node.inputs) < 3:
        return []
    if not _finite_constant(node.inputs[2]):
        return []
    if node.op_type == "LSTM" and len(node.inputs) > 7 and node.inputs[7] is not None \
            and not _finite_constant(node.inputs[7]):
        return []
    return [i for i in slots if i < len(node.inputs) and node.inputs[i] is not None and all_zeros(node.inputs[i])]


class DropZeroRnnStatesPass(optcc.Pass):
    """Drop LSTM/GRU/RNN initial states that are all zeros (their default)."""

    name = "drop-zero-rnn-states"
    numerics = "exact"
    triggers = frozenset(_STATE_INPUTS)

    def call(self, model: ir.Model) -> optcc.PassResult:
        dropped: dict[str, int] = {}
        for node in optcc.ir.nodes(model):
            for index in _droppable(node):
                node.replace_input_with(index, None)
                dropped[node.op_type] = dropped.get(node.op_type, 0) + 1
        return optcc.PassResult(model, bool(dropped), {"dropped": dropped} if dropped else {})
