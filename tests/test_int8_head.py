"""INT8: the output head's logits stay float; the driver folds Conv affine blocks first."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh

import optcc
from reference import lossy_metrics, onnxruntime_outputs
from optcc.quant.calibration import calibrate
from optcc.passes.quantize_int8 import QuantizeInt8Pass
from optcc.quant.driver import quantize_int8

SEED = 0


def _model(nodes: list, inits: list, out: str, out_shape: list) -> onnx.ModelProto:
    graph = oh.make_graph(
        nodes, "g", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
        [oh.make_tensor_value_info(out, onnx.TensorProto.FLOAT, out_shape)], inits,
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    return model


def head_model() -> onnx.ModelProto:
    """Conv-Relu-Conv-Sigmoid gate (x*sigmoid(x), inside) - Reshape-MatMul-Add(bias)-Softmax."""
    rng = np.random.default_rng(SEED)
    inits = [
        nh.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32) * 0.3, "W1"),
        nh.from_array(rng.normal(size=(8, 8, 1, 1)).astype(np.float32) * 0.3, "W2"),
        nh.from_array(np.array([1, 512], np.int64), "shape"),
        nh.from_array(rng.normal(size=(512, 10)).astype(np.float32) * 0.05, "Wfc"),
        nh.from_array(rng.normal(size=10).astype(np.float32), "Bfc"),
    ]
    nodes = [
        oh.make_node("Conv", ["x", "W1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        oh.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        oh.make_node("Conv", ["r1", "W2"], ["c2"], name="conv2"),
        oh.make_node("Sigmoid", ["c2"], ["s2"], name="gate"),
        oh.make_node("Mul", ["c2", "s2"], ["m2"], name="swish"),
        oh.make_node("Reshape", ["m2", "shape"], ["f"], name="flatten"),
        oh.make_node("MatMul", ["f", "Wfc"], ["mm"], name="fc"),
        oh.make_node("Add", ["mm", "Bfc"], ["logits"], name="bias"),
        oh.make_node("Softmax", ["logits"], ["probs"], axis=-1, name="softmax"),
    ]
    return _model(nodes, inits, "probs", [1, 10])


def _samples(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(n)]


def _argmax_agreement(original: onnx.ModelProto, quantized, samples) -> float:
    """Top-1 agreement along the last axis of the single [N, C] output of ``quantized``
    against the float32 ``original``, both run on onnxruntime, over all ``samples``."""
    quantized = quantized if isinstance(quantized, onnx.ModelProto) else optcc.ir.serialize(quantized)
    pairs = [(onnxruntime_outputs(original, f)[0], onnxruntime_outputs(quantized, f)[0]) for f in samples]
    return float(np.mean(np.concatenate([np.argmax(r, -1) == np.argmax(g, -1) for r, g in pairs])))


def _by_name(model, name):  # noqa: ANN001, ANN202
    return next(n for n in model.graph if n.name == name)


def test_logits_of_the_output_head_stay_float() -> None:
    proto = head_model()
    model = optcc.ir.load(proto)
    ranges = calibrate(model, _samples(8, 1), "minmax").ranges
    result = QuantizeInt8Pass(ranges, count_fused=False)(model)
    q = result.model
    assert result.stats["quantized"]["Conv"] == 2 and result.stats["quantized"]["MatMul"] == 1
    assert result.stats["kept_float"].get(
        "logits of an output head (Add/Mul with a constant before Softmax/Sigmoid)"
    ) == 1
    fc, bias = _by_name(q, "fc"), _by_name(q, "bias")
    # the MatMul reads quantized data and weights, writes float logits into the float bias Add
    assert fc.inputs[0].producer().op_type == "DequantizeLinear"
    assert fc.inputs[1].producer().op_type == "DequantizeLinear"
    assert [u.node for u in fc.outputs[0].uses()] == [bias]
    assert [u.node.op_type for u in bias.outputs[0].uses()] == ["Softmax"]
    # an inner Sigmoid (a gate) is not a head: conv2's result is still quantized
    (use,) = {u.node.op_type for u in _by_name(q, "conv2").outputs[0].uses()}
    assert use == "QuantizeLinear"
    assert [v.name for v in q.graph.outputs] == ["probs"]
    samples = _samples(4, 2)
    ((sqnr, cosine),) = lossy_metrics(proto, q, samples)
    agree = _argmax_agreement(proto, q, samples)
    assert sqnr >= 25 and cosine >= 0.99 and agree == 1.0, (sqnr, cosine, agree)
    again = QuantizeInt8Pass(ranges, count_fused=False)(q)
    assert not again.modified


def test_driver_folds_conv_affine_before_quantizing() -> None:
    """Conv -> Mul(c) -> Add(c) (PP-LCNet's learnable affine after a conv) is folded into
    the Conv first, so it costs no extra 8-bit rounding."""
    rng = np.random.default_rng(SEED)
    inits = [
        nh.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32) * 0.3, "W1"),
        nh.from_array(np.array(1.7, np.float32), "scale"),
        nh.from_array(np.array(0.2, np.float32), "shift"),
        nh.from_array(rng.normal(size=(4, 8, 1, 1)).astype(np.float32) * 0.3, "W2"),
    ]
    nodes = [
        oh.make_node("Conv", ["x", "W1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        oh.make_node("Mul", ["c1", "scale"], ["m1"], name="affine_mul"),
        oh.make_node("Add", ["m1", "shift"], ["a1"], name="affine_add"),
        oh.make_node("Relu", ["a1"], ["r1"], name="relu1"),
        oh.make_node("Conv", ["r1", "W2"], ["y"], name="conv2"),
    ]
    proto = _model(nodes, inits, "y", [1, 4, 8, 8])
    quantized, stats = quantize_int8(proto, _samples(10, 3), holdout_fraction=0.2, require_speedup=False)
    hist = optcc.ir.op_histogram(quantized)
    assert "float_fusions" in stats and "fuse-conv-affine" in stats["float_fusions"]
    assert hist.get("Mul", 0) == 0 and hist.get("Add", 0) == 0 and hist["Conv"] == 2
    assert stats["pass"]["quantized"]["Conv"] == 2
    assert stats["fallback"]["target_met"], stats["fallback"]
    # the input model is untouched
    assert [n.op_type for n in proto.graph.node] == ["Conv", "Mul", "Add", "Relu", "Conv"]
    ((sqnr, cosine),) = lossy_metrics(proto, quantized, _samples(4, 4))  # a feature map: no argmax
    assert sqnr >= 25 and cosine >= 0.99, (sqnr, cosine)
