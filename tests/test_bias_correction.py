"""Empirical bias correction (optcc.quant.bias_correction) on a model whose weight rounding is
biased by construction: every small tap of the depthwise conv rounds up by 0.45 of a step,
and the inputs are positive, so the quantized model's conv results are shifted."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
import onnxruntime as ort
from onnx import TensorProto as TP

import optcc
from optcc.quant.bias_correction import FloatMeans, SegmentMeans, correct_biases
from optcc.quant.calibration import calibrate
from optcc.passes.quantize_int8 import QuantizeInt8Pass
from optcc.quant.fallback import count_integer_nodes, evaluate
from optcc.quant.driver import quantize_int8
from calls import first_arguments

CONVS = ["c1", "c2", "c3"]


def biased_chain() -> onnx.ModelProto:
    """Conv(3x3, bias)-Relu -> depthwise Conv(3x3, no bias)-Relu -> Conv(1x1, bias)."""
    rng = np.random.default_rng(0)
    w1 = (rng.normal(size=(8, 3, 3, 3)) * 0.3).astype(np.float32)
    step = 1.0 / 127  # the per-channel weight scale of the depthwise conv (max |w| = 1)
    w2 = np.full((8, 1, 3, 3), 0.55 * step, np.float32)  # rounds to 1 step: +0.45 step each
    w2[:, 0, 1, 1] = 1.0
    w3 = (rng.normal(size=(4, 8, 1, 1)) * 0.5).astype(np.float32)
    inits = [nh.from_array(w1, "W1"), nh.from_array(np.full(8, 0.1, np.float32), "B1"),
             nh.from_array(w2, "W2"), nh.from_array(w3, "W3"),
             nh.from_array(np.zeros(4, np.float32), "B3")]
    nodes = [
        oh.make_node("Conv", ["x", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        oh.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        oh.make_node("Conv", ["r1", "W2"], ["c2"], pads=[1, 1, 1, 1], group=8, name="dw"),
        oh.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        oh.make_node("Conv", ["r2", "W3", "B3"], ["c3"], name="conv3"),
    ]
    graph = oh.make_graph(nodes, "chain", [oh.make_tensor_value_info("x", TP.FLOAT, ["N", 3, 12, 12])],
                          [oh.make_tensor_value_info("c3", TP.FLOAT, ["N", 4, 12, 12])], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


def samples(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.uniform(0, 1, size=(1, 3, 12, 12)).astype(np.float32)} for _ in range(n)]


def quantized(model: onnx.ModelProto, calib: list) -> optcc.ir.Model:
    ranges = calibrate(model, calib, "minmax").ranges
    return QuantizeInt8Pass(ranges, count_fused=False)(optcc.ir.load(model)).model


def channel_means(model: optcc.ir.Model | onnx.ModelProto, names: list[str], data: list) -> list[np.ndarray]:
    """Per-channel means of intermediates, fetched whole and averaged with numpy."""
    proto = model if isinstance(model, onnx.ModelProto) else optcc.ir.serialize(model)
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    del proto.graph.output[:]
    proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    runs = [session.run(names, f) for f in data]
    return [np.mean([r[i].mean(axis=tuple(a for a in range(r[i].ndim) if a != 1)) for r in runs], axis=0)
            for i in range(len(names))]


def mean_errors(float_model: onnx.ModelProto, q: optcc.ir.Model, data: list) -> list[float]:
    ref, got = channel_means(float_model, CONVS, data), channel_means(q, CONVS, data)
    return [float(np.abs(g - r).max()) for r, g in zip(ref, got)]


def test_corrected_convs_have_the_float_models_channel_means() -> None:
    model, calib = biased_chain(), samples(8, 0)
    q = quantized(model, calib)
    before = mean_errors(model, q, calib)
    stats = correct_biases(optcc.ir.load(model), q, calib)
    after = mean_errors(model, q, calib)
    assert stats["layers"] == 3 and stats["overflow_channels"] == 0
    assert before[1] > 5e-3  # the constructed shift: 8 taps x 0.45 step x mean input
    for b, a in zip(before, after):
        assert a < 0.05 * b + 1e-5, (before, after)


def test_held_out_data_gains_accuracy() -> None:
    model, calib, held = biased_chain(), samples(8, 0), samples(8, 1)
    q = quantized(model, calib)
    plain = evaluate(optcc.ir.load(model), q, held).worst_sqnr_db
    correct_biases(optcc.ir.load(model), q, calib)
    corrected = evaluate(optcc.ir.load(model), q, held).worst_sqnr_db
    assert max(mean_errors(model, q, held)) < 0.2 * max(mean_errors(model, quantized(model, calib), held))
    assert corrected > plain + 2.0, (plain, corrected)


def test_a_conv_without_bias_gets_an_int32_bias_and_still_fuses() -> None:
    model, calib = biased_chain(), samples(8, 0)
    q = quantized(model, calib)
    fused_before = count_integer_nodes(q)
    correct_biases(optcc.ir.load(model), q, calib)
    dw = next(n for n in q.graph if n.name == "dw")
    assert len(dw.inputs) == 3 and dw.inputs[2] is not None
    bias_dq = dw.inputs[2].producer()
    assert bias_dq.op_type == "DequantizeLinear"
    b_q, b_scale = (optcc.ir.as_numpy(v) for v in bias_dq.inputs[:2])
    x_scale = optcc.ir.as_numpy(dw.inputs[0].producer().inputs[1])
    w_scale = optcc.ir.as_numpy(dw.inputs[1].producer().inputs[1])
    assert b_q.dtype == np.int32 and np.any(b_q)
    np.testing.assert_allclose(b_scale, x_scale * w_scale, rtol=1e-6)
    proto = optcc.ir.serialize(q)
    onnx.checker.check_model(proto, full_check=True)
    assert count_integer_nodes(q) == fused_before  # every QLinearConv is still fused


def test_float_means_shared_by_candidates_give_the_same_biases() -> None:
    """One ``FloatMeans`` serves the fully quantized model and a candidate with a layer left
    float (as the driver's fallback does): each comes out byte for byte as corrected with
    means of its own, and the means are the float model's channel means (numpy)."""
    model, calib = biased_chain(), samples(8, 0)
    reference = optcc.ir.load(model)
    ranges = calibrate(model, calib, "minmax").ranges
    candidates = [QuantizeInt8Pass(ranges, count_fused=False, exclude=exclude)(optcc.ir.load(model)).model
                  for exclude in ([], ["conv1"], [], ["conv1"])]
    means = FloatMeans(reference, calib)
    for q in candidates[:2]:
        correct_biases(reference, q, calib, means=means)
    for q in candidates[2:]:
        correct_biases(reference, q, calib)
    for shared, own in zip(candidates[:2], candidates[2:]):
        assert optcc.ir.serialize(shared).SerializeToString() == optcc.ir.serialize(own).SerializeToString()
    assert sorted(means.means) == CONVS  # measured for the full model, reused for the candidate
    for name, expected in zip(CONVS, channel_means(model, CONVS, calib)):
        np.testing.assert_allclose(means.means[name], expected, rtol=1e-5, atol=1e-7)


def test_driver_corrects_biases_unless_told_not_to() -> None:
    model, data = biased_chain(), samples(10, 0)
    # equalization renames the intermediates this compares with the original by name
    options = dict(require_speedup=False, require_target=False, accuracy_fallback=False, equalize=False)
    corrected, stats = quantize_int8(model, data, **options)
    plain, plain_stats = quantize_int8(model, data, bias_correction=False, **options)
    assert stats["pass"]["bias_correction"]["layers"] == 3
    assert "bias_correction" not in plain_stats["pass"]
    calib = data[:8]
    assert max(mean_errors(model, corrected, calib)) < 0.1 * max(mean_errors(model, plain, calib))


def biased_mlp() -> onnx.ModelProto:
    """Gemm(transB, bias)-Relu -> Gemm(no bias): the first one's small weights round up."""
    rng = np.random.default_rng(1)
    step = 1.0 / 127
    w1 = np.full((8, 16), 0.55 * step, np.float32)
    w1[:, 0] = 1.0
    w2 = (rng.normal(size=(8, 4)) * 0.5).astype(np.float32)
    nodes = [
        oh.make_node("Gemm", ["x", "W1", "B1"], ["g1"], transB=1, name="fc1"),
        oh.make_node("Relu", ["g1"], ["r1"], name="relu1"),
        oh.make_node("Gemm", ["r1", "W2"], ["g2"], name="fc2"),
    ]
    inits = [nh.from_array(w1, "W1"), nh.from_array(np.full(8, 0.05, np.float32), "B1"), nh.from_array(w2, "W2")]
    graph = oh.make_graph(nodes, "mlp", [oh.make_tensor_value_info("x", TP.FLOAT, ["N", 16])],
                          [oh.make_tensor_value_info("g2", TP.FLOAT, ["N", 4])], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


def test_gemm_layers_are_corrected_too() -> None:
    model = biased_mlp()
    rng = np.random.default_rng(0)
    calib = [{"x": rng.uniform(0, 1, size=(4, 16)).astype(np.float32)} for _ in range(8)]
    q = quantized(model, calib)
    fused_before = count_integer_nodes(q)

    def errors() -> list[float]:
        ref, got = (channel_means(m, ["g1", "g2"], calib) for m in (model, q))
        return [float(np.abs(g - r).max()) for r, g in zip(ref, got)]

    before = errors()
    stats = correct_biases(optcc.ir.load(model), q, calib)
    after = errors()
    assert stats["layers"] == 2 and before[0] > 5e-3
    assert all(a < 0.05 * b + 1e-5 for a, b in zip(after, before)), (before, after)
    assert count_integer_nodes(q) == fused_before
    onnx.checker.check_model(optcc.ir.serialize(q), full_check=True)



def test_segment_means_shared_by_candidates_run_only_what_changed(monkeypatch) -> None:
    """One ``SegmentMeans`` serves the fully quantized model and the candidates after it (as
    the driver's fallback does): a candidate with the last conv float computes the means of
    its corrected convs as the first model did and runs nothing; one with the middle conv
    float takes the first conv's means, runs the first conv once without its probe and
    measures the last one; a model measured before runs nothing. Each comes out byte for
    byte as corrected on its own, and its corrected convs have the float model's channel
    means (numpy)."""
    model, calib = biased_chain(), samples(8, 0)
    reference = optcc.ir.load(model)
    ranges = calibrate(model, calib, "minmax").ranges
    excludes = ([], ["conv3"], ["dw"], [])
    shared = [QuantizeInt8Pass(ranges, count_fused=False, exclude=e)(optcc.ir.load(model)).model for e in excludes]
    own = [QuantizeInt8Pass(ranges, count_fused=False, exclude=e)(optcc.ir.load(model)).model for e in excludes]
    runs = first_arguments(monkeypatch, ort.InferenceSession, "run")
    means, measured, counts = FloatMeans(reference, calib), SegmentMeans(), []
    for q in shared:
        before = len(runs)
        correct_biases(reference, q, calib, means=means, measured=measured)
        counts.append(len(runs) - before)
    alone = []
    for q in own:
        before = len(runs)
        correct_biases(reference, q, calib)
        alone.append(len(runs) - before)
    monkeypatch.undo()
    for a, b in zip(shared, own):
        assert optcc.ir.serialize(a).SerializeToString() == optcc.ir.serialize(b).SerializeToString()
    # alone, per sample: the float means, then a segment per corrected layer and one more; and
    # the weights dequantized once
    assert alone == [8 + 4 * 8 + 1, 8 + 3 * 8 + 1, 8 + 3 * 8 + 1, 8 + 4 * 8 + 1]
    # shared: the float means once; the middle conv float: the first conv without its probe,
    # then the last conv's two segments
    assert counts == [8 + 4 * 8 + 1, 0, 3 * 8 + 1, 0]
    for q, corrected in zip(shared[1:3], (["c1", "c2"], ["c1", "c3"])):
        for name, got, expected in zip(corrected, channel_means(q, corrected, calib),
                                       channel_means(model, corrected, calib)):
            np.testing.assert_allclose(got, expected, atol=0.02, err_msg=name)


def test_intermediates_named_like_the_measuring_outputs_are_corrected() -> None:
    """Tensors of the model named as the channel means' outputs would be (the prefix's
    ``_mean_<i>``, ``_p<k>``): the measuring models take other names, and the corrected
    convs have the float model's channel means (numpy)."""
    model, calib = biased_chain(), samples(8, 0)
    for node in model.graph.node:  # relu1's result, read by the depthwise conv
        node.input[:] = ["optcc_bias_correction_mean_1" if x == "r1" else x for x in node.input]
        node.output[:] = ["optcc_bias_correction_mean_1" if x == "r1" else x for x in node.output]
    model.graph.node[2].output[0] = "optcc_bias_correction_p1"  # the depthwise conv's result
    model.graph.node[3].input[0] = "optcc_bias_correction_p1"
    convs = ["c1", "optcc_bias_correction_p1", "c3"]
    q = quantized(model, calib)
    reference = channel_means(model, convs, calib)
    before = [float(np.abs(g - r).max()) for r, g in zip(reference, channel_means(q, convs, calib))]
    stats = correct_biases(optcc.ir.load(model), q, calib)
    after = [float(np.abs(g - r).max()) for r, g in zip(reference, channel_means(q, convs, calib))]
    assert stats["layers"] == 3 and before[1] > 5e-3
    for b, a in zip(before, after):
        assert a < 0.05 * b + 1e-5, (before, after)


def gained_chain() -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]]]:
    """``biased_chain`` reading ``x * sqrt(gain)``: ``gain`` a graph input that is also an
    initializer (default 1), fed by every sample with values far from that default."""
    model = biased_chain()
    graph = model.graph
    graph.initializer.append(nh.from_array(np.ones((1, 3, 1, 1), np.float32), "gain"))
    graph.input.append(oh.make_tensor_value_info("gain", TP.FLOAT, [1, 3, 1, 1]))
    graph.node.insert(0, oh.make_node("Sqrt", ["gain"], ["root"], name="root"))
    graph.node.insert(1, oh.make_node("Mul", ["x", "root"], ["xg"], name="gain"))
    graph.node[2].input[0] = "xg"
    onnx.checker.check_model(model)
    rng = np.random.default_rng(3)
    data = [{**s, "gain": rng.uniform(9, 25, size=(1, 3, 1, 1)).astype(np.float32)} for s in samples(8, 0)]
    return model, data


def test_a_fed_input_with_a_default_is_read_from_the_samples() -> None:
    """The float means and the quantized segments both read the samples' value of an input
    that has a default (an initializer of the same name), not the default."""
    model, calib = gained_chain()
    q = quantized(model, calib)
    before = mean_errors(model, q, calib)
    means = FloatMeans(optcc.ir.load(model), calib)
    stats = correct_biases(optcc.ir.load(model), q, calib, means=means, measured=SegmentMeans())
    after = mean_errors(model, q, calib)
    # the means measured: numpy's over onnxruntime's results with every sample's feeds
    for name, expected in zip(CONVS, channel_means(model, CONVS, calib)):
        np.testing.assert_allclose(means.means[name], expected, rtol=1e-5, atol=1e-6)
    assert stats["layers"] == 3 and before[1] > 5e-3
    for b, a in zip(before, after):
        assert a < 0.05 * b + 1e-5, (before, after)
