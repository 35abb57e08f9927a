"""INT8 weights stay within +-64, so onnxruntime's integer kernels compute the same exact
accumulations on every CPU: without VNNI (AVX2), uint8 x int8 products are summed in
pairs into a saturating int16, which full-range int8 weights overflow (a pair reaches
2 * 255 * 127). The references are the tests' own: the QDQ graph run as written (each
Q/DQ emulated in float, no integer kernel) and numpy's exact integer products."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import optcc
from optcc.infra.registry import create_pass
from optcc.quant.calibration import calibrate

IN, HIDDEN, OUT = 256, 64, 10
INT16_MAX = 32767


def _model() -> onnx.ModelProto:
    """Two MatMuls whose weights use their whole range (the case that saturates)."""
    rng = np.random.default_rng(5)
    w1 = rng.uniform(-1, 1, (IN, HIDDEN)).astype(np.float32)
    w2 = rng.uniform(-1, 1, (HIDDEN, OUT)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "W2"], ["y"])], "full_range",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, IN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, OUT])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _samples(n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(6)
    return [{"x": rng.uniform(0, 1, (4, IN)).astype(np.float32)} for _ in range(n)]


def _run(model: optcc.ir.Model, feeds: list[dict[str, np.ndarray]], fused: bool) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if fused
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    session = ort.InferenceSession(optcc.ir.serialize(model).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, f)[0] for f in feeds])


def _int8_weights(model: optcc.ir.Model) -> list[np.ndarray]:
    proto = optcc.ir.serialize(model)
    return [numpy_helper.to_array(t) for t in proto.graph.initializer
            if t.data_type == TensorProto.INT8 and len(t.dims) == 2]  # not the zero points


def test_static_int8_weights_cannot_saturate_a_pair_sum() -> None:
    data = _samples(8)
    float_model = optcc.ir.load(_model())
    quantized = create_pass("quantize-int8", ranges=calibrate(float_model, data, "minmax").ranges)(
        float_model).model
    weights = _int8_weights(quantized)
    assert len(weights) == 2
    for w in weights:
        assert np.abs(w.astype(np.int64)).max() == 64  # the whole +-64 range is used
        assert 2 * 255 * int(np.abs(w.astype(np.int64)).max()) <= INT16_MAX
    fused, emulated = _run(quantized, data, True), _run(quantized, data, False)
    # the integer kernels agree with the float emulation of the same QDQ graph to within one
    # step of the output's quantization (rounding), far from a saturated sum's error
    scale = max(float(np.abs(emulated).max()), 1e-6)
    assert np.abs(fused - emulated).max() <= 0.01 * scale


def test_dynamic_int8_accumulations_are_exact() -> None:
    data = _samples(4)
    float_model = optcc.ir.load(_model())
    quantized = create_pass("quantize-dynamic")(float_model).model
    for w in _int8_weights(quantized):
        assert 2 * 255 * int(np.abs(w.astype(np.int64)).max()) <= INT16_MAX
    # numpy's exact integer product of what DynamicQuantizeLinear makes of x, for the first
    # MatMul: onnxruntime's MatMulInteger kernel, run alone on the same integers, equals it
    w1q = next(w for w in _int8_weights(quantized) if w.shape == (IN, HIDDEN))
    x = data[0]["x"]
    scale = np.float32((max(float(x.max()), 0.0) - min(float(x.min()), 0.0)) / 255.0)
    zero = np.uint8(np.clip(np.rint(-min(float(x.min()), 0.0) / scale), 0, 255))
    xq = np.clip(np.rint(x / scale) + zero, 0, 255).astype(np.uint8)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "w", "za"], ["acc"])], "acc",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [4, IN])],
        [helper.make_tensor_value_info("acc", TensorProto.INT32, [4, HIDDEN])],
        [numpy_helper.from_array(w1q, "w"), numpy_helper.from_array(np.array(0, np.uint8), "za")])
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
                                   .SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"a": xq})[0]
    np.testing.assert_array_equal(got, xq.astype(np.int64) @ w1q.astype(np.int64))
