"""fold-constants' kept shape inference across a pass that makes a node read another value
the inference saw: reused where inference finds both alike (a removed no-op between two
float values of the same type; a merged twin Shape), run again where it may not (a no-op
removed between values of different types). Each result is the bytes a fresh inference
gives, and onnx's reference evaluator gives the original's outputs on it."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.reference
import onnx_ir as ir

from optcc.passes.eliminate_common_subexpressions import EliminateCommonSubexpressionsPass
from optcc.passes.eliminate_noops import EliminateNoOpsPass
from test_shape_reuse_across_calls import _fold  # fold-constants in place; how many inferences it ran


def _fold_around(text: str, between, monkeypatch) -> tuple[int, bytes]:
    """fold-constants, ``between``, fold-constants, with reuse and without; the inferences
    of the second call with reuse, and the result (the same bytes either way)."""
    results, second = [], []
    for reuse in (True, False):
        model = ir.from_proto(onnx.parser.parse_model(text))
        assert _fold(model, monkeypatch, reuse=reuse) == 1
        assert between()(model).modified
        second.append(_fold(model, monkeypatch, reuse=reuse))
        results.append(ir.to_proto(model).SerializeToString())
    assert results[0] == results[1]
    assert second[1] == 1
    return second[0], results[0]


def _outputs(proto: bytes | onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    model = onnx.ModelProto.FromString(proto) if isinstance(proto, bytes) else proto
    return onnx.reference.ReferenceEvaluator(model).run(None, feeds)


_NOOP = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,8,8] x) => (float[N,3,H,W] y, int64[4] s) {
    one = Constant <value = float {1.0}> ()
    a = Relu(x)
    m = Mul(a, one)
    r = Sigmoid(m)
    y = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (r)
    s = Shape(y)
}"""


def test_a_removed_no_op_between_values_of_one_type_reuses_the_inference(monkeypatch):
    """``Mul(a, 1)`` removed: Sigmoid reads ``a``, which inference found as it found the
    product (float[N,3,8,8]); the second call runs no inference."""
    inferences, result = _fold_around(_NOOP, EliminateNoOpsPass, monkeypatch)
    assert inferences == 0
    assert "Mul" not in [n.op_type for n in onnx.ModelProto.FromString(result).graph.node]
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    got, want = _outputs(result, {"x": x}), _outputs(onnx.parser.parse_model(_NOOP), {"x": x})
    np.testing.assert_array_equal(got[0], want[0])
    expected = 1 / (1 + np.exp(-np.maximum(x.astype(np.float64), 0)))
    np.testing.assert_allclose(got[0], expected.reshape(2, 3, 4, 2, 4, 2).max(axis=(3, 5)), rtol=1e-6)
    np.testing.assert_array_equal(got[1], np.array([2, 3, 4, 4], np.int64))


_BROADCAST = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,1,8] x) => (float[N,P,Q] y, int64[3] s) {
    ones = Constant <value = float[1,4,1] {1.0, 1.0, 1.0, 1.0}> ()
    a = Relu(x)
    m = Mul(a, ones)
    y = Sigmoid(m)
    s = Shape(y)
}"""


def test_a_no_op_that_broadcast_is_not_taken_for_its_input(monkeypatch):
    """``Mul(a, ones[1,4,1])`` broadcasts ``a`` from [N,1,8] to [N,4,8], so it is no no-op;
    Sigmoid made to read ``a`` in its place by hand reads a value of another type: the
    second call infers again, and the folded shape is the new graph's."""
    results = []
    for reuse in (True, False):
        model = ir.from_proto(onnx.parser.parse_model(_BROADCAST))
        assert _fold(model, monkeypatch, reuse=reuse) == 1
        sigmoid = next(n for n in model.graph if n.op_type == "Sigmoid")
        relu = next(n for n in model.graph if n.op_type == "Relu")
        sigmoid.replace_input_with(0, relu.outputs[0])  # a rewrite a wrong no-op rule would make
        model.graph.remove(next(n for n in model.graph if n.op_type == "Mul"), safe=True)
        assert _fold(model, monkeypatch, reuse=reuse) == 1
        results.append(ir.to_proto(model).SerializeToString())
    assert results[0] == results[1]
    x = np.random.default_rng(1).standard_normal((3, 1, 8)).astype(np.float32)
    got = _outputs(results[0], {"x": x})
    np.testing.assert_array_equal(got[1], np.array([3, 1, 8], np.int64))  # y's shape now, not [3, 4, 8]


_TWINS = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,12] x) => (float[P,Q] y, int64[2] s) {
    rest = Constant <value = int64[1] {-1}> ()
    n1 = Shape <end = 1> (x)
    n2 = Shape <end = 1> (x)
    first = Concat <axis = 0> (n1, rest)
    x2 = Reshape(x, first)
    second = Concat <axis = 0> (rest, n2)
    y = Reshape(x2, second)
    s = Shape(y)
}"""


def test_a_merged_twin_shape_reuses_the_inference(monkeypatch):
    """The two ``Shape(x)[:1]`` merged: the second Concat reads ``n1`` in place of ``n2``,
    the same output of a node of the same kind and attributes reading ``x``, so inference
    gives both the same type and data; the second call runs no inference."""
    inferences, result = _fold_around(_TWINS, EliminateCommonSubexpressionsPass, monkeypatch)
    assert inferences == 0
    assert [n.op_type for n in onnx.ModelProto.FromString(result).graph.node].count("Shape") == 2  # n1 and s
    x = np.random.default_rng(2).standard_normal((3, 12)).astype(np.float32)
    got, want = _outputs(result, {"x": x}), _outputs(onnx.parser.parse_model(_TWINS), {"x": x})
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[0], x.reshape(12, 3))
    np.testing.assert_array_equal(got[1], np.array([12, 3], np.int64))


_CAST_SHAPE = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3] x, float[M] z) => (float[P,Q] r, int64[1] s) {
    one = Constant <value = float {1.0}> ()
    sh = Shape(x)
    f = Cast <to = 1> (sh)
    m = Mul(f, one)
    c = Cast <to = 7> (m)
    r = Reshape(z, c)
    s = Shape <start = 1> (r)
}"""


def test_a_no_op_removed_between_float_values_carrying_a_shape_infers_again(monkeypatch):
    """``Mul(f, 1)`` removed where ``f`` is a shape Cast to float: inference gives ``f`` the
    shape's data but not the product, so the second call infers again (not reused), and
    the result is the bytes a fresh inference gives."""
    results, inferences = [], []
    for reuse in (True, False):
        model = ir.from_proto(onnx.parser.parse_model(_CAST_SHAPE))
        _fold(model, monkeypatch, reuse=reuse)
        assert EliminateNoOpsPass()(model).modified
        inferences.append(_fold(model, monkeypatch, reuse=reuse))
        results.append(ir.to_proto(model).SerializeToString())
    assert results[0] == results[1]  # the folded Shape of the reshaped value included
    assert inferences[0] >= 1
    result = results[0]
    assert "Reshape" in [n.op_type for n in onnx.ModelProto.FromString(result).graph.node]
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((2, 3)).astype(np.float32), "z": rng.standard_normal(6).astype(np.float32)}
    got, want = _outputs(result, feeds), _outputs(onnx.parser.parse_model(_CAST_SHAPE), feeds)
    np.testing.assert_array_equal(got[0], feeds["z"].reshape(2, 3))
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
