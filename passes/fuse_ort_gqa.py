"""Grouped-query causal decoder attention into onnxruntime's ``com.microsoft.GroupQueryAttention``.

Rewrite (after ``fuse-ort-attention``, -O3, target onnxruntime)::

    kc = Concat(past_key, k, axis=2)                    (graph input, graph output)
    vc = Concat(past_value, v, axis=2)                  (graph input, graph output)
    y  = MultiHeadAttention(query, repeat_kv(kc, n), repeat_kv(vc, n), attention_bias=causal)
 ->
    y, kc, vc = GroupQueryAttention(query, merge(k), merge(v), past_key, past_value,
                                    seqlens_k, total_sequence_length, query_seqlens=seq,
                                    num_heads, kv_num_heads = num_heads / n, scale, causal=1)

with ``merge(t) = Reshape(Transpose(t, [0,2,1,3]), [0,0,-1])`` (the op's new key/value are
``(batch, seq, kv_heads * head_size)``; the cache stays ``(batch, kv_heads, len, head_size)``),
``total = Shape(past_key)[2] + Shape(query)[1]`` (the query is proved as long as the new
key, and reading its shape leaves the new key to the merge alone, so that ``fuse-ort-rotary``
can move a rotary before it to the token layout), ``seqlens_k = Expand(total - 1, [batch])``,
``total_sequence_length`` the same total as an int32 scalar and ``query_seqlens =
Expand(Shape(query)[1], [batch])``: every length is computed in the graph from shapes, no input
is added. Layers whose past length, batch and query length onnxruntime's shape inference
names alike (the decoders' pasts share one declared length, and every layer's query is the
step's tokens) share the first such layer's lengths: equal values, computed once. ``query_seqlens`` (every row valid) lets the CPU kernel take a batch above one with a
multi-token step after a past; without it onnxruntime refuses that case.

Preconditions, each refused with its reason in ``layers``:

- the MultiHeadAttention has only ``num_heads``/``scale``, no bias, key padding mask or past
  inputs, and only its output is read;
- its key and value are ``repeat_kv`` (``grouped_kv``) of KV-cache Concats by one constant
  factor ``n`` dividing ``num_heads`` (``n`` = 1 too: one key/value head per query head);
  each Concat's past is a graph input and the Concat a graph output (present), and nothing
  the new op reads depends on a Concat. A MultiHeadAttention with no ``repeat_kv`` (its cache
  already folded by ``fuse-ort-attention``) is no candidate;
- the attention bias is proved causal with no padding: ``Where(LessOrEqual(Range(0, c, 1),
  Unsqueeze(Range(a, c, 1), [1])), 0, fill)`` (or the ``GreaterOrEqual``/negated spellings),
  the same ``c`` in both Ranges, ``fill`` a constant at most -1e9 (or -inf), then only
  Unsqueezes on leading axes and Expands; a bias that reads a graph input's values (an
  ``attention_mask``, which may hold padding zeros) is refused;
- onnxruntime's symbolic shape inference proves the bias rows and columns are the query
  length and the key length (past + new) and the new key as long as the query. Then row ``i``
  allows key ``j`` iff ``j <= i + c - rows = i + past``: the op's causal mask. Equal names of
  declared symbolic dims are taken as equal sizes (what the model's interface states; the
  decoders' pasts share one length).

Numerics ("fusion"): the same softmax(q kt * scale + causal) v, with key/value head ``i // n``
shared by query head ``i`` (``repeat_kv``'s order), in one kernel: within about 1e-6
relative. Masked keys get probability 0 in both (``exp(fill + score - max)`` underflows to 0
for scores below about 1e8 in magnitude); a causal row always has key 0, so no row is
all-masked. The presents are the Concats' values exactly. Requires onnxruntime 1.32 (the
``query_seqlens`` input). Rotary embeddings stay where they are (``do_rotary=0``).

Stats: ``layers``: per MultiHeadAttention with grouped key/value, ``"fused:
com.microsoft.GroupQueryAttention"`` or why not; ``fused_layers``.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

import optcc
from optcc.infra import PassResult
from optcc.passes.fuse_attention import MS_DOMAIN, exported_rank
from optcc.passes.grouped_kv import Repeat, repeated_kv
from optcc.passes.ort_shapes import OrtShapes, same_dim
from optcc.rewrite import static_rank

__all__ = ["FUSED", "FuseOrtGroupQueryAttentionPass", "causal_mask_refusal"]

FUSED = f"fused: {MS_DOMAIN}.GroupQueryAttention"
_FILL_LIMIT = -1e9
_DEFAULT = ("", "ai.onnx")


def _is(node: ir.Node | None, *ops: str) -> bool:
    return node is not None and node.domain in _DEFAULT and node.op_type in ops


def _const_is(value: ir.Value | None, expected: float) -> bool:
    array = optcc.ir.const_array(value)
    return array is not None and array.size == 1 and float(array.reshape(-1)[0]) == expected


def _scalar_root(value: ir.Value | None) -> ir.Value | None:
    """The value behind Squeeze / Reshape-to-scalar wrappers of a one-element tensor."""
    while value is not None and _is(value.producer(), "Squeeze", "Reshape"):
        value = value.producer().inputs[0]
    return value


def _unsqueeze_axes(node: ir.Node) -> list[int] | None:
    if len(node.inputs) > 1:
        axes = optcc.ir.const_array(node.inputs[1])
        return None if axes is None else [int(a) for a in axes.reshape(-1)]
    attr = node.attributes.get("axes")
    return None if attr is None else list(attr.as_ints())


def _range(value: ir.Value) -> tuple[ir.Value, ir.Value] | None:
    """``(start, end)`` of ``Range(start, end, 1)``."""
    node = value.producer()
    if not _is(node, "Range") or len(node.inputs) != 3 or not _const_is(node.inputs[2], 1):
        return None
    return node.inputs[0], node.inputs[1]


def causal_mask_refusal(where: ir.Value) -> str | None:
    """None when ``where = Where(j <= i + a, 0, fill)`` with ``j`` from ``Range(0, c, 1)``
    and ``i + a`` from ``Unsqueeze(Range(a, c, 1), [1])`` (or an equivalent spelling), else
    why not. The rows are then ``c - a`` long and the columns ``c``: row ``i`` allows key
    ``j`` iff ``j <= i + (columns - rows)``."""
    node = where.producer()
    if not _is(node, "Where") or len(node.inputs) != 3:
        return "the attention bias is not a Where of a comparison"
    cond, a, b = node.inputs
    test = cond.producer() if cond is not None else None
    allowed_first = None
    if _is(test, "LessOrEqual"):
        cols, rows, allowed_first = test.inputs[0], test.inputs[1], True
    elif _is(test, "GreaterOrEqual"):
        rows, cols, allowed_first = test.inputs[0], test.inputs[1], True
    elif _is(test, "Greater"):
        cols, rows, allowed_first = test.inputs[0], test.inputs[1], False
    elif _is(test, "Less"):
        rows, cols, allowed_first = test.inputs[0], test.inputs[1], False
    if allowed_first is None:
        return "the attention bias is not Where(key position <= query position, ...)"
    zero, fill = (a, b) if allowed_first else (b, a)
    fill_array = optcc.ir.const_array(fill)
    if not _const_is(zero, 0.0) or fill_array is None or fill_array.size != 1 \
            or not float(fill_array.reshape(-1)[0]) <= _FILL_LIMIT:
        return f"the attention bias is not 0 where allowed and a constant <= {_FILL_LIMIT:g} elsewhere"
    unsq = rows.producer() if rows is not None else None
    if not _is(unsq, "Unsqueeze") or _unsqueeze_axes(unsq) not in ([1], [-1]):
        return "the query positions are not a Range unsqueezed into a column"
    row_range, col_range = _range(unsq.inputs[0]), _range(cols) if cols is not None else None
    if row_range is None or col_range is None or not _const_is(col_range[0], 0):
        return "the positions are not Range(a, c, 1) and Range(0, c, 1)"
    if _scalar_root(row_range[1]) is not _scalar_root(col_range[1]):
        return "the query and key positions do not end at the same total length"
    return None


def _bias_where(bias: ir.Value) -> tuple[ir.Value, str | None]:
    """The Where behind leading-axis Unsqueezes and Expands of the attention bias."""
    value = bias
    while True:
        node = value.producer()
        if _is(node, "Expand"):
            value = node.inputs[0]
        elif _is(node, "Unsqueeze"):
            axes = _unsqueeze_axes(node)
            if axes is None or any(a < 0 for a in axes) or sorted(axes) != list(range(len(axes))):
                return value, "the attention bias is unsqueezed on other than its leading axes"
            value = node.inputs[0]
        else:
            return value, causal_mask_refusal(value)


def _reads_input_values(value: ir.Value) -> str | None:
    """The name of a graph input whose values (not only its shape) ``value`` depends on."""
    seen: set[ir.Value] = set()
    stack = [value]
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        if v.is_graph_input():
            return v.name
        node = v.producer()
        if node is None or _is(node, "Shape", "Size"):
            continue
        stack.extend(x for x in node.inputs if x is not None)
    return None


class _Site:
    """One MultiHeadAttention on grouped key/value and what the rewrite needs of it."""

    def __init__(self, node: ir.Node) -> None:
        self.node = node
        self.heads = node.attributes["num_heads"].as_int() if "num_heads" in node.attributes else 0
        self.n_rep = 0
        self.caches: list[ir.Value] = []
        self.parts: list[tuple[ir.Value, ir.Value]] = []
        self.where: ir.Value | None = None
        self.lengths_key: tuple[str, str, str] | None = None  # (past, batch, seq) as inferred

    def check(self, shapes: OrtShapes) -> str | None:
        node = self.node
        extra = set(node.attributes) - {"num_heads", "scale"}
        if extra:
            return f"MultiHeadAttention has attributes GroupQueryAttention does not take: {sorted(extra)}"
        inputs = list(node.inputs) + [None] * (8 - len(node.inputs))
        if any(v is not None for v in (inputs[3], inputs[4], inputs[6], inputs[7])):
            return "MultiHeadAttention has a bias, key padding mask or past inputs"
        if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
            return "MultiHeadAttention's present or qk outputs are read"
        query, key, value, bias = inputs[0], inputs[1], inputs[2], inputs[5]
        facts = _Facts()
        found = [repeated_kv(facts, t, lambda v: exported_rank(facts, v)) for t in (key, value)]
        if not all(isinstance(f, Repeat) for f in found):
            return "key and value are not repeat_kv (grouped heads)"
        if found[0].n_rep != found[1].n_rep or self.heads <= 0 or self.heads % found[0].n_rep:
            return "key and value repeated by different factors, or not dividing the heads"
        self.n_rep = found[0].n_rep
        self.caches = [f.source for f in found]
        parts = [_cache_parts(c) for c in self.caches]
        if parts[0] is None or parts[1] is None or self.caches[0] is self.caches[1]:
            return "key and value are not Concat(past, new, axis=2) with past a rank-4 graph input"
        self.parts = parts
        if not all(c.is_graph_output() for c in self.caches):
            return "the cache Concats are not graph outputs (present)"
        upstream = optcc.ir.ancestors([query, parts[0][1], parts[1][1]])
        if any(u.node in upstream for c in self.caches for u in c.uses()):
            return "a cache Concat is read by what the new op reads (its present output would form a cycle)"
        if bias is None:
            return "no attention bias: the attention is not causal"
        reader = _reads_input_values(bias)
        if reader is not None:
            return f"the attention bias reads graph input {reader!r} (it may hold padding zeros)"
        self.where, reason = _bias_where(bias)
        if reason is not None:
            return reason
        dims = {name: shapes.dims(v) for name, v in (("query", query), ("where", self.where),
                                                      ("key", self.caches[0]), ("new", parts[0][1]))}
        if shapes.error is not None:
            return shapes.error
        if any(d is None for d in dims.values()) or len(dims["query"]) != 3 or len(dims["key"]) != 4 \
                or len(dims["new"]) != 4 or len(dims["where"]) < 2:
            return "shapes of the query, key or bias not inferred"
        if not (same_dim(dims["where"][-2], dims["query"][1]) and same_dim(dims["where"][-1], dims["key"][2])):
            return "the causal bias is not proved to be (query length, key length)"
        if not same_dim(dims["new"][2], dims["query"][1]):
            return "the new key is not proved as long as the query"
        past = shapes.dims(parts[0][0])
        if past is not None and len(past) == 4 and None not in (past[2], *dims["query"][:2]):
            self.lengths_key = (str(past[2]), str(dims["query"][0]), str(dims["query"][1]))
        return None


def _cache_parts(value: ir.Value) -> tuple[ir.Value, ir.Value] | None:
    """``(past, new)`` when ``value = Concat(past, new, axis=2)`` and ``past`` is a graph
    input declared of rank 4 (Concat then needs ``new`` of rank 4 too)."""
    node = value.producer()
    if not _is(node, "Concat") or len(node.inputs) != 2 or None in node.inputs:
        return None
    axis = node.attributes.get("axis")
    past, new = node.inputs
    if axis is None or axis.as_int() not in (2, -2) or not past.is_graph_input() or past.is_initializer():
        return None
    return (past, new) if past.shape is not None and past.shape.rank() == 4 else None


class _Facts:
    """What ``grouped_kv`` and ``exported_rank`` read of a pattern match (constants and
    static ranks), for a node found without the pattern engine."""

    def __init__(self) -> None:
        self._ranks: dict[ir.Value, int | None] = {}

    def value_array(self, value: ir.Value) -> np.ndarray | None:
        return optcc.ir.const_array(value)

    def rank(self, value: ir.Value) -> int | None:
        return static_rank(value, self._ranks)


class FuseOrtGroupQueryAttentionPass(optcc.Pass):
    """Grouped-query causal decoder MultiHeadAttention -> ``com.microsoft.GroupQueryAttention``
    (onnxruntime target, -O3)."""

    name = "fuse-ort-gqa"
    numerics = "fusion"

    def call(self, model: ir.Model) -> PassResult:
        report: dict[str, str] = {}
        shapes = OrtShapes(model)
        lengths: dict[tuple[str, str, str], _Lengths] = {}
        names = optcc.ir.ModelNames(model)
        modified = False
        for graph in [model.graph]:  # present outputs are the main graph's
            for node in list(graph):
                if node.domain != MS_DOMAIN or node.op_type != "MultiHeadAttention":
                    continue
                site = _Site(node)
                reason = site.check(shapes)
                label = node.name or f"MultiHeadAttention#{len(report)}"
                if reason == "key and value are not repeat_kv (grouped heads)":
                    continue  # plain multi-head attention is no candidate
                if reason is None:
                    _rewrite(model, site, lengths, names)
                    modified = True
                report[label] = reason or FUSED
        if modified:
            graph.sort()
        stats: dict[str, object] = {}
        if report:
            stats["layers"] = report
            stats["fused_layers"] = sum(v == FUSED for v in report.values())
        return PassResult(model, modified, stats)


_Lengths = tuple[ir.Value, ir.Value, ir.Value]  # seqlens_k, total_sequence_length, query_seqlens


def _rewrite(model: ir.Model, site: _Site, lengths: dict[tuple[str, str, str], _Lengths],
             names: optcc.ir.ModelNames) -> None:
    """Replace the site's MultiHeadAttention and cache Concats by one GroupQueryAttention.
    Its length inputs are shared by every site whose past length, batch and query length
    onnxruntime's shape inference names alike (``lengths``: the first such site's). New
    values and constants are named against every name of the model (``names``)."""
    node, graph = site.node, model.graph
    (past_k, new_k), (past_v, new_v) = site.parts

    def op(op_type: str, *inputs: ir.Value, **attrs: object) -> ir.Value:
        n = ir.Node("", op_type, list(inputs), [ir.convenience.convert_attribute(k, a) for k, a in attrs.items()],
                    num_outputs=1)
        n.outputs[0].name = names.value(f"{node.name or 'gqa'}_{op_type.lower()}")
        n.name = n.outputs[0].name
        graph.insert_before(node, n)
        return n.outputs[0]

    def merge(t: ir.Value) -> ir.Value:
        heads_last = op("Transpose", t, perm=[0, 2, 1, 3])
        return op("Reshape", heads_last, names.constant_for(node, np.array([0, 0, -1], np.int64), "merge"))

    query = node.inputs[0]
    shared = lengths.get(site.lengths_key) if site.lengths_key is not None else None
    if shared is None:
        seq = op("Shape", query, start=1, end=2)  # proved equal to the new key's length (check)
        total = op("Add", op("Shape", past_k, start=2, end=3), seq)
        batch = op("Shape", query, start=0, end=1)
        total32 = op("Cast", total, to=ir.DataType.INT32)
        seqlens = op("Expand", op("Sub", total32, names.constant_for(node, np.array([1], np.int32), "one")), batch)
        total_scalar = op("Reshape", total32, names.constant_for(node, np.array([], np.int64), "scalar"))
        query_seqlens = op("Expand", op("Cast", seq, to=ir.DataType.INT32), batch)
        shared = (seqlens, total_scalar, query_seqlens)
        if site.lengths_key is not None:
            lengths[site.lengths_key] = shared
    seqlens, total_scalar, query_seqlens = shared
    key, value = merge(new_k), merge(new_v)
    attrs = [ir.AttrInt64("num_heads", site.heads), ir.AttrInt64("kv_num_heads", site.heads // site.n_rep),
             ir.AttrInt64("causal", 1)]
    if "scale" in node.attributes:
        attrs.append(ir.AttrFloat32("scale", node.attributes["scale"].as_float()))
    inputs = [query, key, value, past_k, past_v, seqlens, total_scalar] + [None] * 9 + [query_seqlens]
    fused = ir.Node(MS_DOMAIN, "GroupQueryAttention", inputs, attrs, num_outputs=3, name=node.name)
    graph.insert_before(node, fused)
    out = node.outputs[0]
    name, type_, shape = out.name, out.type, out.shape
    out.replace_all_uses_with(fused.outputs[0], replace_graph_outputs=True)
    graph.remove(node, safe=True)
    fused.outputs[0].name, fused.outputs[0].type, fused.outputs[0].shape = name, type_, shape
    for cache, present in zip(site.caches, fused.outputs[1:]):
        concat = cache.producer()
        name, type_, shape = cache.name, cache.type, cache.shape
        cache.replace_all_uses_with(present, replace_graph_outputs=True)
        graph.remove(concat, safe=True)
        present.name, present.type, present.shape = name, type_, shape
