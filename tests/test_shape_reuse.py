"""fold-constants reuses a shape inference across its rounds only when its own folds
cannot change what inference finds; the results are checked against onnx's reference
evaluator and against the same pass with reuse turned off."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.reference
import onnx_ir as ir

from optcc.passes.fold_constants import FoldConstantsPass
import optcc.passes.shape_reuse as shape_reuse
from optcc.passes.shape_reuse import InferenceSnapshot
from calls import first_arguments


def _run(proto: onnx.ModelProto, monkeypatch, *, reuse: bool = True) -> tuple[onnx.ModelProto, int]:
    """fold-constants on ``proto``; returns the result and how many shape inferences ran."""
    with monkeypatch.context() as patch:
        # fold-constants' inference (``shape_reuse.holding``)
        calls = first_arguments(patch, shape_reuse, "shape_findings")
        if not reuse:
            patch.setattr(InferenceSnapshot, "still_holds", lambda self, model, findings: False)
        model = ir.from_proto(proto)
        FoldConstantsPass()(model)
    return ir.to_proto(model), len(calls)


def _reference(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return onnx.reference.ReferenceEvaluator(proto).run(None, feeds)


def test_a_folded_resize_scale_is_inferred_again(monkeypatch):
    """Folding the Mul that computes Resize's scales lets inference size the Resize output,
    so the second round must run inference again (Resize reads its scales' data) and then
    folds the Shape."""
    proto = onnx.parser.parse_model("""
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,4,4] x) => (float[N,C,H,W] y, int64[3] dims) {
    c1 = Constant <value = float[4] {1.0, 1.0, 2.0, 2.0}> ()
    c2 = Constant <value = float[4] {1.0, 1.0, 1.0, 1.0}> ()
    scales = Mul(c1, c2)
    y = Resize <mode = "nearest"> (x, , scales)
    dims = Shape <start = 1> (y)
}""")
    result, inferences = _run(proto, monkeypatch)
    assert inferences == 2
    assert "Shape" not in [n.op_type for n in result.graph.node]
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
    got, want = _reference(result, {"x": x}), _reference(proto, {"x": x})
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], np.array([3, 8, 8], np.int64))
    np.testing.assert_array_equal(got[1], want[1])


def test_a_folded_bias_reshape_reuses_the_inference(monkeypatch):
    """A bias reshaped from a constant and added upstream of a Shape: folding it gives Add
    an initializer of the dims inference had found, so the second round reuses the first
    inference, and the result is the one a second inference gives."""
    proto = onnx.parser.parse_model("""
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,4,2,2] x) => (float[N,16] y) {
    b = Constant <value = float[4] {0.5, -1.0, 2.0, 0.25}> ()
    target = Constant <value = int64[4] {1, 4, 1, 1}> ()
    bias = Reshape(b, target)
    a = Add(x, bias)
    r = Relu(a)
    s = Shape(r)
    zero = Constant <value = int64[1] {0}> ()
    n = Gather(s, zero)
    rest = Constant <value = int64[1] {-1}> ()
    shape = Concat <axis = 0> (n, rest)
    y = Reshape(r, shape)
}""")
    result, inferences = _run(proto, monkeypatch)
    assert inferences == 1
    assert "Shape" in [n.op_type for n in result.graph.node]  # the batch stays dynamic
    again, fresh = _run(proto, monkeypatch, reuse=False)
    assert fresh == 2
    assert result.SerializeToString() == again.SerializeToString()
    x = np.random.default_rng(1).standard_normal((3, 4, 2, 2)).astype(np.float32)
    got, want = _reference(result, {"x": x})[0], _reference(proto, {"x": x})[0]
    np.testing.assert_array_equal(got, want)
    bias = np.array([0.5, -1.0, 2.0, 0.25]).reshape(1, 4, 1, 1)
    np.testing.assert_allclose(got, np.maximum(x.astype(np.float64) + bias, 0).reshape(3, 16), rtol=1e-6)


def test_a_folded_shape_value_is_inferred_again(monkeypatch):
    """An int64 vector folded into a Reshape target upstream of a Shape: Reshape's
    inference reads such a constant (so does onnx's data propagation), so no reuse, and
    the second inference folds the Shape."""
    proto = onnx.parser.parse_model("""
<ir_version: 8, opset_import: ["" : 17]>
g (float[6] x) => (float[M,K] y, int64[1] cols) {
    t0 = Constant <value = int64[2] {-2, 3}> ()
    t = Abs(t0)
    y = Reshape(x, t)
    cols = Shape <start = 1> (y)
}""")
    result, inferences = _run(proto, monkeypatch)
    assert inferences == 2
    assert "Shape" not in [n.op_type for n in result.graph.node]
    x = np.random.default_rng(2).standard_normal(6).astype(np.float32)
    got, want = _reference(result, {"x": x}), _reference(proto, {"x": x})
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], np.array([3], np.int64))


def test_a_model_with_a_body_never_reuses(monkeypatch):
    proto = onnx.parser.parse_model("""
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,4] x, bool c) => (float[N,4] y, int64[2] dims) {
    b = Constant <value = float[4] {1.0, 2.0, 3.0, 4.0}> ()
    target = Constant <value = int64[2] {1, 4}> ()
    bias = Reshape(b, target)
    a = Add(x, bias)
    y = If (c) <then_branch = g1 () => (float[N,4] t) { t = Relu(a) },
                else_branch = g2 () => (float[N,4] e) { e = Neg(a) }>
    dims = Shape(a)
}""")
    result, inferences = _run(proto, monkeypatch)
    assert inferences == 2
    x = np.random.default_rng(3).standard_normal((2, 4)).astype(np.float32)
    for flag in (True, False):
        feeds = {"x": x, "c": np.array(flag)}
        for got, want in zip(_reference(result, feeds), _reference(proto, feeds)):
            np.testing.assert_array_equal(got, want)
