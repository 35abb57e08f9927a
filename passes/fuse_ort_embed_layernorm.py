"""FuseOrtEmbedLayerNormPass: BERT-style embeddings into onnxruntime's com.microsoft
EmbedLayerNormalization (opt-in: in no level's pipeline; target onnxruntime, com.microsoft
opset 1 imported when used).

Rewrite (the three sums in any order and operand order)::

    e = Gather(word_table, input_ids) + Gather(position_table, position_ids)
        [+ Gather(segment_table, segment_ids)]
    y = LayerNormalization(e, gamma, beta?, axis=-1, epsilon)

becomes ``EmbedLayerNormalization(Cast(input_ids, int32), Cast(segment_ids, int32)?,
word_table, position_table, segment_table?, gamma, beta, epsilon)`` with its optional
``mask_index`` output unread (the attention fusions take the mask themselves).

Preconditions: float32 tables (rank 2, one hidden size) and LayerNormalization
constants (vectors of that size; a missing beta becomes zeros); Gathers over axis 0;
LayerNormalization over the last axis with its mean/inv_std outputs unused; ``input_ids``
(and ``segment_ids``) int32 or int64 of rank 2, the segment ids declared with the same
dims as the input ids (the kernel requires one shape); the position ids proved to be
``0 .. S-1`` for S = ``input_ids``' second dim: ``Slice(c, [0], end, [1], [1]?)`` of a
constant ``c = [arange(N)]`` with ``end`` that dim (``Shape(input_ids, start=1, end=2)``,
``Unsqueeze(Gather(Shape(input_ids), 1))`` or ``Slice(Shape(input_ids), [1], [2])``), which
is what the kernel uses when given no position ids (as torch's TorchScript and dynamo
exports of BERT, MiniLM, RoBERTa-style buffers write them). Intermediates read elsewhere
(the embedding sum, a Gather) block the match.

Numerics ("fusion"): the kernel sums the three rows in float32 (word + position +
segment, one association where the graph may use another: about 1 ulp) and normalizes
with the same two-pass mean and variance; within about 1e-6 relative, inside 1e-4.
Invalid ids differ: Gather reads a negative id from the end of the table and the kernel
refuses it; ids at or beyond 2^31 wrap in the int32 Cast (no tokenizer writes either).

Cost: onnxruntime 1.32's float32 CPU kernel is slower than Gather + Add +
LayerNormalization (the embedding block of all-MiniLM-L6-v2, one thread, fastest of 200
runs: 1.35-1.8x at batch 4-8 x 128-256 tokens, equal at 1 x 16), so -O3 (whose fusions must not make
onnxruntime's CPU slower) leaves it out; name it (``passes=[..., "fuse-ort-embed-layernorm"]``,
``--passes``) for a target whose kernel is fast. It also hides the embedding Gathers from
``quantize-weights``/``quantize-dynamic``'s int8 embedding rows.

Stats: ``applied``/``rejected`` per rule.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from optcc.passes.fuse_ort_transformer import MS_DOMAIN, MicrosoftRewritePass, float32_only, float_vector
from optcc.rewrite import Builder, Const, Match, Op, Rule, Var

__all__ = ["FuseOrtEmbedLayerNormPass", "RULES"]

_INT_IDS = (ir.DataType.INT32, ir.DataType.INT64)


def _gather(i: int) -> Op:
    return Op("Gather", Const(f"t{i}"), Var(f"i{i}"), name=f"g{i}")


def _pattern(outer: int | None) -> Op:
    """LayerNormalization of Add(Add(g_a, g_b), g_outer), or of Add(g1, g2) (outer None)."""
    if outer is None:
        total = Op("Add", _gather(1), _gather(2), commute=True, name="sum")
    else:
        a, b = (i for i in (1, 2, 3) if i != outer)
        inner = Op("Add", _gather(a), _gather(b), commute=True, name="inner")
        total = Op("Add", inner, _gather(outer), commute=True, name="sum")
    return Op("LayerNormalization", total, Const("gamma"), Const("beta", optional=True), name="ln")


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    if value.const_value is not None and not value.is_graph_input():
        return value.const_value.numpy()
    node = value.producer()
    if node is not None and node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
        attr = node.attributes.get("value")
        return None if attr is None else attr.as_tensor().numpy()
    return None


def _int_at(value: ir.Value | None, expected: int) -> bool:
    array = _const(value)
    return array is not None and array.size == 1 and int(array.reshape(-1)[0]) == expected


def _is_seq_len(end: ir.Value | None, ids: ir.Value) -> bool:
    """Whether ``end`` is the 1-element tensor ``[ids.shape[1]]``, as exporters compute it."""
    node = end.producer() if end is not None else None
    if node is None or node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "Shape":
        start, stop = node.attributes.get("start"), node.attributes.get("end")
        return (node.inputs[0] is ids and start is not None and start.as_int() == 1
                and stop is not None and stop.as_int() == 2)
    if node.op_type == "Slice" and len(node.inputs) >= 3:
        shape = node.inputs[0].producer() if node.inputs[0] is not None else None
        axes = node.inputs[3] if len(node.inputs) > 3 else None
        steps = node.inputs[4] if len(node.inputs) > 4 else None
        return (shape is not None and shape.op_type == "Shape" and not shape.attributes
                and shape.inputs[0] is ids and _int_at(node.inputs[1], 1) and _int_at(node.inputs[2], 2)
                and (axes is None or _int_at(axes, 0)) and (steps is None or _int_at(steps, 1)))
    if node.op_type == "Unsqueeze" and len(node.inputs) == 2 and _int_at(node.inputs[1], 0):
        gather = node.inputs[0].producer() if node.inputs[0] is not None else None
        if gather is None or gather.op_type != "Gather" or not _int_at(gather.inputs[1], 1):
            return False
        axis = gather.attributes.get("axis")
        shape = gather.inputs[0].producer() if gather.inputs[0] is not None else None
        return ((axis is None or axis.as_int() == 0) and shape is not None and shape.op_type == "Shape"
                and not shape.attributes and shape.inputs[0] is ids)
    return False


def _is_positions(positions: ir.Value, ids: ir.Value) -> bool:
    """Whether ``positions`` is ``[[0, 1, .., S-1]]`` for S = ``ids.shape[1]``."""
    node = positions.producer()
    if node is None or node.op_type != "Slice" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 4:
        return False
    table = _const(node.inputs[0])
    if table is None or table.ndim != 2 or table.shape[0] != 1 or table.dtype.kind not in "iu":
        return False
    if not np.array_equal(table[0], np.arange(table.shape[1])):
        return False
    steps = node.inputs[4] if len(node.inputs) > 4 else None
    return (_int_at(node.inputs[1], 0) and _int_at(node.inputs[3], 1) and (steps is None or _int_at(steps, 1))
            and _is_seq_len(node.inputs[2], ids))


def _ids_ok(value: ir.Value) -> bool:
    return value.dtype in _INT_IDS and value.shape is not None and value.shape.rank() == 2


def _roles(m: Match, count: int) -> tuple[int, int, int | None] | str:
    """(word, position, segment) gather indices, or why the Gathers are not embeddings."""
    for i in range(1, count + 1):
        axis = m[f"g{i}"].attributes.get("axis")
        table = m.array(f"t{i}")
        if axis is not None and axis.as_int() != 0:
            return "a Gather not over axis 0"
        if table is None or table.ndim != 2 or table.dtype != np.float32:
            return "an embedding table is not a float32 matrix"
    positions = [i for i in range(1, count + 1)
                 if any(_is_positions(m[f"i{i}"], m[f"i{j}"]) for j in range(1, count + 1) if j != i)]
    if len(positions) != 1:
        return "position ids not proved to be 0..S-1"
    pos = positions[0]
    others = [i for i in range(1, count + 1) if i != pos]
    if not _is_positions(m[f"i{pos}"], m[f"i{others[0]}"]):
        others.reverse()  # the word ids are the ones the positions were measured on
    word, segment = others[0], (others[1] if len(others) > 1 else None)
    return word, pos, segment


def _check(count: int):  # noqa: ANN202 - returns a Check
    def check(m: Match) -> str | None:
        roles = _roles(m, count)
        if isinstance(roles, str):
            return roles
        word, pos, segment = roles
        ln: ir.Node = m["ln"]
        if any(len(o.uses()) or o.is_graph_output() for o in ln.outputs[1:]):
            return "LayerNormalization's mean/inv_std outputs are used"
        axis = ln.attributes.get("axis")
        if axis is not None and axis.as_int() not in (-1, 2):
            return "LayerNormalization not over the last axis"
        if not float32_only(m["sum"].outputs[0], m.output):
            return "not float32"
        hidden = m.array(f"t{word}").shape[1]
        if any(m.array(f"t{i}").shape[1] != hidden for i in range(1, count + 1)):
            return "embedding tables of different widths"
        gamma, beta = float_vector(m, "gamma"), float_vector(m, "beta") if m.get("beta") is not None else None
        if gamma is None or gamma.size != hidden or (m.get("beta") is not None and (beta is None or beta.size != hidden)):
            return "gamma/beta are not float32 vectors of the hidden size"
        ids = m[f"i{word}"]
        if not _ids_ok(ids):
            return "input ids not an int32/int64 matrix"
        if segment is not None:
            seg = m[f"i{segment}"]
            if not _ids_ok(seg) or list(seg.shape.dims) != list(ids.shape.dims) or any(
                    d is None or (not isinstance(d, int) and d.value is None) for d in ids.shape.dims):
                return "segment ids not declared with the input ids' shape"
        return None

    return check


def _int32(b: Builder, value: ir.Value) -> ir.Value:
    return value if value.dtype == ir.DataType.INT32 else b.op("Cast", value, to=ir.DataType.INT32)


def _rewrite(count: int):  # noqa: ANN202 - returns a Rewrite
    def rewrite(m: Match, b: Builder) -> ir.Value:
        word, pos, segment = _roles(m, count)  # type: ignore[misc]
        ln: ir.Node = m["ln"]
        eps = ln.attributes.get("epsilon")
        beta = m.get("beta")
        if beta is None:
            beta = b.const(np.zeros_like(m.array("gamma")), "embed_ln_beta")
        inputs = [_int32(b, m[f"i{word}"]),
                  _int32(b, m[f"i{segment}"]) if segment is not None else None,
                  m[f"t{word}"], m[f"t{pos}"], m[f"t{segment}"] if segment is not None else None,
                  m["gamma"], beta]
        # The kernel's schema needs its mask_index output, named (onnx drops trailing unnamed
        # outputs; unread, so nothing else changes) and Builder nodes have one output: the
        # node is built here, its second output named by a builder node that is then dropped.
        reserve = b.op("mask_index", inputs[0])
        b.nodes.remove(reserve.producer())
        reserve.producer().replace_input_with(0, None)
        node = ir.Node(MS_DOMAIN, "EmbedLayerNormalization", inputs,
                       [ir.AttrFloat32("epsilon", 1e-5 if eps is None else eps.as_float())],
                       num_outputs=2, name=ln.name)
        node.outputs[1].name = reserve.name
        node.outputs[1].dtype = ir.DataType.INT32
        b.nodes.append(node)
        return node.outputs[0]

    return rewrite


RULES: tuple[Rule, ...] = (
    *(Rule("embed-layernorm", _pattern(outer), _rewrite(3), _check(3), min_opset=17) for outer in (1, 2, 3)),
    Rule("embed-layernorm-no-segment", _pattern(None), _rewrite(2), _check(2), min_opset=17),
)


class FuseOrtEmbedLayerNormPass(MicrosoftRewritePass):
    """Word + position (+ segment) Gathers, Add, LayerNormalization ->
    com.microsoft.EmbedLayerNormalization (opt-in)."""

    name = "fuse-ort-embed-layernorm"
    numerics = "fusion"
    rules = RULES
