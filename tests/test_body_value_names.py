"""A node merge-consecutive builds in an If body gives its output a name no enclosing graph
holds: left unnamed, onnx-ir names it ``val_<n>``, unique in the body alone, which here (as in
a torch dynamo export, whose values are named so) shadows a main-graph value, fails onnx's
checker, and the pass manager reverts the whole pass. The change must be kept and the result
equal onnxruntime on the original for both branches."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import optcc

# val_0 ... val_3 in the main graph: the names onnx-ir makes up first in a body
_OUTER = "val_0 = Relu(x)\n    val_1 = Neg(x)\n    val_2 = Abs(x)\n    val_3 = Sigmoid(x)"
_OUTER_OUTPUTS = "float[2, 3] val_0, float[2, 3] val_1, float[2, 3] val_2, float[2, 3] val_3"

# concat-concat: Concat(Concat(x, x), x) in the body becomes one new Concat
_CONCATS = f"""
<ir_version: 8, opset_import: ["" : 13]>
g (float[2, 3] x, bool b) => (float[2, 9] z, {_OUTER_OUTPUTS}) {{
    {_OUTER}
    z = If(b) <
      then_branch = g1 () => (float[2, 9] o1) {{
        c = Concat<axis = 1>(x, x)
        d = Concat<axis = 1>(c, x)
        o1 = Relu(d)
      }},
      else_branch = g2 () => (float[2, 9] o2) {{ o2 = Concat<axis = 1>(x, x, x) }}
    >
}}"""

# slice-shape: Slice(Shape(x), [1], [2]) in the body becomes a new Shape<start = 1, end = 2>(x)
_SHAPE_SLICE = f"""
<ir_version: 8, opset_import: ["" : 15]>
g (float[2, 3] x, bool b) => (int64[1] z, {_OUTER_OUTPUTS}) <int64[1] one = {{1}}, int64[1] two = {{2}}> {{
    {_OUTER}
    z = If(b) <
      then_branch = g1 () => (int64[1] o1) {{
        s = Shape(x)
        t = Slice(s, one, two)
        o1 = Add(t, t)
      }},
      else_branch = g2 () => (int64[1] o2) {{ o2 = Shape<start = 0, end = 1>(x) }}
    >
}}"""


def _run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.mark.parametrize(("text", "rule"), [(_CONCATS, "concat-concat"), (_SHAPE_SLICE, "slice-shape")],
                         ids=["concat-concat", "slice-shape"])
def test_a_new_body_value_shadows_no_main_graph_name(text: str, rule: str) -> None:
    proto = onnx.parser.parse_model(text)
    onnx.checker.check_model(proto, full_check=True)
    result = optcc.optimize(proto, passes=["merge-consecutive"])
    (record,) = [r for r in result.report.passes if r.name == "merge-consecutive"]
    assert record.status == "changed", record.reason
    assert record.stats == {rule: 1}
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    for b in (True, False):
        feeds = {"x": x, "b": np.array(b)}
        for got, want in zip(_run(out, feeds), _run(proto, feeds), strict=True):
            np.testing.assert_array_equal(got, want)
