"""Weights stored as integers and dequantized in the graph: ``Mul(Cast<float>(q), scale)``.

A model may keep a weight as an integer constant ``q`` and compute the float weight at run
time (``Mul(Cast(q, to=FLOAT), scale)``, either operand order). The float weight is then a
constant subexpression, not a constant: ``dequantized_array`` evaluates it as a runtime
does, so a pass can treat it as the constant weight it is, and ``drop_dequantization``
removes the chain once nothing reads its result.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from optcc.ir.edit import const_array, is_constant

# integer types whose every value a float32 holds exactly (the Cast is exact)
_EXACT_IN_FLOAT32 = (np.int8, np.uint8, np.int16, np.uint16)


def _default_domain(node: ir.Node | None, op_type: str) -> bool:
    return node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx")


def _chain(value: ir.Value) -> tuple[ir.Node, ir.Node, ir.Value] | None:
    """(the Mul, the Cast, the scale operand) when ``value`` is the output of
    ``Mul(Cast<float>(q), scale)`` (either order), else None. Constness is the caller's
    question."""
    mul = value.producer()
    if not _default_domain(mul, "Mul") or len(mul.inputs) != 2 or None in mul.inputs:
        return None
    for cast_operand, scale in (mul.inputs, reversed(mul.inputs)):
        cast = cast_operand.producer()
        to = cast.attributes.get("to") if _default_domain(cast, "Cast") else None
        if to is not None and to.value == ir.DataType.FLOAT and cast.inputs[0] is not None:
            return mul, cast, scale
    return None


def dequantized_array(value: ir.Value, *, inputs_constant: bool = False) -> np.ndarray | None:
    """The float32 array of ``value = Mul(Cast<float>(q), scale)`` with ``q`` an 8- or 16-bit
    integer constant and ``scale`` a float32 constant (``const_array``'s rule, with
    ``inputs_constant``), evaluated as the graph computes it: the Cast is exact and each
    element one float32 product. None for any other value."""
    chain = _chain(value)
    if chain is None:
        return None
    _, cast, scale_value = chain
    q = const_array(cast.inputs[0], inputs_constant=inputs_constant)
    scale = const_array(scale_value, inputs_constant=inputs_constant)
    if q is None or scale is None or q.dtype.type not in _EXACT_IN_FLOAT32 or scale.dtype != np.float32:
        return None
    return np.multiply(q.astype(np.float32), scale, dtype=np.float32)


def _levels_type(chain: tuple[ir.Node, ir.Node, ir.Value] | None) -> ir.DataType | None:
    """The element type of a ``_chain``'s ``q`` when a float32 holds its every value, else None."""
    q_type = None if chain is None else chain[1].inputs[0].dtype
    if q_type is None or q_type.numpy() not in [np.dtype(t) for t in _EXACT_IN_FLOAT32]:
        return None
    return q_type


def stored_bits(value: ir.Value) -> int | None:
    """The bits of the integer levels ``value = Mul(Cast<float>(q), scale)`` reads (8 or 16
    for an int8/uint8 or int16/uint16 ``q``), None for any other value or type."""
    q_type = _levels_type(_chain(value))
    return None if q_type is None else int(q_type.itemsize * 8)


def stored_levels(value: ir.Value) -> tuple[ir.Node, ir.Value, ir.Value] | None:
    """``(the Mul, q, scale)`` when ``value = Mul(Cast<float>(q), scale)`` with ``q`` an 8-
    or 16-bit integer constant and ``scale`` a float32 constant (``dequantized_array(value)``
    is then an array; the product is not computed); else None."""
    chain = _chain(value)
    if chain is None or _levels_type(chain) is None or not is_constant(chain[1].inputs[0]):
        return None
    mul, cast, scale = chain
    factor = const_array(scale)
    if factor is None or factor.dtype != np.float32:
        return None
    return mul, cast.inputs[0], scale


def drop_dequantization(value: ir.Value) -> list[ir.Value]:
    """Remove the Mul and Cast of a ``dequantized_array`` chain behind ``value`` when nothing
    reads their outputs any more (a node still read elsewhere stays); returns the chain's
    constant operands (``q``, ``scale``) for the caller to drop once they are unread too."""
    chain = _chain(value)
    if chain is None or value.uses() or value.is_graph_output():
        return []
    mul, cast, scale_value = chain
    q_value = cast.inputs[0]
    assert mul.graph is not None
    mul.graph.remove(mul, safe=True)
    if cast.outputs[0].uses() or cast.outputs[0].is_graph_output() or cast.graph is None:
        return [scale_value]
    cast.graph.remove(cast, safe=True)
    return [q_value, scale_value]
