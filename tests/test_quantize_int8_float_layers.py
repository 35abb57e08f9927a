"""Layers kept float by QuantizeInt8Pass stay float on onnxruntime.

onnxruntime quantizes, per tensor, the float weights of a Conv, ConvTranspose or Gemm
that reads a per-tensor DequantizeLinear output; the pass feeds such a layer through a
DequantizeLinear with a per-channel (repeated) scale instead. These tests run the
quantized model on onnxruntime with all optimizations and compare it with onnx's
reference evaluator on the same QDQ model (the ONNX semantics, with no such rewrite):
a layer whose weights were re-quantized per tensor would lose its small channels.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh
from onnx.reference import ReferenceEvaluator

import optcc
from optcc.passes.quantize_int8 import QuantizeInt8Pass
from optcc.quant.calibration import calibrate

SEED = 5


def _uneven_channels(rng: np.random.Generator, shape: tuple[int, ...], axis: int) -> np.ndarray:
    """Weights whose slices along ``axis`` span three decades: one int8 scale for the whole
    tensor rounds the smallest slices to zero."""
    w = rng.normal(size=shape).astype(np.float32)
    gains = np.logspace(-3, 0, shape[axis]).astype(np.float32)
    view = [1] * len(shape)
    view[axis] = -1
    return w * gains.reshape(view)


def _model(nodes: list, inits: list, x_shape: list, s_shape: list) -> onnx.ModelProto:
    """``nodes`` computing ``s`` from ``x``, then a 1x1 Conv (or a Gemm) ``third`` (quantized)
    reading ``s``: onnxruntime re-quantizes a float layer whose result is quantized again.
    Outputs: ``s`` (the float layer's result) and ``y``."""
    rng = np.random.default_rng(SEED + 1)
    channels = s_shape[1]
    if len(s_shape) == 4:
        third = oh.make_node("Conv", ["s", "W3"], ["y"], name="third")
        w3, y_shape = (rng.normal(size=(4, channels, 1, 1)) * 0.3).astype(np.float32), ["N", 4, *s_shape[2:]]
    else:
        third = oh.make_node("Gemm", ["s", "W3"], ["y"], name="third")
        w3, y_shape = (rng.normal(size=(channels, 4)) * 0.3).astype(np.float32), ["N", 4]
    graph = oh.make_graph([*nodes, third], "g", [oh.make_tensor_value_info("x", TP.FLOAT, x_shape)],
                          [oh.make_tensor_value_info("s", TP.FLOAT, s_shape),
                           oh.make_tensor_value_info("y", TP.FLOAT, y_shape)],
                          [nh.from_array(a, n) for n, a in [*inits, ("W3", w3)]])
    # opset 19: onnx's reference evaluator implements DequantizeLinear from there
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 19)])


def _conv_model(second: str) -> onnx.ModelProto:
    """Conv (quantized) -> Relu -> ``second`` (Conv or ConvTranspose, 8 output channels of
    uneven size, kept float) -> 1x1 Conv (quantized)."""
    rng = np.random.default_rng(SEED)
    w1 = (rng.normal(size=(6, 3, 3, 3)) * 0.3).astype(np.float32)
    if second == "Conv":
        w2 = _uneven_channels(rng, (8, 6, 3, 3), 0)
        out = ["N", 8, 8, 8]
    else:
        w2 = _uneven_channels(rng, (6, 8, 2, 2), 1)
        out = ["N", 8, 16, 16]
    attrs = {"pads": [1, 1, 1, 1]} if second == "Conv" else {"strides": [2, 2]}
    nodes = [oh.make_node("Conv", ["x", "W1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             oh.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             oh.make_node(second, ["r1", "W2", "B2"], ["s"], name="second", **attrs)]
    bias = np.linspace(-0.01, 0.01, 8).astype(np.float32)
    return _model(nodes, [("W1", w1), ("W2", w2), ("B2", bias)], ["N", 3, 8, 8], out)


def _gemm_model() -> onnx.ModelProto:
    """Gemm (quantized) -> Relu -> Gemm with transB (8 outputs of uneven size, kept float)
    -> Gemm (quantized)."""
    rng = np.random.default_rng(SEED)
    w1 = (rng.normal(size=(16, 12)) * 0.3).astype(np.float32)
    w2 = _uneven_channels(rng, (8, 12), 0)  # transB: [N, K]
    nodes = [oh.make_node("Gemm", ["x", "W1"], ["g1"], name="gemm1"),
             oh.make_node("Relu", ["g1"], ["r1"], name="relu1"),
             oh.make_node("Gemm", ["r1", "W2", "B2"], ["s"], transB=1, name="second")]
    return _model(nodes, [("W1", w1), ("W2", w2), ("B2", np.zeros(8, np.float32))], ["N", 16], ["N", 8])


def _samples(model: onnx.ModelProto, n: int, seed: int) -> list[dict[str, np.ndarray]]:
    dims = [d.dim_value or 2 for d in model.graph.input[0].type.tensor_type.shape.dim]
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=dims).astype(np.float32)} for _ in range(n)]


def _quantize(model: onnx.ModelProto, **options) -> optcc.PassResult:
    ranges = calibrate(model, _samples(model, 8, 1), "minmax").ranges
    return QuantizeInt8Pass(ranges, count_fused=False, **options)(optcc.ir.load(model))


def _onnxruntime(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """``s``, the kept-float layer's result, with all of onnxruntime's optimizations."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(["s"], feeds)[0]


def _assert_float_layer_kept_float(result: optcc.PassResult) -> None:
    """On onnxruntime the kept-float layer computes what the QDQ model says, channel by
    channel, to float rounding (its smallest channel is 1000x below its largest)."""
    proto = optcc.ir.serialize(result.model)
    reference = ReferenceEvaluator(proto)
    for feeds in _samples(proto, 3, 2):
        expected = np.asarray(reference.run(["s"], feeds)[0], np.float64)
        got = _onnxruntime(proto, feeds).astype(np.float64)
        channels = np.moveaxis(expected, 1, 0).reshape(expected.shape[1], -1)
        errors = np.moveaxis(got - expected, 1, 0).reshape(expected.shape[1], -1)
        scale = np.abs(channels).max(axis=1)
        assert scale.min() > 0
        np.testing.assert_array_less(np.abs(errors).max(axis=1), 1e-4 * scale + 1e-7)


def _second_input_dq(result: optcc.PassResult) -> onnx.NodeProto:
    proto = optcc.ir.serialize(result.model)
    producers = {o: n for n in proto.graph.node for o in n.output}
    second = next(n for n in proto.graph.node if n.name == "second")
    return producers[second.input[0]]


def test_excluded_conv_reads_a_per_channel_dq_and_stays_float_on_onnxruntime() -> None:
    result = _quantize(_conv_model("Conv"), exclude=["second"])
    assert result.stats["layers"] == ["conv1", "third"]
    assert result.stats["float_layers_shielded"] == 1
    dq = _second_input_dq(result)
    proto = optcc.ir.serialize(result.model)
    inits = {i.name: nh.to_array(i) for i in proto.graph.initializer}
    assert dq.op_type == "DequantizeLinear" and dq.attribute[0].i == 1
    # the same 8-bit tensor and, repeated over the 6 input channels, the layer's scale
    quantized_relu = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "c1")
    assert dq.input[0] == quantized_relu.output[0]
    assert inits[dq.input[1]].shape == (6,)
    assert np.all(inits[dq.input[1]] == inits[quantized_relu.input[1]])
    assert np.all(inits[dq.input[2]] == inits[quantized_relu.input[2]])
    _assert_float_layer_kept_float(result)


def test_conv_transpose_stays_float_on_onnxruntime() -> None:
    result = _quantize(_conv_model("ConvTranspose"))
    assert result.stats["layers"] == ["conv1", "third"] and result.stats["float_layers_shielded"] == 1
    _assert_float_layer_kept_float(result)


def test_excluded_gemm_stays_float_on_onnxruntime() -> None:
    result = _quantize(_gemm_model(), exclude=["second"])
    assert result.stats["layers"] == ["gemm1", "third"] and result.stats["float_layers_shielded"] == 1
    _assert_float_layer_kept_float(result)


def test_quantized_layers_keep_their_per_tensor_input_dq() -> None:
    result = _quantize(_conv_model("Conv"))
    assert result.stats["float_layers_shielded"] == 0
    dq = _second_input_dq(result)
    proto = optcc.ir.serialize(result.model)
    inits = {i.name: nh.to_array(i) for i in proto.graph.initializer}
    assert inits[dq.input[1]].ndim == 0
