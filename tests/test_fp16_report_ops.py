"""The per-layer table of an FP16 run names each kept node's op type, named nodes too
(their label is the node's name, which does not say the op)."""

from __future__ import annotations

import numpy as np
import onnx

import optcc
from reference import expected_outputs_float64, onnxruntime_outputs


def test_a_named_node_kept_float32_has_its_op_type_in_the_table() -> None:
    """``big`` reaches 3e5 (beyond float16's 65504), so the Mul producing it stays float32;
    the table's row for it says Mul, and the result still computes the float64 values."""
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["": 17]>
        g (float[1, 64] x) => (float[1, 64] y) {
            k = Constant <value = float {30000.0}> ()
            big = Mul (x, k)
            small = Constant <value = float {0.0001}> ()
            y = Mul (big, small)
        }""")
    model.graph.node[1].name = "scale_up"
    rng = np.random.default_rng(0)
    samples = [{"x": rng.uniform(-10, 10, size=(1, 64)).astype(np.float32)} for _ in range(4)]
    result = optcc.optimize(model, passes=[], fp16=True, inputs=samples, allow_float_fallback=True)
    rows = {row["name"]: row for row in result.report.layer_table()}
    assert rows["scale_up"]["precision"] == "float32" and rows["scale_up"]["op_type"] == "Mul"
    assert "65504" in rows["scale_up"]["reason"]
    want = expected_outputs_float64(model, samples[0])[0]
    np.testing.assert_allclose(onnxruntime_outputs(result.model, samples[0])[0], want, rtol=2e-3, atol=1e-3)
