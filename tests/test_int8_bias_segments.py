"""Bias correction run segment by segment (optcc.quant.bias_correction) against a plain
sequential reference written here: each layer, in graph order, measured by onnxruntime on
the whole QDQ model with the corrections before it written in, its per-channel mean
compared with the float model's. The graph branches (a skip connection, a side branch
read only at the end), so tensors are carried across several segments."""

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

CONVS = ["c1", "side", "c2", "c3", "c4"]


def branching() -> onnx.ModelProto:
    """x -> c1 -> relu -> depthwise c2 -> relu -> + relu(c1) -> c3 ; x -> side conv (read
    only by the final Concat) ; concat(c3, side) -> c4 -> sigmoid. Small weights round up, so the
    quantized means are biased."""
    rng = np.random.default_rng(3)
    step = 1.0 / 127

    def biased(shape: tuple[int, ...]) -> np.ndarray:
        w = np.full(shape, 0.55 * step, np.float32)
        w.reshape(shape[0], -1)[:, 0] = 1.0
        return w

    inits = [nh.from_array((rng.normal(size=(8, 3, 3, 3)) * 0.3).astype(np.float32), "W1"),
             nh.from_array(np.full(8, 0.1, np.float32), "B1"),
             nh.from_array(biased((4, 3, 1, 1)), "WS"),
             nh.from_array(biased((8, 1, 3, 3)), "W2"),
             nh.from_array(biased((8, 8, 1, 1)), "W3"), nh.from_array(np.zeros(8, np.float32), "B3"),
             nh.from_array((rng.normal(size=(4, 12, 1, 1)) * 0.5).astype(np.float32), "W4"),
             nh.from_array(np.full(4, -0.2, np.float32), "B4")]
    nodes = [
        oh.make_node("Conv", ["x", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        oh.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        oh.make_node("Conv", ["x", "WS"], ["side"], name="side_conv"),
        oh.make_node("Conv", ["r1", "W2"], ["c2"], pads=[1, 1, 1, 1], group=8, name="dw"),
        oh.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        oh.make_node("Add", ["r2", "r1"], ["skip"], name="skip_add"),
        oh.make_node("Conv", ["skip", "W3", "B3"], ["c3"], name="conv3"),
        oh.make_node("Concat", ["c3", "side"], ["cat"], axis=1, name="cat"),
        oh.make_node("Conv", ["cat", "W4", "B4"], ["c4"], name="conv4"),
        oh.make_node("Sigmoid", ["c4"], ["y"], name="sigmoid4"),
    ]
    graph = oh.make_graph(nodes, "branching", [oh.make_tensor_value_info("x", TP.FLOAT, ["N", 3, 10, 10])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, ["N", 4, 10, 10])], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


def samples(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.uniform(0, 1, size=(1, 3, 10, 10)).astype(np.float32)} for _ in range(n)]


def channel_mean(proto: onnx.ModelProto, name: str, data: list) -> np.ndarray:
    """float64 per-channel mean of one intermediate over ``data`` (onnxruntime, no graph
    optimization, fetched whole, averaged by numpy)."""
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    del proto.graph.output[:]
    proto.graph.output.append(onnx.ValueInfoProto(name=name))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return np.mean([session.run([name], f)[0].astype(np.float64).mean(axis=(0, 2, 3)) for f in data], axis=0)


def bias_dq(proto: onnx.ModelProto, conv: str) -> tuple[onnx.TensorProto, onnx.TensorProto] | None:
    """(int32 bias initializer, its scale) behind the conv producing ``conv``, or None."""
    node = next(n for n in proto.graph.node if n.output[0] == conv)
    if len(node.input) < 3 or not node.input[2]:
        return None
    dq = next(n for n in proto.graph.node if n.output[0] == node.input[2])
    inits = {t.name: t for t in proto.graph.initializer}
    return inits[dq.input[0]], inits[dq.input[1]]


def reference_biases(float_model: onnx.ModelProto, quantized: onnx.ModelProto, data: list) -> dict[str, np.ndarray]:
    """The sequential correction, layer by layer on the whole model (layers with a bias)."""
    q = onnx.ModelProto.FromString(quantized.SerializeToString())
    out = {}
    for conv in CONVS:
        found = bias_dq(q, conv)
        if found is None:
            continue
        tensor, scale_tensor = found
        error = channel_mean(q, conv, data) - channel_mean(float_model, conv, data)
        scale = nh.to_array(scale_tensor).astype(np.float64)
        bias = nh.to_array(tensor).astype(np.float64) * scale
        new = np.round((bias - error) / scale).astype(np.int32)
        tensor.CopyFrom(nh.from_array(new, tensor.name))
        out[conv] = new
    return out


def test_segmented_correction_equals_sequential_whole_model_reference() -> None:
    model, data = branching(), samples(6, 0)
    ranges = calibrate(model, data, "minmax").ranges
    q = QuantizeInt8Pass(ranges, count_fused=False)(optcc.ir.load(model)).model
    before = optcc.ir.serialize(q)
    stats = correct_biases(optcc.ir.load(model), q, data[:4])
    assert stats["layers"] == len(CONVS)
    # layers without a bias got one: the reference needs them present from the start,
    # so it starts from the corrected model's structure with the original (zero) values
    corrected = optcc.ir.serialize(q)
    start = onnx.ModelProto.FromString(corrected.SerializeToString())
    for conv in CONVS:
        tensor, _ = bias_dq(start, conv)
        found = bias_dq(before, conv)
        original = nh.to_array(found[0]) if found is not None else np.zeros(nh.to_array(tensor).shape, np.int32)
        tensor.CopyFrom(nh.from_array(original, tensor.name))
    expected = reference_biases(model, start, data[:4])
    assert set(expected) == set(CONVS)
    moved = 0
    for conv, want in expected.items():
        got = nh.to_array(bias_dq(corrected, conv)[0])
        # float32 ReduceMean in the graph vs float64 numpy here: at most one int32 step apart
        assert np.abs(got.astype(np.int64) - want).max() <= 1, (conv, got, want)
        moved += int(np.any(want != nh.to_array(bias_dq(start, conv)[0])))
    assert moved >= 3  # the corrections are not all zero
    assert stats["mean_error_after"] < 0.2 * stats["mean_error_before"]


def test_a_conv_whose_relu_became_the_output_quantization_is_not_corrected_toward_the_relu() -> None:
    """Conv -> Relu as the graph output: the quantization absorbs the Relu, so the conv's
    result is renamed and the DQ after it carries the output name; the float model's value
    of that name is the Relu's result, whose mean is not the conv's."""
    model = branching()
    sigmoid = next(n for n in model.graph.node if n.op_type == "Sigmoid")
    sigmoid.op_type = "Relu"
    data = samples(6, 0)
    ranges = calibrate(model, data, "minmax").ranges
    q = QuantizeInt8Pass(ranges, count_fused=False)(optcc.ir.load(model)).model
    conv4 = next(n for n in optcc.ir.serialize(q).graph.node if n.name == "conv4")
    before = bias_dq(optcc.ir.serialize(q), conv4.output[0])
    stats = correct_biases(optcc.ir.load(model), q, data[:4])
    assert stats["layers"] == len(CONVS) - 1  # conv4 has no float counterpart to match
    after = bias_dq(optcc.ir.serialize(q), conv4.output[0])
    np.testing.assert_array_equal(nh.to_array(after[0]), nh.to_array(before[0]))
