"""Weight-only INT8 of convolutions (quantize-weights with bits=8): per-output-channel int8
weights behind a per-axis DequantizeLinear, activations float, and bias correction from
calibration samples.

References are independent of optcc: the levels against a numpy RTN, the outputs against
onnx's reference evaluator running the float graph with W_hat and the expected bias, and
each bias shift against a numpy computation of ``E[conv(x, W - W_hat)]`` from the float
model's conv inputs (sum over kernel taps of ``dW`` times the mean input patch)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh
from onnx.reference import ReferenceEvaluator

import optcc
from optcc.passes.quantize_weights import QuantizeWeightsPass

import onnx_ir as ir


def _conv_net(opset: int = 12, *, constant_node_weight: bool = False, bias: bool = True) -> onnx.ModelProto:
    """x[N,4,12,12] -> Conv 3x3 pad 1 (bias) -> Relu -> depthwise Conv 3x3 stride 2 dilation 1
    (no bias) -> Conv 1x1 group 2 (bias) -> ConvTranspose 2x2 stride 2 (bias) -> y."""
    rng = np.random.default_rng(1)
    w1 = rng.normal(size=(8, 4, 3, 3)).astype(np.float32) * 0.3
    w2 = rng.normal(size=(8, 1, 3, 3)).astype(np.float32) * 0.5
    w3 = rng.normal(size=(6, 4, 1, 1)).astype(np.float32) * 0.4
    w4 = rng.normal(size=(6, 5, 2, 2)).astype(np.float32) * 0.3  # ConvTranspose: [C_in, C_out, k, k]
    inits = [nh.from_array(w2, "W2"), nh.from_array(w3, "W3"), nh.from_array(w4, "W4"),
             nh.from_array(rng.normal(size=6).astype(np.float32), "B3"),
             nh.from_array(rng.normal(size=5).astype(np.float32), "B4")]
    nodes = []
    if constant_node_weight:
        nodes.append(oh.make_node("Constant", [], ["W1"], value=nh.from_array(w1, "W1")))
    else:
        inits.append(nh.from_array(w1, "W1"))
    conv1 = ["x", "W1"]
    if bias:
        inits.append(nh.from_array(rng.normal(size=8).astype(np.float32), "B1"))
        conv1.append("B1")
    nodes += [
        oh.make_node("Conv", conv1, ["h1"], pads=[1, 1, 1, 1], name="conv1"),
        oh.make_node("Relu", ["h1"], ["r1"]),
        oh.make_node("Conv", ["r1", "W2"], ["h2"], group=8, strides=[2, 2], pads=[1, 1, 1, 1], name="conv2"),
        oh.make_node("Conv", ["h2", "W3", "B3"], ["h3"], group=2, name="conv3"),
        oh.make_node("ConvTranspose", ["h3", "W4", "B4"], ["y"], strides=[2, 2], name="deconv"),
    ]
    graph = oh.make_graph(nodes, "convs", [oh.make_tensor_value_info("x", TP.FLOAT, ["N", 4, 12, 12])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, None)], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])


def _samples(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)  # image-like: non-negative, non-zero mean
    return [{"x": rng.uniform(0.0, 1.0, size=(1, 4, 12, 12)).astype(np.float32)} for _ in range(n)]


def _quantize(model: onnx.ModelProto, **options) -> tuple[onnx.ModelProto, dict]:
    result = QuantizeWeightsPass(bits=8, **options)(ir.from_proto(model))
    out = ir.to_proto(result.model)
    onnx.checker.check_model(out, full_check=True)
    return out, result.stats


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: nh.to_array(t) for t in model.graph.initializer}


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers and Constant-node tensors of a float model."""
    found = _initializers(model)
    for node in model.graph.node:
        if node.op_type == "Constant":
            found[node.output[0]] = nh.to_array(node.attribute[0].t)
    return found


def _rtn_int8(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy reference: per slice along ``axis``, the value of largest magnitude maps to -128."""
    moved = np.moveaxis(w.astype(np.float64), axis, 0).reshape(w.shape[axis], -1)
    v = moved[np.arange(len(moved)), np.argmax(np.abs(moved), axis=1)]
    scale = (v / -128.0).astype(np.float32)
    scale = np.where(scale == 0, np.float32(1), scale)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.rint(w / scale.astype(np.float64).reshape(shape)), -128, 127)
    return q.astype(np.int8), scale


def _dequantized(quantized: onnx.ModelProto) -> dict[str, tuple[np.ndarray, int]]:
    """Each DequantizeLinear's reader input name -> (W_hat as DequantizeLinear computes it, axis)."""
    inits = _initializers(quantized)
    found = {}
    for node in quantized.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        q, scale = inits[node.input[0]], inits[node.input[1]]
        axis = next(a.i for a in node.attribute if a.name == "axis")
        assert q.dtype == np.int8 and len(node.input) == 2  # symmetric: no zero point
        shape = [1] * q.ndim
        shape[axis] = -1
        found[node.output[0]] = (q.astype(np.float32) * scale.reshape(shape), axis)
    return found


def _evaluate(quantized: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The quantized model on onnx's reference evaluator. It implements DequantizeLinear from
    opset 19 on; the ops here (Conv, ConvTranspose, Relu, int8 DequantizeLinear without a
    zero point) mean the same at 13 and 19, so only the import's number is raised."""
    copy = onnx.ModelProto()
    copy.CopyFrom(quantized)
    for opset in copy.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, 19)
    return ReferenceEvaluator(copy).run(None, feeds)[0]


def _conv_of(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def _with(model: onnx.ModelProto, replace: dict[str, np.ndarray]) -> onnx.ModelProto:
    """``model`` with the convs' weights/biases named in ``replace`` ("<node>:<input index>")
    fed from new initializers."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for key, array in replace.items():
        node_name, idx = key.split(":")
        node = _conv_of(copy, node_name)
        name = f"{key.replace(':', '_')}_replaced"
        while len(node.input) <= int(idx):
            node.input.append("")
        node.input[int(idx)] = name
        copy.graph.initializer.append(nh.from_array(array.astype(np.float32), name))
    return copy


def _mean_patch_shift(x: np.ndarray, dw: np.ndarray, group: int, stride: int, pad: int) -> np.ndarray:
    """E over samples and output positions of conv(x, dW) per output channel, as the sum over
    kernel taps of dW times the mean (over samples and positions) of the input patch."""
    n, c, h, w = x.shape
    k = dw.shape[2]
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh_, ow_ = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    patch = np.empty((c, k, k))
    for i in range(k):
        for j in range(k):
            patch[:, i, j] = xp[:, :, i:i + stride * oh_:stride, j:j + stride * ow_:stride][:, :, :oh_, :ow_].mean(axis=(0, 2, 3))
    out_per_group, in_per_group = dw.shape[0] // group, c // group
    shift = np.empty(dw.shape[0])
    for o in range(dw.shape[0]):
        g = o // out_per_group
        shift[o] = np.sum(dw[o].astype(np.float64) * patch[g * in_per_group:(g + 1) * in_per_group])
    return shift


def test_levels_and_outputs_without_samples() -> None:
    model = _conv_net()
    quantized, stats = _quantize(model)
    ops = [n.op_type for n in quantized.graph.node]
    assert ops.count("DequantizeLinear") == 4 and stats["quantized"] == {"Conv int8": 3, "ConvTranspose int8": 1}
    assert stats["bias_correction"]["corrected"] == 0 and "no calibration samples" in stats["bias_correction"]["note"]
    assert not any(i.data_type == TP.FLOAT and len(i.dims) == 4 for i in quantized.graph.initializer)
    assert {o.version for o in quantized.opset_import if o.domain == ""} == {13}  # per-axis DQ, no more
    weights, dq = _weights(model), _dequantized(quantized)
    replace = {}
    for node_name, w_name, axis in (("conv1", "W1", 0), ("conv2", "W2", 0), ("conv3", "W3", 0), ("deconv", "W4", 1)):
        node = _conv_of(quantized, node_name)
        w_hat, got_axis = dq[node.input[1]]
        q, scale = _rtn_int8(weights[w_name], axis)
        shape = [1] * q.ndim
        shape[axis] = -1
        assert got_axis == axis
        np.testing.assert_array_equal(w_hat, q.astype(np.float32) * scale.reshape(shape))
        assert np.all(np.abs(w_hat - weights[w_name]) <= np.abs(scale.reshape(shape)) / 2 * (1 + 1e-6))
        if len(node.input) > 2:  # no samples: the biases are the float ones
            np.testing.assert_array_equal(_initializers(quantized)[node.input[2]],
                                          weights[_conv_of(model, node_name).input[2]])
        replace[f"{node_name}:1"] = w_hat
    x = _samples(1, 5)[0]
    want = ReferenceEvaluator(_with(model, replace)).run(None, x)[0]
    got = _evaluate(quantized, x)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    session = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, x)[0], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("constant_node_weight", [False, True])
def test_bias_correction_matches_the_mean_patch_formula(constant_node_weight: bool) -> None:
    model = _conv_net(constant_node_weight=constant_node_weight)
    calib = _samples(6, 0)
    quantized, stats = _quantize(model, samples=calib)
    assert stats["bias_correction"]["corrected"] == 4 and stats["bias_correction"]["samples"] == 6
    assert not any(n.op_type == "Constant" for n in quantized.graph.node)  # the float weight is gone
    weights, dq, inits = _weights(model), _dequantized(quantized), _initializers(quantized)
    x = np.concatenate([s["x"] for s in calib])
    r1, h2, h3 = ReferenceEvaluator(model).run(["r1", "h2", "h3"], {"x": x})  # the float model's conv inputs
    replace = {}
    for node_name, w_name, x_in, group, stride, pad in (("conv1", "W1", x, 1, 1, 1), ("conv2", "W2", r1, 8, 2, 1),
                                                         ("conv3", "W3", h2, 2, 1, 0)):
        node = _conv_of(quantized, node_name)
        w_hat = dq[node.input[1]][0]
        shift = _mean_patch_shift(x_in, weights[w_name].astype(np.float64) - w_hat, group, stride, pad)
        float_node = _conv_of(model, node_name)
        bias = weights[float_node.input[2]].astype(np.float64) if len(float_node.input) > 2 else 0.0
        got = inits[node.input[2]].astype(np.float64)
        np.testing.assert_allclose(got, bias + shift, rtol=0, atol=1e-5 * (1 + np.abs(bias + shift).max()))
        replace[f"{node_name}:1"], replace[f"{node_name}:2"] = w_hat, got
    # ConvTranspose: the shift by the definition (mean of its float64 result with dW)
    node = _conv_of(quantized, "deconv")
    w_hat = dq[node.input[1]][0]
    dw = weights["W4"].astype(np.float64) - w_hat
    single = oh.make_model(oh.make_graph(
        [oh.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2])], "t",
        [oh.make_tensor_value_info("x", TP.DOUBLE, None), oh.make_tensor_value_info("w", TP.DOUBLE, None)],
        [oh.make_tensor_value_info("y", TP.DOUBLE, None)]), opset_imports=[oh.make_opsetid("", 13)])
    shift = ReferenceEvaluator(single).run(None, {"x": h3.astype(np.float64), "w": dw})[0].mean(axis=(0, 2, 3))
    want_bias = weights["B4"].astype(np.float64) + shift
    np.testing.assert_allclose(inits[node.input[2]], want_bias, rtol=0, atol=1e-5 * (1 + np.abs(want_bias).max()))
    replace["deconv:1"], replace["deconv:2"] = w_hat, inits[node.input[2]]
    # the quantized model computes exactly the float graph with W_hat and the corrected biases
    held = _samples(1, 9)[0]
    want = ReferenceEvaluator(_with(model, replace)).run(None, held)[0]
    np.testing.assert_allclose(_evaluate(quantized, held), want, rtol=1e-6, atol=1e-6)


def test_bias_correction_lowers_the_mean_output_error() -> None:
    model = _conv_net(bias=False)  # conv1 gets a bias from the correction
    calib, held = _samples(8, 0), _samples(8, 3)
    plain, _ = _quantize(model)
    corrected, stats = _quantize(model, samples=calib)
    assert len(_conv_of(corrected, "conv1").input) == 3 and len(_conv_of(plain, "conv1").input) == 2

    def channel_error(candidate: onnx.ModelProto, data: list[dict[str, np.ndarray]]) -> float:
        x = {"x": np.concatenate([s["x"] for s in data])}
        ref = ReferenceEvaluator(model).run(None, x)[0].astype(np.float64)
        got = _evaluate(candidate, x).astype(np.float64)
        return float(np.abs((got - ref).mean(axis=(0, 2, 3))).mean())

    for data in (calib, held):
        before, after = channel_error(plain, data), channel_error(corrected, data)
        assert after < 0.5 * before, (before, after)


def test_shared_weight_is_dequantized_once_and_each_conv_corrected() -> None:
    rng = np.random.default_rng(2)
    w = rng.normal(size=(4, 4, 3, 3)).astype(np.float32)
    graph = oh.make_graph(
        [oh.make_node("Conv", ["x", "W", "B"], ["a"], pads=[1, 1, 1, 1], name="c1"),
         oh.make_node("Relu", ["a"], ["r"]),
         oh.make_node("Conv", ["r", "W", "B"], ["y"], pads=[1, 1, 1, 1], name="c2")],
        "shared", [oh.make_tensor_value_info("x", TP.FLOAT, [1, 4, 12, 12])],
        [oh.make_tensor_value_info("y", TP.FLOAT, [1, 4, 12, 12])],
        [nh.from_array(w, "W"), nh.from_array(np.zeros(4, np.float32), "B")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 13)])
    calib = _samples(4, 0)
    quantized, stats = _quantize(model, samples=calib)
    c1, c2 = _conv_of(quantized, "c1"), _conv_of(quantized, "c2")
    assert [n.op_type for n in quantized.graph.node].count("DequantizeLinear") == 1 and c1.input[1] == c2.input[1]
    assert c1.input[2] != c2.input[2] and "B" not in _initializers(quantized)
    w_hat = _dequantized(quantized)[c1.input[1]][0]
    x = np.concatenate([s["x"] for s in calib])
    r = ReferenceEvaluator(model).run(["r"], {"x": x})[0]
    inits = _initializers(quantized)
    for node, x_in in ((c1, x), (c2, r)):
        want = _mean_patch_shift(x_in, w.astype(np.float64) - w_hat, 1, 1, 1)
        np.testing.assert_allclose(inits[node.input[2]], want, rtol=0, atol=1e-5 * (1 + np.abs(want).max()))


def _single_conv(extra_nodes: list, inputs: list, inits: list, weight: str = "W") -> onnx.ModelProto:
    graph = oh.make_graph(
        [*extra_nodes, oh.make_node("Conv", ["x", weight], ["y"], name="conv")], "one",
        [oh.make_tensor_value_info("x", TP.FLOAT, [1, 4, 8, 8]), *inputs],
        [oh.make_tensor_value_info("y", TP.FLOAT, None)], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 13)])


def test_weights_left_alone() -> None:
    w = np.random.default_rng(3).normal(size=(4, 4, 3, 3)).astype(np.float32)
    w_info = oh.make_tensor_value_info("W", TP.FLOAT, [4, 4, 3, 3])
    cases = {
        # the weight also read as an activation (another role): Conv(W, W)
        "weight shared with another op": _single_conv(
            [oh.make_node("Conv", ["W", "W"], ["z"], name="self")], [], [nh.from_array(w, "W")]),
        # ... and as an Add operand
        "weight shared with another op ": _single_conv(
            [oh.make_node("Add", ["W", "W"], ["z"])], [], [nh.from_array(w, "W")]),
        "weight is a graph input": _single_conv([], [w_info], [nh.from_array(w, "W")]),
        "weight not a constant": _single_conv(
            [oh.make_node("Mul", ["V", "V"], ["W2"])], [oh.make_tensor_value_info("V", TP.FLOAT, [4, 4, 3, 3])],
            [], weight="W2"),
    }
    for reason, model in cases.items():
        if "Add" in [n.op_type for n in model.graph.node]:
            model.graph.output.append(oh.make_tensor_value_info("z", TP.FLOAT, None))
        result = QuantizeWeightsPass(bits=8, samples=_samples(2, 0))(ir.from_proto(model))
        assert not result.modified, reason
        assert result.stats["kept_float"].get(reason.strip(), 0) >= 1, (reason, result.stats)


def test_int4_and_turned_off_leave_convs_float_and_second_run_changes_nothing() -> None:
    model = _conv_net()
    assert not QuantizeWeightsPass(bits=4)(ir.from_proto(model)).modified
    assert not QuantizeWeightsPass(bits=8, convs=False)(ir.from_proto(model)).modified
    once = QuantizeWeightsPass(bits=8)(ir.from_proto(model)).model
    assert not QuantizeWeightsPass(bits=8)(once).modified


def test_optimize_weight_only_int8_with_samples_end_to_end() -> None:
    model = _conv_net()
    calib = _samples(4, 0)
    result = optcc.optimize(model, weight_only={"bits": 8, "samples": calib}, verify=False)
    stats = next(r.stats for r in result.report.passes if r.name == "quantize-weights")
    assert stats["bias_correction"]["corrected"] == 4
    out = result.model
    x = _samples(1, 7)[0]
    ref = ReferenceEvaluator(model).run(None, x)[0]
    got = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    signal, noise = float(np.sum(ref.astype(np.float64) ** 2)), float(np.sum((ref - got).astype(np.float64) ** 2))
    assert 10 * np.log10(signal / noise) > 30
    weight_bytes = lambda m: sum(nh.to_array(t).nbytes for t in m.graph.initializer)  # noqa: E731
    assert weight_bytes(out) < 0.4 * weight_bytes(model)


def test_real_ppocr_classifier_with_constant_node_weights() -> None:
    """PP-OCR mobile cls as exported (opset 11, every weight a Constant node), the pass alone:
    each Conv reads int8 per channel, and the model computes the float graph with W_hat and
    the corrected biases; the first layer's shift against the numpy mean-patch formula."""
    from fixtures.corpus import CorpusUnavailable, fetch, find_model

    try:
        path = fetch(find_model("ppocr-mobile-cls"))
    except (CorpusUnavailable, KeyError) as e:
        pytest.skip(f"corpus model ppocr-mobile-cls unavailable (offline?): {e}")
    model = onnx.load(path)
    rng = np.random.default_rng(0)
    calib = [{"x": rng.uniform(-1.0, 1.0, size=(1, 3, 48, 192)).astype(np.float32)} for _ in range(3)]
    matmuls = [n.output[0] for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]  # kept float here
    result = QuantizeWeightsPass(bits=8, samples=calib, exclude=matmuls)(ir.from_proto(model))
    quantized = ir.to_proto(result.model)
    assert {o.version for o in quantized.opset_import if o.domain == ""} == {13}
    convs = sum(n.op_type == "Conv" for n in model.graph.node)
    assert result.stats["quantized"] == {"Conv int8": convs} and result.stats["bias_correction"]["corrected"] == convs
    assert not any(n.op_type == "Constant" and len(nh.to_array(n.attribute[0].t).shape) == 4
                   for n in quantized.graph.node)
    dq, inits = _dequantized(quantized), _initializers(quantized)
    # the float model, every conv fed W_hat and the corrected bias from new initializers
    replaced = onnx.ModelProto()
    replaced.CopyFrom(model)
    by_output = {n.output[0]: n for n in quantized.graph.node if n.op_type == "Conv"}
    for node in (n for n in replaced.graph.node if n.op_type == "Conv"):
        mine = by_output[node.output[0]]
        w_name, b_name = f"{node.output[0]}_w_hat", f"{node.output[0]}_b"
        replaced.graph.initializer.extend([nh.from_array(dq[mine.input[1]][0], w_name),
                                           nh.from_array(inits[mine.input[2]], b_name)])
        node.input[1:] = [w_name, b_name]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    run = lambda m: ort.InferenceSession(m.SerializeToString(), options,  # noqa: E731
                                         providers=["CPUExecutionProvider"]).run(None, calib[0])[0]
    np.testing.assert_allclose(run(quantized), run(replaced), rtol=1e-5, atol=1e-6)
    first = next(n for n in model.graph.node if n.op_type == "Conv")
    w = _weights(model)[first.input[1]]
    mine = by_output[first.output[0]]
    x = np.concatenate([s["x"] for s in calib])
    want = _mean_patch_shift(x, w.astype(np.float64) - dq[mine.input[1]][0], 1, 2, 1)  # 3x3, stride 2, pad 1
    np.testing.assert_allclose(inits[mine.input[2]], want, rtol=0, atol=1e-5 * (1 + np.abs(want).max()))


def test_same_input_same_bytes_with_bias_correction() -> None:
    model, calib = _conv_net(), _samples(4, 0)
    first, second = (_quantize(model, samples=calib)[0].SerializeToString() for _ in range(2))
    assert first == second


def test_onnxruntime_fused_conv_of_O3_is_quantized_and_corrected() -> None:
    """-O3 fuses conv1 + Relu into com.microsoft FusedConv first; its weight is stored as int8
    too and its bias shifted by the Conv part's mean error (the activation left out)."""
    model, calib = _conv_net(), _samples(6, 0)
    result = optcc.optimize(model, level=3, weight_only={"bits": 8, "samples": calib}, verify=False)
    stats = next(r.stats for r in result.report.passes if r.name == "quantize-weights")
    assert stats["quantized"].get("FusedConv int8") == 1 and stats["bias_correction"]["corrected"] == 4
    out = result.model
    fused = next(n for n in out.graph.node if n.op_type == "FusedConv")
    w_hat, inits = _dequantized(out)[fused.input[1]][0], _initializers(out)
    x = np.concatenate([s["x"] for s in calib])
    want = _weights(model)["B1"] + _mean_patch_shift(x, _weights(model)["W1"].astype(np.float64) - w_hat, 1, 1, 1)
    np.testing.assert_allclose(inits[fused.input[2]], want, rtol=0, atol=1e-5 * (1 + np.abs(want).max()))
    held = _samples(1, 7)[0]
    ref = ReferenceEvaluator(model).run(None, held)[0].astype(np.float64)
    got = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, held)[0]
    assert 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - got) ** 2)) > 30
