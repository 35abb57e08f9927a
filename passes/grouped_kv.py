"""Proofs about the shape arithmetic exporters write around attention: grouped key/value
heads (HF ``repeat_kv``) and the dynamo exporter's flattened key transpose. Used by
``fuse_attention``; no pass lives here.

``repeat_kv(x, n)`` for ``x`` of shape ``(B, H, S, D)`` is exported as::

    Reshape(Expand(Unsqueeze(x, axes=[2]), [B, H, n, S, D]), [B, H*n, S, D])

which is ``np.repeat(x, n, axis=1)``: head ``j`` of the result is head ``j // n`` of ``x``,
exactly how the standard ``Attention`` op (and onnxruntime's kernel) shares a key/value head
among ``n`` consecutive query heads when the key has fewer heads than the query. The
Expand and Reshape targets are either constants or computed from ``Shape`` (TorchScript:
``Gather(Shape(x), i)`` and ``Mul(Gather(Shape(x), 1), n)`` behind torch's
``Where(Equal(t, -1), 1, t)``; dynamo: ``Shape`` slices of another input whose declared
symbolic dims match). Every entry is proved equal to the dim it must be (a constant, the
same axis of the same tensor, or the same declared symbolic dim); anything unproved refuses.
A dim is followed back through the ops that made it, each by its definition: Transpose,
Reshape (a copied ``0``, a target entry, and the ``-1`` it infers: the input's elements
over the other entries, cancelled pair by pair until constants are left), Concat,
MatMul with a 2-D weight, Slice on other axes, elementwise Cast/Neg/Identity,
RotaryEmbedding, and broadcasting Add/Sub/Mul/Div (a 1 takes the other side's dim; a
constant above 1 is the output's, since the op runs only when the other side is 1 or the
same).

The dynamo exporter transposes the key's last two axes through rank 3:
``Reshape(Transpose(Reshape(k, [-1, S, D]), [0, 2, 1]), [B, H, D, S])``, which is
``Transpose(k, [0, 1, 3, 2])`` exactly when ``S, D, B, H`` are ``k``'s own dims.

Dims are compared as sets of keys: ``("int", n)``, ``("sym", name)`` for a declared symbolic
dim, ``("ref", value, axis)`` for an axis of a tensor, ``("mul", key, n)`` for a product,
``("add", {key, key})`` for a sum (a cache's total length: past + new).
Two dims are proved equal when their key sets intersect.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx_ir as ir

from optcc.rewrite import Match

__all__ = ["Repeat", "repeated_kv", "flat_transpose_source", "query_heads", "heads_is_one", "dim_keys", "same_dim",
           "shape_vector"]

Keys = frozenset
_DEPTH = 16
_DIM_DEPTH = 4
_DEFAULT = ("", "ai.onnx")
_BROADCASTING = ("Add", "Sub", "Mul", "Div")


@dataclass(frozen=True)
class Repeat:
    """``value = repeat_kv(source, n_rep)``."""

    source: ir.Value
    n_rep: int


def _is(node: ir.Node | None, op: str) -> bool:
    return node is not None and node.op_type == op and node.domain in _DEFAULT


def _is_rotary(node: ir.Node) -> bool:
    """A RotaryEmbedding (standard or onnxruntime's): its output has its first input's shape."""
    return node.op_type == "RotaryEmbedding" and node.domain in (*_DEFAULT, "com.microsoft")


def _int_keys(n: int) -> Keys:
    return frozenset({("int", int(n))})


def dim_keys(value: ir.Value, axis: int, m: Match | None = None,
             rank_of: Callable[[ir.Value], int | None] | None = None, depth: int = 0) -> Keys:
    """What is known of ``value``'s dim ``axis`` (``axis`` >= 0): declared, and with ``m``
    and ``rank_of`` also through the Transpose, Reshape or projection MatMul that made it."""
    keys = {("ref", value, axis)}
    shape = value.shape
    if shape is not None and axis < shape.rank():
        dim = shape[axis]
        if isinstance(dim, int):
            keys.add(("int", dim))
        elif getattr(dim, "value", None) is not None:
            keys.add(("sym", dim.value))
    node = value.producer()
    if m is None or rank_of is None or node is None or depth > _DIM_DEPTH or value is not node.outputs[0]:
        return frozenset(keys)
    if _is(node, "Transpose") and "perm" in node.attributes:
        perm = list(node.attributes["perm"].as_ints())
        if axis < len(perm):
            keys |= dim_keys(node.inputs[0], perm[axis], m, rank_of, depth + 1)
    elif _is(node, "Reshape") and len(node.inputs) == 2:
        target = shape_vector(m, node.inputs[1], rank_of, depth + 1)
        entry = target[axis] if target is not None and axis < len(target) else None
        n = _int_of(entry)
        allowzero = node.attributes.get("allowzero")
        if n == 0 and (allowzero is None or allowzero.as_int() == 0):
            keys |= dim_keys(node.inputs[0], axis, m, rank_of, depth + 1)
        elif n == -1:
            keys |= _inferred(node, target, m, rank_of, depth + 1)
        elif entry is not None and n != 0:
            keys |= entry
    elif _is(node, "Identity") or _is(node, "Cast") or _is(node, "Neg") or _is_rotary(node):  # shape kept
        keys |= dim_keys(node.inputs[0], axis, m, rank_of, depth + 1)
    elif _is(node, "Concat") and "axis" in node.attributes and len(node.inputs) == 2:
        rank = rank_of(value)
        parts = [dim_keys(v, axis, m, rank_of, depth + 1) for v in node.inputs]
        if rank is not None and node.attributes["axis"].as_int() % rank == axis:
            keys |= _sum(*parts)
        elif rank is not None:  # every other axis is equal in both inputs
            keys |= parts[0] | parts[1]
    elif _is(node, "Slice") and _slice_keeps(m, node, axis, rank_of):
        keys |= dim_keys(node.inputs[0], axis, m, rank_of, depth + 1)
    elif node.op_type in _BROADCASTING and _is(node, node.op_type) and len(node.inputs) == 2:
        keys |= _broadcast(node, axis, m, rank_of, depth + 1)
    elif _is(node, "MatMul") and rank_of(node.inputs[1]) == 2:  # (.., n, k) @ (k, m): leading axes kept
        rank = rank_of(node.inputs[0])
        if rank is not None and rank >= 2 and axis < rank - 1:
            keys |= dim_keys(node.inputs[0], axis, m, rank_of, depth + 1)
        elif rank is not None and rank >= 2 and axis == rank - 1:
            keys |= dim_keys(node.inputs[1], 1, m, rank_of, depth + 1)
    return frozenset(keys)


def _slice_keeps(m: Match, node: ir.Node, axis: int, rank_of: Callable[[ir.Value], int | None]) -> bool:
    """Whether a Slice provably leaves ``axis`` alone: its constant axes do not list it."""
    rank = rank_of(node.inputs[0])
    starts = _const_ints(m, node.inputs[1]) if len(node.inputs) > 1 else None
    if rank is None or starts is None:
        return False
    axes = node.inputs[3] if len(node.inputs) > 3 else None
    listed = _const_ints(m, axes) if axes is not None else list(range(len(starts)))
    return listed is not None and axis not in {a % rank for a in listed}


def _broadcast(node: ir.Node, axis: int, m: Match, rank_of: Callable[[ir.Value], int | None],
               depth: int) -> Keys:
    """An elementwise binary op's output dim (numpy broadcasting, inputs aligned right): the
    other input's where one input's is 1, a constant above 1 wherever it stands (the other is
    1 or the same for the op to run), the shared dim where both are proved equal."""
    ranks = [rank_of(operand) for operand in node.inputs]
    if None in ranks:
        return frozenset()
    parts = []
    for operand, operand_rank in zip(node.inputs, ranks):
        own = axis - (max(ranks) - operand_rank)
        parts.append(dim_keys(operand, own, m, rank_of, depth) if own >= 0 else _int_keys(1))
    if _int_of(parts[0]) == 1:
        return parts[1]
    if _int_of(parts[1]) == 1:
        return parts[0]
    for part in parts:
        if (_int_of(part) or 0) > 1:
            return part
    return parts[0] | parts[1] if same_dim(*parts) else frozenset()


def _inferred(reshape: ir.Node, target: list[Keys], m: Match, rank_of: Callable[[ir.Value], int | None],
              depth: int) -> Keys:
    """The dim a Reshape infers for its single -1 entry, as an int: the input's element
    count over the other entries' product. Each other entry is cancelled against an input
    axis proved equal to it (0 copies the input's own axis); what is left on both sides must
    be constants, so the quotient is exact."""
    rank = rank_of(reshape.inputs[0])
    allowzero = reshape.attributes.get("allowzero")
    ints = [_int_of(t) for t in target]
    if rank is None or ints.count(-1) != 1 or (0 in ints and allowzero is not None and allowzero.as_int() == 1):
        return frozenset()
    left: list[Keys | None] = [dim_keys(reshape.inputs[0], i, m, rank_of, depth) for i in range(rank)]
    for axis in (i for i, n in enumerate(ints) if n == 0):  # copies of the input's own axes
        if axis >= rank:
            return frozenset()
        left[axis] = None
    numerator, denominator = 1, 1
    for entry, n in zip(target, ints):
        if n in (-1, 0):
            continue
        matched = next((i for i, dim in enumerate(left) if dim is not None and same_dim(dim, entry)), None)
        if matched is not None:
            left[matched] = None
        elif n is not None and n > 0:
            denominator *= n
        else:
            return frozenset()
    for dim in left:
        n = None if dim is None else _int_of(dim)
        if dim is not None and (n is None or n < 0):
            return frozenset()
        numerator *= 1 if dim is None else n
    if denominator == 0 or numerator % denominator:
        return frozenset()
    return _int_keys(numerator // denominator)


def _sum(a: Keys, b: Keys) -> Keys:
    """The keys of a sum of two dims."""
    keys = {("add", frozenset((x, y))) for x in a for y in b}
    x, y = _int_of(a), _int_of(b)
    if x is not None and y is not None:
        keys.add(("int", x + y))
    return frozenset(keys)


def same_dim(a: Keys | None, b: Keys | None) -> bool:
    return a is not None and b is not None and bool(a & b)


def _int_of(keys: Keys | None) -> int | None:
    found = [k[1] for k in keys or () if k[0] == "int"]
    return found[0] if found else None


def _const_ints(m: Match, value: ir.Value | None) -> list[int] | None:
    array = m.value_array(value) if value is not None else None
    if array is None or array.dtype.kind not in "iu" or array.ndim > 1:
        return None
    return [int(a) for a in array.reshape(-1)]


def _scalar(m: Match, value: ir.Value, rank_of: Callable[[ir.Value], int | None], depth: int) -> Keys | None:
    """The keys of a scalar (or 1-element) integer tensor."""
    ints = _const_ints(m, value)
    if ints is not None:
        return _int_keys(ints[0]) if len(ints) == 1 else None
    vector = shape_vector(m, value, rank_of, depth)
    if vector is not None and len(vector) == 1:
        return vector[0]
    node = value.producer()
    if node is None or depth > _DEPTH:
        return None
    if _is(node, "Gather") and len(node.inputs) == 2:
        axis = node.attributes.get("axis")
        index = _const_ints(m, node.inputs[1])
        source = shape_vector(m, node.inputs[0], rank_of, depth + 1)
        if (axis is None or axis.as_int() == 0) and index is not None and len(index) == 1 and source is not None \
                and -len(source) <= index[0] < len(source):
            return source[index[0]]
        return None
    if _is(node, "Mul") and len(node.inputs) == 2:
        for a, b in (node.inputs, reversed(node.inputs)):
            c = _const_ints(m, b)
            if c is not None and len(c) == 1:
                inner = _scalar(m, a, rank_of, depth + 1)
                if inner is None:
                    return None
                keys = {("mul", k, c[0]) for k in inner}
                n = _int_of(inner)
                if n is not None:
                    keys.add(("int", n * c[0]))
                return frozenset(keys)
        return None
    if _is(node, "Add") and len(node.inputs) == 2:
        parts = [_scalar(m, v, rank_of, depth + 1) for v in node.inputs]
        return None if None in parts else _sum(*parts)
    if _is(node, "Cast") or _is(node, "Identity") or _is(node, "Squeeze"):
        return _scalar(m, node.inputs[0], rank_of, depth + 1)
    return None


def shape_vector(m: Match, value: ir.Value | None, rank_of: Callable[[ir.Value], int | None],
                 depth: int = 0) -> list[Keys] | None:
    """The entries of a 1-D integer shape tensor, each as the keys of the dim it holds;
    None when some entry is not understood."""
    if value is None or depth > _DEPTH:
        return None
    ints = _const_ints(m, value)
    if ints is not None:
        array = m.value_array(value)
        return [_int_keys(i) for i in ints] if array.ndim == 1 else None
    node = value.producer()
    if node is None:
        return None
    if _is(node, "Concat"):
        axis = node.attributes.get("axis")
        if axis is None or axis.as_int() not in (0, -1):
            return None
        parts = [shape_vector(m, v, rank_of, depth + 1) for v in node.inputs]
        return None if any(p is None for p in parts) else [k for p in parts for k in p]
    if _is(node, "Shape"):
        rank = rank_of(node.inputs[0])
        if rank is None:
            return None
        bounds = [node.attributes[a].as_int() if a in node.attributes else None for a in ("start", "end")]
        return [dim_keys(node.inputs[0], i, m, rank_of, depth + 1) for i in range(rank)[slice(*bounds)]]
    if _is(node, "Unsqueeze"):
        axes = _const_ints(m, node.inputs[1]) if len(node.inputs) > 1 else (
            list(node.attributes["axes"].as_ints()) if "axes" in node.attributes else None)
        if axes not in ([0], [-1]) or rank_of(node.inputs[0]) != 0:
            return None
        scalar = _scalar(m, node.inputs[0], rank_of, depth + 1)
        return None if scalar is None else [scalar]
    if _is(node, "Slice") and len(node.inputs) >= 3:
        source = shape_vector(m, node.inputs[0], rank_of, depth + 1)
        bounds = [_const_ints(m, v) if v is not None else None for v in node.inputs[1:5]]
        if source is None or any(b is None or len(b) != 1 for b in bounds[:2]):
            return None
        if len(bounds) > 2 and bounds[2] is not None and bounds[2] not in ([0], [-1]):
            return None
        if len(bounds) > 3 and bounds[3] is not None and bounds[3] != [1]:
            return None
        if len(node.inputs) > 3 and node.inputs[3] is not None and bounds[2] is None:
            return None
        if len(node.inputs) > 4 and node.inputs[4] is not None and bounds[3] is None:
            return None
        return source[bounds[0][0]:bounds[1][0]]
    if _is(node, "Gather") and len(node.inputs) == 2:
        axis = node.attributes.get("axis")
        index = m.value_array(node.inputs[1])
        source = shape_vector(m, node.inputs[0], rank_of, depth + 1)
        if (axis is not None and axis.as_int() != 0) or index is None or index.ndim != 1 or source is None:
            return None
        if any(not -len(source) <= int(i) < len(source) for i in index):
            return None
        return [source[int(i)] for i in index]
    if _is(node, "Cast") or _is(node, "Identity"):
        return shape_vector(m, node.inputs[0], rank_of, depth + 1)
    if _is(node, "Reshape") and _const_ints(m, node.inputs[1]) in ([-1], [1]):  # a scalar made 1-D
        scalar = _scalar(m, node.inputs[0], rank_of, depth + 1) if rank_of(node.inputs[0]) in (0, 1) else None
        return None if scalar is None else [scalar]
    if _is(node, "Where") and len(node.inputs) == 3:
        return _where(m, node, rank_of, depth)
    return None


def _where(m: Match, node: ir.Node, rank_of: Callable[[ir.Value], int | None], depth: int) -> list[Keys] | None:
    """torch's ``Where(Equal(t, c), a, b)`` guard, entry by entry: a dim (never negative)
    differs from a negative constant; two constants compare by value."""
    cond, a, b = node.inputs
    equal = cond.producer()
    if not _is(equal, "Equal"):
        return None
    left = shape_vector(m, equal.inputs[0], rank_of, depth + 1)
    right = shape_vector(m, equal.inputs[1], rank_of, depth + 1)
    picks = shape_vector(m, a, rank_of, depth + 1), shape_vector(m, b, rank_of, depth + 1)
    if left is None or right is None or None in picks:
        return None
    size = max(len(left), len(right), *(len(p) for p in picks))
    vectors = []
    for vector in (left, right, *picks):  # 1-element vectors broadcast
        if len(vector) not in (1, size):
            return None
        vectors.append(vector * size if len(vector) == 1 else vector)
    out = []
    for x, y, pa, pb in zip(*vectors):
        ix, iy = _int_of(x), _int_of(y)
        if ix is not None and iy is not None:
            out.append(pa if ix == iy else pb)
        elif (ix is not None and ix < 0) or (iy is not None and iy < 0):
            out.append(pb)  # a dim is never negative
        elif x & y:
            out.append(pa)
        else:
            return None
    return out


def _axes(m: Match, node: ir.Node) -> list[int] | None:
    if len(node.inputs) > 1:
        return _const_ints(m, node.inputs[1])
    attr = node.attributes.get("axes")
    return list(attr.as_ints()) if attr is not None else None


def repeated_kv(m: Match, value: ir.Value, rank_of: Callable[[ir.Value], int | None]) -> Repeat | str | None:
    """``Repeat(x, n)`` when ``value`` is proved to be ``repeat_kv(x, n)``; None when it is
    not a ``Reshape(Expand(Unsqueeze(..)))`` at all; else why the proof failed."""
    reshape = value.producer()
    if not _is(reshape, "Reshape") or len(reshape.inputs) != 2:
        return None
    expand = reshape.inputs[0].producer()
    if not _is(expand, "Expand"):
        return None
    unsqueeze = expand.inputs[0].producer()
    if not _is(unsqueeze, "Unsqueeze"):
        return None
    x = unsqueeze.inputs[0]
    if rank_of(x) != 4:
        return "repeat_kv input not known to be rank 4"
    if _axes(m, unsqueeze) not in ([2], [-3]):
        return "repeat_kv Unsqueeze is not on axis 2"
    target = shape_vector(m, expand.inputs[1], rank_of)
    if target is None or len(target) != 5:
        return "repeat_kv Expand target not understood"
    n_rep = _int_of(target[2])
    if n_rep is None or n_rep < 1:
        return "repeat_kv factor is not a constant"
    dims = [dim_keys(x, i, m, rank_of) for i in range(4)]
    for entry, dim in zip((target[0], target[1], target[3], target[4]), dims):
        if not (_int_of(entry) == 1 or same_dim(entry, dim)):
            return "repeat_kv Expand target does not keep the other axes"
    # what Reshape must produce from (B, H, n, S, D); 0 copies the input's dim there
    expanded = [dims[0], dims[1], _int_keys(n_rep), dims[2], dims[3]]
    h = _int_of(dims[1])
    merged = frozenset({("mul", k, n_rep) for k in dims[1]} | ({("int", h * n_rep)} if h is not None else set()))
    wanted = [dims[0], merged, dims[2], dims[3]]
    shape = shape_vector(m, reshape.inputs[1], rank_of)
    if shape is None or len(shape) != 4:
        return "repeat_kv Reshape target not understood"
    allowzero = reshape.attributes.get("allowzero")
    inferred = 0
    for i, (entry, want) in enumerate(zip(shape, wanted)):
        n = _int_of(entry)
        if n == 0 and (allowzero is None or allowzero.as_int() == 0):
            entry = expanded[i]
        elif n == -1:
            inferred += 1
            continue
        if not same_dim(entry, want):
            return "repeat_kv Reshape does not merge (kv_heads, n_rep) into the head axis"
    if inferred > 1:
        return "repeat_kv Reshape target not understood"
    return Repeat(x, n_rep)


def flat_transpose_source(m: Match, kt: ir.Value, rank_of: Callable[[ir.Value], int | None]) -> ir.Value | None:
    """``k`` when ``kt = Reshape(Transpose(Reshape(k, [-1, S, D]), [0, 2, 1]), [B, H, D, S])``
    with ``(B, H, S, D)`` the dims of the rank-4 ``k``: then ``kt = Transpose(k, [0, 1, 3, 2])``."""
    outer = kt.producer()
    if not _is(outer, "Reshape") or len(outer.inputs) != 2:
        return None
    transpose = outer.inputs[0].producer()
    if not _is(transpose, "Transpose") or "perm" not in transpose.attributes \
            or list(transpose.attributes["perm"].as_ints()) != [0, 2, 1]:
        return None
    inner = transpose.inputs[0].producer()
    if not _is(inner, "Reshape") or len(inner.inputs) != 2:
        return None
    k = inner.inputs[0]
    if rank_of(k) != 4:
        return None
    dims = [dim_keys(k, i, m, rank_of) for i in range(4)]
    for node, wanted in ((inner, [None, dims[2], dims[3]]), (outer, [dims[0], dims[1], dims[3], dims[2]])):
        shape = shape_vector(m, node.inputs[1], rank_of)
        if shape is None or len(shape) != len(wanted):
            return None
        free = [i for i, e in enumerate(shape) if _int_of(e) == -1]
        if len(free) > 1 or any(_int_of(e) == 0 for e in shape):
            return None
        for i, (entry, want) in enumerate(zip(shape, wanted)):
            if i not in free and not same_dim(entry, want):
                return None
        if node is inner and free != [0]:
            return None
    return k


def heads_is_one(m: Match, q: ir.Value, split_heads: Callable[[ir.Value], int | None],
                 rank_of: Callable[[ir.Value], int | None], depth: int = 0) -> bool:
    """Whether axis 1 of the rank-4 ``q`` is proved to be 1: declared, split into one head,
    or through elementwise ops whose other inputs have rank <= 2 (they broadcast over the
    last two axes only)."""
    if ("int", 1) in dim_keys(q, 1, m, rank_of) or split_heads(q) == 1:
        return True
    node = q.producer()
    if node is None or depth > _DEPTH or node.domain not in _DEFAULT or q is not node.outputs[0] \
            or node.op_type not in ("Mul", "Div", "Add", "Sub", "Neg", "Cast", "Identity"):
        return False
    ranks = [rank_of(v) for v in node.inputs]
    wide = [v for v, r in zip(node.inputs, ranks) if r is None or r > 2]
    return len(wide) == 1 and rank_of(wide[0]) == 4 and heads_is_one(m, wide[0], split_heads, rank_of, depth + 1)


_SAME_HEADS = frozenset({"Add", "Sub", "Mul", "Div", "Neg", "Cast", "Identity", "Concat", "Slice", "Where"})


def query_heads(m: Match, q: ir.Value, split_heads: Callable[[ir.Value], int | None],
                rank_of: Callable[[ir.Value], int | None], depth: int = 0) -> int | None:
    """The number of heads on axis 1 of the rank-4 ``q`` when some path proves it above 1
    (declared, ``split_heads`` of a head-splitting Transpose, or through elementwise ops,
    Concat/Slice off axis 1 and RotaryEmbedding: their output's axis 1 is the largest axis 1
    of their rank-4 inputs)."""
    n = _int_of(dim_keys(q, 1, m, rank_of))
    if n is not None and n > 1:
        return n
    found = split_heads(q)
    if found is not None and found > 1:
        return found
    node = q.producer()
    if node is None or depth > _DEPTH or q is not node.outputs[0]:
        return None
    if node.op_type == "RotaryEmbedding" and node.domain in (*_DEFAULT, "com.microsoft"):
        inputs = node.inputs[:1]
    elif node.domain in _DEFAULT and node.op_type in _SAME_HEADS:
        inputs = [v for v in node.inputs if v is not None]
        axes = None
        if node.op_type == "Concat":
            axes = [node.attributes["axis"].as_int()] if "axis" in node.attributes else None
        elif node.op_type == "Slice":
            axes = _const_ints(m, node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
            inputs = inputs[:1]
        elif node.op_type == "Where":
            inputs = inputs[1:]
        if node.op_type in ("Concat", "Slice") and (axes is None or any(a in (1, -3) for a in axes)):
            return None
    else:
        return None
    for v in inputs:
        found = query_heads(m, v, split_heads, rank_of, depth + 1) if rank_of(v) == 4 else None
        if found is not None:
            return found
    return None
