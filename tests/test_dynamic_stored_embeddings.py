"""--int8-dynamic on an embedding table stored as int8 levels and dequantized in the graph
(``Gather(Mul(Cast<float>(q), scale), ids)``, as weight-only exporters write it): the rows
are gathered as int8 and dequantized after (``Mul(Cast<float>(Gather(q, ids)), scale or
Gather(scale, ids))``), so the table is never dequantized whole; each element is the same
float32 product of the same operands, so the result is bit for bit the original's (onnx's
reference evaluator and numpy)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh
from onnx.reference import ReferenceEvaluator

import optcc
from optcc.passes.quantize_dynamic import QuantizeDynamicPass

RNG = np.random.default_rng(21)
V, H = 50, 8
Q = RNG.integers(-127, 128, size=(V, H), dtype=np.int8)
IDS = np.array([[0, 7, 49, 7, 3], [12, 12, 0, 48, 1]], np.int64)


def _model(scale: np.ndarray, *, scale_first: bool = False, matmul_too: bool = False,
           ids: np.ndarray = IDS) -> onnx.ModelProto:
    """ids -> Gather(Mul(Cast(Q), scale), ids) -> e; ``matmul_too``: x @ table^T as well (tied head)."""
    mul_inputs = ["S", "qf"] if scale_first else ["qf", "S"]
    nodes = [oh.make_node("Cast", ["Q"], ["qf"], to=TP.FLOAT), oh.make_node("Mul", mul_inputs, ["table"]),
             oh.make_node("Gather", ["table", "ids"], ["e"], name="embed")]
    inputs = [oh.make_tensor_value_info("ids", TP.INT64, list(ids.shape))]
    outputs = [oh.make_tensor_value_info("e", TP.FLOAT, [*ids.shape, H])]
    if matmul_too:
        nodes.append(oh.make_node("Gemm", ["x", "table"], ["logits"], transB=1))
        inputs.append(oh.make_tensor_value_info("x", TP.FLOAT, [3, H]))
        outputs.append(oh.make_tensor_value_info("logits", TP.FLOAT, [3, V]))
    graph = oh.make_graph(nodes, "stored_embedding", inputs, outputs, [nh.from_array(Q, "Q"), nh.from_array(scale, "S")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


SCALES = {
    "per-row": (RNG.uniform(0.5, 2.0, size=(V, 1)) / 127).astype(np.float32),
    "per-column": (RNG.uniform(0.5, 2.0, size=(H,)) / 127).astype(np.float32),
    "one": np.array(0.0123, np.float32),
}


@pytest.mark.parametrize("kind", list(SCALES))
@pytest.mark.parametrize("scale_first", [False, True])
def test_stored_embedding_rows_are_gathered_as_int8(kind, scale_first):
    scale = SCALES[kind]
    model = _model(scale, scale_first=scale_first)
    result = QuantizeDynamicPass(count_fused=False)(optcc.ir.load(model))
    assert result.modified and result.stats["stored_rows_gathered"] == 1
    q = optcc.ir.serialize(result.model)
    onnx.checker.check_model(q, full_check=True)
    gathered = {n.input[0] for n in q.graph.node if n.op_type == "Gather"}
    assert "Q" in gathered and "table" not in gathered
    assert not any(n.op_type == "Cast" and n.input[0] == "Q" for n in q.graph.node)  # the table is not cast whole
    assert {t.name for t in q.graph.initializer} == {"Q", "S"}  # the stored levels and scales, nothing more
    (got,) = ReferenceEvaluator(q).run(None, {"ids": IDS})
    (expected,) = ReferenceEvaluator(model).run(None, {"ids": IDS})
    np.testing.assert_array_equal(got, expected)
    rows = scale[IDS] if scale.ndim == 2 else scale
    np.testing.assert_array_equal(got, Q[IDS].astype(np.float32) * rows)
    assert not QuantizeDynamicPass(count_fused=False)(optcc.ir.load(q)).modified


@pytest.mark.parametrize("scale_shape", [(1, H), (1, 1)])
@pytest.mark.parametrize("ids", [np.array(7, np.int64), IDS], ids=["0-d ids", "2-d ids"])
def test_a_scale_of_rank_two_for_every_row_keeps_the_gathered_shape(scale_shape, ids):
    """A [1, H] or [1, 1] scale for every row: the rows of 0-d ids have rank 1 in the
    original, and so in the result (the scale is not broadcast against them as [1, H])."""
    scale = (RNG.uniform(0.5, 2.0, size=scale_shape) / 127).astype(np.float32)
    model = _model(scale, ids=ids)
    result = QuantizeDynamicPass(count_fused=False)(optcc.ir.load(model))
    assert result.modified and result.stats["stored_rows_gathered"] == 1
    q = optcc.ir.serialize(result.model)
    onnx.checker.check_model(q, full_check=True)
    (got,) = ReferenceEvaluator(q).run(None, {"ids": ids})
    expected = Q[ids].astype(np.float32) * scale.reshape(-1)
    assert got.shape == (*ids.shape, H)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got, ReferenceEvaluator(model).run(None, {"ids": ids})[0])


def test_a_stored_table_read_by_a_matmul_too_is_left_alone():
    model = _model(SCALES["per-row"], matmul_too=True)
    result = QuantizeDynamicPass(count_fused=False)(optcc.ir.load(model))
    q = optcc.ir.serialize(result.model)
    assert "stored_rows_gathered" not in result.stats
    assert any(n.op_type == "Gather" and n.input[0] == "table" for n in q.graph.node)


def test_an_excluded_gather_keeps_its_stored_table():
    """``exclude`` names the embedding's Gather: its table is read as the graph reads it."""
    model = _model(SCALES["per-row"])
    result = QuantizeDynamicPass(count_fused=False, exclude=["embed"])(optcc.ir.load(model))
    assert not result.modified and "stored_rows_gathered" not in result.stats
    q = optcc.ir.serialize(result.model)
    assert any(n.op_type == "Gather" and n.input[0] == "table" for n in q.graph.node)
    (got,) = ReferenceEvaluator(q).run(None, {"ids": IDS})
    np.testing.assert_array_equal(got, Q[IDS].astype(np.float32) * SCALES["per-row"][IDS])
