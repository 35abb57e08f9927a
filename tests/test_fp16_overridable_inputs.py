"""FP16 on a graph input that has an initializer default (IR >= 4: the caller may feed
another value). The default is the input's, not a weight: it keeps the input's type
(float32 with kept input types; float16, data converted, when the inputs become
float16), and a fed value computes what the float model computes on it."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
import pytest
from onnx import TensorProto as TP

import optcc
from reference import expected_outputs_float64, onnxruntime_outputs

FP16_RTOL = 2e-3  # two float16 roundings of the inputs, one of the product


def _gain_model() -> onnx.ModelProto:
    """``y = (x @ W) * gain`` with ``gain`` a graph input defaulting to 1."""
    rng = np.random.default_rng(0)
    inits = [nh.from_array((rng.normal(size=(16, 8)) * 0.3).astype(np.float32), "W"),
             nh.from_array(np.array(1.0, np.float32), "gain")]
    nodes = [oh.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             oh.make_node("Mul", ["h", "gain"], ["y"], name="scale")]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TP.FLOAT, [4, 16]),
                                       oh.make_tensor_value_info("gain", TP.FLOAT, [])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, [4, 8])], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("keep_io", [True, False])
def test_fed_default_keeps_the_input_type(keep_io: bool) -> None:
    model = _gain_model()
    rng = np.random.default_rng(1)
    samples = [{"x": rng.normal(size=(4, 16)).astype(np.float32), "gain": np.array(g, np.float32)}
               for g in (30.0, -7.5, 0.25)]
    result = optcc.optimize(model, fp16=True, fp16_keep_io=keep_io, inputs=samples)
    assert result.precision["fp16"] is None
    converted = result.model
    want = TP.FLOAT if keep_io else TP.FLOAT16
    assert {i.name: i.type.tensor_type.elem_type for i in converted.graph.input} == {"x": want, "gain": want}
    assert {t.name: t.data_type for t in converted.graph.initializer}["gain"] == want
    dtype = np.float32 if keep_io else np.float16
    for feeds in [*samples, {"x": samples[0]["x"]}]:  # the default still serves a caller who feeds no gain
        expected = expected_outputs_float64(model, feeds)[0]
        got = onnxruntime_outputs(converted, {k: v.astype(dtype) for k, v in feeds.items()})[0]
        np.testing.assert_allclose(got.astype(np.float64), expected, rtol=FP16_RTOL, atol=FP16_RTOL * np.abs(expected).max())
