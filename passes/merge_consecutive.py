"""MergeConsecutivePass: collapse Transpose, Squeeze/Unsqueeze and Reshape chains.

Rewrites (``y = A(x)``, ``z = B(y)``; default-domain ops, in every graph):

- ``transpose-transpose``: ``Transpose(Transpose(x, p1), p2)`` becomes
  ``Transpose(x, p)`` with ``p[i] = p1[p2[i]]``, or just ``x`` when ``p`` is the
  identity. The first Transpose must have no other reader (and not be a graph output),
  except when ``p`` is the identity: then only the second goes and the first stays for
  its other readers.
- ``squeeze-unsqueeze`` / ``unsqueeze-squeeze``: ``Unsqueeze(Squeeze(x, a), a)`` and
  ``Squeeze(Unsqueeze(x, a), a)`` become ``x`` when the axes, normalized against the
  rank they refer to, are the same set (axes as attribute before opset 13, as a constant
  input from 13). Squeeze without axes counts only when every dim of its input is static.
- ``reshape-reshape``: ``Reshape(Reshape(x, s1), s2)`` becomes ``Reshape(x, s2)`` when
  ``s2`` is a constant with no ``0`` entry, or the second Reshape has ``allowzero=1``. A
  ``0`` without allowzero copies a dim of the *intermediate* shape, which ``x`` may not
  have at that position, so such chains stay. ``-1`` is fine: it is inferred from the
  element count, which both shapes share. The first Reshape must have no other reader.

Why exact: each rewrite only moves data the same way with fewer steps (a transposition
composed with a transposition is one; a unit axis removed then re-inserted at the same
place is no change; a Reshape's result depends only on its input's elements and, without
0 entries, its target). When ``z`` is a graph output and the chain collapses to ``x``,
``x`` takes ``z``'s name under the rule of ``eliminate-identities`` (else nothing
changes). A first node with other readers, or that is a graph output, is kept.
"""

from __future__ import annotations

import onnx_ir as ir

import optcc
from optcc.passes.eliminate_noops import (
    bypass,
    constant_array,
    graph_opset,
    remove_if_dead,
    static_dim,
)

__all__ = ["MergeConsecutivePass"]

_DEFAULT_DOMAINS = ("", "ai.onnx")


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = None if value is None else value.producer()
    if node is None or node.op_type != op_type or node.domain not in _DEFAULT_DOMAINS:
        return None
    if len(node.outputs) != 1 or not node.inputs or node.inputs[0] is None:
        return None
    return node


def _only_reader(value: ir.Value, node: ir.Node) -> bool:
    """Whether ``node`` is the one and only reader of ``value`` (not a graph output)."""
    return not value.is_graph_output() and all(use.node is node for use in value.uses())


def _rank(*values: ir.Value | None, offsets: tuple[int, ...]) -> int | None:
    """The first known rank of ``values[i]`` plus ``offsets[i]``."""
    for value, offset in zip(values, offsets):
        if value is not None and value.shape is not None:
            return value.shape.rank() + offset
    return None


def _perm(node: ir.Node, rank: int | None) -> list[int] | None:
    attribute = node.attributes.get("perm")
    if attribute is None:
        return None if rank is None else list(reversed(range(rank)))
    return [int(p) for p in attribute.as_ints()]


def _transposes(node: ir.Node, opset: int) -> bool:
    first = _producer(node.inputs[0], "Transpose")
    if first is None:
        return False
    x, y, z = first.inputs[0], first.outputs[0], node.outputs[0]
    rank = _rank(x, y, z, offsets=(0, 0, 0))
    p1 = _perm(first, rank)
    p2 = _perm(node, rank if p1 is None else len(p1))
    if p1 is None or p2 is None or sorted(p1) != list(range(len(p1))) or sorted(p2) != sorted(p1):
        return False
    composed = [p1[i] for i in p2]
    if composed == list(range(len(composed))):
        if not bypass(node, z, x):
            return False
        remove_if_dead(first)
        return True
    if not _only_reader(y, node):
        return False
    node.replace_input_with(0, x)
    node.attributes["perm"] = ir.AttrInt64s("perm", composed)
    remove_if_dead(first)
    return True


def _axes(node: ir.Node, opset: int) -> list[int] | None:
    """A Squeeze/Unsqueeze node's axes; [] for a Squeeze without axes; None if unknown."""
    if opset >= 13:
        if len(node.inputs) < 2 or node.inputs[1] is None:
            return [] if node.op_type == "Squeeze" else None
        array = constant_array(node.inputs[1])
        return None if array is None else [int(a) for a in array.reshape(-1)]
    attribute = node.attributes.get("axes")
    if attribute is None:
        return [] if node.op_type == "Squeeze" else None
    return [int(a) for a in attribute.as_ints()]


def _unit_axes(value: ir.Value | None) -> list[int] | None:
    """The axes a Squeeze without axes removes from ``value``: known only when every
    dim is static."""
    if value is None or value.shape is None:
        return None
    dims = [static_dim(d) for d in value.shape]
    return None if None in dims else [i for i, d in enumerate(dims) if d == 1]


def _normalized(axes: list[int], rank: int | None) -> set[int] | None:
    if rank is None:
        return None if any(a < 0 for a in axes) else set(axes)
    if any(not -rank <= a < rank for a in axes):
        return None
    return {a % rank for a in axes}


def _squeeze_pair(node: ir.Node, opset: int) -> str | None:
    first_op = "Squeeze" if node.op_type == "Unsqueeze" else "Unsqueeze"
    first = _producer(node.inputs[0], first_op)
    if first is None:
        return None
    x, y, z = first.inputs[0], first.outputs[0], node.outputs[0]
    a1, a2 = _axes(first, opset), _axes(node, opset)
    if a1 is None or a2 is None:
        return None
    if first_op == "Squeeze":  # both axis lists refer to x's rank (== z's rank)
        if not a1:
            a1 = _unit_axes(x)
        if a1 is None:
            return None
        rank = _rank(x, z, y, offsets=(0, 0, len(a1)))
    else:  # both refer to y's rank
        if not a2:
            a2 = _unit_axes(y)
        if a2 is None:
            return None
        rank = _rank(y, x, z, offsets=(0, len(a1), len(a2)))
    s1, s2 = _normalized(a1, rank), _normalized(a2, rank)
    if s1 is None or s1 != s2 or len(s1) != len(a1) or len(s2) != len(a2):
        return None
    if not bypass(node, z, x):
        return None
    remove_if_dead(first)
    return f"{first_op.lower()}-{node.op_type.lower()}"


def _reshapes(node: ir.Node, opset: int) -> bool:
    if opset < 5:
        return False  # Reshape-1 takes its target as an attribute; not worth the cases
    first = _producer(node.inputs[0], "Reshape")
    if first is None or not _only_reader(first.outputs[0], node):
        return False
    allowzero = node.attributes.get_int("allowzero", 0) if opset >= 14 else 0
    if not allowzero:
        target = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if target is None or (target == 0).any():
            return False
    node.replace_input_with(0, first.inputs[0])
    remove_if_dead(first)
    return True


def _merge(node: ir.Node, opset: int) -> str | None:
    """The rule that merged ``node`` with its producer, or None."""
    if node.op_type == "Transpose":
        return "transpose-transpose" if _transposes(node, opset) else None
    if node.op_type in ("Squeeze", "Unsqueeze"):
        return _squeeze_pair(node, opset)
    if node.op_type == "Reshape":
        return "reshape-reshape" if _reshapes(node, opset) else None
    return None


class MergeConsecutivePass(optcc.Pass):
    """Collapse Transpose-Transpose, Squeeze/Unsqueeze and Reshape-Reshape chains.

    Rules, preconditions and why each is exact: see the module docstring.
    """

    name = "merge-consecutive"
    level = 1
    numerics = "exact"

    def call(self, model: ir.Model) -> optcc.PassResult:
        model_opset = optcc.ir.default_opset(model)
        merged: dict[str, int] = {}
        for graph in optcc.ir.graphs(model):
            opset = graph_opset(graph, model_opset)
            for node in list(graph):
                if node.domain not in _DEFAULT_DOMAINS or node.graph is None:
                    continue
                if len(node.outputs) != 1 or not node.inputs or node.inputs[0] is None:
                    continue
                label = _merge(node, opset)
                if label is not None:
                    merged[label] = merged.get(label, 0) + 1
        return optcc.PassResult(model, bool(merged), merged)
