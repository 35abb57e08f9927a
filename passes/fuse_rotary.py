"""Rotary position embeddings written as HF's ``rotate_half`` into one RotaryEmbedding op.

Rewrite (default-domain ops; Mul and Add operands in either order)::

    y = Add(Mul(x, cos), Mul(Concat(Neg(Slice(x, h, end)), Slice(x, 0, h), axis=-1), sin))

``x`` is ``(batch, heads, seq, head_size)``; ``cos`` and ``sin`` are ``Unsqueeze(c, axes=[1])``
of ``(batch, seq, 2h)`` tensors reached through elementwise ops (one input, or a second input
that is a scalar constant: Cos/Sin, Cast, HF's ``* attention_scaling``) from either

- ``Concat(a, a, axis=-1)`` (HF's ``emb = cat(freqs, freqs)``, computed from the position ids), or
- ``Gather(T, ids, axis=0)`` of a constant ``(positions, 2h)`` table whose two column halves are
  equal bit for bit (a cached table).

Their left half ``c_h`` is the same ops applied to ``a`` (or to ``Gather(T[:, :h], ids)``).
Partial rotary (``Concat(rotate(Slice(x, 0, r)), Slice(x, r, end), axis=-1)``, NeoX/Phi style)
becomes the same op with ``rotary_embedding_dim=r``.

- ``FuseRotaryPass`` (``fuse-rotary``, -O2, default opset >= 23): ``RotaryEmbedding(x, c_h,
  s_h)`` with 3-D caches and no position ids.
- ``FuseOrtRotaryPass`` (``fuse-ort-rotary``, -O3, opset < 23): ``com.microsoft.RotaryEmbedding(x,
  ids, cos_cache, sin_cache)``, whose caches are 2-D tables indexed by position ids: the tables
  are ``c_h``/``s_h`` reshaped to ``(batch * seq, h)`` and ``ids = arange(batch * seq)`` reshaped
  to ``(batch, seq)``, so row ``b * seq + s`` is ``c_h[b, s]`` (no table is precomputed, no
  maximum position assumed, nothing assumed about the position ids' values). Then a contrib
  op between head transposes (a fused attention's query or key) runs on the tokens layout
  (``token_layout``, exact bit for bit; its docstring says when).

Why it is exact: with ``cos = [c_h, c_h]`` and ``sin = [s_h, s_h]`` the pattern computes
``x1 * c_h + (-x2) * s_h`` and ``x2 * c_h + x1 * s_h`` for the halves ``x1``, ``x2``, which is the
op's definition with ``interleaved=0`` (negation is exact and ``a + (-b) == a - b``); the
elementwise ops give ``c_h`` exactly the values of ``cos``'s halves. Nothing requires
``c_h`` to be a cosine. (``interleaved=1`` pairs ``x[..., 0::2]`` with ``x[..., 1::2]``, GPT-J's
``rotate_every_two``, a different graph that is not matched.)

Preconditions: float32; ``x`` rank 4 with a static even rotary width; both Slices over the last
axis with step 1 and bounds exactly ``[0, h)`` and ``[h, 2h)`` (``2h`` the head size, or ``r``);
the Concat over the last axis; the caches' width ``2h``; their batch and seq dims proved equal
to ``x``'s (the same number, or the same symbolic name within one source: the declared
shapes, onnx shape inference from the graph's inputs on a copy without weights and
annotations, or for the contrib op onnxruntime's symbolic inference, ``ort_shapes``) or
statically 1, then expanded to ``x``'s (onnxruntime
requires equal dims; the decomposed Mul broadcast); for the contrib op with partial rotary, a
static number of heads. The pattern driver refuses matches whose intermediates are read
elsewhere or are graph outputs.

Numerics ("fusion"): the same products and sums in float32; the kernels may fuse a multiply
and add (about 1 ulp).

Stats: ``applied``/``rejected`` per rule; ``token_layout`` (contrib): rotary ops moved to the
tokens layout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

import optcc
from optcc.infra import PassResult
from optcc.passes.fold_shapes import infer_shapes
from optcc.passes.fuse_ort_transformer import MS_DOMAIN, import_microsoft_domain
from optcc.passes.ort_shapes import OrtShapes, same_dim
from optcc.rewrite import Builder, Const, Match, Op, RewritePass, Rule, Var

__all__ = ["FuseRotaryPass", "FuseOrtRotaryPass", "ROTARY_OPSET", "token_layout"]

ROTARY_OPSET = 23
_DEFAULT = ("", "ai.onnx")
# ops that map each element alone (the chain between a cos/sin source and its use)
_UNARY = frozenset({"Cos", "Sin", "Cast", "Identity", "Neg", "Abs", "Exp", "Sqrt", "Reciprocal"})
_WITH_SCALAR = frozenset({"Mul", "Div", "Add", "Sub", "Pow"})
_CHAIN_DEPTH = 16


class _Dims:
    """Dims of values from two sources, ``"declared"`` and ``"inferred"`` (onnx shape inference
    from the graph's inputs alone, run once per pass call when first needed, on a copy without
    the weights' data or value annotations), and for the contrib pass a third, ``ort``
    (onnxruntime's symbolic shape inference, ``ort_shapes``, which knows the contrib ops and
    names the size a Reshape computes by an expression, where onnx's inference loses the
    sequence length after the first layer). Symbolic names are compared only within one
    source: two inference runs may give one name to different dims."""

    def __init__(self, model: ir.Model, with_ort: bool = False) -> None:
        self.model = model
        self._inferred: dict[ir.Value, ir.Shape] | None = None
        self.ort = OrtShapes(model) if with_ort else None

    def get(self, value: ir.Value, source: str) -> tuple | None:
        if source == "declared":
            shape = value.shape
        else:
            if self._inferred is None:
                values = [v for n in optcc.ir.nodes(self.model) for v in (*n.inputs, *n.outputs)]
                self._inferred = infer_shapes(self.model, values, annotations=False)
            shape = self._inferred.get(value)
        return None if shape is None else tuple(shape.dims)

    def static(self, value: ir.Value) -> tuple | None:
        """The dims with every size that either source knows as a number (None: no rank)."""
        declared = self.get(value, "declared")
        if declared is not None and all(isinstance(d, int) for d in declared):
            return declared
        inferred = self.get(value, "inferred")
        if declared is None or inferred is None or len(declared) != len(inferred):
            return inferred if declared is None else declared
        return tuple(d if isinstance(d, int) else i for d, i in zip(declared, inferred))


def _same(a: int | ir.SymbolicDim, b: int | ir.SymbolicDim) -> bool:
    """Whether two dims are provably equal: the same number, or the same symbolic name."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b and a >= 0
    if isinstance(a, int) or isinstance(b, int):
        return False
    return a.value is not None and a.value == b.value


@dataclasses.dataclass
class _Half:
    """How to compute the left half of a cos/sin tensor: ``base`` (``a`` of ``Concat(a, a)``, or
    the ids of the Gather of ``table``), then ``steps`` (node, index of the chained input),
    applied last to first."""

    base: ir.Value
    table: ir.Value | None  # the constant table, whose left half is gathered
    steps: list[tuple[ir.Node, int]]
    rank3: ir.Value  # (batch, seq, 2h), before the Unsqueeze


def _attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def _chain_input(m: Match, node: ir.Node) -> int | None:
    """Which input of ``node`` carries the tensor when ``node`` maps each element alone."""
    if node.domain not in _DEFAULT:
        return None
    if node.op_type in _UNARY and len(node.inputs) == 1:
        return 0
    if node.op_type in _WITH_SCALAR and len(node.inputs) == 2:
        for i in (0, 1):
            other = m.value_array(node.inputs[1 - i]) if node.inputs[1 - i] is not None else None
            if other is not None and other.size == 1 and other.ndim <= 1 and node.inputs[i] is not None \
                    and m.value_array(node.inputs[i]) is None:
                return i
    return None


def _unsqueezed_at_1(m: Match, node: ir.Node) -> bool:
    axes = m.value_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if axes is None and node.attributes.get("axes") is not None:
        axes = np.array(node.attributes["axes"].as_ints())
    return axes is not None and axes.size == 1 and int(axes.reshape(())) in (1, -3)


def _half(m: Match, dims: _Dims, value: ir.Value, h: int) -> _Half | str:
    """The recipe for the left half of ``value`` (rank 4, ``(batch, 1, seq, 2h)``), proved to
    equal its right half, or the reason it cannot be proved."""
    steps: list[tuple[ir.Node, int]] = []
    rank3: ir.Value | None = None
    node = None
    for _ in range(_CHAIN_DEPTH):
        node = value.producer()
        if node is None:
            return "cos/sin is not computed in the graph"
        if node.op_type == "Unsqueeze" and node.domain in _DEFAULT and rank3 is None:
            if not _unsqueezed_at_1(m, node):
                return "cos/sin is not unsqueezed at axis 1"
            value = rank3 = node.inputs[0]
            continue
        index = _chain_input(m, node)
        if index is None:
            break
        steps.append((node, index))
        value = node.inputs[index]
    if rank3 is None:
        return "cos/sin is not Unsqueeze(c, axes=[1])"
    c_dims = dims.static(rank3)
    if c_dims is None or len(c_dims) != 3 or c_dims[2] != 2 * h:
        return "cos/sin is not (batch, seq, rotary dim)"
    if node.op_type == "Concat" and node.domain in _DEFAULT and len(node.inputs) == 2 \
            and node.inputs[0] is node.inputs[1] and _attr_int(node, "axis", 0) in (-1, 2):
        return _Half(node.inputs[0], None, steps, rank3)
    if node.op_type == "Gather" and node.domain in _DEFAULT and _attr_int(node, "axis", 0) == 0:
        table = m.value_array(node.inputs[0])
        if table is None:
            return "cos/sin table is not a constant"
        if table.ndim != 2 or table.shape[1] != 2 * h or not np.array_equal(table[:, :h], table[:, h:]):
            return "cos/sin table halves differ"
        return _Half(node.inputs[1], node.inputs[0], steps, rank3)
    return "cos/sin is not Concat(a, a) or a Gather of a constant table"


def _slice_range(m: Match, prefix: str, dim: int) -> tuple[int, int] | None:
    """``[start, end)`` of the matched Slice ``prefix`` over the last axis (of size ``dim``) of
    a rank-4 tensor, with step 1; None for anything else."""
    starts, ends, axes, steps = (m.array(f"{prefix}_{k}") for k in ("starts", "ends", "axes", "steps"))
    if any(a is not None and a.size != 1 for a in (starts, ends, axes, steps)):
        return None
    if axes is None or int(axes.reshape(())) not in (-1, 3):
        return None
    if steps is not None and int(steps.reshape(())) != 1:
        return None
    bounds = []
    for raw in (int(starts.reshape(())), int(ends.reshape(()))):
        bounds.append(min(max(raw + dim if raw < 0 else raw, 0), dim))
    return bounds[0], bounds[1]


def _slice(x: Var | Op, prefix: str) -> Op:
    return Op("Slice", x, Const(f"{prefix}_starts"), Const(f"{prefix}_ends"), Const(f"{prefix}_axes", optional=True),
              Const(f"{prefix}_steps", optional=True), name=prefix)


def _pattern(partial: bool) -> Op:
    x = Var("x")
    source = _slice(x, "rot") if partial else x
    rotated = Op("Concat", Op("Neg", _slice(source, "x2"), name="neg"), _slice(source, "x1"), name="rotated")
    y = Op("Add", Op("Mul", source, Var("cos"), commute=True, name="mul_cos"),
           Op("Mul", rotated, Var("sin"), commute=True, name="mul_sin"), commute=True, name="sum")
    return Op("Concat", y, _slice(x, "pass"), name="joined") if partial else y


@dataclasses.dataclass
class _Plan:
    rotary_dim: int  # 0: the whole head
    heads: int | None
    half: int  # h: the caches' width
    cos: _Half
    sin: _Half
    expand_cos: bool
    expand_sin: bool


def _last_axis(node: ir.Node) -> bool:
    return _attr_int(node, "axis", 0) in (-1, 3) and len(node.inputs) == 2


def _plan(m: Match, dims: _Dims, contrib: bool) -> _Plan | str:
    x = m["x"]
    if optcc.ir.element_type(x) != ir.DataType.FLOAT:
        return "not float32"
    x_dims = dims.static(x)
    if x_dims is None or len(x_dims) != 4 or not isinstance(x_dims[3], int):
        return "input is not rank 4 with a static head size"
    head = x_dims[3]
    rotary = head
    if m.get("joined") is not None:
        rot, kept = _slice_range(m, "rot", head), _slice_range(m, "pass", head)
        if rot is None or kept is None or rot[0] != 0 or kept != (rot[1], head) or not 0 < rot[1] < head \
                or not _last_axis(m["joined"]):
            return "partial rotary slices are not [0, r) and [r, head)"
        rotary = rot[1]
    h = rotary // 2
    if rotary % 2 or _slice_range(m, "x1", rotary) != (0, h) or _slice_range(m, "x2", rotary) != (h, rotary):
        return "slices are not the two halves of the rotary dim"
    if not _last_axis(m["rotated"]):
        return "rotate_half Concat is not over the last axis"
    heads = x_dims[1] if isinstance(x_dims[1], int) else None
    if contrib and rotary < head and heads is None:
        return "partial rotary needs a static number of heads (com.microsoft RotaryEmbedding)"
    halves = [_half(m, dims, m[name], h) for name in ("cos", "sin")]
    for half in halves:
        if isinstance(half, str):
            return half
    expand = [_needs_expand(dims, x, half.rank3) for half in halves]
    if None in expand:
        return "cannot prove cos/sin batch and seq equal the input's"
    return _Plan(0 if rotary == head else rotary, heads, h, halves[0], halves[1], expand[0], expand[1])


def _needs_expand(dims: _Dims, x: ir.Value, c: ir.Value) -> bool | None:
    """Whether ``c`` (batch, seq, 2h) must be expanded to ``x``'s (batch, heads, seq, head)
    batch and seq: False when both are proved equal, True when the others are statically 1,
    None when neither is proved."""
    ones = dims.static(c)
    for source in ("declared", "inferred"):
        x_dims, c_dims = dims.get(x, source), dims.get(c, source)
        if x_dims is None or c_dims is None or len(x_dims) != 4 or len(c_dims) != 3:
            continue
        pairs = ((x_dims[0], c_dims[0], ones[0]), (x_dims[2], c_dims[1], ones[1]))
        if all(_same(a, b) or one == 1 for a, b, one in pairs):
            return not all(_same(a, b) for a, b, _ in pairs)
    x_dims, c_dims = (dims.ort.dims(x), dims.ort.dims(c)) if dims.ort is not None else (None, None)
    if x_dims is not None and c_dims is not None and len(x_dims) == 4 and len(c_dims) == 3 \
            and same_dim(x_dims[0], c_dims[0]) and same_dim(x_dims[2], c_dims[1]):
        return False
    return None


class _Constants:
    """The constants a pass call builds, one initializer per content and graph, so that the
    nodes built for each site are equal and CSE merges them (in -O3 no initializer dedup
    follows)."""

    def __init__(self) -> None:
        self._made: dict[tuple, ir.Value] = {}

    def get(self, m: Match, b: Builder, key: tuple, make: Callable[[], np.ndarray], base: str) -> ir.Value:
        graph = m.graph
        made = self._made.get((id(graph), *key))
        if made is not None and (made in b.initializers or (
                isinstance(graph, ir.Graph) and graph.initializers.get(made.name) is made)):
            return made
        made = self._made[(id(graph), *key)] = b.const(make(), base)
        return made

    def ints(self, m: Match, b: Builder, values: int | list[int], base: str) -> ir.Value:
        key = ("ints", values if isinstance(values, int) else tuple(values))
        return self.get(m, b, key, lambda: np.array(values, np.int64), base)


def _build_half(m: Match, b: Builder, consts: _Constants, half: _Half, expand: bool, h: int, name: str) -> ir.Value:
    value = half.base
    if half.table is not None:
        table = consts.get(m, b, ("table", half.table, h),
                           lambda: np.ascontiguousarray(m.value_array(half.table)[:, :h]), f"{name}_half_table")
        value = b.op("Gather", table, value, axis=0)
    for node, index in reversed(half.steps):
        inputs = list(node.inputs)
        inputs[index] = value
        value = b.op(node.op_type, *inputs, attributes=node.attributes)
    if expand:  # a batch or seq of 1 broadcast by the decomposed Mul
        batch_seq = b.op("Gather", b.op("Shape", m["x"]), consts.ints(m, b, [0, 2], "batch_seq_axes"), axis=0)
        value = b.op("Expand", value, b.op("Concat", batch_seq, consts.ints(m, b, [h], "rotary_half"), axis=0))
    return value


def _rules(contrib: bool, dims: _Dims) -> tuple[Rule, ...]:
    """The rules of one pass call: checks and rewrites share ``dims``; a check's plan is what
    the rewrite of the same match builds."""
    plans: dict[int, _Plan] = {}
    consts = _Constants()

    def check(m: Match) -> str | None:
        if contrib and m.opset >= ROTARY_OPSET:
            return "opset >= 23: fuse-rotary writes the standard RotaryEmbedding"
        if contrib and m.opset < 11:
            return "opset < 11: no Range for the position ids"
        plan = _plan(m, dims, contrib)
        if isinstance(plan, str):
            return plan
        plans[id(m.root)] = plan
        return None

    def rewrite(m: Match, b: Builder) -> ir.Value:
        plan = plans.pop(id(m.root))
        x = m["x"]
        h = plan.half
        cos = _build_half(m, b, consts, plan.cos, plan.expand_cos, h, "cos")
        sin = _build_half(m, b, consts, plan.sin, plan.expand_sin, h, "sin")
        attrs = {"rotary_embedding_dim": plan.rotary_dim} if plan.rotary_dim else {}
        if not contrib:
            return b.op("RotaryEmbedding", x, cos, sin, interleaved=0, **attrs)
        flat = consts.ints(m, b, [-1, h], "rotary_table_shape")
        batch_seq = b.op("Gather", b.op("Shape", cos), consts.ints(m, b, [0, 1], "batch_seq_axes"), axis=0)
        count = b.op("ReduceProd", batch_seq, keepdims=0)
        ids = b.op("Reshape", b.op("Range", consts.ints(m, b, 0, "zero"), count, consts.ints(m, b, 1, "one")),
                   batch_seq)
        if plan.rotary_dim:
            attrs["num_heads"] = plan.heads
        return b.op("RotaryEmbedding", x, ids, b.op("Reshape", cos, flat), b.op("Reshape", sin, flat),
                    domain=MS_DOMAIN, interleaved=0, **attrs)

    return tuple(Rule("rotary-partial" if partial else "rotary", _pattern(partial), rewrite, check,
                      min_opset=0 if contrib else ROTARY_OPSET) for partial in (True, False))


class FuseRotaryPass(RewritePass):
    """x * cos + rotate_half(x) * sin -> RotaryEmbedding (opset >= 23)."""

    name = "fuse-rotary"
    numerics = "fusion"
    contrib = False

    def call(self, model: ir.Model) -> PassResult:
        return self._fuse(model, _Dims(model, with_ort=self.contrib))

    def _fuse(self, model: ir.Model, dims: _Dims) -> PassResult:
        self.rules = _rules(self.contrib, dims)
        result = super().call(model)
        if result.modified and self.contrib:
            import_microsoft_domain(model)
        return result


class FuseOrtRotaryPass(FuseRotaryPass):
    """x * cos + rotate_half(x) * sin -> com.microsoft RotaryEmbedding (opset < 23, -O3); then
    each such op between head-transposes is moved to the token layout (``token_layout``)."""

    name = "fuse-ort-rotary"
    contrib = True

    def call(self, model: ir.Model) -> PassResult:
        dims = _Dims(model, with_ort=True)
        result = self._fuse(model, dims)
        # the inference may predate this call's fusions: it is read only for values they keep
        moved = token_layout(model, dims.ort)
        if moved:
            model.graph.sort()
        stats = dict(result.stats or {})
        stats["token_layout"] = moved
        return PassResult(model, result.modified or moved > 0, stats)


_PERM_HEADS = [0, 2, 1, 3]
_TOKEN_LAYOUT_ATTRIBUTES = frozenset({"interleaved", "rotary_embedding_dim", "num_heads"})


def _is_head_transpose(node: ir.Node | None) -> bool:
    """Whether ``node`` is ``Transpose(perm=[0, 2, 1, 3])`` (its own inverse)."""
    if node is None or node.domain not in _DEFAULT or node.op_type != "Transpose":
        return False
    perm = node.attributes.get("perm")
    return perm is not None and list(perm.as_ints()) == _PERM_HEADS


def _token_layout_site(node: ir.Node, shapes: OrtShapes) -> tuple[ir.Value, ir.Value, int] | None:
    """``(x3, shape, heads)`` when ``node`` is ``RotaryEmbedding(Transpose(Reshape(x3, shape),
    [0, 2, 1, 3]), ...)`` with ``x3`` ``(b, s, heads * head)`` and the Reshape proved to split
    only its last axis into ``(heads, head)``, and every reader of its output is a
    ``Transpose([0, 2, 1, 3])`` that is no graph output; else None."""
    if node.domain != MS_DOMAIN or node.op_type != "RotaryEmbedding" or len(node.inputs) != 4 \
            or set(node.attributes) - _TOKEN_LAYOUT_ATTRIBUTES or None in node.inputs:
        return None
    out = node.outputs[0]
    readers = [use.node for use in out.uses()]
    if not readers or out.is_graph_output() or not all(
            _is_head_transpose(r) and not r.outputs[0].is_graph_output() for r in readers):
        return None
    heads_first = node.inputs[0].producer()
    if not _is_head_transpose(heads_first):
        return None
    split = heads_first.inputs[0].producer()
    if split is None or split.domain not in _DEFAULT or split.op_type != "Reshape" or len(split.inputs) != 2 \
            or _attr_int(split, "allowzero", 0) != 0:
        return None
    x3, shape = split.inputs
    x3_dims, split_dims = shapes.dims(x3), shapes.dims(split.outputs[0])
    if x3_dims is None or split_dims is None or len(x3_dims) != 3 or len(split_dims) != 4:
        return None
    heads, head = split_dims[2], split_dims[3]
    if not (isinstance(heads, int) and isinstance(head, int) and heads > 0 and x3_dims[2] == heads * head
            and same_dim(x3_dims[0], split_dims[0]) and same_dim(x3_dims[1], split_dims[1])):
        return None
    return x3, shape, heads


def token_layout(model: ir.Model, shapes: OrtShapes) -> int:
    """Rewrite, in the main graph, for each ``com.microsoft.RotaryEmbedding`` between head transposes::

        Transpose(RotaryEmbedding(Transpose(Reshape(x3, shape), [0,2,1,3]), ids, cos, sin), [0,2,1,3])
     -> Reshape(RotaryEmbedding(x3, ids, cos, sin, num_heads=heads), shape)

    as attention fusions leave it: the rotary applied to heads ``(b, heads, s, head)`` whose
    result a MultiHeadAttention / GroupQueryAttention query or key reads back as tokens ``(b, s,
    heads * head)``. The op also takes ``(b, s, heads * head)`` with ``num_heads``, so both
    transposes (two copies of the tensor) go. Preconditions (``_token_layout_site``): the
    Reshape only splits ``x3``'s last axis (its first two dims proved equal to ``x3``'s by
    onnxruntime's shape inference; heads and head static), every reader of the rotary is such
    a Transpose, no graph output is involved, and the op has only the attributes this pass
    writes. Exact: the op rotates each ``(b, s, h)`` row of ``head`` elements by the position
    ``ids[b, s]`` alone; the layout changes which memory holds a row, not its arithmetic (the
    same values bit for bit). Returns the number of rotary ops moved."""
    graph, names, moved = model.graph, optcc.ir.ModelNames(model), 0
    for node in list(graph):
        site = _token_layout_site(node, shapes)
        if site is None:
            continue
        x3, shape, heads = site
        attributes = [a for a in node.attributes.values() if a.name != "num_heads"]
        attributes.append(ir.AttrInt64("num_heads", heads))
        tokens = ir.Node(MS_DOMAIN, "RotaryEmbedding", [x3, *node.inputs[1:]], attributes, name=f"{node.name}_tokens")
        split = ir.Node("", "Reshape", [tokens.outputs[0], shape], name=f"{node.name}_heads")
        tokens.outputs[0].name = names.value(f"{node.outputs[0].name}_tokens")
        split.outputs[0].name = names.value(f"{node.outputs[0].name}_split")
        graph.insert_before(node, [tokens, split])
        readers = [use.node for use in node.outputs[0].uses()]
        for reader in readers:
            reader.outputs[0].replace_all_uses_with(split.outputs[0])
        heads_first = node.inputs[0].producer()
        _remove_unread(graph, [*readers, node, heads_first, heads_first.inputs[0].producer()])
        moved += 1
    return moved


def _remove_unread(graph: ir.Graph, nodes: list[ir.Node]) -> None:
    """Remove each of ``nodes`` (in order: readers first) whose outputs nothing reads."""
    for node in nodes:
        if node.graph is graph and not any(o.uses() or o.is_graph_output() for o in node.outputs):
            graph.remove(node, safe=True)
