"""Which tensor dims are provably equal: each dim traced back to the dim it copies.

``dim_origin(value, axis)`` follows ``value``'s dim ``axis`` up through producers whose
output dim there is, by the operator's definition, one input dim for every input the
graph admits (the op would fail otherwise), and returns the last ``(value, axis)`` reached.
Two dims with the same origin are equal whenever the graph runs, whatever its symbolic
annotations say (those are not trusted: an exporter's ``unk__28`` and ``s6`` may or may
not be equal). The steps, for default-domain ops with the output read being the first:

- elementwise ops of one tensor (activations, Cast, Identity, Softmax over any axis,
  inference BatchNormalization, LayerNormalization, Q/DQ): the same axis of the input;
- broadcasting ops (Add, Mul, Where, ...): the aligned axis of the one input that is not a
  constant, when every other input has no dim there or a constant 1;
- Transpose: the permuted axis; Concat: any axis but the concatenated one, of the first
  input; Unsqueeze/Squeeze with constant axes: the axis it came from;
- Reshape with a constant target: where the target holds 0 (``allowzero`` 0), the same axis;
- Conv, ConvTranspose and pools: the batch; Gemm: rows of A, columns of B (as
  transposed); MatMul of rank >= 2 operands: the last two axes from A and B, a batch axis
  from the one operand that has it;
- LSTM/GRU/RNN's Y: sequence and batch from X (``layout`` read).
"""

from __future__ import annotations

import onnx_ir as ir

from optcc.rewrite.pattern import DEFAULT_DOMAINS, _axes, _const_array, static_rank

__all__ = ["dim_origin", "same_dim"]

MAX_STEPS = 256

_ELEMENTWISE = frozenset({
    "Abs", "Acos", "Asin", "Atan", "Ceil", "Cos", "Cosh", "Elu", "Erf", "Exp", "Floor", "Gelu",
    "HardSigmoid", "HardSwish", "Identity", "IsInf", "IsNaN", "LeakyRelu", "Log", "LogSoftmax",
    "Mish", "Neg", "Not", "Reciprocal", "Relu", "Round", "Selu", "Sigmoid", "Sign", "Sin",
    "Sinh", "Softmax", "Softplus", "Softsign", "Sqrt", "Tan", "Tanh", "ThresholdedRelu",
    "Cast", "CastLike", "Clip", "Dropout", "BatchNormalization", "InstanceNormalization",
    "LayerNormalization", "LpNormalization", "QuantizeLinear", "DequantizeLinear",
})
_BROADCASTING = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "PRelu", "Mod",
    "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Xor", "BitShift",
})
_BATCH_KEEPING = frozenset({
    "Conv", "ConvTranspose", "AveragePool", "MaxPool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
    "GlobalLpPool",
})
_RECURRENT = frozenset({"LSTM", "GRU", "RNN"})


def same_dim(a: ir.Value, a_axis: int, b: ir.Value, b_axis: int, ranks: dict) -> bool:
    """Whether ``a``'s dim ``a_axis`` provably equals ``b``'s dim ``b_axis`` (``ranks``: a
    ``static_rank`` memo)."""
    origin = dim_origin(a, a_axis, ranks)
    return origin is not None and origin == dim_origin(b, b_axis, ranks)


def dim_origin(value: ir.Value, axis: int, ranks: dict) -> tuple[ir.Value, int] | None:
    """The dim ``value``'s dim ``axis`` copies (module docstring), as (value, axis >= 0);
    None when ``value``'s rank is unknown or ``axis`` is outside it."""
    rank = static_rank(value, ranks)
    if rank is None or not -rank <= axis < rank:
        return None
    axis %= rank
    for _ in range(MAX_STEPS):
        step = _step(value, axis, ranks)
        if step is None:
            break
        value, axis = step
    return value, axis


def _step(value: ir.Value, axis: int, ranks: dict) -> tuple[ir.Value, int] | None:
    """The input dim that ``value``'s dim ``axis`` (>= 0, within its rank) is, or None."""
    node = value.producer()
    if node is None or node.domain not in DEFAULT_DOMAINS or not node.inputs or node.inputs[0] is None \
            or value is not node.outputs[0]:
        return None
    op, x = node.op_type, node.inputs[0]
    rank = static_rank(value, ranks)
    if op in _ELEMENTWISE:
        return x, axis
    if op in _BROADCASTING:
        return _broadcast_step(node, axis, rank, ranks)
    if op in _BATCH_KEEPING:
        return (x, 0) if axis == 0 else None
    if op == "Transpose":
        perm = node.attributes.get_ints("perm", None)
        perm = list(reversed(range(rank))) if perm is None and rank is not None else perm
        return (x, int(perm[axis])) if perm is not None and axis < len(perm) else None
    if op == "Concat":
        joined = node.attributes.get_int("axis", 0)
        return (x, axis) if rank is not None and axis != joined % rank else None
    if op == "Reshape" and len(node.inputs) == 2 and not node.attributes.get_int("allowzero", 0):
        target = _const_array(node.inputs[1])
        copies = target is not None and target.ndim == 1 and axis < target.size and int(target[axis]) == 0
        return (x, axis) if copies else None
    if op in ("Unsqueeze", "Squeeze"):
        return _squeeze_step(node, axis, rank, ranks)
    if op == "Gemm" and len(node.inputs) >= 2 and node.inputs[1] is not None:
        if axis == 0:
            return x, 1 if node.attributes.get_int("transA", 0) else 0
        return node.inputs[1], 0 if node.attributes.get_int("transB", 0) else 1
    if op == "MatMul" and len(node.inputs) == 2 and node.inputs[1] is not None and rank is not None:
        a_rank, b_rank = static_rank(x, ranks), static_rank(node.inputs[1], ranks)
        if a_rank is None or b_rank is None or a_rank < 2 or b_rank < 2:
            return None
        if axis == rank - 2:
            return x, a_rank - 2
        if axis == rank - 1:
            return node.inputs[1], b_rank - 1
        # a batch axis: the operand that has one there, when the other has none
        a_at, b_at = axis - (rank - a_rank), axis - (rank - b_rank)
        return (x, a_at) if b_at < 0 <= a_at else (node.inputs[1], b_at) if a_at < 0 <= b_at else None
    if op in _RECURRENT:
        # X [seq, batch, input] -> Y [seq, directions, batch, hidden]; with layout 1,
        # X [batch, seq, input] -> Y [batch, seq, directions, hidden]
        source = ({0: 0, 1: 1} if node.attributes.get_int("layout", 0) == 1 else {0: 0, 2: 1}).get(axis)
        return (x, source) if source is not None else None
    return None


def _broadcast_step(node: ir.Node, axis: int, rank: int | None, ranks: dict) -> tuple[ir.Value, int] | None:
    """The one non-constant input whose aligned dim the output's dim ``axis`` is: every other
    input has no dim there (a lower rank) or a constant 1."""
    if rank is None:
        return None
    chosen = None
    for value in node.inputs:
        if value is None:
            continue
        array = _const_array(value)
        if array is not None:
            at = axis - (rank - array.ndim)
            if at >= 0 and array.shape[at] != 1:
                return None  # the constant sets (or must equal) the dim: nothing to trace
            continue
        input_rank = static_rank(value, ranks)
        if input_rank is None or chosen is not None:
            return None
        at = axis - (rank - input_rank)
        if at < 0:
            continue  # this input has no dim there
        chosen = (value, at)
    return chosen


def _squeeze_step(node: ir.Node, axis: int, rank: int | None, ranks: dict) -> tuple[ir.Value, int] | None:
    """The input axis an Unsqueeze/Squeeze output's ``axis`` came from (constant axes)."""
    axes = _axes(node, False)
    x_rank = static_rank(node.inputs[0], ranks)
    if axes is None or rank is None or x_rank is None:
        return None
    if node.op_type == "Unsqueeze":
        added = sorted(int(a) % rank for a in axes)
        return None if axis in added else (node.inputs[0], axis - sum(a < axis for a in added))
    removed = {int(a) % x_rank for a in axes}
    kept = [i for i in range(x_rank) if i not in removed]
    return (node.inputs[0], kept[axis]) if axis < len(kept) else None
