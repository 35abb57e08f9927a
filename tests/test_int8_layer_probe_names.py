"""The INT8 fallback's per-layer probe (one combined model: the float graph plus a copy
of each layer's Q/DQ group) must be a valid model when a layer reads one quantized
activation through two inputs. Found on basic-pitch 0.4.0's nmp.onnx (``--int8
--calibration``): its probe held two nodes of one name, onnxruntime refused it, and the
whole INT8 request was declined with "raised Fail: ... two nodes with same node name"."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
from onnx import TensorProto as TP

import optcc
from optcc.quant.driver import quantize_int8
from optcc.quant.fallback import Target


def _square_between_convs() -> onnx.ModelProto:
    """Conv -> Mul(c, c) -> Conv: the Mul's two inputs are one quantized activation."""
    rng = np.random.default_rng(0)
    inits = [nh.from_array((rng.normal(size=(8, 3, 3, 3)) * 0.3).astype(np.float32), "W1"),
             nh.from_array((rng.normal(size=(8, 8, 3, 3)) * 0.2).astype(np.float32), "W2")]
    nodes = [oh.make_node("Conv", ["x", "W1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             oh.make_node("Mul", ["c1", "c1"], ["sq"], name="square"),
             oh.make_node("Conv", ["sq", "W2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    graph = oh.make_graph(nodes, "square", [oh.make_tensor_value_info("x", TP.FLOAT, [1, 3, 16, 16])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, [1, 8, 16, 16])], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def test_fallback_probes_a_layer_that_reads_one_activation_twice() -> None:
    rng = np.random.default_rng(1)
    data = [{"x": rng.uniform(-1, 1, (1, 3, 16, 16)).astype(np.float32)} for _ in range(20)]
    # a target the fully quantized model misses, so the fallback ranks the layers by their
    # local error, which runs the probe
    _, stats = quantize_int8(_square_between_convs(), data, "minmax", min_speedup=1e-9,
                             target=Target(min_sqnr_db=60.0), metric=None)
    text = repr(stats)
    assert "same node name" not in text and "invalid model" not in text, text[:2000]
    assert stats["fallback"], "the fallback did not run: the test no longer reaches the probe"
