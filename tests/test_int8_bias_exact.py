"""Bias correction (optcc.quant.bias_correction) equals, bit for bit, a plain sequential
reference written here: for each corrected layer in graph order, the whole QDQ model (its
weights dequantized by their DequantizeLinear nodes on every run, the corrections so far
written into the int32 biases) run by onnxruntime without graph optimizations, a float32
ReduceMean over every axis but the channels appended to the layer's result, averaged over
the samples in float64; the float model's means the same way. The segmented measurement
dequantizes each weight once and hands it to its sessions as an initializer, carries
copies of activations between segments and hands large weights over in place: none of it
may change a single bias. The model has a Gemm whose dequantized weight is over 4 MB (so
it is handed over in place, not inlined) and a skip connection carried across segments."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
import onnxruntime as ort
from onnx import TensorProto as TP

import optcc
from optcc.passes.quantize_int8 import QuantizeInt8Pass
from optcc.quant.bias_correction import correct_biases
from optcc.quant.calibration import calibrate

HIDDEN = 160  # the first Gemm's weight: 160 x 8192 floats, 5.2 MB


def model() -> onnx.ModelProto:
    """conv1 -> relu -> conv2 -> relu -> + relu(conv1) -> conv3 -> flatten -> gemm1 -> relu -> gemm2 -> sigmoid."""
    rng = np.random.default_rng(7)

    def w(*shape: int, s: float = 0.3) -> np.ndarray:
        return (rng.normal(size=shape) * s).astype(np.float32)

    inits = [nh.from_array(w(16, 3, 3, 3), "W1"), nh.from_array(w(16, s=0.1), "B1"),
             nh.from_array(w(16, 16, 3, 3, s=0.1), "W2"), nh.from_array(w(16, s=0.1), "B2"),
             nh.from_array(w(32, 16, 1, 1), "W3"), nh.from_array(w(32, s=0.1), "B3"),
             nh.from_array(w(HIDDEN, 32 * 16 * 16, s=0.02), "G1"), nh.from_array(w(HIDDEN, s=0.1), "C1"),
             nh.from_array(w(HIDDEN, 10, s=0.1), "G2"), nh.from_array(w(10, s=0.1), "C2")]
    nodes = [
        oh.make_node("Conv", ["x", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        oh.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        oh.make_node("Conv", ["r1", "W2", "B2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        oh.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        oh.make_node("Add", ["r2", "r1"], ["skip"], name="skip"),
        oh.make_node("Conv", ["skip", "W3", "B3"], ["c3"], name="conv3"),
        oh.make_node("Flatten", ["c3"], ["flat"], axis=1, name="flatten"),
        oh.make_node("Gemm", ["flat", "G1", "C1"], ["g1"], transB=1, name="gemm1"),
        oh.make_node("Relu", ["g1"], ["h"], name="relu3"),
        oh.make_node("Gemm", ["h", "G2", "C2"], ["g2"], name="gemm2"),
        oh.make_node("Sigmoid", ["g2"], ["y"], name="sigmoid"),
    ]
    graph = oh.make_graph(nodes, "exact", [oh.make_tensor_value_info("x", TP.FLOAT, [1, 3, 16, 16])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, [1, 10])], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


def samples(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.uniform(0, 1, size=(1, 3, 16, 16)).astype(np.float32)} for _ in range(n)]


def channel_mean(proto: onnx.ModelProto, name: str, rank: int, data: list) -> np.ndarray:
    """float64 average over ``data`` of a float32 ReduceMean over every axis but 1 of ``name``,
    on the whole model (onnxruntime, no graph optimization)."""
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    proto.graph.node.append(oh.make_node("ReduceMean", [name], ["m"], axes=[0, *range(2, rank)], keepdims=0))
    del proto.graph.output[:]
    proto.graph.output.append(onnx.ValueInfoProto(name="m"))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    total = 0.0
    for feeds in data:
        total = total + session.run(["m"], feeds)[0].astype(np.float64) / len(data)
    return total


def bias_of(proto: onnx.ModelProto, result: str) -> tuple[onnx.TensorProto, np.ndarray]:
    """(the int32 bias initializer, its float64 scale) of the layer producing ``result``."""
    node = next(n for n in proto.graph.node if n.output[0] == result)
    dq = next(n for n in proto.graph.node if n.output[0] == node.input[2])
    inits = {t.name: t for t in proto.graph.initializer}
    assert dq.op_type == "DequantizeLinear" and inits[dq.input[0]].data_type == TP.INT32
    return inits[dq.input[0]], nh.to_array(inits[dq.input[1]]).astype(np.float64)


def reference(float_model: onnx.ModelProto, quantized: onnx.ModelProto, layers: list[tuple[str, int]],
              data: list) -> dict[str, np.ndarray]:
    """Sequential correction on the whole model: ``b[c] -= E[y_q[c]] - E[y[c]]``, rounded to the
    int32 grid and written before the next layer is measured."""
    q = onnx.ModelProto.FromString(quantized.SerializeToString())
    out = {}
    for name, rank in layers:
        tensor, scale = bias_of(q, name)
        error = channel_mean(q, name, rank, data) - channel_mean(float_model, name, rank, data)
        bias = nh.to_array(tensor).astype(np.float64) * scale
        new = np.round((bias - error) / scale).astype(np.int32)
        tensor.CopyFrom(nh.from_array(new, tensor.name))
        out[name] = new
    return out


def test_corrected_biases_equal_the_whole_model_sequential_reference_bit_for_bit() -> None:
    float_model, data = model(), samples(6, 0)
    ranges = calibrate(float_model, data, "minmax").ranges
    q = QuantizeInt8Pass(ranges, count_fused=False)(optcc.ir.load(float_model)).model
    before = optcc.ir.serialize(q)
    gemm = next(n for n in before.graph.node if n.output[0] == "g1")
    weight_dq = next(n for n in before.graph.node if n.output[0] == gemm.input[1])
    assert weight_dq.op_type == "DequantizeLinear"  # the Gemm is quantized: its weight is dequantized
    layers = [("c1", 4), ("c2", 4), ("c3", 4), ("g1", 2), ("g2", 2)]
    expected = reference(float_model, before, layers, data[:4])

    stats = correct_biases(optcc.ir.load(float_model), q, data[:4])

    assert stats["layers"] == len(layers)
    after = optcc.ir.serialize(q)
    moved = 0
    for name, _ in layers:
        got = nh.to_array(bias_of(after, name)[0])
        np.testing.assert_array_equal(got, expected[name], err_msg=name)
        moved += int(np.any(got != nh.to_array(bias_of(before, name)[0])))
    assert moved == len(layers)  # every layer's correction is measured, not all zero


def test_the_float_model_is_left_as_it_was() -> None:
    """The reference model's weights are handed to onnxruntime in place: none is changed."""
    float_model, data = model(), samples(4, 1)
    ranges = calibrate(float_model, data, "minmax").ranges
    reference_ir = optcc.ir.load(float_model)
    q = QuantizeInt8Pass(ranges, count_fused=False)(optcc.ir.load(float_model)).model
    correct_biases(reference_ir, q, data)
    kept = {t.name: nh.to_array(t) for t in optcc.ir.serialize(reference_ir).graph.initializer}
    for init in float_model.graph.initializer:
        np.testing.assert_array_equal(kept[init.name], nh.to_array(init), err_msg=init.name)
