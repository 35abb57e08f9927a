"""The fallback ranks layers by their error as the outputs see it: a layer whose result
is nearly cancelled downstream (``a - b`` of two close MatMuls) hurts the output far
more than its own error says, and goes back to float first; one whose result is scaled
down hurts it far less."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
from onnx import TensorProto as TP

import optcc
from reference import lossy_metrics, onnxruntime_outputs
from optcc.infra.registry import create_pass
from optcc.passes import quantize_int8 as quantize_int8_pass
from optcc.quant import fallback
from optcc.quant.calibration import calibrate
from optcc.quant.driver import quantize_int8
from optcc.quant.fallback import Target

TARGET = Target(min_sqnr_db=15.0, min_argmax_agreement=0.0)


SCALE = 0.003  # of W3: the x W1 branch in y


def _model() -> onnx.ModelProto:
    """``d = x Wa - x Wb`` (``Wb`` within 3% of ``Wa``: ``d`` is about 30 dB below ``x Wa``)
    and ``y = x W2 + x W1 W3``, two outputs. ``W1``'s row 0 is huge and the input's
    feature 0 always 0 (``_rows``): its INT8 scale rounds every real weight to zero, the
    worst local error of the model, which ``W3`` (``SCALE`` times a random matrix) makes
    harmless at ``y``."""
    rng = np.random.default_rng(3)
    wa = rng.normal(size=(16, 16)).astype(np.float32) * 0.3
    wb = (wa + rng.normal(size=(16, 16)) * 0.01).astype(np.float32)
    w1, w2, w3 = (rng.normal(size=(16, 16)).astype(np.float32) * 0.3 for _ in range(3))
    w3 *= SCALE
    w1[0, :] = 1000.0
    nodes = [oh.make_node("MatMul", ["x", "Wa"], ["a"], name="mm_a"),
             oh.make_node("MatMul", ["x", "Wb"], ["b"], name="mm_b"),
             oh.make_node("Sub", ["a", "b"], ["d"], name="sub"),
             oh.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
             oh.make_node("MatMul", ["h", "W3"], ["hs"], name="mm3"),
             oh.make_node("MatMul", ["x", "W2"], ["g"], name="mm2"),
             oh.make_node("Add", ["g", "hs"], ["y"], name="add")]
    inits = [nh.from_array(w, n) for w, n in ((wa, "Wa"), (wb, "Wb"), (w1, "W1"), (w2, "W2"), (w3, "W3"))]
    graph = oh.make_graph(nodes, "cancel", [oh.make_tensor_value_info("x", TP.FLOAT, ["N", 16])],
                          [oh.make_tensor_value_info("d", TP.FLOAT, ["N", 16]),
                           oh.make_tensor_value_info("y", TP.FLOAT, ["N", 16])], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _rows(n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(11)
    rows = [rng.normal(size=(4, 16)).astype(np.float32) for _ in range(n)]
    for x in rows:
        x[:, 0] = 0.0
    return [{"x": x} for x in rows]


def _power(arrays: list[np.ndarray]) -> float:
    return float(sum(np.sum(np.asarray(a, np.float64) ** 2) for a in arrays))


def test_output_sqnr_is_the_local_error_seen_at_the_outputs(monkeypatch) -> None:
    """A layer's error injected in the float model reaches an output through linear ops:
    ``mm_a``'s and ``mm_b``'s reach ``d`` unchanged (``y`` stays exact), so their output
    SQNR is their local SQNR plus the power ratio of ``a`` (or ``b``) to ``d``, here from
    onnxruntime's float run. ``mm1``'s, the worst local error, reaches ``y`` through
    ``W3``: the least harm at the outputs. (The planning rule for cancellations, off
    here, would keep ``mm_a`` and ``mm_b`` float.)"""
    monkeypatch.setattr(quantize_int8_pass, "CANCELLATION_RATIO", float("inf"))
    proto, samples = _model(), _rows(6)
    float_model = optcc.ir.load(proto)
    ranges = calibrate(float_model, samples[:3], "minmax").ranges
    result = create_pass("quantize-int8", ranges=ranges, count_fused=False)(float_model.clone())
    layer_outputs = result.stats["layer_outputs"]
    held = samples[3:]
    local = fallback.local_sqnr(float_model, result.model, layer_outputs, held)
    output = fallback.output_sqnr(float_model, result.model, layer_outputs, held)
    assert {"mm_a", "mm_b", "mm1"} <= set(output)
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in ("a", "b"))
    values = [dict(zip(("d", "y", "a", "b"), onnxruntime_outputs(probe, feeds))) for feeds in held]
    for layer, name in (("mm_a", "a"), ("mm_b", "b")):
        expected = local[layer] + 10 * math.log10(_power([v["d"] for v in values]) / _power([v[name] for v in values]))
        assert abs(output[layer] - expected) < 0.05, (layer, output[layer], expected)
    assert local["mm1"] < min(local["mm_a"], local["mm_b"]) - 10  # the worst local error ...
    assert output["mm1"] > max(output["mm_a"], output["mm_b"]) + 10  # ... less harmful than theirs
    assert min(output, key=output.get) in ("mm_a", "mm_b")


def test_fallback_returns_the_cancelled_layers_first_and_meets_the_target(monkeypatch) -> None:
    """The budget (4 layers), returned to float in the order of the layers' own errors
    (``mm1`` first), meets the target; then the output ranking puts the cancelled pair
    first, and two layers float meet it too: ``mm1`` stays quantized. (The planning rule
    for cancellations, off here, keeps ``mm_a`` and ``mm_b`` float from the start: ``d``'s
    range is far narrower than ``a``'s, and then INT8 meets the target with no fallback.)"""
    monkeypatch.setattr(quantize_int8_pass, "CANCELLATION_RATIO", float("inf"))
    model = _model()
    data = _rows(20)
    q, stats = quantize_int8(model, data, "minmax", min_speedup=1e-9, target=TARGET, metric=None,
                             max_float_layers=4)
    report = stats["fallback"]
    assert report["initial"]["passed"] is False
    assert {r["layer"] for r in report["sensitivity"][:2]} == {"mm_a", "mm_b"}
    assert set(report["kept_float"]) == {"mm_a", "mm_b"} and report["target_met"] is True
    assert [(t["order"], t["float_layers"], t["passed"]) for t in report["tried"]] == [
        ("local", 4, True), ("estimate", 1, False), ("estimate", 2, True)]
    assert "mm1" in stats["pass"]["layers"]
    for sqnr, _ in lossy_metrics(model, q, data[-4:]):
        assert sqnr >= TARGET.min_sqnr_db, sqnr


def test_a_budget_that_misses_declines_before_the_output_ranking(monkeypatch) -> None:
    """With the default budget (3 of 6 layers), the three worst by their own error
    (``mm1``, ``mm3`` and one of the pair) leave ``d`` below the target: INT8 is declined
    after that one candidate, and no layer's error is taken to the outputs. (The planning
    rule for cancellations is off here.)"""
    monkeypatch.setattr(quantize_int8_pass, "CANCELLATION_RATIO", float("inf"))
    model = _model()
    q, stats = quantize_int8(model, _rows(20), "minmax", min_speedup=1e-9, target=TARGET, metric=None)
    report = stats["fallback"]
    assert stats["declined"] == "accuracy" and report["target_met"] is False
    assert [(t["order"], t["float_layers"], t["passed"]) for t in report["tried"]] == [("local", 3, False)]
    assert report["sensitivity"][0]["layer"] == "mm1"
    assert all(r["output_sqnr_db"] == "nan" for r in report["sensitivity"])
    assert [n.op_type for n in q.graph] == [n.op_type for n in model.graph.node]  # the model as given


def test_the_cancellation_rule_keeps_the_pair_float_without_a_fallback() -> None:
    """With the planning rule on, ``d = a - b`` (a range far narrower than ``a``'s) keeps
    ``mm_a`` and ``mm_b`` float from the start: the target is met with no layer returned
    to float, ``mm1``, ``mm2`` and ``mm3`` stay quantized, and ``d`` and ``y`` meet the
    SQNR target against onnxruntime's float run."""
    model = _model()
    data = _rows(20)
    q, stats = quantize_int8(model, data, "minmax", min_speedup=1e-9, target=TARGET, metric=None)
    assert stats["fallback"]["initial"]["passed"] is True and stats["fallback"]["tried"] == []
    assert set(stats["pass"]["layers"]) == {"mm1", "mm2", "mm3", "add"}
    assert stats["pass"]["kept_float"] == {
        "input of a cancelling Sub (result's range more than 4x narrower than an input's)": 2}
    for sqnr, _ in lossy_metrics(model, q, data[-4:]):
        assert sqnr >= TARGET.min_sqnr_db, sqnr
