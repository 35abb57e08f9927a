"""Scaled dot-product attention, as today's exporters write it, into one attention op.

Rewrite (default-domain ops; ``q``, ``k``, ``v`` rank 4, ``(batch, heads, seq, head_size)``)::

    s = MatMul(q [* or / c1], kt [* or / c2]) [* or / c3]      (any subset of the scales)
    s = Add(s, mask)                                            (optional, either order)
    p = Softmax(s, axis=-1)
    p = Where(IsNaN(p), 0, p)                                   (optional NaN guard)
    p = Cast(p, to=float)                                       (optional, a no-op in float32)
    y = MatMul(p, v)

This covers the torch SDPA export (``sqrt(scale)`` on q and on kt, boolean masks turned
into ``Where(mask, 0, -inf)`` and the IsNaN/Where guard), the dynamo export (the same
graph in onnxscript's spelling) and the old eager export (``MatMul(q, kt) / sqrt(d)`` or
``* (1/sqrt(d))`` plus an additive mask). ``kt`` is the transposed key: ``Transpose(k,
perm=[0,1,3,2])`` (then ``k`` is used), ``Transpose(x, perm=[0,2,3,1])`` of the
``(batch, seq, heads, head_size)`` key (then ``Transpose(x, perm=[0,2,1,3])`` is built), or
anything else of rank 4 (then ``Transpose(kt, perm=[0,1,3,2])`` is built).

The dynamo exporter's key transposed through rank 3 (``Reshape(Transpose(Reshape(k, [-1, S,
D]), [0,2,1]), [B, H, D, S])``, proved from ``k``'s own dims) is read as ``k``.

Grouped-query attention (standard ``Attention`` only): when the key and the value are both
HF ``repeat_kv(x, n)`` of ``(batch, kv_heads, seq, head_size)`` tensors by the same constant
``n`` (``Reshape(Expand(Unsqueeze(x, [2]), [B, kv_heads, n, S, D]), [B, kv_heads*n, S, D])``,
every target entry proved, see ``grouped_kv``) and the query is proved to have more than one
head, the op takes the un-repeated key and value: it shares key/value head ``i // n`` with
query head ``i``, which is what ``repeat_kv``'s ``[k0, k0, k1, k1]`` order computed (exact:
the same products, no copy). A cache Concat before the repeat then becomes the op's
un-repeated past/present. A standard ``Attention`` the exporter wrote itself (dynamo at
opset 23) on such a repeated key/value, without past inputs, gets the un-repeated ones the
same way. ``MultiHeadAttention`` has no grouped heads: it keeps the repeat.

KV cache: when the key and the value are ``Concat(past, new, axis=2)`` of rank-4 tensors,
the fused node (and a standard ``Attention`` the exporter wrote itself) takes ``new`` as
key/value and ``past`` as ``past_key``/``past_value``, and its ``present_key``/
``present_value`` outputs replace the two Concats (graph outputs keep their names). A
``Shape`` of a cache Concat read upstream of the attention (a total length for the causal
mask) becomes ``Shape(past) + Shape(new) * [0, 0, 1, 0]``; any other upstream reader keeps
the Concats, and so do Concats that nothing reads after the attention (onnxruntime refuses
past inputs without present outputs). Exact: both kernels write ``Concat(past, new, axis=2)`` as present and
attend over it, and the Concat needs every other axis equal.

- ``FuseAttentionPass`` (``fuse-attention``, -O2): the standard ``Attention`` op (opset
  23) with ``scale = c1 * c2 * c3`` (``1/c`` for a Div) and the additive mask as
  ``attn_mask``; only in models whose default opset is >= 23.
- ``FuseOrtAttentionPass`` (``fuse-ort-attention``, -O3, target onnxruntime): onnxruntime's
  ``com.microsoft.MultiHeadAttention`` (query ``(batch, seq, hidden)``, key and value
  ``(batch, heads, kv_seq, head_size)``, mask as ``attention_bias``, ``num_heads`` and
  ``scale`` attributes) at any opset; its output goes back to ``(batch, heads, seq,
  head_size)`` through ``Reshape([0, 0, heads, -1])`` and ``Transpose([0,2,1,3])``, which the
  exporter's own inverse Transpose/Reshape then cancel (``merge-consecutive``). The query
  is the exporter's ``(batch, seq, hidden)`` tensor when ``q = Transpose(Reshape(x, [.., .., heads,
  head_size]), [0,2,1,3])``, else it is rebuilt from ``q``.

The mask becomes ``Expand(mask, [1, 1, seq, kv_seq])`` unless its static shape already
ends in the query and key lengths: both kernels broadcast a mask over batch and heads
only, where the decomposed Add broadcast it over every axis. For MultiHeadAttention the
Expand (and the Shape/Slice/Concat computing its target, per layer) is also left out when
onnxruntime's symbolic shape inference (``ort_shapes``) proves the mask ``(batch or 1, heads
or 1, S, T)`` with ``S, T`` the scores' own last axes, as in transformers' exports, whose
padding mask is indexed by the key positions: the Expand would return the mask unchanged.

After a MultiHeadAttention, the exporter's head merge is bypassed: when the op's output,
split into heads (``Reshape(y, [0, 0, H, -1])``) and moved back by ``Transpose([0,2,1,3])``,
passes only Transposes and Reshapes that the same inference proves keep their input's shape,
and is merged by a Reshape to ``(batch, seq, H * head)`` with the split view's batch and
sequence length, that merge's readers read the op's output (the same elements in the same
order; exact); the chain and its shape arithmetic are then dead (``head_merges_bypassed``).

Preconditions: float32 tensors; Softmax over the last axis; every scale a constant
scalar; ranks of q, kt and v known to be 4 and the mask's rank at most 4; q not proved to
have one head where kt has more (the MatMul broadcast it; neither op broadcasts); the
number of heads known (static shape, the constant in the exporter's head-splitting Reshape,
or proved through the ops after it, e.g. a rotary embedding) for MultiHeadAttention. The pattern driver refuses
matches whose scores or probabilities are read elsewhere (e.g. attention weights that are
returned) or are graph outputs.

Numerics ("fusion"): the same softmax(q kt * scale + mask) v in float32 with one fused
kernel (different summation order, the scale applied once instead of twice): within
about 1e-6 relative, inside the 1e-4 fusion tolerance. Rows in which every key is masked
(an all-zero ``attention_mask``, which no valid input has) differ: the decomposed graph
gives NaN (-inf fills; 0 behind the guard) or the mean of v (finite fills); onnxruntime's
``Attention`` gives 0 for both; MultiHeadAttention gives NaN for -inf fills and the mean of
v for finite ones.

Stats: ``applied``/``rejected`` per rule, ``layers``: per Softmax node that could be an
attention layer, ``"fused: <op>"`` or the reason it was not fused, ``grouped_kv``: per fused
layer whose key or value is a ``repeat_kv`` lookalike, ``"grouped: ..."`` or why the repeat
was kept, ``kv_cache``: per attention node whose key is a cache Concat, ``"folded"`` or
why not, and ``head_merges_bypassed`` (MultiHeadAttention outputs read without the merge).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

import optcc
from optcc.infra import PassResult
from optcc.passes.grouped_kv import Repeat, flat_transpose_source, heads_is_one, query_heads, repeated_kv
from optcc.passes.ort_shapes import OrtShapes, same_dim
from optcc.rewrite import Builder, Const, Match, Op, RewritePass, Rule, Var, apply_rules, static_rank

__all__ = ["FuseAttentionPass", "FuseOrtAttentionPass", "attention_rules", "cache_parts", "exported_rank",
           "fold_kv_cache", "MS_DOMAIN"]

MS_DOMAIN = "com.microsoft"
ATTENTION_OPSET = 23
_RANK_DEPTH = 12


# ---------------------------------------------------------------- static facts


def exported_rank(m: Match, value: ir.Value | None, depth: int = 0) -> int | None:
    """The static rank of ``value``: the pattern engine's, then exporter idioms it does not
    know (Transpose's perm, a Reshape to a Concat-built shape, Expand, Where, ConstantOfShape,
    Shape, Flatten)."""
    if value is None:
        return None
    rank = m.rank(value)
    if rank is not None or depth > _RANK_DEPTH:
        return rank
    node = value.producer()
    if node is not None and node.domain == MS_DOMAIN and node.op_type == "SkipLayerNormalization" \
            and len(node.outputs) > 3 and value is node.outputs[3]:  # input + skip (+ bias)
        return exported_rank(m, node.inputs[0], depth + 1)
    if node is None or value is not node.outputs[0]:
        return None
    if node.domain == MS_DOMAIN and node.op_type in (
            "SkipLayerNormalization", "BiasGelu", "FastGelu", "Gelu", "MultiHeadAttention", "Attention",
            "RotaryEmbedding"):
        return exported_rank(m, node.inputs[0], depth + 1)  # output shaped as the first input
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Transpose":
        perm = node.attributes.get("perm")
        return len(perm.as_ints()) if perm is not None else None
    if node.op_type in ("Reshape", "Expand") and len(node.inputs) > 1:
        length = _length(m, node.inputs[1], depth + 1)
        if node.op_type == "Reshape" or length is None:
            return length
        base = exported_rank(m, node.inputs[0], depth + 1)
        return None if base is None else max(base, length)
    if node.op_type in ("Range", "Shape"):
        return 1
    if node.op_type == "Flatten":
        return 2
    if node.op_type == "ConstantOfShape":
        return _length(m, node.inputs[0], depth + 1)
    if node.op_type in ("LayerNormalization", "Gelu", "Erf", "Sqrt", "Relu", "Tanh", "Identity", "RotaryEmbedding"):
        return exported_rank(m, node.inputs[0], depth + 1)
    if node.op_type == "MatMul":
        ranks = [exported_rank(m, v, depth + 1) for v in node.inputs]
        return None if None in ranks or min(ranks) < 2 else max(ranks)
    if node.op_type == "Gather" and len(node.inputs) > 1:
        data, index = exported_rank(m, node.inputs[0], depth + 1), exported_rank(m, node.inputs[1], depth + 1)
        return None if data is None or index is None else data - 1 + index
    if node.op_type == "Unsqueeze" and len(node.inputs) > 1:
        axes, base = m.value_array(node.inputs[1]), exported_rank(m, node.inputs[0], depth + 1)
        return None if axes is None or base is None else base + int(axes.size)
    if node.op_type in ("Where", "Add", "Mul", "Sub", "Div", "Cast", "Softmax", "Neg", "Not",
                        "And", "Or", "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual"):
        ranks = [exported_rank(m, v, depth + 1) for v in node.inputs if v is not None]
        return None if not ranks or any(r is None for r in ranks) else max(ranks)
    return None


def _length(m: Match, value: ir.Value | None, depth: int) -> int | None:
    """The length of a 1-D shape tensor (constant, declared, or a Concat of pieces)."""
    if value is None:
        return None
    array = m.value_array(value)
    if array is not None:
        return int(array.size) if array.ndim == 1 else None
    if value.shape is not None and value.shape.rank() == 1 and isinstance(value.shape[0], int):
        return value.shape[0]
    node = value.producer()
    if node is None or depth > _RANK_DEPTH:
        return None
    if node.op_type == "Concat":
        parts = [_length(m, v, depth + 1) for v in node.inputs]
        return None if any(p is None for p in parts) else sum(parts)
    if node.op_type == "Unsqueeze" and exported_rank(m, node.inputs[0], depth + 1) == 0:
        return 1
    if node.op_type == "Slice" and len(node.inputs) in (3, 4) or (
            node.op_type == "Slice" and len(node.inputs) == 5 and node.inputs[4] is None):
        bounds = [m.value_array(v) if v is not None else None for v in node.inputs[1:4]]
        size = _length(m, node.inputs[0], depth + 1)
        if size is None or any(b is None or b.size != 1 for b in bounds[:2]) or (
                bounds[2:] and bounds[2] is not None and (bounds[2].size != 1 or int(bounds[2].reshape(-1)[0]) != 0)):
            return None
        start, end = (int(b.reshape(-1)[0]) for b in bounds[:2])
        return len(range(size)[start:end])
    if node.op_type in ("Where", "Equal", "Add", "Mul", "Max", "Min", "Cast", "Abs"):
        parts = [1 if exported_rank(m, v, depth + 1) == 0 else _length(m, v, depth + 1)  # scalars broadcast
                 for v in node.inputs]
        return None if any(p is None for p in parts) else max(parts)
    if node.op_type == "Reshape" and len(node.inputs) > 1:
        target = m.value_array(node.inputs[1])
        if target is None or target.size != 1:
            return None
        n = int(target.reshape(-1)[0])
        return n if n > 0 else (_length(m, node.inputs[0], depth + 1) if n == -1 else None)
    if node.op_type == "ConstantOfShape":  # a 1-D tensor of n values, n constant
        shape = m.value_array(node.inputs[0]) if node.inputs else None
        return int(shape.reshape(-1)[0]) if shape is not None and shape.size == 1 else None
    if node.op_type == "Shape":
        rank = exported_rank(m, node.inputs[0], depth + 1)
        if rank is None:
            return None
        start, end = node.attributes.get("start"), node.attributes.get("end")
        return len(range(rank)[start.as_int() if start is not None else 0:
                               end.as_int() if end is not None else rank])
    return None


def _is_float32(m: Match, *values: ir.Value | None) -> bool:
    for v in values:
        if v is None:
            continue
        if v.dtype is not None and v.dtype != ir.DataType.FLOAT:
            return False
    return True


def _perm(node: ir.Node | None) -> list[int] | None:
    if node is None or node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
        return None
    attr = node.attributes.get("perm")
    return None if attr is None else list(attr.as_ints())


def _scalar(m: Match, name: str) -> float | None:
    array = m.array(name)
    if array is None or array.size != 1 or array.dtype.kind != "f":
        return None
    return float(array.reshape(()))


def _split_heads(m: Match, q: ir.Value) -> tuple[ir.Value | None, int | None]:
    """``(x, heads)`` when ``q = Transpose(Reshape(x, [.., .., heads, head]), [0,2,1,3])``
    with ``x`` of rank 3; else ``(None, heads from q's static shape or None)``."""
    heads = None
    if q.shape is not None and q.shape.rank() == 4 and isinstance(q.shape[1], int):
        heads = q.shape[1]
    transpose = q.producer()
    if _perm(transpose) != [0, 2, 1, 3]:
        return None, heads
    reshape = transpose.inputs[0].producer()
    if reshape is None or reshape.op_type != "Reshape" or len(reshape.inputs) < 2:
        return None, heads
    target = reshape.inputs[1]
    pieces = None
    array = m.value_array(target)
    if array is not None and array.size == 4:
        pieces = [int(a) for a in array.reshape(-1)[2:]]
    elif target.producer() is not None and target.producer().op_type == "Concat":
        parts = target.producer().inputs
        arrays = [m.value_array(p) for p in parts[2:]] if len(parts) == 4 else []
        if len(arrays) == 2 and all(a is not None and a.size == 1 for a in arrays):
            pieces = [int(a.reshape(-1)[0]) for a in arrays]
    if pieces is None:
        return None, heads
    found, head_size = pieces
    hidden = _last_dim(m, reshape.inputs[0])
    if found == -1 and head_size > 0 and hidden is not None and hidden % head_size == 0:
        found = hidden // head_size
    if found <= 0:
        return None, heads
    x = reshape.inputs[0]
    return (x if exported_rank(m, x) == 3 else None), found


def _last_dim(m: Match, value: ir.Value, depth: int = 0) -> int | None:
    """The static size of ``value``'s last axis (declared, or from a projection's
    constant weight or bias)."""
    if value.shape is not None and value.shape.rank() and isinstance(value.shape[-1], int):
        return value.shape[-1]
    node = value.producer()
    if node is None or depth > _RANK_DEPTH or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type in ("MatMul", "Gemm") and len(node.inputs) > 1:
        weight = m.value_array(node.inputs[1])
        if weight is not None and weight.ndim >= 1:
            transposed = node.op_type == "Gemm" and node.attributes.get("transB") is not None \
                and node.attributes["transB"].as_int() == 1
            return int(weight.shape[0] if transposed else weight.shape[-1])
    if node.op_type == "Split" and len(node.inputs) > 1 and node.inputs[1] is not None:
        sizes = m.value_array(node.inputs[1])
        axis = node.attributes.get("axis")
        rank = exported_rank(m, node.inputs[0], depth + 1)
        last = axis is not None and rank is not None and axis.as_int() in (-1, rank - 1)
        if sizes is not None and last and sizes.ndim == 1:
            return int(sizes[list(node.outputs).index(value)])
        return None
    if node.op_type in ("Add", "Mul"):
        for v in node.inputs:
            array = m.value_array(v) if v is not None else None
            if array is not None and array.ndim >= 1 and array.shape[-1] > 1:
                return int(array.shape[-1])
        for v in node.inputs:
            if v is not None and m.value_array(v) is None:
                found = _last_dim(m, v, depth + 1)
                if found is not None:
                    return found
    return None


# ---------------------------------------------------------------- patterns


def _scaled(inner: Op | Var, name: str, present: bool) -> Op | Var:
    if not present:
        return inner
    return Op(("Mul", "Div"), inner, Const(f"c_{name}"), commute=True, name=f"scale_{name}")


def _pattern(scale_q: bool, scale_k: bool, scale_s: bool, mask: bool, guard: bool, cast: bool) -> Op:
    q = _scaled(Var("q"), "q", scale_q)
    kt = _scaled(Var("kt"), "k", scale_k)
    scores = _scaled(Op("MatMul", q, kt, name="qk"), "s", scale_s)
    if mask:
        scores = Op("Add", scores, Var("mask"), commute=True, name="add_mask")
    softmax = Op("Softmax", scores, name="softmax")
    probs = Op("Where", Op("IsNaN", softmax, name="isnan"), Const("zero"), softmax,
               name="guard") if guard else softmax
    if cast:
        probs = Op("Cast", probs, name="cast")
    return Op("MatMul", probs, Var("v"), name="pv")


def _scale(m: Match) -> float | str:
    """The product of the scales (``1/c`` for a Div), or the reason there is none."""
    total = 1.0
    for part in ("q", "k", "s"):
        node = m.get(f"scale_{part}")
        if node is None:
            continue
        c = _scalar(m, f"c_{part}")
        if c is None or c == 0.0:
            return "a scale is not a constant non-zero float scalar"
        if node.op_type == "Div":
            if node.inputs[1] is not m[f"c_{part}"]:
                return "a scale divides by the scores"
            c = 1.0 / c
        total *= c
    return total


def _common_check(m: Match) -> str | None:
    softmax: ir.Node = m["softmax"]
    axis = softmax.attributes.get("axis")
    if axis is None and m.opset < 13:
        return "Softmax over more than the last axis (opset < 13 default)"
    if axis is not None and axis.as_int() not in (-1, 3):
        return "Softmax not over the last axis"
    if not _is_float32(m, m["q"], m["kt"], m["v"], m.get("mask"), m.output):
        return "not float32"
    for name in ("q", "kt", "v"):
        if exported_rank(m, m[name]) != 4:
            return f"rank of {name} not known to be 4"
    if m.get("mask") is not None:
        rank = exported_rank(m, m["mask"])
        if rank is None or rank > 4:
            return "rank of the mask unknown or above 4"
    if _broadcast_query(m):
        return "the query's one head broadcasts over the key's heads (the fused ops do not broadcast)"
    cast = m.get("cast")
    if cast is not None and (cast.attributes.get("to") is None or cast.attributes["to"].as_int() != 1):
        return "probabilities are cast to another type"
    if m.get("guard") is not None:
        zero = m.array("zero")
        if zero is None or zero.size != 1 or float(zero.reshape(())) != 0.0:
            return "the NaN guard does not write 0"
    scale = _scale(m)
    return scale if isinstance(scale, str) else None


def _broadcast_query(m: Match) -> bool:
    """Whether q's head axis is proved to be 1 while kt's is not: the MatMul broadcast q
    over the key's heads, which neither fused op does (Attention reads fewer query heads)."""
    rank = lambda v: exported_rank(m, v)  # noqa: E731
    split = lambda v: _split_heads(m, v)[1]  # noqa: E731
    return heads_is_one(m, m["q"], split, rank) and not heads_is_one(m, m["kt"], split, rank)


def _key(m: Match, b: Builder) -> ir.Value:
    """The (batch, heads, kv_seq, head_size) key behind ``kt``."""
    kt: ir.Value = m["kt"]
    producer = kt.producer()
    perm = _perm(producer)
    if perm == [0, 1, 3, 2]:
        return producer.inputs[0]
    if perm == [0, 2, 3, 1]:
        return b.op("Transpose", producer.inputs[0], perm=[0, 2, 1, 3])
    key = flat_transpose_source(m, kt, lambda v: exported_rank(m, v))
    return key if key is not None else b.op("Transpose", kt, perm=[0, 1, 3, 2])


def _record(layers: dict[ir.Node, str]) -> Callable[[Callable[[Match], str | None]], Callable[[Match], str | None]]:
    def wrap(check: Callable[[Match], str | None]) -> Callable[[Match], str | None]:
        def recorded(m: Match) -> str | None:
            reason = check(m)
            if reason is not None:
                layers.setdefault(m["softmax"], reason)
            return reason
        return recorded
    return wrap


def _same_dim(a: ir.Value, i: int, b: ir.Value, j: int) -> bool:
    if a.shape is None or b.shape is None or a.shape.rank() <= i or b.shape.rank() <= j:
        return False
    da, db = a.shape[i], b.shape[j]
    return da == db and (isinstance(da, int) or getattr(da, "value", None) is not None)


def mask_fits_scores(m: Match, shapes: OrtShapes | None) -> bool:
    """Whether ``shapes`` prove the additive mask already shaped as MultiHeadAttention's
    ``attention_bias`` takes it: rank 4, ``(batch or 1, heads or 1)`` leading and its last two
    axes the scores' (query length, key length). Then expanding it to the scores' last two
    axes, what the decomposed Add's broadcast did, returns it unchanged."""
    mask = m.get("mask")
    if shapes is None or mask is None:
        return False
    mask_dims, score_dims = shapes.dims(mask), shapes.dims(m["qk"].outputs[0])
    if mask_dims is None or score_dims is None or len(mask_dims) != 4 or len(score_dims) != 4:
        return False
    leading = all(d == 1 or same_dim(d, s) for d, s in zip(mask_dims[:2], score_dims[:2]))
    return leading and all(same_dim(d, s) for d, s in zip(mask_dims[2:], score_dims[2:]))


def _full_mask(m: Match, b: Builder, query: ir.Value, q_axis: int, key: ir.Value,
               shapes: OrtShapes | None = None) -> ir.Value | None:
    """The mask with its last two axes expanded to (query length, key length), as both
    onnxruntime kernels require (the decomposed Add broadcast it); the mask itself when its
    declared shape or ``shapes`` (``mask_fits_scores``) prove it already has them; None when
    absent."""
    mask = m.get("mask")
    if mask is None:
        return None
    if exported_rank(m, mask) == 4 and _same_dim(mask, 2, query, q_axis) and _same_dim(mask, 3, key, 2):
        return mask
    if mask_fits_scores(m, shapes):
        return mask

    def dim(value: ir.Value, axis: int, tag: str) -> ir.Value:
        return b.op("Slice", b.op("Shape", value), b.const(np.array([axis], np.int64), f"{tag}_start"),
                    b.const(np.array([axis + 1], np.int64), f"{tag}_end"))

    cache = cache_parts(key)
    # the key length from the cache's pieces when the key is a KV-cache Concat: that
    # Concat's output may become the attention's present output (fold_kv_cache)
    kv = dim(key, 2, "mask_k") if cache is None else b.op(
        "Add", dim(cache[0], 2, "mask_past"), dim(cache[1], 2, "mask_new"))
    target = b.op("Concat", b.const(np.array([1, 1], np.int64), "mask_lead"),
                  dim(query, q_axis, "mask_q"), kv, axis=0)
    return b.op("Expand", mask, target)


def _grouped(m: Match, key: ir.Value, kind: str) -> tuple[Repeat, Repeat] | str | None:
    """The un-repeated key and value when both are ``repeat_kv`` by one factor and the
    query's heads are proved to be ``kv_heads * n_rep`` (standard ``Attention`` then shares
    each key/value head among ``n_rep`` consecutive query heads, as ``repeat_kv`` did);
    None when neither is a repeat; else why the repeat stays."""
    rank = lambda v: exported_rank(m, v)  # noqa: E731
    found = repeated_kv(m, key, rank), repeated_kv(m, m["v"], rank)
    if found == (None, None):
        return None
    if kind != "standard":
        return "repeat_kv kept: com.microsoft.MultiHeadAttention has no grouped key/value heads"
    for name, item in zip(("key", "value"), found):
        if not isinstance(item, Repeat):
            return f"repeat_kv kept: {item or f'the {name} is not repeated'}"
    if found[0].n_rep != found[1].n_rep:
        return "repeat_kv kept: key and value repeated by different factors"
    if found[0].n_rep > 1 and query_heads(m, m["q"], lambda v: _split_heads(m, v)[1], rank) is None:
        return "repeat_kv kept: query heads not proved above 1 (a broadcast query cannot be grouped)"
    return found


def _standard_rewrite(m: Match, b: Builder, groups: dict[ir.Node, str]) -> ir.Value:
    key, value = _key(m, b), m["v"]
    grouped = _grouped(m, key, "standard")
    if isinstance(grouped, tuple):
        key, value = grouped[0].source, grouped[1].source
        groups[m["softmax"]] = f"grouped: key/value heads shared by {grouped[0].n_rep} query heads"
    elif grouped is not None:
        groups[m["softmax"]] = grouped
    mask = _full_mask(m, b, m["q"], 2, key)
    inputs = [m["q"], key, value] + ([mask] if mask is not None else [])
    return b.op("Attention", *inputs, scale=float(_scale(m)))


def _mha_check(m: Match, shapes: OrtShapes | None = None) -> str | None:
    reason = _common_check(m)
    if reason is not None:
        return reason
    if _heads(m) is None:
        return "number of heads unknown (MultiHeadAttention needs it)"
    if shapes is not None and m.get("mask") is not None:
        shapes.dims(m["mask"])  # infer once on the graph before this pass rewrote any layer
    return None


def _heads(m: Match) -> int | None:
    """The query's number of heads: from its static shape or head-splitting Reshape, else
    proved through the ops between that Reshape and ``q`` (e.g. a rotary embedding)."""
    heads = _split_heads(m, m["q"])[1]
    return heads if heads is not None else query_heads(
        m, m["q"], lambda v: _split_heads(m, v)[1], lambda v: exported_rank(m, v))


def _mha_rewrite(m: Match, b: Builder, groups: dict[ir.Node, str], shapes: OrtShapes | None = None) -> ir.Value:
    q: ir.Value = m["q"]
    query, heads = _split_heads(m, q)
    heads = heads if heads is not None else _heads(m)
    if query is None:
        query = b.op("Reshape", b.op("Transpose", q, perm=[0, 2, 1, 3]),
                     b.const(np.array([0, 0, -1], np.int64), "mha_merge_heads"))
    key = _key(m, b)
    grouped = _grouped(m, key, "ort")
    if grouped is not None:
        groups[m["softmax"]] = grouped
    mask = _full_mask(m, b, query, 1, key, shapes)
    inputs = [query, key, m["v"], None, None, mask] if mask is not None else [query, key, m["v"]]
    out = b.op("MultiHeadAttention", *inputs, domain=MS_DOMAIN, num_heads=int(heads),
               scale=float(_scale(m)))
    split = b.op("Reshape", out, b.const(np.array([0, 0, heads, -1], np.int64), "mha_split_heads"))
    return b.op("Transpose", split, perm=[0, 2, 1, 3])


def attention_rules(kind: str, layers: dict[ir.Node, str] | None = None,
                    groups: dict[ir.Node, str] | None = None, shapes: OrtShapes | None = None) -> tuple[Rule, ...]:
    """The attention rules for ``kind`` ("standard" or "ort"); rejections are recorded per
    Softmax node in ``layers``, and for layers whose key/value are ``repeat_kv``, whether
    the fused node groups them or why not in ``groups``, when given. For "ort", ``shapes``
    (onnxruntime's symbolic inference of the model) may prove a mask needs no Expand."""
    layers = {} if layers is None else layers
    groups = {} if groups is None else groups
    if kind == "standard":
        check, rewrite = _common_check, functools.partial(_standard_rewrite, groups=groups)
    else:
        check = functools.partial(_mha_check, shapes=shapes)
        rewrite = functools.partial(_mha_rewrite, groups=groups, shapes=shapes)
    min_opset = ATTENTION_OPSET if kind == "standard" else 1
    rules = []
    for sq, sk, ss, mask, guard, cast in itertools.product((True, False), repeat=6):
        name = "attention" + ("-masked" if mask else "") + ("-guarded" if guard else "")
        rules.append(Rule(name, _pattern(sq, sk, ss, mask, guard, cast), rewrite,
                          _record(layers)(check), min_opset=min_opset))
    return tuple(rules)


_NOT_REPEATED = "key and value are not repeat_kv"


def _exported_check(m: Match, groups: dict[ir.Node, str]) -> str | None:
    """A standard ``Attention`` written by the exporter on ``repeat_kv`` key/value (4-D, no
    past) -> None when it can take the kv heads; what ``_grouped`` found is recorded in
    ``groups``."""
    if any(exported_rank(m, m[name]) != 4 for name in ("q", "k", "v")):
        return "rank of q, k or v not known to be 4"
    grouped = _grouped(m, m["k"], "standard")
    if grouped is None:
        return _NOT_REPEATED
    groups[m["attention"]] = grouped if isinstance(grouped, str) else \
        f"grouped: key/value heads shared by {grouped[0].n_rep} query heads"
    return grouped if isinstance(grouped, str) else None


def _exported_rewrite(m: Match, b: Builder) -> ir.Value:
    rank = lambda v: exported_rank(m, v)  # noqa: E731
    k, v = repeated_kv(m, m["k"], rank), repeated_kv(m, m["v"], rank)
    assert isinstance(k, Repeat) and isinstance(v, Repeat)
    inputs = [m["q"], k.source, v.source] + ([m["mask"]] if m.get("mask") is not None else [])
    return b.op("Attention", *inputs, attributes=m["attention"].attributes)


def exported_attention_rules(groups: dict[ir.Node, str]) -> tuple[Rule, ...]:
    """A standard ``Attention`` the exporter wrote on ``repeat_kv`` key/value -> the same op
    on the un-repeated key/value (the grouping is what ``_grouped`` proves)."""
    pattern = Op("Attention", Var("q"), Var("k"), Var("v"), Var("mask", optional=True), name="attention")
    return (Rule("attention-grouped-kv", pattern, _exported_rewrite,
                 functools.partial(_exported_check, groups=groups), min_opset=ATTENTION_OPSET),)


# ---------------------------------------------------------------- KV cache


def _rank4(value: ir.Value) -> bool:
    """Whether ``value`` is known to be of rank 4 (declared, a 4-axis Transpose, or static)."""
    if value.shape is not None:
        return value.shape.rank() == 4
    perm = _perm(value.producer())
    return len(perm) == 4 if perm is not None else static_rank(value) == 4


def cache_parts(value: ir.Value) -> tuple[ir.Value, ir.Value] | None:
    """``(past, new)`` when ``value = Concat(past, new, axis=2)`` of rank-4
    ``(batch, heads, seq, head_size)`` tensors (a KV cache), else None."""
    node = value.producer()
    if node is None or node.op_type != "Concat" or node.domain not in ("", "ai.onnx"):
        return None
    axis = node.attributes.get("axis")
    if axis is None or axis.as_int() not in (2, -2) or len(node.inputs) != 2 or None in node.inputs:
        return None
    past, new = node.inputs
    return (past, new) if _rank4(past) and _rank4(new) else None


# (domain, op) -> the index of its past_key input (past_value follows)
_PAST_INPUT = {("", "Attention"): 4, (MS_DOMAIN, "MultiHeadAttention"): 6}


def _shape_from_parts(names: optcc.ir.ModelNames, shape: ir.Node, past: ir.Value, new: ir.Value) -> None:
    """``Shape(Concat(past, new, axis=2))`` (with its start/end) as ``Shape(past) +
    Shape(new) * onehot(2)``: exact, since Concat needs every other axis equal. New values
    take names no graph of the model holds (``names``)."""
    graph = shape.graph
    axes = list(range(4))[slice(*(shape.attributes[a].as_int() if a in shape.attributes else None
                                   for a in ("start", "end")))]
    attrs = [ir.Attr(a.name, a.type, a.value) for a in shape.attributes.values()]
    out = shape.outputs[0]
    made = [ir.Node("", "Shape", [past], attrs, num_outputs=1)]
    if 2 in axes:
        onehot = names.constant_for(shape, np.array([int(a == 2) for a in axes], np.int64), "seq_axis")
        made.append(ir.Node("", "Shape", [new], [ir.Attr(a.name, a.type, a.value) for a in attrs], num_outputs=1))
        made.append(ir.Node("", "Mul", [made[1].outputs[0], onehot], num_outputs=1))
        made.append(ir.Node("", "Add", [made[0].outputs[0], made[2].outputs[0]], num_outputs=1))
    for n in made:
        n.outputs[0].name = names.value(f"{out.name}_{n.op_type.lower()}")
        n.name = n.outputs[0].name
        graph.insert_before(shape, n)
    result, name = made[-1].outputs[0], out.name
    result.type, result.shape = out.type, out.shape
    out.replace_all_uses_with(result, replace_graph_outputs=True)
    graph.remove(shape, safe=True)
    result.name = name


def _live(node: ir.Node, memo: dict[ir.Node, bool], depth: int = 0) -> bool:
    """Whether some output of ``node`` reaches a graph output (assumed beyond a depth)."""
    if node not in memo:
        memo[node] = depth > _RANK_DEPTH or any(
            o.is_graph_output() or any(_live(u.node, memo, depth + 1) for u in o.uses()) for o in node.outputs)
    return memo[node]


def _fold_one(names: optcc.ir.ModelNames, graph: ir.Graph | ir.Function, node: ir.Node,
              past_at: int) -> str | None:
    """Feed ``node`` the past key/value and the new key/value, and make its present outputs
    replace the two cache Concats; None when done, else why not. A name a fold frees is
    given to the value replacing it, so ``names`` (the model's) stays whole across folds."""
    if len(node.inputs) > past_at and any(v is not None for v in node.inputs[past_at:]):
        return "already has past inputs"
    if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
        return "extra outputs are used"
    causal = node.attributes.get("is_causal")
    if causal is not None and causal.as_int() != 0:
        return "is_causal with a past is left alone"
    key, value = node.inputs[1], node.inputs[2]
    parts = cache_parts(key), cache_parts(value)
    if parts[0] is None or parts[1] is None or key is value:
        return "key and value are not Concat(past, new, axis=2)"
    upstream = optcc.ir.ancestors(node.inputs)
    readers = [(u.node, parts[i]) for i, c in enumerate((key, value)) for u in c.uses() if u.node is not node]
    early = [(r, p) for r, p in readers if r in upstream]
    if any(r.op_type != "Shape" or r.domain not in ("", "ai.onnx") for r, _ in early):
        return "a cache Concat is read upstream of the attention (its present output would form a cycle)"
    live: dict[ir.Node, bool] = {}
    if not all(c.is_graph_output() or any(u.node is not node and u.node not in upstream and _live(u.node, live)
                                          for u in c.uses()) for c in (key, value)):
        # onnxruntime refuses past inputs without present outputs, which an unread one would lose
        return "a cache Concat is not read after the attention (its present output would be unused)"
    for reader, (past, new) in early:  # e.g. the total length read for the causal mask
        _shape_from_parts(names, reader, past, new)
    inputs = list(node.inputs[:past_at]) + [None] * (past_at - len(node.inputs))
    inputs[1], inputs[2] = parts[0][1], parts[1][1]
    inputs += [parts[0][0], parts[1][0]]
    attrs = [ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()]
    fused = ir.Node(node.domain, node.op_type, inputs, attrs, num_outputs=3, name=node.name)
    graph.insert_before(node, fused)
    out, name = node.outputs[0], node.outputs[0].name
    fused.outputs[0].type, fused.outputs[0].shape = out.type, out.shape
    out.replace_all_uses_with(fused.outputs[0], replace_graph_outputs=True)
    graph.remove(node, safe=True)
    fused.outputs[0].name = name
    for cache, present in zip((key, value), fused.outputs[1:]):
        concat = cache.producer()
        name, type_, shape = cache.name, cache.type, cache.shape
        cache.replace_all_uses_with(present, replace_graph_outputs=True)
        graph.remove(concat, safe=True)
        present.name, present.type, present.shape = name, type_, shape
    return None


def fold_kv_cache(model: ir.Model, op: tuple[str, str]) -> dict[str, str]:
    """Every ``op`` node (standard ``Attention`` or ``com.microsoft.MultiHeadAttention``)
    whose key and value are KV-cache Concats takes the past and new key/value as inputs, and
    its ``present_key``/``present_value`` outputs replace the Concats (graph outputs keep
    their names). Exact: both kernels write ``Concat(past, new, axis=2)`` as present and
    attend over it. Returns per node with a cache: "folded" or why not."""
    report = {}
    names = optcc.ir.ModelNames(model)
    for graph in optcc.ir.graphs(model):
        for node in list(graph):
            if (node.domain if node.domain != "ai.onnx" else "", node.op_type) != op:
                continue
            if len(node.inputs) < 3 or node.inputs[1] is None or cache_parts(node.inputs[1]) is None:
                continue
            reason = _fold_one(names, graph, node, _PAST_INPUT[op])
            report[node.name or f"{op[1]}#{len(report)}"] = reason or "folded"
            if reason is None:
                graph.sort()  # readers of a present output that came before the attention
    return report


# ---------------------------------------------------------------- heads merged back


_IDENTITY4 = [0, 1, 2, 3]


def _const_ints(value: ir.Value | None) -> list[int] | None:
    array = None if value is None or value.is_graph_input() else optcc.ir.as_numpy(value)
    return None if array is None or array.ndim != 1 else [int(a) for a in array]


def _only_mover(value: ir.Value) -> ir.Node | None:
    """The one reader of ``value`` other than ``Shape``, when it is a default-domain Reshape
    or Transpose reading it as its data; else None."""
    movers = [u.node for u in value.uses() if u.node.op_type != "Shape" or u.node.domain not in ("", "ai.onnx")]
    if len(movers) != 1 or value.is_graph_output():
        return None
    node = movers[0]
    ok = node.domain in ("", "ai.onnx") and node.op_type in ("Reshape", "Transpose") and node.inputs[0] is value
    return node if ok and list(node.inputs).count(value) == 1 else None


def _merged_heads(mha: ir.Node, shapes: OrtShapes) -> ir.Value | None:
    """The value after ``mha`` that equals its output element for element: the output split
    into heads (``Reshape(y, [0, 0, H, -1])``), moved only by Transposes and by Reshapes that
    ``shapes`` prove keep their input's shape, and merged back by a Reshape to ``(batch,
    seq, H * head)``. Tracks the permutation ``p`` with ``v = Transpose(split, p)``; the merge
    must see ``p`` the identity, and the split view's batch, sequence length and ``H * head``
    as its inferred dims. None when the chain is anything else."""
    split = _only_mover(mha.outputs[0])
    heads = mha.attributes["num_heads"].as_int() if "num_heads" in mha.attributes else 0
    if split is None or split.op_type != "Reshape" or _const_ints(split.inputs[1]) != [0, 0, heads, -1]:
        return None
    value, perm, heads_view = split.outputs[0], _IDENTITY4, None  # heads_view: (B, H, S, D) dims
    while True:
        node = _only_mover(value)
        if node is None:
            return None
        out = node.outputs[0]
        if node.op_type == "Transpose":
            attr = node.attributes.get("perm")
            order = list(attr.as_ints()) if attr is not None else None
            if order is None or sorted(order) != _IDENTITY4:
                return None
            perm = [perm[i] for i in order]
            if perm == [0, 2, 1, 3] and heads_view is None:
                heads_view = shapes.dims(out)
        elif perm != _IDENTITY4:  # a Reshape of a transposed view keeps it only when proved a no-op
            before, after = shapes.dims(value), shapes.dims(out)
            if before is None or after is None or len(before) != len(after) \
                    or not all(same_dim(a, b) for a, b in zip(before, after)):
                return None
        else:
            return out if _is_merge(shapes.dims(out), heads_view, heads) else None
        value = out


def _is_merge(dims: list | None, heads_view: list | None, heads: int) -> bool:
    """Whether ``dims`` are ``(B, S, H * D)`` of the heads view's ``(B, H, S, D)``."""
    if dims is None or heads_view is None or len(dims) != 3 or len(heads_view) != 4:
        return False
    head = heads_view[3]
    return same_dim(dims[0], heads_view[0]) and same_dim(dims[1], heads_view[2]) and heads_view[1] == heads \
        and isinstance(head, int) and dims[2] == heads * head


def bypass_head_merges(model: ir.Model, shapes: OrtShapes) -> int:
    """Readers of ``_merged_heads(mha)`` read the MultiHeadAttention's output instead (the
    split, the exporter's transposes and its merge then have no readers left, for dead-node
    elimination). Exact: the merged value is the output's elements in the output's order and
    shape. Returns how many were bypassed."""
    bypassed = 0
    for node in list(model.graph):
        if node.domain != MS_DOMAIN or node.op_type != "MultiHeadAttention":
            continue
        merged = _merged_heads(node, shapes)
        if merged is None or merged.is_graph_output():
            continue
        merged.replace_all_uses_with(node.outputs[0])
        bypassed += 1
    return bypassed


# ---------------------------------------------------------------- per-layer report


def _softmaxes(model: ir.Model) -> list[ir.Node]:
    return [n for g in optcc.ir.graphs(model) for n in g
            if n.op_type == "Softmax" and n.domain in ("", "ai.onnx")]


def _diagnose(node: ir.Node, opset: int, kind: str) -> str:
    """Why a Softmax that no rule fused is not a fusable attention layer."""
    if kind == "standard" and opset < ATTENTION_OPSET:
        return (f"model opset {opset} < {ATTENTION_OPSET} (standard Attention needs "
                f"{ATTENTION_OPSET}; -O3 emits com.microsoft.MultiHeadAttention)")
    out = node.outputs[0]
    readers = [u.node for u in out.uses()]
    if out.is_graph_output():
        return "attention probabilities are a graph output"
    guards = [r for r in readers if r.op_type in ("IsNaN", "Where")]
    matmuls = [r for r in readers if r.op_type == "MatMul" and r.inputs[0] is out]
    if guards and not matmuls:
        where = next((r for r in readers if r.op_type == "Where"), None)
        if where is not None:
            readers = [u.node for u in where.outputs[0].uses()]
            matmuls = [r for r in readers if r.op_type == "MatMul" and r.inputs[0] is where.outputs[0]]
    if not matmuls:
        return "Softmax is not followed by a MatMul with the values (not attention)"
    if len(readers) > len(matmuls) + (0 if not guards else 2):
        return "attention probabilities have readers besides the value MatMul"
    scores = node.inputs[0]
    if scores is not None and len(scores.uses()) > 1:
        return "attention scores have other readers"
    return "scores are not MatMul(q, kt) with constant scales and an optional additive mask"


class _AttentionPass(RewritePass):
    kind = "standard"

    def call(self, model: ir.Model) -> PassResult:
        layers: dict[ir.Node, str] = {}
        groups: dict[ir.Node, str] = {}
        before = {n: n.name or f"Softmax#{i}" for i, n in enumerate(_softmaxes(model))}
        # every pattern has a Softmax: without one (or the op to write), none of the 64 is built
        opset = optcc.ir.default_opset(model)
        exported: dict[ir.Node, str] = {}
        if self.kind == "standard" and opset >= ATTENTION_OPSET and any(
                n.op_type == "Attention" and n.domain in ("", "ai.onnx") for g in optcc.ir.graphs(model) for n in g):
            first = apply_rules(model, exported_attention_rules(exported), max_iters=self.max_iters)
        else:
            first = None
        # below opset 23 the standard op does not exist: every layer gets _diagnose's reason
        possible = bool(before) and (self.kind == "ort" or opset >= ATTENTION_OPSET)
        shapes = OrtShapes(model) if self.kind == "ort" else None
        stats = apply_rules(model, attention_rules(self.kind, layers, groups, shapes) if possible else (),
                            max_iters=self.max_iters)
        if first is not None:  # the exporter's own Attention nodes, grouped first
            stats.applied.update(first.applied)
            for rule, reasons in first.rejected.items():  # an Attention without repeat_kv is no candidate
                stats.rejected[rule].update({r: c for r, c in reasons.items() if r != _NOT_REPEATED})
        remaining = set(_softmaxes(model))
        op = "Attention" if self.kind == "standard" else f"{MS_DOMAIN}.MultiHeadAttention"
        report = {}
        for node, label in before.items():
            if node not in remaining:
                report[label] = f"fused: {op}"
            else:
                report[label] = layers.get(node) or _diagnose(node, opset, self.kind)
        if stats.modified and self.kind == "ort" and MS_DOMAIN not in model.opset_imports:
            model.opset_imports[MS_DOMAIN] = 1
        caches = {}
        if self.kind == "ort" or opset >= ATTENTION_OPSET:
            caches = fold_kv_cache(model, ("", "Attention") if self.kind == "standard"
                                   else (MS_DOMAIN, "MultiHeadAttention"))
        bypassed = bypass_head_merges(model, shapes) if shapes is not None and stats.modified else 0
        result = stats.as_dict()
        if bypassed:
            result["head_merges_bypassed"] = bypassed
        if caches:
            result["kv_cache"] = caches
        if report:
            result["layers"] = report
            result["fused_layers"] = sum(v.startswith("fused") for v in report.values())
        grouped = {before[n]: reason for n, reason in groups.items() if n in before}
        grouped.update({n.name or f"Attention#{i}": reason for i, (n, reason) in enumerate(exported.items())})
        if grouped:
            result["grouped_kv"] = grouped
        folded = any(v == "folded" for v in caches.values())
        return PassResult(model, stats.modified or folded or bypassed > 0, result)


class FuseAttentionPass(_AttentionPass):
    """Decomposed scaled dot-product attention -> standard ``Attention`` (opset >= 23)."""

    name = "fuse-attention"
    numerics = "fusion"
    kind = "standard"


class FuseOrtAttentionPass(_AttentionPass):
    """Decomposed scaled dot-product attention -> ``com.microsoft.MultiHeadAttention``
    (onnxruntime target, -O3)."""

    name = "fuse-ort-attention"
    numerics = "fusion"
    kind = "ort"
