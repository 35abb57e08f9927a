"""SinkLayoutOpsPass: a layout change undone after elementwise work disappears.

Rewrite (default-domain ops, in every graph): a chain that starts at a layout op
(Transpose, Squeeze, Unsqueeze) reading ``x`` and goes on through layout ops and ops
that commute with a layout change, up to the first layout op after which the layout
ops seen, composed, leave every axis of ``x`` where it was:

    R(fn(...f1(L(x))))  becomes  fn'(...f1'(x))

(``L``, ``R``: the layout ops, ``fi'``: ``fi`` in ``x``'s layout). When no point of the
chain restores the identity but one composes to a pure permutation ``p`` of ``x``'s
axes after at least two layout ops, the last such point gets ``Transpose(.., p)``
instead. The channels-last export ``Conv -> Transpose -> Squeeze -> Mul -> Add -> Elu ->
Pad -> Unsqueeze -> Transpose -> Conv`` becomes ``Conv -> Mul -> Add -> Elu -> Pad ->
Conv``, which the Conv-affine and Pad fusions then fold.

The ops a layout change commutes with, and how each is carried back to ``x``'s layout
through the composed map of the layout ops before it (``optcc.ir.layout_maps``, which the
proof of equivalence keys a moved op by):

- unary elementwise ops (``_UNARY``), and Clip with constant one-element bounds;
- binary elementwise ops (``_BINARY``; PRelu with the chain as its first input) whose
  other operand is a constant ``c``: ``c``, right-aligned to the rank of the op's chain
  input, is carried back axis by axis (axes the layout ops inserted dropped, unit axes
  they removed put back as 1, leading 1s dropped). ``c``'s rank is at most the chain
  input's (else the result's rank would grow) and its dims on inserted axes are 1; where
  the op broadcasts as numpy does (``optcc.ir.broadcasts``: opset 7 on, Max and Min 8 on);
- Pad in ``constant`` mode with constant pads (and axes): each axis's pads move to the
  axis of ``x`` it comes from; an inserted axis must have none, a removed one gets none.

Preconditions: every value of the chain but the last is read by the next node of the
chain only and is no graph output (nothing else sees the old layout); the last may be a
graph output when an op moved (that op's output, or the Transpose, takes its name, type
and shape); all nodes in one graph; the rank of ``x`` known; Squeeze
and Unsqueeze axes constant (a Squeeze without axes ends the chain); Transpose perms
valid. The chain's layout ops (at least one, the identity needs two unless one is
itself a no-op) are removed, at most one Transpose is added, no node is duplicated; a
carried constant that differs from the one it replaces is a new constant
(``optcc.ir.constant_for``: a main-graph initializer, a Constant node in a body), the constants nothing reads any more (the old
operands, the layout ops' axes) are dropped.

Why exact: a layout op moves elements without changing them. An elementwise op gives
each output element from the elements at the same index of its operands; carried back
through the same index map, ``c`` pairs every element of ``x`` with the same constant
element as before, so each element gets the same value and lands where it did
(broadcasting is per axis, so it commutes with relabeling the axes: where ``c``
stretches a unit axis, it stretches the axis of ``x`` that one comes from). A
constant-mode Pad decides per axis, from an element's index on that axis alone, whether
it is an input element or the pad value; padding the axis of ``x`` that an axis comes
from by the same amounts gives the same array after the layout ops. No arithmetic is
reordered: bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

import optcc
from optcc.passes.eliminate_noops import bypass, constant_array, graph_opset, remove_if_dead
from optcc.passes.merge_consecutive import squeeze_axes, transpose_perm
from optcc.passes.quantize_weights import drop_unused_weights
from optcc.rewrite import static_rank

__all__ = ["SinkLayoutOpsPass"]

_DEFAULT_DOMAINS = ("", "ai.onnx")
_LAYOUT = frozenset({"Transpose", "Squeeze", "Unsqueeze"})
_UNARY = optcc.ir.LAYOUT_FREE_UNARY
_BINARY = optcc.ir.LAYOUT_FREE_BINARY
AxisMap = optcc.ir.AxisMap


def _layout_map(node: ir.Node, opset: int, rank: int) -> AxisMap | None:
    """The axis map of a Transpose/Squeeze/Unsqueeze reading a value of rank ``rank``."""
    if node.op_type == "Transpose":
        perm = transpose_perm(node, rank)
        return perm if perm is not None and sorted(perm) == list(range(rank)) else None
    axes = squeeze_axes(node, opset)
    # None: unknown, or a Squeeze of every unit axis (which needs static dims)
    return optcc.ir.squeeze_map(node.op_type, axes, rank) if axes else None


def _as_perm(src: AxisMap, rank: int) -> list[int] | None:
    """The map as a permutation of ``rank`` axes, None when it changes the rank. An axis
    inserted where unit axes were removed stands for one of them (all hold size 1), in order."""
    if len(src) != rank:
        return None
    removed = iter(sorted(set(range(rank)) - set(src)))
    return [next(removed) if s == -1 else s for s in src]


def _full_pads(node: ir.Node, opset: int, rank: int) -> list[int] | None:
    """A constant-mode Pad's begin and end pads for every axis of its rank-``rank`` input."""
    if node.attributes.get_string("mode", "constant") != "constant":
        return None
    if opset < 11:
        attribute = node.attributes.get("pads" if opset >= 2 else "paddings")
        pads = None if attribute is None else [int(v) for v in attribute.as_ints()]
        return pads if pads is not None and len(pads) == 2 * rank else None
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    array = constant_array(node.inputs[1])
    if array is None:
        return None
    axes_value = node.inputs[3] if len(node.inputs) > 3 else None
    axes = None if axes_value is None else constant_array(axes_value)
    if axes_value is not None and axes is None:
        return None
    return optcc.ir.full_pads([int(v) for v in array.reshape(-1)],
                              None if axes is None else [int(a) for a in axes.reshape(-1)], rank)


@dataclass
class _Move:
    """How one commuting op changes: the input reading the chain, the map from ``x`` to
    that input's layout, and the constant it gets anew (operand or pads) at ``operand``."""

    node: ir.Node
    index: int
    src: AxisMap
    operand: int | None = None
    array: np.ndarray | None = None


def _commuting(node: ir.Node, index: int, src: AxisMap, rank: int, opset: int) -> _Move | None:
    """The change that moves ``node`` (reading the chain at input ``index``, in the layout
    ``src`` maps ``x`` of rank ``rank`` to) before the layout ops; None if it does not
    commute."""
    op, inputs = node.op_type, node.inputs
    if len(node.outputs) != 1 or index != 0 and op not in _BINARY:
        return None
    if op in _UNARY and len(inputs) == 1:
        return _Move(node, index, src)
    if op == "Clip":
        bounds = [constant_array(v) if v is not None else np.zeros(1) for v in inputs[1:]]
        return _Move(node, index, src) if all(b is not None and b.size == 1 for b in bounds) else None
    if op in _BINARY and len(inputs) == 2 and optcc.ir.broadcasts(op, opset) and not (op == "PRelu" and index != 0):
        other = 1 - index
        array = constant_array(inputs[other])
        if array is None:
            return None
        carried = optcc.ir.carried_back(array, src, rank)
        return None if carried is None else _Move(node, index, src, other, carried)
    if op == "Pad" and index == 0:
        pads = _full_pads(node, opset, len(src))
        if pads is None:
            return None
        carried = optcc.ir.carried_pads(pads, src, rank)
        return None if carried is None else _Move(node, index, src, 1, carried)
    return None


def _only_reader(value: ir.Value, graph: ir.Graph | ir.Function) -> tuple[ir.Node, int] | None:
    """The one node of ``graph`` reading ``value`` once, and at which input; None when the
    value is a graph output or read otherwise."""
    uses = list(value.uses())
    if value.is_graph_output() or len(uses) != 1 or uses[0].node.graph is not graph:
        return None
    return uses[0].node, uses[0].idx


@dataclass
class _Plan:
    """A chain to rewrite: the rank of ``x``, its layout ops, its commuting ops, its last
    node and the permutation left at its end (None: the identity)."""

    rank: int
    layouts: list[ir.Node]
    moves: list[_Move]
    last: ir.Node
    perm: list[int] | None


def _plan(start: ir.Node, opset: int) -> _Plan | None:
    """The longest worthwhile chain from the layout op ``start``, or None."""
    graph, x = start.graph, start.inputs[0]
    rank = static_rank(x)
    if rank is None:
        return None
    src: AxisMap = list(range(rank))
    layouts: list[ir.Node] = []
    moves: list[_Move] = []
    best: _Plan | None = None
    node, index = start, 0
    while True:
        if node.domain not in _DEFAULT_DOMAINS:
            break
        if node.op_type in _LAYOUT and index == 0 and len(node.outputs) == 1:
            step = _layout_map(node, opset, len(src))
            if step is None:
                break
            src = optcc.ir.compose(src, step)
            layouts.append(node)
            output, perm = node.outputs[0], _as_perm(src, rank)
            if perm == list(range(rank)):
                # a graph output is handed to the last moved op (``x`` may not take its name)
                return best if output.is_graph_output() and not moves else _Plan(rank, layouts, moves, node, None)
            if perm is not None and len(layouts) >= 2:
                best = _Plan(rank, list(layouts), list(moves), node, perm)
        else:
            move = _commuting(node, index, src, rank, opset)
            if move is None:
                break
            moves.append(move)
        reader = _only_reader(node.outputs[0], graph)
        if reader is None:
            break
        node, index = reader
    return best


def _carried_shape(value: ir.Value, src: AxisMap, rank: int) -> ir.Shape | None:
    """``value``'s shape in the layout of the map's input: None when unknown."""
    if value.shape is None or value.shape.rank() != len(src):
        return None
    dims = list(value.shape)
    return ir.Shape([dims[src.index(j)] if j in src else 1 for j in range(rank)])


def _apply(plan: _Plan, opset: int, constants: optcc.ir.ModelNames) -> None:
    current = plan.layouts[0].inputs[0]
    # the constants the chain read before (operands replaced, the layout ops' axes): dropped
    # below where nothing reads them any more
    replaced = [v for node in plan.layouts for v in node.inputs[1:] if v is not None]
    for move in plan.moves:
        node = move.node
        if move.operand is not None:  # its constants (operand; pads and axes), maybe replaced below
            replaced.extend(v for i, v in enumerate(node.inputs) if i != move.index and v is not None)
        node.replace_input_with(move.index, current)
        if move.operand is not None:
            if node.op_type == "Pad" and opset < 11:
                name = "pads" if opset >= 2 else "paddings"
                node.attributes[name] = ir.AttrInt64s(name, [int(v) for v in move.array])
            else:
                if node.op_type == "Pad" and len(node.inputs) > 3:
                    node.resize_inputs(3)  # the carried pads name every axis of x, in order
                    node.replace_input_with(1, constants.constant_for(node, move.array, "pads"))
                elif not optcc.ir.same_operand(constant_array(node.inputs[move.operand]), move.array):
                    name = "pads" if node.op_type == "Pad" else "layout_operand"
                    node.replace_input_with(move.operand, constants.constant_for(node, move.array, name))
        output = node.outputs[0]
        output.shape = _carried_shape(output, move.src, plan.rank)
        current = output
    end = plan.last.outputs[0]
    if plan.perm is not None:
        transpose = ir.node("Transpose", [current], {"perm": plan.perm})
        plan.last.graph.insert_after(plan.last, transpose)
        result = transpose.outputs[0]
        result.type, result.shape = end.type, end.shape
        end.replace_all_uses_with(result, replace_graph_outputs=True)
        name, end.name = end.name, None
        result.name = name
    else:
        handed = bypass(plan.last, end, current)
        assert handed, "the chain's end is a graph output that its last moved op cannot name"
    graph = plan.layouts[0].graph
    for node in reversed(plan.layouts):
        removed = node.graph is None or remove_if_dead(node)  # (bypass removes the last one)
        assert removed, "a layout op of a rewritten chain is still read"
    assert graph is not None
    drop_unused_weights(graph, dict.fromkeys(replaced))


class SinkLayoutOpsPass(optcc.Pass):
    """Remove a Transpose/Squeeze/Unsqueeze round trip around elementwise ops and Pads.

    Rewrite, preconditions and why it is exact: see the module docstring.
    """

    name = "sink-layout-ops"
    numerics = "exact"
    triggers = _LAYOUT

    def call(self, model: ir.Model) -> optcc.PassResult:
        model_opset = optcc.ir.default_opset(model)
        removed = 0
        constants = optcc.ir.ModelNames(model)
        for graph in optcc.ir.graphs(model):
            opset = graph_opset(graph, model_opset)
            for node in list(graph):
                if (node.graph is None or node.op_type not in _LAYOUT or node.domain not in _DEFAULT_DOMAINS
                        or not node.inputs or node.inputs[0] is None):
                    continue
                plan = _plan(node, opset)
                if plan is not None:
                    _apply(plan, opset, constants)
                    removed += len(plan.layouts) - (plan.perm is not None)
        return optcc.PassResult(model, bool(removed), {"layout_ops_removed": removed} if removed else {})
