"""Bias correction measures a Conv from its sums computed once: the Conv without its bias,
then an Add of the bias (optcc.quant.bias_correction ``_bias_added``). The corrected biases
must equal, bit for bit, those of a plain sequential reference written here (each layer
measured on the whole QDQ model as written, its Conv adding its own bias, the corrections so
far written in), on convolutions of every kind the layer walk meets: 1-D, strided, padded,
depthwise, grouped, dilated, 1x1 over many channels, and one without a bias. Independently,
numpy in float64 computes the float model's channel means: correcting brings the quantized
model's means closer to them."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
from onnx import TensorProto as TP

import optcc
from optcc.passes.quantize_int8 import QuantizeInt8Pass
from optcc.quant.bias_correction import correct_biases
from optcc.quant.calibration import calibrate
from test_int8_bias_exact import bias_of, channel_mean

# (result, input channels, output channels, kernel, attributes, with a bias)
CONVS2D = [
    ("c1", 3, 8, 3, {"pads": [1, 1, 1, 1]}, True),
    ("dw", 8, 8, 3, {"pads": [1, 1, 1, 1], "group": 8, "strides": [2, 2]}, True),
    ("grouped", 8, 12, 3, {"pads": [2, 2, 2, 2], "group": 4, "dilations": [2, 2]}, False),
    ("wide", 12, 40, 1, {}, True),
    ("mix", 40, 6, 3, {"pads": [0, 1, 0, 1]}, True),
]


def _weights(rng: np.random.Generator, cout: int, cin: int, kernel: tuple[int, ...]) -> np.ndarray:
    w = (rng.normal(size=(cout, cin, *kernel)) * 0.4).astype(np.float32)
    w.reshape(cout, -1)[:, 1:] += 0.45 / 127  # small weights that round one way: a biased error
    return w


def model_2d() -> onnx.ModelProto:
    rng = np.random.default_rng(11)
    nodes, inits, x = [], [], "x"
    for name, cin, cout, k, attrs, biased in CONVS2D:
        w = _weights(rng, cout, cin // attrs.get("group", 1), (k, k))
        inits.append(nh.from_array(w, f"W_{name}"))
        inputs = [x, f"W_{name}"]
        if biased:
            inits.append(nh.from_array((rng.normal(size=cout) * 0.1).astype(np.float32), f"B_{name}"))
            inputs.append(f"B_{name}")
        nodes.append(oh.make_node("Conv", inputs, [name], name=f"conv_{name}", **attrs))
        nodes.append(oh.make_node("Relu", [name], [f"{name}_relu"], name=f"relu_{name}"))
        x = f"{name}_relu"
    nodes.append(oh.make_node("Sigmoid", [x], ["y"], name="sigmoid"))  # the last Conv's result stays its own
    graph = oh.make_graph(nodes, "convs", [oh.make_tensor_value_info("x", TP.FLOAT, [1, 3, 14, 14])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, None)], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


def model_1d() -> onnx.ModelProto:
    rng = np.random.default_rng(12)
    inits = [nh.from_array(_weights(rng, 6, 2, (5,)), "W1"), nh.from_array(np.full(6, 0.05, np.float32), "B1"),
             nh.from_array(_weights(rng, 4, 6, (3,)), "W2"), nh.from_array(np.full(4, -0.1, np.float32), "B2")]
    nodes = [oh.make_node("Conv", ["x", "W1", "B1"], ["a"], pads=[2, 2], name="conv_a"),
             oh.make_node("Relu", ["a"], ["ar"], name="relu_a"),
             oh.make_node("Conv", ["ar", "W2", "B2"], ["b"], strides=[2], name="conv_b"),
             oh.make_node("Sigmoid", ["b"], ["y"], name="sigmoid_b")]
    graph = oh.make_graph(nodes, "conv1d", [oh.make_tensor_value_info("x", TP.FLOAT, [1, 2, 40])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, None)], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


def samples(shape: tuple[int, ...], n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.uniform(0, 1, size=shape).astype(np.float32)} for _ in range(n)]


def sequential(float_model: onnx.ModelProto, start: onnx.ModelProto, layers: list[str], rank: int,
               data: list) -> dict[str, np.ndarray]:
    """``b[c] -= E[y_q[c]] - E[y[c]]`` layer by layer on the whole model, each rounded to the
    int32 grid and written before the next layer is measured."""
    q = onnx.ModelProto.FromString(start.SerializeToString())
    out = {}
    for name in layers:
        tensor, scale = bias_of(q, name)
        error = channel_mean(q, name, rank, data) - channel_mean(float_model, name, rank, data)
        new = np.round((nh.to_array(tensor).astype(np.float64) * scale - error) / scale).astype(np.int32)
        tensor.CopyFrom(nh.from_array(new, tensor.name))
        out[name] = new
    return out


def _corrected(float_model: onnx.ModelProto, shape: tuple[int, ...]
               ) -> tuple[onnx.ModelProto, onnx.ModelProto, list, dict]:
    """(the QDQ model before correction, with a zero int32 bias where correction adds one;
    the corrected model; the samples corrected on; the stats)."""
    data = samples(shape, 6, 0)
    ranges = calibrate(float_model, data, "minmax").ranges
    q = QuantizeInt8Pass(ranges, count_fused=False)(optcc.ir.load(float_model)).model
    before = optcc.ir.serialize(q)
    stats = correct_biases(optcc.ir.load(float_model), q, data[:4])
    after = optcc.ir.serialize(q)
    start = onnx.ModelProto.FromString(after.SerializeToString())
    for node in before.graph.node:  # a layer without a bias got one: it starts from zeros
        if node.op_type == "Conv" and (len(node.input) < 3 or not node.input[2]):
            tensor, _ = bias_of(start, node.output[0])
            tensor.CopyFrom(nh.from_array(np.zeros(nh.to_array(tensor).shape, np.int32), tensor.name))
        elif node.op_type == "Conv":
            tensor, _ = bias_of(start, node.output[0])
            tensor.CopyFrom(bias_of(before, node.output[0])[0])
    return start, after, data[:4], stats


def test_conv_sums_then_bias_give_the_sequential_biases_bit_for_bit() -> None:
    float_model = model_2d()
    start, after, data, stats = _corrected(float_model, (1, 3, 14, 14))
    layers = [name for name, *_ in CONVS2D]
    assert stats["layers"] == len(layers)
    expected = sequential(float_model, start, layers, 4, data)
    for name in layers:
        np.testing.assert_array_equal(nh.to_array(bias_of(after, name)[0]), expected[name], err_msg=name)
    assert sum(np.any(expected[n] != nh.to_array(bias_of(start, n)[0])) for n in layers) == len(layers)


def test_one_dimensional_convs_too() -> None:
    float_model = model_1d()
    start, after, data, stats = _corrected(float_model, (1, 2, 40))
    assert stats["layers"] == 2
    expected = sequential(float_model, start, ["a", "b"], 3, data)
    for name in ("a", "b"):
        np.testing.assert_array_equal(nh.to_array(bias_of(after, name)[0]), expected[name], err_msg=name)


def _conv64(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, pads: list[int], strides: list[int],
            dilations: list[int], group: int) -> np.ndarray:
    """A 2-D convolution in float64, written out (N = 1)."""
    x = np.pad(x[0].astype(np.float64), ((0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    cout, cin_g, kh, kw = w.shape
    out_h = (x.shape[1] - dilations[0] * (kh - 1) - 1) // strides[0] + 1
    out_w = (x.shape[2] - dilations[1] * (kw - 1) - 1) // strides[1] + 1
    y = np.zeros((cout, out_h, out_w))
    per_group = cout // group
    for o in range(cout):
        g = o // per_group
        for i in range(kh):
            for j in range(kw):
                patch = x[g * cin_g:(g + 1) * cin_g,
                          i * dilations[0]:i * dilations[0] + strides[0] * (out_h - 1) + 1:strides[0],
                          j * dilations[1]:j * dilations[1] + strides[1] * (out_w - 1) + 1:strides[1]]
                y[o] += np.tensordot(w[o, :, i, j].astype(np.float64), patch, axes=1)
        if b is not None:
            y[o] += b[o]
    return y[None]


def test_correction_moves_the_quantized_means_to_a_float64_numpy_reference() -> None:
    """The float model's channel means, computed by numpy in float64 (not onnxruntime): the
    corrected model's layer means are closer to them than the uncorrected ones."""
    float_model = model_2d()
    start, after, data, _ = _corrected(float_model, (1, 3, 14, 14))
    weights = {t.name: nh.to_array(t) for t in float_model.graph.initializer}
    means: dict[str, np.ndarray] = {}
    for feeds in data:
        x = feeds["x"]
        for name, _, _, _, attrs, biased in CONVS2D:
            y = _conv64(x, weights[f"W_{name}"], weights.get(f"B_{name}") if biased else None,
                        attrs.get("pads", [0, 0, 0, 0]), attrs.get("strides", [1, 1]),
                        attrs.get("dilations", [1, 1]), attrs.get("group", 1))
            means[name] = means.get(name, 0.0) + y.mean(axis=(0, 2, 3)) / len(data)
            x = np.maximum(y, 0.0)
    for name, *_ in CONVS2D:
        before = np.abs(channel_mean(start, name, 4, data) - means[name]).mean()
        corrected = np.abs(channel_mean(after, name, 4, data) - means[name]).mean()
        assert corrected < 0.5 * before, (name, corrected, before)
