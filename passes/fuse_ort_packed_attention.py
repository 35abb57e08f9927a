"""Self-attention MultiHeadAttention with its Q/K/V projections into onnxruntime's packed
``com.microsoft.Attention`` (-O3, target onnxruntime, after ``fuse-ort-attention``).

Rewrite::

    q = Add(MatMul(x, Wq), bq)                                  (batch, seq, hidden)
    k = Transpose(Reshape(Add(MatMul(x, Wk), bk), split), [0,2,1,3])   or the 3-D Add
    v = Transpose(Reshape(Add(MatMul(x, Wv), bv), split), [0,2,1,3])   or the 3-D Add
    y = MultiHeadAttention(q, k, v, attention_bias=mask, num_heads=H, scale=s)
 ->
    y = Attention(x, Concat(Wq, Wk, Wv, axis=1), Concat(bq, bk, bv), attention_bias=mask,
                  num_heads=H, scale=s)

The op computes the three projections as one GEMM of ``x`` by the packed ``[K, 3 * hidden]``
weight, adds the packed bias, splits the heads and attends, as the MultiHeadAttention did on
the separate projections. A projection without its Add gets a zero bias. The mask is passed
as it was: the same ``attention_bias`` input, with the same broadcast rule (``(batch or 1,
heads or 1, S, T)``) in both ops; the padding stays in it.

Readers of a projection (before or after its head split) that only take its shape
(``Shape``, reached directly or through Reshapes and Transposes) read instead the same
dims computed from ``Shape(x)`` and constants: onnxruntime's symbolic shape inference
(``ort_shapes``) names every such dim an integer or one of ``x``'s leading dims. Otherwise
they would keep a projection computed twice.

Preconditions, each refused with its reason per layer in ``layers``:

- the MultiHeadAttention has only ``num_heads`` and ``scale``, no bias, key padding mask or
  past inputs (a KV cache keeps MultiHeadAttention, or GroupQueryAttention), and only its
  first output is read;
- its query, key and value are projections ``Add(MatMul(x, W), b)`` (either Add order, or
  ``MatMul(x, W)`` alone) of one value ``x`` of rank 3, by three distinct MatMuls with
  float32 weights ``[K, hidden]`` that are initializers read by that MatMul only and no
  graph inputs, and constant biases of ``hidden`` elements; query, key and value of one
  ``hidden``, a multiple of ``num_heads``;
- the query is its projection, or Reshapes of it proved (onnxruntime's shape inference) to
  end in its own dims (an exporter's head split merged back: the same elements in the same
  order);
- a 4-D key or value is ``Transpose(Reshape(p, split), [0,2,1,3])`` of its projection ``p``
  with the Reshape proved (onnxruntime's shape inference) to take ``(b, s, hidden)`` to
  ``(b, s, num_heads, hidden / num_heads)``: a split of the last axis into heads, so the
  Transpose gives the ``(batch, heads, seq, head)`` layout the op computes;
- the projections, Reshapes and Transposes have no readers other than the next of them, the
  MultiHeadAttention and the shape readers above, and are no graph outputs.

Where: every MultiHeadAttention that meets the preconditions, in graph order; no measurement
takes part in the decision.

Numerics ("fusion", the tolerance of ``fuse-ort-attention``): the same dot products of ``x``
with the same weight columns plus the same biases, computed in one GEMM of a wider matrix
(the kernel may order a sum differently), then onnxruntime's attention kernel code that
MultiHeadAttention runs too: within about 1e-6 relative of the MultiHeadAttention on its
separate projections. Rows whose every key is masked come out as MultiHeadAttention's (NaN for
-inf fills, the mean of the values for finite ones). The shape reads are exact.

Stats: ``layers``: per MultiHeadAttention, ``"fused: com.microsoft.Attention"`` or why not;
``fused_layers``; ``shape_reads``: Shape nodes now reading ``x``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import onnx_ir as ir

import optcc
from optcc.infra import PassResult
from optcc.passes.fuse_attention import MS_DOMAIN
from optcc.passes.ort_shapes import OrtShapes, same_dim

__all__ = ["FUSED", "FuseOrtPackedAttentionPass"]

FUSED = f"fused: {MS_DOMAIN}.Attention"
_DEFAULT = ("", "ai.onnx")
_HEAD_SPLIT = [0, 2, 1, 3]


def _is(node: ir.Node | None, *ops: str) -> bool:
    return node is not None and node.domain in _DEFAULT and node.op_type in ops


class _XAxis(NamedTuple):
    """Axis ``axis`` of the projections' input ``x`` (rank 3)."""

    axis: int


_Dims = list[int | _XAxis]  # what a shape read returns, entry by entry


@dataclasses.dataclass
class _Projection:
    """``y = Add(MatMul(x, weight), bias)``, maybe split into heads; ``chain``: its nodes
    from the MatMul to the value the MultiHeadAttention reads."""

    x: ir.Value
    weight: np.ndarray
    bias: np.ndarray
    chain: list[ir.Node]


def _shape_reads(value: ir.Value, allowed: ir.Node) -> list[ir.Node] | None:
    """The Shape nodes among the readers of ``value`` other than ``allowed``, reached
    directly or through Reshapes and Transposes that nothing else reads; None when some
    reader takes more than the shape, or the value or a Shape read of it is a graph output."""
    found: list[ir.Node] = []
    stack = [(value, allowed)]
    while stack:
        current, skip = stack.pop()
        if current.is_graph_output():
            return None
        for use in current.uses():
            node = use.node
            if node is skip:
                continue
            if _is(node, "Shape"):
                if node.outputs[0].is_graph_output():  # a graph output's value is not replaced
                    return None
                found.append(node)
            elif _is(node, "Reshape", "Transpose") and use.idx == 0:
                stack.append((node.outputs[0], None))
            else:
                return None
    return found


def _projection(value: ir.Value, heads: int, shapes: OrtShapes, name: str) -> _Projection | str:
    """The projection behind the MultiHeadAttention input ``value``, or why there is none."""
    chain: list[ir.Node] = []
    node = value.producer()
    if _is(node, "Transpose") and name != "query":  # the op's query is (batch, seq, hidden)
        perm = node.attributes.get("perm")
        split = node.inputs[0].producer()
        if perm is None or list(perm.as_ints()) != _HEAD_SPLIT or not _is(split, "Reshape"):
            return f"the {name} is not a projection split into heads by Reshape and Transpose([0,2,1,3])"
        before, after = shapes.dims(split.inputs[0]), shapes.dims(split.outputs[0])
        if before is None or after is None or len(before) != 3 or len(after) != 4 or not (
                same_dim(before[0], after[0]) and same_dim(before[1], after[1]) and after[2] == heads
                and isinstance(before[2], int) and isinstance(after[3], int) and heads * after[3] == before[2]):
            return f"the {name}'s Reshape is not proved to split its last axis into {heads} heads"
        chain = [split, node]
        node = split.inputs[0].producer()
    elif _is(node, "Reshape") and name == "query":
        while _is(node, "Reshape"):
            chain.insert(0, node)
            node = node.inputs[0].producer()
        before, after = shapes.dims(chain[0].inputs[0]), shapes.dims(value)
        if before is None or after is None or len(before) != 3 or len(after) != 3 \
                or not all(same_dim(a, b) for a, b in zip(before, after)):
            return "the query's Reshapes are not proved to keep its projection's shape"
    bias = None
    if _is(node, "Add"):
        for i in (0, 1):
            matmul = node.inputs[i].producer() if node.inputs[i] is not None else None
            if _is(matmul, "MatMul"):
                bias = optcc.ir.const_array(node.inputs[1 - i])
                if bias is not None:
                    break
        else:
            return f"the {name} is not Add(MatMul(x, W), b) with a constant b"
        chain.insert(0, node)
        node = matmul
    if not _is(node, "MatMul") or len(node.inputs) != 2:
        return f"the {name} is not a projection MatMul(x, W) [+ b]"
    x, w = node.inputs
    weight = w.const_value.numpy() if w is not None and w.is_initializer() and not w.is_graph_input() \
        and w.const_value is not None else None
    if weight is None or w.dtype != ir.DataType.FLOAT or weight.ndim != 2:
        return f"the {name}'s projection weight is not a 2-D float32 initializer"
    if len(w.uses()) != 1:
        return f"the {name}'s projection weight is shared (packing would copy it)"
    hidden = weight.shape[1]
    if bias is None:
        bias = np.zeros(hidden, np.float32)
    if bias.dtype != np.float32 or bias.size != hidden or bias.shape[-1] != hidden or bias.ndim > 3:
        return f"the {name}'s bias is not {hidden} float32 values on the last axis"
    chain.insert(0, node)
    dims = shapes.dims(x)
    if dims is None or len(dims) != 3:
        return f"the {name}'s projection input is not proved of rank 3"
    return _Projection(x, weight, bias.reshape(-1), chain)


@dataclasses.dataclass
class _Site:
    """A MultiHeadAttention to rewrite: its query, key and value projections, and the Shape
    nodes reading them with what each returns."""

    node: ir.Node
    heads: int
    parts: list[_Projection]
    shape_reads: list[tuple[ir.Node, _Dims]]


def _site(node: ir.Node, shapes: OrtShapes) -> _Site | str:
    """The rewrite of one MultiHeadAttention, or why it stays."""
    extra = set(node.attributes) - {"num_heads", "scale"}
    if extra:
        return f"MultiHeadAttention has attributes the rewrite does not carry: {sorted(extra)}"
    inputs = list(node.inputs) + [None] * (8 - len(node.inputs))
    if len(node.inputs) > 8 or any(v is not None for v in inputs[6:]):
        return "a KV cache (past inputs) stays with MultiHeadAttention"
    if inputs[3] is not None or inputs[4] is not None:
        return "MultiHeadAttention has a bias or key padding mask input"
    if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
        return "MultiHeadAttention's present or qk outputs are read"
    heads = node.attributes["num_heads"].as_int() if "num_heads" in node.attributes else 0
    if heads <= 0:
        return "num_heads unknown"
    if shapes.dims(node.inputs[0]) is None and shapes.error is not None:
        return shapes.error
    parts = []
    for name, value in zip(("query", "key", "value"), inputs[:3]):
        if value is None:
            return f"no {name}"
        part = _projection(value, heads, shapes, name)
        if isinstance(part, str):
            return part
        parts.append(part)
    if len({id(p.x) for p in parts}) != 1:
        return "query, key and value are projections of different inputs (not self-attention)"
    if len({id(p.chain[0]) for p in parts}) != 3:
        return "query, key and value share a projection"
    if len({p.weight.shape for p in parts}) != 1 or parts[0].weight.shape[1] % heads:
        return "query, key and value projections differ in size, or it is no multiple of num_heads"
    reads: list[ir.Node] = []
    for part in parts:
        for node_in_chain, after in zip(part.chain, [*part.chain[1:], node]):
            found = _shape_reads(node_in_chain.outputs[0], after)
            if found is None:
                return "a projection is read by more than its attention (it would be computed twice)"
            reads.extend(found)
    x_dims = shapes.dims(parts[0].x)
    pieces = [_shape_pieces(read, shapes, x_dims) for read in reads]
    if any(p is None for p in pieces):
        return "a shape read of a projection is not proved from the input's shape"
    return _Site(node, heads, parts, list(zip(reads, pieces)))


def _shape_pieces(read: ir.Node, shapes: OrtShapes, x_dims: list) -> _Dims | None:
    """What ``Shape`` node ``read`` returns, per entry: an integer, or an axis of ``x``
    (``x_dims``: its inferred dims); None when some entry is neither."""
    dims = shapes.dims(read.inputs[0])
    if dims is None:
        return None
    start, end = read.attributes.get("start"), read.attributes.get("end")
    dims = dims[start.as_int() if start is not None else 0:end.as_int() if end is not None else len(dims)]
    pieces: _Dims = []
    for dim in dims:
        if isinstance(dim, int):
            pieces.append(dim)
            continue
        axis = next((i for i, d in enumerate(x_dims) if same_dim(dim, d)), None)
        if axis is None:
            return None
        pieces.append(_XAxis(axis))
    return pieces


class _Writer:
    """New nodes and constants of one graph, named after the node they serve."""

    def __init__(self, model: ir.Model) -> None:
        self.model, self.graph = model, model.graph
        self.names = optcc.ir.ModelNames(model)

    def const(self, array: np.ndarray, before: ir.Node, base: str) -> ir.Value:
        """A main-graph initializer (a Constant node below IR version 4: ``constant_for``)."""
        return self.names.constant_for(before, array, base)

    def node(self, domain: str, op: str, inputs: list[ir.Value | None], attrs: list[ir.Attr],
             before: ir.Node, base: str) -> ir.Node:
        while inputs and inputs[-1] is None:
            inputs = inputs[:-1]
        new = ir.Node(domain, op, inputs, attrs, num_outputs=1, name=self.names.node(f"{before.name}_{base}"))
        new.outputs[0].name = self.names.value(f"{before.name or op}_{base}")
        self.graph.insert_before(before, new)
        return new


def _rewrite(writer: _Writer, site: _Site) -> tuple[ir.Value, ir.Value]:
    """Write ``site``'s Attention; returns the MultiHeadAttention's output value it replaced
    and the Attention's output."""
    node, parts = site.node, site.parts
    x = parts[0].x
    weight = writer.const(np.concatenate([p.weight for p in parts], axis=1), node, "qkv_weight")
    bias = writer.const(np.concatenate([p.bias for p in parts]), node, "qkv_bias")
    attrs = [ir.AttrInt64("num_heads", site.heads)]
    if "scale" in node.attributes:
        attrs.append(ir.AttrFloat32("scale", node.attributes["scale"].as_float()))
    mask = node.inputs[5] if len(node.inputs) > 5 else None
    fused = writer.node(MS_DOMAIN, "Attention", [x, weight, bias, None, None, mask], attrs, node, "packed")
    out = node.outputs[0]
    name, type_, shape = out.name, out.type, out.shape
    out.replace_all_uses_with(fused.outputs[0], replace_graph_outputs=True)
    writer.graph.remove(node, safe=True)
    fused.outputs[0].name, fused.outputs[0].type, fused.outputs[0].shape = name, type_, shape
    made: list[ir.Value] = []

    def x_shape() -> ir.Value:  # one Shape(x) per site, made when a read needs it
        if not made:
            made.append(writer.node("", "Shape", [x], [], parts[0].chain[0], "input_shape").outputs[0])
        return made[0]

    for read, pieces in site.shape_reads:
        read.outputs[0].replace_all_uses_with(_dims_value(writer, read, pieces, x_shape))
    return out, fused.outputs[0]


def _dims_value(writer: _Writer, read: ir.Node, pieces: _Dims, x_shape: Callable[[], ir.Value]) -> ir.Value:
    """``pieces`` as an int64 vector made before ``read``: a constant, or a Gather from
    ``Concat(Shape(x), the constants)``."""
    consts = [p for p in pieces if not isinstance(p, _XAxis)]
    if len(consts) == len(pieces):
        value = writer.const(np.array(consts, np.int64), read, "dims")
    else:
        table = x_shape()
        if consts:
            sizes = writer.const(np.array(consts, np.int64), read, "sizes")
            table = writer.node("", "Concat", [table, sizes], [ir.AttrInt64("axis", 0)], read, "dims_table").outputs[0]
        after_x = iter(range(3, 3 + len(consts)))  # the constants follow x's 3 dims in the table
        index = [p.axis if isinstance(p, _XAxis) else next(after_x) for p in pieces]
        value = writer.node("", "Gather", [table, writer.const(np.array(index, np.int64), read, "dims_index")],
                            [ir.AttrInt64("axis", 0)], read, "dims").outputs[0]
    value.type, value.shape = ir.TensorType(ir.DataType.INT64), ir.Shape([len(pieces)])
    return value


class FuseOrtPackedAttentionPass(optcc.Pass):
    """Self-attention MultiHeadAttention and its Q/K/V projections of one input ->
    ``com.microsoft.Attention`` with packed weights (onnxruntime target, -O3)."""

    name = "fuse-ort-packed-attention"
    numerics = "fusion"
    triggers = frozenset({f"{MS_DOMAIN}::MultiHeadAttention"})

    def call(self, model: ir.Model) -> PassResult:
        report: dict[str, str] = {}
        shapes = OrtShapes(model)
        sites: list[_Site] = []
        for i, node in enumerate(n for n in model.graph if n.domain == MS_DOMAIN and n.op_type == "MultiHeadAttention"):
            site = _site(node, shapes)
            report[node.name or f"MultiHeadAttention#{i}"] = site if isinstance(site, str) else FUSED
            if not isinstance(site, str):
                sites.append(site)
        if sites:
            writer = _Writer(model)
            replaced: dict[ir.Value, ir.Value] = {}  # a rewritten layer's output: its Attention's
            for site in sites:  # every site was checked on the graph its shapes were inferred from
                x = site.parts[0].x
                if x in replaced:  # the input is an earlier layer's output, now the Attention's
                    site.parts = [dataclasses.replace(part, x=replaced[x]) for part in site.parts]
                old, new = _rewrite(writer, site)
                replaced[old] = new
            model.graph.sort()
        stats: dict[str, object] = {}
        if report:
            stats["layers"] = report
            stats["fused_layers"] = len(sites)
        reads = sum(len(s.shape_reads) for s in sites)
        if reads:
            stats["shape_reads"] = reads
        return PassResult(model, bool(sites), stats)
