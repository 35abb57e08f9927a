"""EliminateNoOpsPass: remove nodes that provably return their input unchanged.

Rewrites (``y = Op(x, ...)`` removed, every use of ``y`` reads ``x``), each only when
the value types and constant operands prove the node is a no-op:

- ``cast``: Cast to the dtype ``x`` already has; CastLike to a value of that dtype. An
  unannotated ``x`` has the dtype ONNX's type constraints fix from its producer
  (``optcc.ir.element_type``: a Cast's ``to``, a ConstantOfShape's ``value`` tensor's,
  bool from a comparison or logical op, a data-movement op's data input's, ...).
- ``reshape``: Reshape whose target (a constant) gives ``x``'s own shape: every entry is
  a copy (``0`` without allowzero), the equal static dim, or a single ``-1`` when every
  other dim of ``x`` is static and positive (so the inferred size is ``x``'s dim); or
  the target ``[-1]`` for an ``x`` of rank 1 (``optcc.rewrite.static_rank`` where the
  shape is unknown): no other entry, so ``-1`` infers ``x``'s length, whatever it is.
- ``expand``: Expand whose target broadcasts to ``x``'s shape (rank <= rank(x); each
  entry 1 or equal to a static dim of ``x``).
- ``flatten``: Flatten of a rank-2 value with ``axis`` 1 (or -1), or with ``axis`` 0
  when the first dim is a static 1: its result is ``[d0, d1]``, the input's own shape.
- ``transpose``: Transpose with the identity permutation (no ``perm``: rank <= 1).
- ``pad``: Pad whose pads are all zero (any mode; ``pads`` attribute or constant input).
- ``slice``: Slice that selects everything: on every sliced axis step 1, start clamps
  to 0 and end clamps to the dim (a static dim; on a symbolic dim only start 0 and end
  INT64_MAX prove it).
- ``concat``: Concat of one input, or of one input and others provably empty along the
  axis (a static 0 dim there, or a ConstantOfShape whose target holds a known 0 at the
  axis, through unary elementwise ops and binary ones with a scalar constant, as
  PyTorch exports ``cat([x, pad])`` with a zero-length pad); ``split``: Split into one output (given split sizes
  must equal a static dim).
- ``mul``/``div``/``add``/``sub``: ``x*1``, ``1*x``, ``x/1``, ``x-0``, ``x+(-0.0)``,
  ``(-0.0)+x`` (integers: ``x+0``, ``0+x``), where the constant has ``x``'s dtype (ONNX
  gives both operands of these ops one type, so an unannotated ``x`` has it) and
  broadcasting keeps ``x``'s shape (a scalar constant, of rank 0, whatever ``x``'s shape;
  a one-element constant of rank <= rank(x), the rank from ``optcc.rewrite.static_rank``
  where the shape is unknown; else the constant's rank <= rank(x), each of its dims 1 or
  equal to a static dim of ``x``).
- ``and-or``: ``And(x, x)`` and ``Or(x, x)`` (both inputs the same value): ``x`` broadcast
  with itself is ``x``'s shape, and ``a and a = a or a = a`` for every bool;
  ``And(x, True)``, ``Or(x, False)`` (either side; an all-True / all-False bool constant
  whose broadcasting keeps ``x``'s shape, as for the arithmetic rules).

Where ``x`` carries no shape annotation (arithmetic, reshape and expand rules), its shape
is derived through the node that made it: a unary elementwise op (Cast, Neg, Abs, Relu,
Not, ...) keeps its input's shape, a binary one (Add, Sub, Mul, Div, Pow, And, Or, ...)
whose other operand is a constant that broadcasting absorbs keeps the shape of the first,
Gemm gives ``[M, N]`` from its rank-2 inputs (after ``transA``/``transB``), MatMul
``numpy.matmul``'s shape of its operands' (batch dims broadcast where static), and a
Reshape its constant target (a ``0`` copying the input's dim without allowzero, a ``-1``
the element count over the other entries where every dim is static), as the operator's
definition fixes (up to ``_SHAPE_DEPTH`` producers back; anything else is unknown).

Why each is exact (bit for bit): the removed node copies ``x``. For the arithmetic rules
IEEE 754 gives ``x*1 = x/1 = x`` and ``x - (+0.0) = x + (-0.0) = x`` for every ``x``,
signed zeros, infinities and NaN included; the only bit-level difference is that a
signalling-NaN input is no longer quieted (it stays a NaN). ``x + (+0.0)`` is NOT
removed for floats: ``-0.0 + 0.0`` is ``+0.0``, which is observable (``1/x``); likewise
``x - (-0.0)``.

Preconditions: default-domain ops only (custom domains pass through untouched); a
constant operand is an initializer that is not a graph input (those are overridable) or
a Constant node; anything unknown leaves the node. When ``y`` is a graph output, ``x``
takes its name only if ``x`` is produced by a node of the same graph and is no graph
input, initializer or other graph output (the rule of ``eliminate-identities``);
otherwise the node stays. Every graph is visited: main graph, functions, If/Loop/Scan
bodies. Types and shapes come from the model's value info; running shape inference
before this pass lets it prove more.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

import optcc
from optcc.passes.fold_shapes import shape_elements
from optcc.rewrite import static_rank

__all__ = [
    "EliminateNoOpsPass",
    "constant_array",
    "bypass",
    "remove_if_dead",
    "static_dim",
    "graph_opset",
    "shape_of",
]

INT64_MAX = np.iinfo(np.int64).max
_DEFAULT_DOMAINS = ("", "ai.onnx")


# --------------------------------------------------------------------------- helpers


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The array behind an initializer (not an overridable graph input) or a Constant
    node's output; None when the value is not a constant or cannot be read."""
    if value is None or value.is_graph_input():
        return None
    try:
        return optcc.ir.as_numpy(value)
    except (ValueError, TypeError):
        return None


def static_dim(dim: object) -> int | None:
    """A dim as an int when it is static, else None (negative dims, which some exporters
    write for "dynamic", count as unknown)."""
    return dim if isinstance(dim, int) and dim >= 0 else None


def _ints(node: ir.Node, attr: str, input_index: int | None) -> list[int] | None:
    """Integer list from a constant input (newer opsets) or an attribute (older ones)."""
    if input_index is not None and _has_input(node, input_index):
        array = constant_array(node.inputs[input_index])
        return None if array is None else [int(v) for v in array.reshape(-1)]
    attribute = node.attributes.get(attr)
    if attribute is None or attribute.type != ir.AttributeType.INTS:
        return None
    return [int(v) for v in attribute.as_ints()]


def _has_input(node: ir.Node, index: int) -> bool:
    return len(node.inputs) > index and node.inputs[index] is not None


def remove_if_dead(node: ir.Node) -> bool:
    """Remove ``node`` when none of its outputs is used or a graph output."""
    if any(v.uses() or v.is_graph_output() for v in node.outputs):
        return False
    assert node.graph is not None
    node.graph.remove(node, safe=True)
    return True


def bypass(node: ir.Node, result: ir.Value, source: ir.Value) -> bool:
    """Make every use of ``result`` (an output of ``node``) read ``source`` and remove
    ``node`` when it becomes dead. A graph output ``result`` is handed to ``source`` by
    renaming, only when ``source`` is an ordinary value of the same graph; otherwise
    nothing changes and False is returned."""
    graph = node.graph
    assert graph is not None
    if result.is_graph_output():
        producer = source.producer()
        renamable = (
            producer is not None
            and producer.graph is graph
            and not source.is_graph_input()
            and not source.is_initializer()
            and not source.is_graph_output()
        )
        if not renamable:
            return False
        name, type_, shape = result.name, result.type, result.shape
        result.replace_all_uses_with(source, replace_graph_outputs=True)
        remove_if_dead(node)
        source.name = name
        source.type = type_ or source.type  # the declared output type and dims stay
        source.shape = shape if shape is not None else source.shape
        return True
    result.replace_all_uses_with(source)
    remove_if_dead(node)
    return True


def graph_opset(graph: ir.Graph | ir.Function, model_opset: int) -> int:
    """The default-domain opset a graph's nodes follow: a function's own import, else the
    model's (If/Loop/Scan bodies follow the model's)."""
    if isinstance(graph, ir.Function):
        return int(graph.opset_imports.get("", graph.opset_imports.get("ai.onnx", model_opset)))
    return model_opset


_UNARY_ELEMENTWISE = frozenset({
    "Abs", "Acos", "Asin", "Atan", "Ceil", "Cos", "Cosh", "Erf", "Exp", "Floor", "IsInf", "IsNaN",
    "Log", "Neg", "Not", "Reciprocal", "Relu", "Round", "Sigmoid", "Sign", "Sin", "Sinh", "Sqrt",
    "Tan", "Tanh", "Cast", "Identity", "Softplus", "Softsign",
})
_BINARY_ELEMENTWISE = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "And", "Or", "Xor", "Equal", "Less", "LessOrEqual",
    "Greater", "GreaterOrEqual", "Max", "Min",
})
_SHAPE_DEPTH = 16


def shape_of(value: ir.Value, depth: int = _SHAPE_DEPTH) -> ir.Shape | None:
    """``value``'s annotated shape, else the shape its producer provably gives it (see the
    module docstring); None when unknown."""
    return _derived_shape(value, depth, {})


def _derived_shape(value: ir.Value, depth: int, memo: dict[ir.Value, ir.Shape | None]) -> ir.Shape | None:
    """``shape_of`` with ``memo`` holding the values already derived in this call (a value
    read along several paths, e.g. both operands of a MatMul, is derived once)."""
    if value.shape is not None or depth == 0:
        return value.shape
    if value not in memo:
        memo[value] = _producer_shape(value, depth, memo)
    return memo[value]


def _producer_shape(value: ir.Value, depth: int, memo: dict[ir.Value, ir.Shape | None]) -> ir.Shape | None:
    node = value.producer()
    if node is None or node.domain not in _DEFAULT_DOMAINS or len(node.outputs) != 1:
        return None
    inputs = list(node.inputs)

    def operand(v: ir.Value) -> ir.Shape | None:
        return _derived_shape(v, depth - 1, memo)

    if node.op_type == "Gemm" and len(inputs) >= 2 and None not in inputs[:2]:
        a, b = operand(inputs[0]), operand(inputs[1])
        if a is None or b is None or a.rank() != 2 or b.rank() != 2:
            return None
        trans_a, trans_b = node.attributes.get_int("transA", 0), node.attributes.get_int("transB", 0)
        return ir.Shape([a[1 if trans_a else 0], b[0 if trans_b else 1]])
    if None in inputs:
        return None
    if node.op_type == "MatMul" and len(inputs) == 2:
        return _matmul_shape(operand(inputs[0]), operand(inputs[1]))
    if node.op_type == "Reshape" and len(inputs) == 2:
        return _reshape_shape(node, operand(inputs[0]))
    if node.op_type in _UNARY_ELEMENTWISE and len(inputs) == 1:
        return operand(inputs[0])
    if node.op_type in _BINARY_ELEMENTWISE and len(inputs) == 2:
        for x, c in (inputs, inputs[::-1]):
            array = constant_array(c)
            if array is None:
                continue
            shape = operand(x)
            if _keeps_shape(shape, array.shape):
                return shape
    return None


def _broadcast_dim(a: object, b: object) -> int | None:
    """The dim numpy broadcasting gives two dims, where static ones decide it (else None)."""
    a, b = static_dim(a), static_dim(b)
    if a is None or b is None:
        return None
    return a if b == 1 else b if a == 1 or a == b else None


def _matmul_shape(a: ir.Shape | None, b: ir.Shape | None) -> ir.Shape | None:
    """MatMul's result shape (numpy.matmul): a 1-D operand gains a unit axis that the result
    drops; the batch axes broadcast (unknown where a dim is not static)."""
    if a is None or b is None or a.rank() == 0 or b.rank() == 0:
        return None
    rows = [a[-2]] if a.rank() >= 2 else []
    columns = [b[-1]] if b.rank() >= 2 else []
    batch_a, batch_b = list(a)[:-2], list(b)[:-2]
    width = max(len(batch_a), len(batch_b))
    batch_a, batch_b = [1] * (width - len(batch_a)) + batch_a, [1] * (width - len(batch_b)) + batch_b
    return ir.Shape([*(_broadcast_dim(x, y) for x, y in zip(batch_a, batch_b)), *rows, *columns])


def _reshape_shape(node: ir.Node, x: ir.Shape | None) -> ir.Shape | None:
    """A Reshape's result shape from its constant target: positive entries as they are, a
    ``0`` (without allowzero) ``x``'s dim there, a ``-1`` the element count over the other
    entries where every dim is static (unknown otherwise)."""
    target = constant_array(node.inputs[1])
    if target is None or target.ndim != 1 or target.dtype != np.int64:
        return None
    allowzero = bool(node.attributes.get_int("allowzero", 0))
    dims: list[int | None] = []
    for i, t in enumerate(int(v) for v in target):
        if t == 0 and not allowzero:
            if x is None or i >= x.rank():
                return None
            dims.append(static_dim(x[i]))
        else:
            dims.append(t)
    if dims.count(-1) > 1 or any(d is not None and d < -1 for d in dims):
        return None
    if -1 in dims:
        known = [d for d in dims if d != -1]
        size = None if x is None else [static_dim(d) for d in x]
        inferred = None
        if size is not None and None not in size and None not in known and 0 not in known:
            total, rest = int(np.prod(size)), int(np.prod(known))
            inferred = total // rest if total % rest == 0 else None
        dims[dims.index(-1)] = inferred
    return ir.Shape(dims)


def _keeps_shape(shape: ir.Shape | None, other: Sequence[int]) -> bool:
    """Whether broadcasting a value of ``shape`` with static dims ``other`` (numpy rules)
    provably gives ``shape`` back: always for a scalar (rank 0), whatever ``shape`` is."""
    if len(other) == 0:
        return True
    if shape is None or len(other) > shape.rank():
        return False
    for dim, size in zip(reversed(list(shape)), reversed(list(other))):
        if size != 1 and static_dim(dim) != size:
            return False
    return True


def _broadcast_keeps(x: ir.Value, other: Sequence[int]) -> bool:
    """``_keeps_shape`` for ``x``'s shape; where that is unknown, a constant of one element
    keeps ``x``'s shape when ``x``'s rank (``optcc.rewrite.static_rank``) is at least its own."""
    shape = shape_of(x)
    if shape is not None or not other or any(d != 1 for d in other):
        return _keeps_shape(shape, other)  # (a rank-0 constant keeps any shape)
    rank = static_rank(x)
    return rank is not None and rank >= len(other)


# --------------------------------------------------------------------------- rules
# Each rule returns the input the node's single output equals, or None.


def _cast(node: ir.Node, opset: int) -> ir.Value | None:
    x = node.inputs[0]
    dtype = optcc.ir.element_type(x)
    if x is None or dtype is None:
        return None
    if node.op_type == "CastLike":
        like = node.inputs[1] if _has_input(node, 1) else None
        return x if like is not None and optcc.ir.element_type(like) == dtype else None
    to = node.attributes.get("to")
    if to is None or to.type != ir.AttributeType.INT:
        return None
    return x if to.as_int() == dtype.value else None


def _reshape(node: ir.Node, opset: int) -> ir.Value | None:
    x = node.inputs[0]
    target = _ints(node, "shape", 1 if opset >= 5 else None)
    shape = None if x is None else shape_of(x)
    if shape is None and target == [-1] and x is not None and static_rank(x) == 1:
        return x  # a vector reshaped to one dim: -1 infers its own length
    if shape is None or target is None or len(target) != shape.rank():
        return None
    allowzero = node.attributes.get_int("allowzero", 0) if opset >= 14 else 0
    inferred = [i for i, t in enumerate(target) if t == -1]
    if len(inferred) > 1:
        return None
    for i, (dim, t) in enumerate(zip(shape, target)):
        if t == -1:
            continue
        if t == 0 and not allowzero:
            if inferred and not (static_dim(dim) or 0) > 0:
                return None  # -1 is only provable when every other dim is known and non-zero
            continue
        if static_dim(dim) != t:
            return None
        if inferred and t <= 0:
            return None
    return x


def _expand(node: ir.Node, opset: int) -> ir.Value | None:
    x = node.inputs[0]
    target = _ints(node, "", 1)
    if x is None or target is None or not _keeps_shape(shape_of(x), target):
        return None
    return x


def _flatten(node: ir.Node, opset: int) -> ir.Value | None:
    x = node.inputs[0]
    if x is None or x.shape is None or x.shape.rank() != 2:
        return None
    axis = node.attributes.get_int("axis", 1)
    if axis in (0, -2):
        return x if static_dim(x.shape[0]) == 1 else None
    return x if axis in (1, -1) else None


def _transpose(node: ir.Node, opset: int) -> ir.Value | None:
    x = node.inputs[0]
    perm = node.attributes.get("perm")
    if perm is None:
        return x if x is not None and x.shape is not None and x.shape.rank() <= 1 else None
    return x if list(perm.as_ints()) == list(range(len(perm.as_ints()))) else None


def _pad(node: ir.Node, opset: int) -> ir.Value | None:
    if opset >= 11:
        pads = _ints(node, "", 1)
    else:
        pads = _ints(node, "pads" if opset >= 2 else "paddings", None)
    return node.inputs[0] if pads is not None and not any(pads) else None


def _slice_axis_is_whole(dim: object, start: int, end: int, step: int) -> bool:
    if step != 1:
        return False
    size = static_dim(dim)
    if size is None:
        return start == 0 and end == INT64_MAX
    start = start + size if start < 0 else start
    end = end + size if end < 0 else end
    return min(max(start, 0), size) == 0 and min(max(end, 0), size) == size


def _slice(node: ir.Node, opset: int) -> ir.Value | None:
    x = node.inputs[0]
    if x is None or x.shape is None:
        return None
    rank = x.shape.rank()
    if opset >= 10:
        starts, ends = _ints(node, "", 1), _ints(node, "", 2)
        axes = _ints(node, "", 3) if _has_input(node, 3) else None
        steps = _ints(node, "", 4) if _has_input(node, 4) else None
        if (_has_input(node, 3) and axes is None) or (_has_input(node, 4) and steps is None):
            return None
    else:
        starts, ends = _ints(node, "starts", None), _ints(node, "ends", None)
        axes, steps = _ints(node, "axes", None), None
    if starts is None or ends is None or len(starts) != len(ends):
        return None
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    if len(axes) != len(starts) or len(steps) != len(starts):
        return None
    if any(not -rank <= a < rank for a in axes) or len({a % rank for a in axes}) != len(axes):
        return None
    for axis, start, end, step in zip(axes, starts, ends, steps):
        if not _slice_axis_is_whole(x.shape[axis % rank], start, end, step):
            return None
    return x


def _concat(node: ir.Node, opset: int) -> ir.Value | None:
    if len(node.inputs) == 1:
        return node.inputs[0]
    if None in node.inputs or "axis" not in node.attributes:
        return None
    axis = node.attributes.get_int("axis")
    if axis < 0:
        rank = static_rank(node.outputs[0])
        if rank is None:
            return None
        axis += rank
    kept = [v for v in node.inputs if not _empty_along(v, axis)]
    return kept[0] if len(kept) == 1 else None


def _empty_along(value: ir.Value, axis: int) -> bool:
    """Whether ``value`` provably has no elements along ``axis`` (a non-negative axis)."""
    for _ in range(_SHAPE_DEPTH):
        if value.shape is not None and axis < value.shape.rank() and static_dim(value.shape[axis]) == 0:
            return True
        node = value.producer()
        if node is None or node.domain not in _DEFAULT_DOMAINS or len(node.outputs) != 1 or None in node.inputs:
            return False
        if node.op_type == "ConstantOfShape":
            target = shape_elements(node.inputs[0], {}, False)
            return target is not None and target.vector and axis < len(target.elements) and target.elements[axis] == 0
        if node.op_type in _UNARY_ELEMENTWISE and len(node.inputs) == 1:
            value = node.inputs[0]
            continue
        if node.op_type not in _BINARY_ELEMENTWISE or len(node.inputs) != 2:
            return False
        scalars = [v for v in node.inputs if (a := constant_array(v)) is not None and a.ndim == 0]
        if len(scalars) != 1:  # broadcasting with a scalar keeps the other operand's shape
            return False
        value = node.inputs[1] if scalars[0] is node.inputs[0] else node.inputs[0]
    return False


def _split(node: ir.Node, opset: int) -> ir.Value | None:
    x = node.inputs[0]
    if len(node.outputs) != 1 or x is None:
        return None
    if not (_has_input(node, 1) or "split" in node.attributes):
        return x
    sizes = _ints(node, "split", 1)
    if sizes is None or len(sizes) != 1 or x.shape is None:
        return None
    axis = node.attributes.get_int("axis", 0)
    rank = x.shape.rank()
    if not -rank <= axis < rank:
        return None
    return x if static_dim(x.shape[axis % rank]) == sizes[0] else None


def _is_neutral(array: np.ndarray, op: str) -> bool:
    """Whether ``array`` is the identity element of ``op`` with ``x`` on the other side."""
    floating = np.issubdtype(array.dtype, np.floating)
    if op in ("Mul", "Div"):
        return bool(np.all(array == 1))
    if op in ("And", "Or"):
        return array.dtype == np.bool_ and bool(np.all(array == (op == "And")))
    if op == "Sub" or not floating:  # x - (+0.0); integer 0
        return bool(np.all(array == 0)) and not (floating and np.any(np.signbit(array)))
    return bool(np.all(array == 0) and np.all(np.signbit(array)))  # x + (-0.0)


def _arithmetic(node: ir.Node, opset: int) -> ir.Value | None:
    if len(node.inputs) != 2 or None in node.inputs:
        return None
    positions = (1, 0) if node.op_type in ("Mul", "Add", "And", "Or") else (1,)
    for position in positions:
        x, c = node.inputs[1 - position], node.inputs[position]
        array = constant_array(c)
        if array is None or array.dtype == object:
            continue
        if x.dtype is not None and array.dtype != x.dtype.numpy():
            continue  # an unannotated x has the constant's dtype: these ops take one type
        if _is_neutral(array, node.op_type) and _broadcast_keeps(x, array.shape):
            return x
    return None


def _same_operands(node: ir.Node, opset: int) -> ir.Value | None:
    if len(node.inputs) != 2 or None in node.inputs:
        return None
    if node.inputs[0] is not node.inputs[1]:
        return _arithmetic(node, opset)
    return node.inputs[0]


_RULES: dict[str, tuple[str, Callable[[ir.Node, int], ir.Value | None]]] = {
    "Cast": ("cast", _cast),
    "CastLike": ("cast", _cast),
    "Reshape": ("reshape", _reshape),
    "Expand": ("expand", _expand),
    "Flatten": ("flatten", _flatten),
    "Transpose": ("transpose", _transpose),
    "Pad": ("pad", _pad),
    "Slice": ("slice", _slice),
    "Concat": ("concat", _concat),
    "Split": ("split", _split),
    "Mul": ("mul", _arithmetic),
    "Div": ("div", _arithmetic),
    "Add": ("add", _arithmetic),
    "Sub": ("sub", _arithmetic),
    "And": ("and-or", _same_operands),
    "Or": ("and-or", _same_operands),
}


class EliminateNoOpsPass(optcc.Pass):
    """Remove nodes that provably return their input (same-type Cast, x*1, zero Pad, ...).

    Rules, preconditions and why each is exact: see the module docstring.
    """

    name = "eliminate-noops"
    numerics = "exact"

    def call(self, model: ir.Model) -> optcc.PassResult:
        model_opset = optcc.ir.default_opset(model)
        removed: dict[str, int] = {}
        for graph in optcc.ir.graphs(model):
            opset = graph_opset(graph, model_opset)
            for node in list(graph):
                rule = _RULES.get(node.op_type)
                if rule is None or node.domain not in _DEFAULT_DOMAINS:
                    continue
                if len(node.outputs) != 1 or not node.inputs or node.inputs[0] is None:
                    continue
                label, match = rule
                source = match(node, opset)
                if source is not None and bypass(node, node.outputs[0], source):
                    removed[label] = removed.get(label, 0) + 1
        return optcc.PassResult(model, bool(removed), removed)
