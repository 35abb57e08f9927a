"""--fp16 folds a constant that grows the model by a shape or pad vector (at most
``FP16_MAX_GROWTH_BYTES``) and keeps a generated weight computed: the float16 model is
wanted for its size, and a computed pad vector costs a node at every run."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
import onnxruntime as ort
from onnx import TensorProto as TP

import optcc
from optcc.api import FP16_MAX_GROWTH_BYTES


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = nh.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32), "w")
    half = nh.from_array(np.array([0, 0, 1, 1], np.int64), "half")
    twice = nh.from_array(np.array([2], np.int64), "twice")
    big_shape = nh.from_array(np.array([FP16_MAX_GROWTH_BYTES, 4], np.int64), "big_shape")
    nodes = [
        # pads [0, 0, 1, 1, 0, 0, 1, 1] (64 bytes) tiled from 40 bytes of constants
        oh.make_node("Tile", ["half", "twice"], ["pads"]),
        oh.make_node("Pad", ["x", "pads"], ["padded"]),
        oh.make_node("Conv", ["padded", "w"], ["conv"]),
        # a 16 KiB float32 table generated from a 16-byte shape: a weight, kept computed
        oh.make_node("ConstantOfShape", ["big_shape"], ["table"],
                     value=nh.from_array(np.array([0.5], np.float32))),
        oh.make_node("ReduceSum", ["table"], ["total"], keepdims=0),
        oh.make_node("Mul", ["conv", "total"], ["y"]),
    ]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TP.FLOAT, [1, 3, 8, 8])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, None)], [w, half, twice, big_shape])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


def test_fp16_folds_the_pad_vector_and_keeps_the_generated_table() -> None:
    model = _model()
    result = optcc.optimize(model, fp16=True)
    assert result.precision == {"fp16": None}
    written = result.model
    assert [n.op_type for n in written.graph.node if n.op_type in ("Tile", "ConstantOfShape")] == \
        ["ConstantOfShape"]  # the pads folded; the table's generator is left
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    w = nh.to_array(model.graph.initializer[0]).astype(np.float64)
    padded = np.pad(x.astype(np.float64), [(0, 0), (0, 0), (1, 1), (1, 1)])
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))  # [1, 3, 8, 8, 3, 3]
    conv = np.einsum("ncijkl,ockl->noij", windows, w)
    want = conv * (0.5 * FP16_MAX_GROWTH_BYTES * 4)
    got = ort.InferenceSession(written.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2 * np.abs(want).max())
