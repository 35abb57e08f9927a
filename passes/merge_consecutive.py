"""MergeConsecutivePass: collapse chains of data-movement ops into one node.

Rewrites (``y = A(x)``, ``z = B(y)``; default-domain ops, in every graph):

- ``transpose-transpose``: ``Transpose(Transpose(x, p1), p2)`` becomes
  ``Transpose(x, p)`` with ``p[i] = p1[p2[i]]``, or just ``x`` when ``p`` is the
  identity. The first Transpose must have no other reader (and not be a graph output),
  except when ``p`` is the identity: then only the second goes and the first stays for
  its other readers (a pair from a graph input to a graph output is left to
  ``cancel-transpose-pairs``).
- ``not-where``: ``Where(Not(c), x, y)`` becomes ``Where(c, y, x)``; the Not goes when it
  has no other reader. ``not-not``: ``Not(Not(x))`` becomes ``x``.
- ``squeeze-unsqueeze`` / ``unsqueeze-squeeze``: ``Unsqueeze(Squeeze(x, a), a)`` and
  ``Squeeze(Unsqueeze(x, a), a)`` become ``x`` when the axes, normalized against the
  rank they refer to, are the same set (axes as attribute before opset 13, as a constant
  input from 13). Squeeze without axes counts only when every dim of its input is static.
- ``reshape-reshape``: ``Reshape(Reshape(x, s1), s2)`` becomes ``Reshape(x, s2)`` when
  ``s2`` is a constant with no ``0`` entry, or the second Reshape has ``allowzero=1``. A
  ``0`` without allowzero copies a dim of the *intermediate* shape, which ``x`` may not
  have at that position: with ``s1`` a constant (without allowzero) each such ``0`` at
  position ``i`` becomes ``s1[i]`` when positive (the intermediate dim it fixed) and
  stays ``0`` when ``s1[i]`` is 0 (then both copy ``x``'s dim ``i``); a copy of an
  inferred (``-1``) dim or of a position past ``s1`` keeps the chain. ``-1`` is fine: it
  is inferred from the element count, which both shapes share. The first Reshape must
  have no other reader. ``reshape-of-view``: the same with ``Squeeze``, ``Unsqueeze``
  or ``Flatten`` in place of the first Reshape (each is a reshape: it keeps the
  elements in order), only when ``s2`` has no ``0`` entry or the Reshape has
  ``allowzero=1`` (a ``0`` would copy a dim of the view, which ``x`` may not have
  there); the first node must have no other reader. A Transpose keeps the element order
  too when the axes of ``x`` it moves are all statically 1 (the others keep their order:
  a unidirectional LSTM's ``[seq, 1, batch, hidden]`` output with ``perm=[0, 2, 1, 3]``);
  after it a ``0`` of ``s2`` at a position the Transpose leaves in place copies the same
  dim of ``x`` and stays, and a single ``0`` elsewhere becomes ``-1`` when every other
  entry of ``s2`` is positive (the element count, the same for ``x``, then infers the dim
  it copied); otherwise the pair stays.
- ``unsqueeze-of-reshape``: ``Unsqueeze(Reshape(x, s), axes)`` becomes ``Reshape(x, s')``
  with ``s'`` the constant ``s`` with a ``1`` at each (normalized) axis, when ``s`` has
  no ``0`` entry or the Reshape has ``allowzero=1`` (a copied dim would move), the axes
  are constant and the Reshape has no other reader.

- ``squeeze-squeeze`` / ``unsqueeze-unsqueeze``: two Squeezes (or two Unsqueezes) become
  one whose axes are the union, each mapped to the position it has in the outer rank
  (Squeeze without axes counts only when every dim of its input is static; negative
  axes only with a known rank).
- ``concat-concat``: a Concat input produced by another Concat on the same axis (read
  only there) is replaced by that Concat's inputs, in place.
- ``reduce-unsqueeze``: ``Unsqueeze(Reduce*(x, axes, keepdims=0), axes)`` with the same
  normalized axis set becomes ``Reduce*(x, axes, keepdims=1)`` (not with
  ``noop_with_empty_axes=1``; a Reduce without axes needs a known rank).
- ``slice-slice``: two Slices with constant inputs and explicit axes on disjoint axes
  (normalized; negative axes need a known rank) become one Slice with both lists.
- ``idempotent``: ``f(f(x))`` is ``f(x)`` for Relu, Sign, Abs, Ceil, Floor, Round.
- ``slice-shape``: ``Slice(Shape(x), [s], [e])`` (axis 0, step 1; opset >= 15; Shape
  without start/end; rank of ``x`` known) becomes ``Shape(x, start=s', end=e')`` with
  ``s'``, ``e'`` normalized against the rank (an empty result is left alone).

A constant a rewrite makes (a target, axes, a Slice's parameters) is a main-graph
initializer, or a Constant node in a body (``optcc.ir.constant_for``).

Why exact: each rewrite only moves data the same way with fewer steps (a transposition
composed with a transposition is one; a unit axis removed then re-inserted at the same
place is no change; nested concatenation along one axis is one concatenation of the
same pieces in the same order; slicing different axes is independent, so two Slices
are one; Where picks ``x`` exactly where ``Not(c)`` is true, i.e. where ``c`` is
false, and the broadcast of (c, x, y) is that of (c, y, x); ``Not(Not(x))`` is ``x`` for
every bool; f(f(x)) == f(x) holds bit for bit for those idempotent functions (NaN stays NaN,
-0.0 stays -0.0); keepdims=1 leaves exactly the unit axes the Unsqueeze
inserts (into a Reshape's target too: unit dims leave the element count, so a ``-1``
infers the same dim); a Slice of a shape is the shape's slice; a Reshape's result depends only on its input's elements and, without
0 entries, its target). When ``z`` is a graph output and the chain collapses to ``x``,
``x`` takes ``z``'s name under the rule of ``eliminate-identities`` (else nothing
changes). A first node with other readers, or that is a graph output, is kept.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

import optcc
from optcc.passes.eliminate_noops import (
    bypass,
    constant_array,
    graph_opset,
    remove_if_dead,
    static_dim,
)

__all__ = ["MergeConsecutivePass", "squeeze_axes", "transpose_perm"]

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


def transpose_perm(node: ir.Node, rank: int | None) -> list[int] | None:
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
    p1 = transpose_perm(first, rank)
    p2 = transpose_perm(node, rank if p1 is None else len(p1))
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


def _not_where(node: ir.Node, opset: int) -> bool:
    """``Where(Not(c), x, y)`` reads ``Where(c, y, x)``."""
    if len(node.inputs) != 3 or None in node.inputs:
        return False
    negation = _producer(node.inputs[0], "Not")
    if negation is None:
        return False
    c, x, y = negation.inputs[0], node.inputs[1], node.inputs[2]
    node.replace_input_with(0, c)
    node.replace_input_with(1, y)
    node.replace_input_with(2, x)
    remove_if_dead(negation)
    return True


def _not_not(node: ir.Node, opset: int) -> bool:
    first = _producer(node.inputs[0], "Not")
    if first is None or not bypass(node, node.outputs[0], first.inputs[0]):
        return False
    remove_if_dead(first)
    return True


def squeeze_axes(node: ir.Node, opset: int) -> list[int] | None:
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
    a1, a2 = squeeze_axes(first, opset), squeeze_axes(node, opset)
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


_VIEWS = ("Reshape", "Squeeze", "Unsqueeze", "Flatten")  # each keeps the element order


def _unit_moving_transpose(value: ir.Value | None) -> ir.Node | None:
    """The Transpose producing ``value`` when it keeps the element order: the axes of its
    input that are not statically 1 stay in their order (only unit axes move)."""
    node = _producer(value, "Transpose")
    shape = None if node is None else node.inputs[0].shape
    if shape is None:
        return None
    perm = transpose_perm(node, shape.rank())
    if perm is None or sorted(perm) != list(range(shape.rank())):
        return None
    kept = [p for p in perm if shape[p] != 1]
    return node if kept == sorted(kept) else None


def _reshapes(node: ir.Node, opset: int, constants: optcc.ir.ModelNames) -> str | None:
    if opset < 5:
        return None  # Reshape-1 takes its target as an attribute; not worth the cases
    first = next(filter(None, (_producer(node.inputs[0], view) for view in _VIEWS)), None)
    first = first or _unit_moving_transpose(node.inputs[0])
    if first is None or not _only_reader(first.outputs[0], node):
        return None
    allowzero = node.attributes.get_int("allowzero", 0) if opset >= 14 else 0
    if not allowzero:
        target = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if target is None or target.ndim != 1:
            return None
        if (target == 0).any():
            if first.op_type == "Reshape":
                resolved = _resolved_copies(target, first, opset)
            elif first.op_type == "Transpose":
                resolved = _moved_copy_inferred(target, transpose_perm(first, first.inputs[0].shape.rank()))
            else:
                return None  # a copy of the view's dim, which x may not have there
            if resolved is None:
                return None
            if resolved is not target:
                node.replace_input_with(1, constants.constant_for(node, resolved, "target"))
    node.replace_input_with(0, first.inputs[0])
    remove_if_dead(first)
    return "reshape-reshape" if first.op_type == "Reshape" else "reshape-of-view"


def _unsqueeze_of_reshape(node: ir.Node, opset: int, constants: optcc.ir.ModelNames) -> bool:
    first = _producer(node.inputs[0], "Reshape") if opset >= 5 else None
    if first is None or len(first.inputs) < 2 or not _only_reader(first.outputs[0], node):
        return False
    target, axes = constant_array(first.inputs[1]), squeeze_axes(node, opset)
    if target is None or target.ndim != 1 or axes is None:
        return False
    allowzero = first.attributes.get_int("allowzero", 0) if opset >= 14 else 0
    if (target == 0).any() and not allowzero:
        return False
    rank = target.size + len(axes)
    units = _normalized(axes, rank)
    if units is None or len(units) != len(axes):
        return False
    rest = iter(target.astype(np.int64).tolist())
    merged = np.array([1 if i in units else next(rest) for i in range(rank)], dtype=np.int64)
    first.replace_input_with(1, constants.constant_for(first, merged, "target"))
    y, z = first.outputs[0], node.outputs[0]
    y.shape, y.type = z.shape, z.type or y.type
    return bypass(node, z, y)  # y is an ordinary value read only here: never refused


def _resolved_copies(target: np.ndarray, first: ir.Node, opset: int) -> np.ndarray | None:
    """``target``'s 0 entries (copies of the intermediate's dims) as entries of a target
    for the first Reshape's input: at position ``i`` the first target's entry when it is
    positive (the intermediate dim it fixed), 0 again when that entry is 0 (without
    allowzero: both copy the input's dim ``i``); None when some copied dim was inferred
    (-1), lies past the first target, or the first target is not a constant."""
    if opset >= 14 and first.attributes.get_int("allowzero", 0):
        return None
    first_target = constant_array(first.inputs[1]) if len(first.inputs) > 1 else None
    if first_target is None or first_target.ndim != 1:
        return None
    resolved = target.astype(np.int64).copy()
    for i in np.flatnonzero(target == 0):
        if i >= first_target.size or first_target[i] < 0:
            return None
        resolved[i] = first_target[i]
    return resolved


def _moved_copy_inferred(target: np.ndarray, perm: list[int]) -> np.ndarray | None:
    """``target``'s 0 entries read after a Transpose by ``perm``, as a target for its input:
    a 0 at a position the Transpose leaves in place copies the same dim there and stays; a
    single 0 elsewhere becomes -1 when every other entry is positive (the element count
    then fixes it to the dim it copied); None otherwise."""
    copies = np.flatnonzero(target == 0)
    if copies.size and copies[-1] >= len(perm):
        return None
    moved = [i for i in copies if perm[i] != i]
    if not moved:
        return target
    others = np.delete(target, moved[0])
    if len(moved) != 1 or not (others > 0).all():
        return None
    resolved = target.astype(np.int64).copy()
    resolved[moved[0]] = -1
    return resolved


def _set_axes(node: ir.Node, axes: list[int], opset: int, constants: optcc.ir.ModelNames) -> None:
    """Give a Squeeze/Unsqueeze ``axes`` (an attribute before opset 13, else a constant
    input)."""
    if opset < 13:
        node.attributes["axes"] = ir.AttrInt64s("axes", axes)
        return
    if len(node.inputs) < 2:
        node.resize_inputs(2)
    node.replace_input_with(1, constants.constant_for(node, np.array(axes, dtype=np.int64), "axes"))


def _same_kind_pair(node: ir.Node, opset: int, constants: optcc.ir.ModelNames) -> str | None:
    """``squeeze-squeeze`` / ``unsqueeze-unsqueeze``."""
    first = _producer(node.inputs[0], node.op_type)
    if first is None or not _only_reader(first.outputs[0], node):
        return None
    x, y, z = first.inputs[0], first.outputs[0], node.outputs[0]
    a1, a2 = squeeze_axes(first, opset), squeeze_axes(node, opset)
    if a1 is None or a2 is None:
        return None
    if node.op_type == "Squeeze":
        a1 = a1 or _unit_axes(x)
        a2 = a2 or _unit_axes(y)
        if not a1 or not a2:
            return None
        rank = _rank(x, y, z, offsets=(0, len(a1), len(a1) + len(a2)))
        s1, s2 = _normalized(a1, rank), _normalized(a2, None if rank is None else rank - len(a1))
        if s1 is None or s2 is None or len(s1) != len(a1) or len(s2) != len(a2):
            return None
        kept = [i for i in range(max(s1 | s2) + len(s1) + 1) if i not in s1]  # x's axes left in y
        merged = sorted(s1 | {kept[j] for j in s2})
    else:
        rank = _rank(z, y, x, offsets=(0, len(a2), len(a1) + len(a2)))
        s1, s2 = _normalized(a1, None if rank is None else rank - len(a2)), _normalized(a2, rank)
        if s1 is None or s2 is None or len(s1) != len(a1) or len(s2) != len(a2):
            return None
        slots = [i for i in range(max(s1 | s2) + len(s2) + 1) if i not in s2]  # y's axes in z
        merged = sorted(s2 | {slots[j] for j in s1})
    node.replace_input_with(0, x)
    _set_axes(node, merged, opset, constants)
    remove_if_dead(first)
    return f"{node.op_type.lower()}-{node.op_type.lower()}"


def _concat_axis(node: ir.Node, opset: int) -> int | None:
    axis = node.attributes.get_int("axis", 1 if opset < 4 else None)
    if axis is None:
        return None
    if axis >= 0:
        return axis
    rank = _rank(node.outputs[0], *node.inputs, offsets=(0,) * (1 + len(node.inputs)))
    return None if rank is None else axis + rank


def _take_place(node: ir.Node, new: ir.Node) -> None:
    """Insert ``new`` (one output, unnamed) before ``node`` and make it replace ``node``,
    its output taking the name of ``node``'s (freed as ``node`` goes): a name no graph of the
    model holds twice, where the name onnx-ir gives a value added unnamed is unique in its
    own graph only and in a body may shadow an enclosing graph's."""
    name = node.outputs[0].name
    node.graph.insert_before(node, new)
    handed = bypass(node, node.outputs[0], new.outputs[0])  # done outside the assert: it holds under -O too
    assert handed  # the new output is an ordinary value of this graph
    new.outputs[0].name = name


def _concats(node: ir.Node, opset: int) -> bool:
    axis = _concat_axis(node, opset)
    if axis is None:
        return False
    inputs: list[ir.Value | None] = []
    absorbed: list[ir.Node] = []
    for value in node.inputs:
        inner = _producer(value, "Concat")
        if (inner is None or None in inner.inputs
                or _concat_axis(inner, opset) != axis or not _only_reader(value, node)):
            inputs.append(value)
            continue
        inputs.extend(inner.inputs)
        if inner not in absorbed:
            absorbed.append(inner)
    if not absorbed:
        return False
    _take_place(node, ir.Node("", "Concat", inputs, [ir.AttrInt64("axis", axis)], num_outputs=1, name=node.name))
    for inner in absorbed:
        remove_if_dead(inner)
    return True


_REDUCE_OPS = frozenset({
    "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
    "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare",
})


def _reduce_axes(node: ir.Node, opset: int) -> list[int] | None:
    """A Reduce node's axes ([] when absent: every axis); None when not a constant."""
    axes_as_input = opset >= 18 or (node.op_type == "ReduceSum" and opset >= 13)
    if axes_as_input:
        if len(node.inputs) < 2 or node.inputs[1] is None:
            return []
        array = constant_array(node.inputs[1])
        return None if array is None else [int(a) for a in array.reshape(-1)]
    attribute = node.attributes.get("axes")
    return [] if attribute is None else [int(a) for a in attribute.as_ints()]


def _reduce_unsqueeze(node: ir.Node, opset: int) -> bool:
    reduce = node.inputs[0].producer() if node.inputs[0] is not None else None
    if (reduce is None or reduce.op_type not in _REDUCE_OPS or reduce.domain not in _DEFAULT_DOMAINS
            or len(reduce.outputs) != 1 or reduce.inputs[0] is None):
        return False
    y, z = reduce.outputs[0], node.outputs[0]
    if not _only_reader(y, node) or reduce.attributes.get_int("keepdims", 1) != 0:
        return False
    if reduce.attributes.get_int("noop_with_empty_axes", 0):
        return False
    reduced, inserted = _reduce_axes(reduce, opset), squeeze_axes(node, opset)
    if reduced is None or inserted is None:
        return False
    rank = _rank(reduce.inputs[0], z, offsets=(0, 0))
    if not reduced:
        if rank is None:
            return False
        reduced = list(range(rank))
    s1, s2 = _normalized(reduced, rank), _normalized(inserted, rank)
    if s1 is None or s1 != s2 or len(s1) != len(reduced) or len(s2) != len(inserted):
        return False
    reduce.attributes["keepdims"] = ir.AttrInt64("keepdims", 1)
    y.shape = z.shape
    return bypass(node, z, y)


def _slice_shape(node: ir.Node, opset: int) -> bool:
    if opset < 15 or len(node.inputs) < 3 or len(node.inputs) > 5:
        return False
    shape = _producer(node.inputs[0], "Shape")
    if shape is None or "start" in shape.attributes or "end" in shape.attributes:
        return False
    x = shape.inputs[0]
    if x is None or x.shape is None:
        return False
    rank = x.shape.rank()
    arrays = [constant_array(v) if v is not None else None for v in node.inputs[1:]]
    if arrays[0] is None or arrays[1] is None or arrays[0].size != 1 or arrays[1].size != 1:
        return False
    if len(arrays) > 2 and arrays[2] is not None and int(arrays[2].reshape(-1)[0]) not in (0, -1):
        return False
    if len(arrays) > 2 and node.inputs[3] is not None and arrays[2] is None:
        return False
    if len(arrays) > 3 and node.inputs[4] is not None and (arrays[3] is None or int(arrays[3].reshape(-1)[0]) != 1):
        return False
    start, end = int(arrays[0].reshape(-1)[0]), int(arrays[1].reshape(-1)[0])
    start = min(max(start + rank if start < 0 else start, 0), rank)
    end = min(max(end + rank if end < 0 else end, 0), rank)
    if start >= end:
        return False
    _take_place(node, ir.Node("", "Shape", [x], [ir.AttrInt64("start", start), ir.AttrInt64("end", end)],
                              num_outputs=1, name=node.name))
    remove_if_dead(shape)
    return True


_IDEMPOTENT = frozenset({"Relu", "Sign", "Abs", "Ceil", "Floor", "Round"})


def _idempotent(node: ir.Node, opset: int) -> bool:
    first = _producer(node.inputs[0], node.op_type)
    if first is None or len(node.inputs) != 1:
        return False
    return bypass(node, node.outputs[0], first.outputs[0])


def _slice_params(node: ir.Node) -> list[list[int]] | None:
    """starts, ends, axes, steps of an opset >= 10 Slice with constant inputs."""
    if len(node.inputs) < 4 or node.inputs[3] is None:
        return None  # without axes, the axes are 0..n-1: merge only explicit ones
    params = []
    for i in range(1, 5):
        if i == 4 and (len(node.inputs) < 5 or node.inputs[4] is None):
            params.append([1] * len(params[0]))
            continue
        array = constant_array(node.inputs[i])
        if array is None or array.dtype != np.int64 or array.ndim != 1:
            return None
        params.append([int(v) for v in array])
    return params if len({len(p) for p in params}) == 1 else None


def _slices(node: ir.Node, opset: int, constants: optcc.ir.ModelNames) -> bool:
    if opset < 10:
        return False
    first = _producer(node.inputs[0], "Slice")
    if first is None or not _only_reader(first.outputs[0], node):
        return False
    p1, p2 = _slice_params(first), _slice_params(node)
    if p1 is None or p2 is None:
        return False
    x = first.inputs[0]
    rank = _rank(x, first.outputs[0], node.outputs[0], offsets=(0, 0, 0))
    a1, a2 = _normalized(p1[2], rank), _normalized(p2[2], rank)
    if a1 is None or a2 is None or len(a1) != len(p1[2]) or len(a2) != len(p2[2]) or a1 & a2:
        return False
    node.replace_input_with(0, x)
    node.resize_inputs(5)  # steps written even where both Slices left them out (all 1)
    for i in range(4):
        node.replace_input_with(i + 1, constants.constant_for(node, np.array(p1[i] + p2[i], dtype=np.int64), "slice"))
    remove_if_dead(first)
    return True


def _merge(node: ir.Node, opset: int, constants: optcc.ir.ModelNames) -> str | None:
    """The rule that merged ``node`` with its producer, or None."""
    if node.op_type in _IDEMPOTENT:
        return "idempotent" if _idempotent(node, opset) else None
    if node.op_type in ("Squeeze", "Unsqueeze"):
        if node.op_type == "Unsqueeze" and _reduce_unsqueeze(node, opset):
            return "reduce-unsqueeze"
        label = _same_kind_pair(node, opset, constants)
        if label is not None:
            return label
    if node.op_type == "Concat":
        return "concat-concat" if _concats(node, opset) else None
    if node.op_type == "Slice":
        if _slice_shape(node, opset):
            return "slice-shape"
        return "slice-slice" if _slices(node, opset, constants) else None
    if node.op_type == "Transpose":
        return "transpose-transpose" if _transposes(node, opset) else None
    if node.op_type == "Where":
        return "not-where" if _not_where(node, opset) else None
    if node.op_type == "Not":
        return "not-not" if _not_not(node, opset) else None
    if node.op_type in ("Squeeze", "Unsqueeze"):
        label = _squeeze_pair(node, opset)
        if label is None and node.op_type == "Unsqueeze" and _unsqueeze_of_reshape(node, opset, constants):
            return "unsqueeze-of-reshape"
        return label
    if node.op_type == "Reshape":
        return _reshapes(node, opset, constants)
    return None


class MergeConsecutivePass(optcc.Pass):
    """Collapse Transpose, Squeeze/Unsqueeze, Reshape, Concat, Reduce-Unsqueeze and
    Shape-Slice chains.

    Rules, preconditions and why each is exact: see the module docstring.
    """

    name = "merge-consecutive"
    numerics = "exact"

    def call(self, model: ir.Model) -> optcc.PassResult:
        model_opset = optcc.ir.default_opset(model)
        merged: dict[str, int] = {}
        constants = optcc.ir.ModelNames(model)
        for graph in optcc.ir.graphs(model):
            opset = graph_opset(graph, model_opset)
            for node in list(graph):
                if node.domain not in _DEFAULT_DOMAINS or node.graph is None:
                    continue
                if len(node.outputs) != 1 or not node.inputs or node.inputs[0] is None:
                    continue
                label = _merge(node, opset, constants)
                while label is not None:  # the node may now read another link of a chain
                    merged[label] = merged.get(label, 0) + 1
                    label = _merge(node, opset, constants) if node.graph is not None else None
        return optcc.PassResult(model, bool(merged), merged)
