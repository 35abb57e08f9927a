"""fuse-ort-skip-layernorm's sum rule (a residual sum also read elsewhere) proves its
inputs are of rank 3 through the values of constants (a Reshape's target): a graph input
with an initializer default (IR >= 4) is no constant, a caller may feed another target.
Here a fed target of two elements makes the summand rank 2 (the Add broadcasts it back to
rank 3), which onnxruntime's SkipLayerNormalization refuses: the LayerNormalization must
stay. Outputs on the fed target and on the default against the float64 reference."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
import pytest
from onnx import TensorProto as TP

import optcc
from reference import expected_outputs_float64, onnxruntime_outputs

H = 4


def _model(ir_version: int = 8) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes = [oh.make_node("Reshape", ["x", "target"], ["r"]), oh.make_node("Add", ["r", "skip"], ["s"]),
             oh.make_node("LayerNormalization", ["s", "gamma", "beta"], ["y"], axis=-1)]
    graph = oh.make_graph(
        nodes, "g",
        [oh.make_tensor_value_info("x", TP.FLOAT, [6, H]), oh.make_tensor_value_info("skip", TP.FLOAT, [1, 6, H]),
         oh.make_tensor_value_info("target", TP.INT64, ["k"])],
        [oh.make_tensor_value_info("y", TP.FLOAT, [1, 6, H]), oh.make_tensor_value_info("s", TP.FLOAT, [1, 6, H])],
        [nh.from_array(np.array([1, 6, H], np.int64), "target"),
         nh.from_array(rng.normal(size=H).astype(np.float32), "gamma"),
         nh.from_array(rng.normal(size=H).astype(np.float32), "beta")])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=ir_version)


@pytest.mark.parametrize("target", [[6, H], [1, 6, H]], ids=["fed", "default"])
def test_sum_rule_reads_no_fed_target(target: list[int]) -> None:
    model = _model()
    rng = np.random.default_rng(1)
    feeds = {"x": rng.normal(size=(6, H)).astype(np.float32), "skip": rng.normal(size=(1, 6, H)).astype(np.float32),
             "target": np.array(target, np.int64)}
    result = optcc.optimize(model, passes=["fuse-ort-skip-layernorm"])
    assert [i.name for i in result.model.graph.input] == ["x", "skip", "target"]
    got = onnxruntime_outputs(result.model, feeds)
    for g, w in zip(got, expected_outputs_float64(model, feeds)):
        np.testing.assert_allclose(g.astype(np.float64), w, rtol=1e-4, atol=1e-4)
