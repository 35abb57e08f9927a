"""Attention-mask fills that float16 can hold.

Exporters fill masked attention positions with -inf or finfo(float32).min (-3.4e38), added
to the scores before Softmax. Neither survives float16 (-3.4e38 overflows; both make
every value on the mask path "reach |x| >= 65504", which keeps that path float32 behind
Casts in every layer). What matters to Softmax is only that masked scores are so low that
``exp(score - max)`` is 0: any fill below about -104 does that in float32 and float16.

``clamp_mask_fills`` replaces, in constants that only feed attention masks, every value
<= -65504 (including -inf) by ``MASK_FILL = -16384`` (2**14, exact in float16): low enough
that exp() of it is 0 in either type, high enough that a score (|s| < 16000) plus up to
three such fills (causal + padding + a bias) stays finite in float16.

A constant counts as a mask fill when every path from it runs through mask-building ops
(Where, Expand, Unsqueeze, Reshape, Mul, Add, Sub, Cast, Concat, Slice, Tile, Min, Max, ...)
and at least one reaches the input of a Softmax over the last axis, an Add feeding one,
the ``attn_mask`` of ``Attention`` or the ``attention_bias`` of
``com.microsoft.MultiHeadAttention`` or ``com.microsoft.Attention``. Exact in float32 on every row with at least one
unmasked key (those positions get probability 0 either way); a row in which every key is
masked becomes a uniform average instead of NaN/0 — no valid input has one.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

from optcc import ir as oir

__all__ = ["MASK_FILL", "clamp_mask_fills"]

MASK_FILL = -16384.0
FP16_MAX = 65504.0
_PASS_THROUGH = frozenset({
    "Where", "Expand", "Unsqueeze", "Squeeze", "Reshape", "Mul", "Add", "Sub", "Cast", "CastLike",
    "Concat", "Slice", "Tile", "Transpose", "Min", "Max", "Identity", "Neg", "Gather",
})
_DEPTH = 16


def _constants(model: ir.Model) -> Iterator[tuple[ir.Graph | ir.Function, ir.Value, ir.Node | None]]:
    for graph in oir.graphs(model):
        if isinstance(graph, ir.Graph):
            for value in graph.initializers.values():
                if not value.is_graph_input() and value.const_value is not None:
                    yield graph, value, None
        for node in graph:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                attr = node.attributes.get("value")
                if attr is not None and attr.type == ir.AttributeType.TENSOR:
                    yield graph, node.outputs[0], node


def _softmax_last(node: ir.Node) -> bool:
    axis = node.attributes.get("axis")
    return axis is None or axis.as_int() == -1  # opset >= 13 default -1; older: coerced 2-D


def _reaches_mask_slot(value: ir.Value) -> bool:
    """Whether every path from ``value`` stays on mask-building ops and one ends in an
    attention mask slot."""
    found = False
    frontier, seen = [value], set()
    for _ in range(_DEPTH):
        nxt = []
        for v in frontier:
            if v.is_graph_output():
                return False
            for use in v.uses():
                node, idx = use.node, use.idx
                if node in seen:
                    continue
                seen.add(node)
                if node.op_type == "Softmax" and node.domain in ("", "ai.onnx"):
                    if not _softmax_last(node):
                        return False
                    found = True
                    continue
                if node.op_type == "Attention" and node.domain in ("", "ai.onnx") and idx == 3:
                    found = True
                    continue
                if node.op_type in ("MultiHeadAttention", "Attention") and node.domain == "com.microsoft" \
                        and idx == 5:  # attention_bias of both
                    found = True
                    continue
                if node.domain not in ("", "ai.onnx") or node.op_type not in _PASS_THROUGH:
                    return False
                if node.op_type == "Where" and idx == 0:
                    return False  # a condition, not a fill
                nxt.extend(node.outputs)
        if not nxt:
            return found
        frontier = nxt
    return False


def clamp_mask_fills(model: ir.Model, fill: float = MASK_FILL) -> list[str]:
    """Replace mask fills <= -65504 (and -inf) by ``fill`` in constants that only build
    attention masks; returns the names of the constants changed. New tensors are built
    (the originals may be shared with checkpoints)."""
    changed = []
    for _graph, value, node in _constants(model):
        try:
            array = oir.as_numpy(value)
        except Exception:  # noqa: BLE001 - not a readable constant
            continue
        if array is None or array.dtype not in (np.float32, np.float64, np.float16) or array.size > 1 << 16:
            continue
        low = array <= -FP16_MAX
        if not low.any() or not _reaches_mask_slot(value):
            continue
        clamped = np.where(low, np.asarray(fill, array.dtype), array).astype(array.dtype)
        tensor = ir.tensor(clamped, name=value.name)
        if node is None:
            value.const_value = tensor
        else:
            node.attributes["value"] = ir.AttrTensor("value", tensor)
        changed.append(value.name or "")
    return changed
