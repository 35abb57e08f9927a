"""A quantized layer whose result is exact (its inputs and output on the 8-bit grid: here a
Concat of integer pixels 0..255, scale 1) loses nothing: the fallback ranks it but never
returns it to float, not even within the budget."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
from onnx import TensorProto as TP

from reference import onnxruntime_outputs
from optcc.quant.driver import quantize_int8
from optcc.quant.fallback import Target

TARGET = Target(min_sqnr_db=60.0, min_argmax_agreement=0.0)  # an 8-bit MatMul misses it


def _model(weights: np.ndarray) -> onnx.ModelProto:
    """``y = Concat(x1, x2) W``: the Concat's result is exact in 8 bits, the MatMul's is not."""
    nodes = [oh.make_node("Concat", ["x1", "x2"], ["c"], name="concat", axis=1),
             oh.make_node("MatMul", ["c", "W"], ["y"], name="mm")]
    graph = oh.make_graph(nodes, "exact", [oh.make_tensor_value_info(n, TP.FLOAT, ["N", 8]) for n in ("x1", "x2")],
                          [oh.make_tensor_value_info("y", TP.FLOAT, ["N", 8])], [nh.from_array(weights, "W")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _pixels(rng: np.random.Generator) -> np.ndarray:
    """Integers in 0..255, both ends present (the calibrated range is [0, 255]: scale 1)."""
    x = rng.integers(0, 256, size=(4, 8)).astype(np.float32)
    x[0, :2] = (0.0, 255.0)
    return x


def test_an_exact_layer_takes_no_place_in_the_budget() -> None:
    rng = np.random.default_rng(2)
    weights = rng.normal(size=(16, 8)).astype(np.float32)
    model = _model(weights)
    data = [{"x1": _pixels(rng), "x2": _pixels(rng)} for _ in range(20)]
    q, stats = quantize_int8(model, data, "minmax", min_speedup=1e-9, target=TARGET, metric=None,
                             max_float_layers=2)
    report = stats["fallback"]
    ranks = {row["layer"]: row for row in report["sensitivity"]}
    assert ranks["concat"]["local_sqnr_db"] == "inf" and ranks["mm"]["local_sqnr_db"] < 60
    # the budget (2 layers) holds the MatMul alone: one candidate, which meets the target
    assert [(t["order"], t["float_layers"], t["passed"]) for t in report["tried"]] == [("local", 1, True)]
    assert report["kept_float"] == ["mm"] and report["target_met"] is True
    assert stats["pass"]["layers"] == ["concat"]
    # the Concat stays quantized and exact, the MatMul float: numpy's float64 product
    for feeds in data[-4:]:
        want = np.concatenate([feeds["x1"], feeds["x2"]], axis=1).astype(np.float64) @ weights.astype(np.float64)
        (got,) = onnxruntime_outputs(q, feeds)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)
