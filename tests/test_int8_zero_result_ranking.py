"""A layer whose float result is all zeros on the ranking samples (a Conv + Relu below zero
there, though not on every calibration sample) has no signal to measure its own error
against: its local SQNR is no estimate (NaN), not the worst possible (-inf), so the
ranking by the layers' own errors does not put it first; its effect on the outputs, here
next to nothing, is what ranks it when that is measured. The premises are checked with
onnx's reference evaluator and numpy."""

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
    nodes = [oh.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             oh.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             oh.make_node("Conv", ["r1", "W2"], ["y2"], name="conv2"),
             oh.make_node("Conv", ["x", "W3"], ["y3"], name="conv3"),
             oh.make_node("Add", ["y2", "y3"], ["y"], name="out_add")]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TP.FLOAT, [1, 3, 8, 8])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, [1, 4, 8, 8])],
                          [nh.from_array(b1, "B1"), *(nh.from_array(w, name) for name, w in weights.items())])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _sqnr_db(reference: np.ndarray, got: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(reference ** 2) / np.sum((reference - got) ** 2)))


def test_a_layer_with_an_all_zero_float_result_does_not_rank_first() -> None:
    rng = np.random.default_rng(5)
    weights = {"W1": (rng.normal(size=(8, 3, 3, 3)) * 0.5).astype(np.float32),
               "W2": (rng.normal(size=(4, 8, 1, 1)) * 0.3).astype(np.float32),
               "W3": (rng.normal(size=(4, 3, 1, 1)) * 0.3).astype(np.float32)}
    samples = [{"x": rng.uniform(0, 1, (1, 3, 8, 8)).astype(np.float32)} for _ in range(8)]
    unbiased = ReferenceEvaluator(_graph(np.zeros(8, np.float32), weights))
    tops = np.max([unbiased.run(["c1"], s)[0].max(axis=(0, 2, 3)) for s in samples], axis=0)
    model = _graph((-tops - 1e-3).astype(np.float32), weights)  # every conv1 result <= -0.001 on the samples
    evaluator = ReferenceEvaluator(model)
    assert all(not evaluator.run(["r1"], s)[0].any() for s in samples)
    # calibrated also on one sample scaled up a little, on which conv1 reaches just above zero
    highest = max(samples, key=lambda s: evaluator.run(["c1"], s)[0].max())
    calibration = [*samples[:4], {"x": (1.02 * highest["x"]).astype(np.float32)}]
    float_model = optcc.ir.load(model)
    result = create_pass("quantize-int8", ranges=calibrate(float_model, calibration, "minmax").ranges,
                         count_fused=False)(float_model.clone())
    layer_outputs = result.stats["layer_outputs"]
    assert set(result.stats["layers"]) >= {"conv1", "conv3"}

    # conv1's quantized result (its inputs come from the graph input: no error arrives from upstream)
    # is not all zeros, and taken through the float model's rest it changes the output next to nothing
    proto = optcc.ir.serialize(result.model)
    proto.graph.output.append(onnx.ValueInfoProto(name=layer_outputs["conv1"][1]))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    w2 = weights["W2"].astype(np.float64)[:, :, 0, 0]
    rest = []
    for s in samples:
        r1 = session.run([layer_outputs["conv1"][1]], s)[0].astype(np.float64)
        rest.append((np.einsum("oc,nchw->nohw", w2, r1), evaluator.run(["y"], s)[0].astype(np.float64)))
    assert any(added.any() for added, _ in rest)
    effect = _sqnr_db(np.concatenate([y.ravel() for _, y in rest]),
                      np.concatenate([(y + added).ravel() for added, y in rest]))
    assert effect > 60.0

    local = fallback.local_sqnr(float_model, result.model, layer_outputs, samples)
    order = [row["layer"] for row in fallback.estimate_sensitivity(result.stats["layers"], local, {})]
    assert order.index("conv3") < order.index("conv1"), (order, local)
    assert math.isnan(local["conv1"]) and math.isfinite(local["conv3"]), local
