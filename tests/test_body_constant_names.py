"""A constant a pass makes in an If body takes a name no graph of the model holds: named
against its own graph alone, it would take the name of a main-graph value (here one named
as the new constant would be), shadow it, fail onnx's checker, and the pass manager would
revert the whole pass. Each pass that makes constants in bodies is run through
``optcc.optimize``; its change must be kept and the result equal onnxruntime on the
original for both branches."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import optcc

# merge-consecutive: Unsqueeze(Unsqueeze(x)) in the body becomes one Unsqueeze whose new axes
# constant would be named Unsqueeze_axes, a main-graph value's name
_MERGE = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[2, 3] x, bool b) => (float[1, 1, 2, 3] z, float[2, 3] Unsqueeze_axes) <int64[1] a = {0}, int64[2] a2 = {0, 1}> {
    Unsqueeze_axes = Relu(x)
    z = If(b) <
      then_branch = g1 () => (float[1, 1, 2, 3] o1) {
        u = Unsqueeze(x, a)
        o1 = Unsqueeze(u, a)
      },
      else_branch = g2 () => (float[1, 1, 2, 3] o2) { o2 = Unsqueeze(x, a2) }
    >
}"""

# sink-layout-ops: Transpose -> Mul by c -> Transpose in the body becomes one Mul by c carried
# to x's layout, a new constant that would be named Mul_layout_operand, a main-graph value's name
_SINK = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[2, 3] x, bool b) => (float[2, 3] z, float[2, 3] Mul_layout_operand) <float[3, 1] c = {1, -2, 3}> {
    Mul_layout_operand = Relu(x)
    z = If(b) <
      then_branch = g1 () => (float[2, 3] o1) {
        t = Transpose<perm = [1, 0]>(x)
        m = Mul(t, c)
        o1 = Transpose<perm = [1, 0]>(m)
      },
      else_branch = g2 () => (float[2, 3] o2) { o2 = Neg(x) }
    >
}"""

# fuse-attention: the body's Attention takes the past key/value; the Shape of the key cache read
# before it becomes Shape(past) + Shape(new) * onehot, a constant that would be named
# Shape_seq_axis, a main-graph value's name
_ATTENTION = """
<ir_version: 10, opset_import: ["" : 23]>
g (float[2, 2, 3, 4] q, float[2, 2, 3, 4] k, float[2, 2, 3, 4] v, float[2, 2, 5, 4] past_key,
   float[2, 2, 5, 4] past_value, bool b)
  => (float[2, 2, 3, 4] y, float[2, 2, 8, 4] present_key, float[2, 2, 8, 4] present_value, int64[1] Shape_seq_axis)
  <float zero = {0}> {
    Shape_seq_axis = Shape<start = 2, end = 3>(past_key)
    y, present_key, present_value = If(b) <
      then_branch = g1 () => (float[2, 2, 3, 4] y1, float[2, 2, 8, 4] pk1, float[2, 2, 8, 4] pv1) {
        pk1 = Concat<axis = 2>(past_key, k)
        pv1 = Concat<axis = 2>(past_value, v)
        s = Shape<start = 2, end = 3>(pk1)
        f = Cast<to = 1>(s)
        m = Mul(f, zero)
        q2 = Add(q, m)
        y1 = Attention<scale = 0.25>(q2, pk1, pv1)
      },
      else_branch = g2 () => (float[2, 2, 3, 4] y2, float[2, 2, 8, 4] pk2, float[2, 2, 8, 4] pv2) {
        y2 = Identity(q)
        pk2 = Concat<axis = 2>(past_key, k)
        pv2 = Concat<axis = 2>(past_value, v)
      }
    >
}"""


def _feeds(proto: onnx.ModelProto, b: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for value in proto.graph.input:
        if value.name == "b":
            feeds["b"] = np.array(b)
            continue
        shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
        feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.mark.parametrize(("pass_name", "text", "stats"), [
    ("merge-consecutive", _MERGE, {"unsqueeze-unsqueeze": 1}),
    ("sink-layout-ops", _SINK, {"layout_ops_removed": 2}),
    ("fuse-attention", _ATTENTION, {"kv_cache": {"Attention#0": "folded"}}),
], ids=["merge-consecutive", "sink-layout-ops", "fuse-attention"])
def test_a_body_constant_shadows_no_main_graph_name(pass_name: str, text: str, stats: dict) -> None:
    proto = onnx.parser.parse_model(text)
    onnx.checker.check_model(proto, full_check=True)
    result = optcc.optimize(proto, passes=[pass_name])
    (record,) = [r for r in result.report.passes if r.name == pass_name]
    assert record.status == "changed", record.reason
    assert stats.items() <= record.stats.items()
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    for b in (True, False):
        feeds = _feeds(proto, b)
        for got, want in zip(_run(out, feeds), _run(proto, feeds), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
