"""The measured ranking (``fallback(ranking="measured")``) ranks at most ``max_layers_ranked``
layers: half the budget on the first layers in graph order, the rest on the layers whose
results are worst in the fully quantized model (propagated SQNR). A layer whose float
result is all zeros on the samples (a Conv + Relu below zero there, and the Conv reading
it) has no signal to measure that against: its propagated SQNR is no estimate (NaN), not
the worst (-inf), so it does not take a slot from a layer whose quantization does change
the output. The layers' effects are measured with onnxruntime against onnx's reference
evaluator, in numpy."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
import onnxruntime as ort
from onnx import TensorProto as TP
from onnx.reference import ReferenceEvaluator

import optcc
from optcc.infra.registry import create_pass
from optcc.quant import fallback
from optcc.quant.calibration import calibrate


def _graph(b1: np.ndarray, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """x -> conv3 -> conv4 -> y4 and x -> conv1 -> Relu -> conv2 -> y2; y = y4 + y2."""
    nodes = [oh.make_node("Conv", ["x", "W3"], ["y3"], name="conv3", pads=[1, 1, 1, 1]),
             oh.make_node("Conv", ["y3", "W4"], ["y4"], name="conv4", pads=[1, 1, 1, 1]),
             oh.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             oh.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             oh.make_node("Conv", ["r1", "W2"], ["y2"], name="conv2"),
             oh.make_node("Add", ["y4", "y2"], ["y"], name="out_add")]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TP.FLOAT, [1, 3, 8, 8])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, [1, 4, 8, 8])],
                          [nh.from_array(b1, "B1"), *(nh.from_array(w, name) for name, w in weights.items())])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _sqnr_db(reference: list[np.ndarray], got: list[np.ndarray]) -> float:
    ref = np.concatenate([r.ravel() for r in reference]).astype(np.float64)
    noise = np.sum((ref - np.concatenate([g.ravel() for g in got]).astype(np.float64)) ** 2)
    return math.inf if noise == 0 else float(10 * np.log10(np.sum(ref ** 2) / noise))


def test_a_layer_with_an_all_zero_float_result_takes_no_ranking_slot() -> None:
    rng = np.random.default_rng(7)
    weights = {"W1": (rng.normal(size=(8, 3, 3, 3)) * 0.5).astype(np.float32),
               "W2": (rng.normal(size=(4, 8, 1, 1)) * 0.3).astype(np.float32),
               "W3": (rng.normal(size=(6, 3, 3, 3)) * 0.5).astype(np.float32),
               "W4": (rng.normal(size=(4, 6, 3, 3)) * 0.3).astype(np.float32)}
    samples = [{"x": rng.uniform(0, 1, (1, 3, 8, 8)).astype(np.float32)} for _ in range(8)]
    unbiased = ReferenceEvaluator(_graph(np.zeros(8, np.float32), weights))
    tops = np.max([unbiased.run(["c1"], s)[0].max(axis=(0, 2, 3)) for s in samples], axis=0)
    model = _graph((-tops - 1e-3).astype(np.float32), weights)  # every conv1 result <= -0.001 on the samples
    evaluator = ReferenceEvaluator(model)
    assert all(not evaluator.run(["r1"], s)[0].any() and not evaluator.run(["y2"], s)[0].any() for s in samples)
    # calibrated also on one sample scaled up a little, on which conv1 reaches just above zero
    highest = max(samples, key=lambda s: evaluator.run(["c1"], s)[0].max())
    calibration = [*samples[:4], {"x": (1.02 * highest["x"]).astype(np.float32)}]
    float_model = optcc.ir.load(model)
    ranges = calibrate(float_model, calibration, "minmax").ranges
    result = create_pass("quantize-int8", ranges=ranges, count_fused=False)(float_model.clone())
    layers = list(result.stats["layers"])
    assert layers[:2] == ["conv3", "conv4"] and {"conv1", "conv2"} <= set(layers), layers

    # each layer's effect on the output, quantized alone (onnxruntime) against onnx's evaluator
    expected = [evaluator.run(["y"], s)[0] for s in samples]

    def effect(layer: str) -> float:
        alone = create_pass("quantize-int8", ranges=ranges, count_fused=False, only=[layer])(float_model.clone())
        session = ort.InferenceSession(optcc.ir.serialize(alone.model).SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        return _sqnr_db(expected, [session.run(["y"], s)[0] for s in samples])

    effects = {layer: effect(layer) for layer in ("conv4", "conv1", "conv2")}
    assert effects["conv4"] < min(effects["conv1"], effects["conv2"]) - 10, effects

    propagated = fallback.propagated_sqnr(float_model, result.model, result.stats["layer_outputs"], samples)
    assert math.isnan(propagated["conv1"]) and math.isfinite(propagated["conv4"]), propagated
    # a budget of 3: conv3 (first in graph order), then the worst results: conv4, not the all-zero ones
    chosen = fallback._candidates(layers, propagated, 3)
    assert chosen[:2] == ["conv3", "conv4"], (chosen, propagated)
