"""INT8 fallback under a speed requirement: when the fewest layers returned to float that
meet the accuracy target are modelled too slow, the candidate the search measured to meet
the target that is modelled fastest, at or above the requirement, ships instead; with no
such candidate the driver declines for speed as before."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper as nh
import onnxruntime as ort

import optcc
from optcc.quant import driver
from optcc.quant.driver import quantize_int8
from optcc.quant.fallback import SpeedBound, Target
from tests.test_int8_decline import _chain as decline_chain

TARGET = Target(min_sqnr_db=15.0, min_argmax_agreement=0.5)
SENSITIVE = ("mm2", "mm4", "mm6", "mm8", "mm10")
N_LAYERS = 16


def _chain() -> tuple[onnx.ModelProto, list[np.ndarray]]:
    """MatMul layers mm1..mm16, ReLU between them, and their weights. In a sensitive layer,
    input feature 0 is always 0 (the previous weight's column 0 is zero) but the weight's
    row 0 is huge: its per-column INT8 scale rounds every real weight to zero, so each
    sensitive layer must return to float for the output to meet the target. Float layers
    apart from each other each cost Q/DQ conversions on both sides; the budget's, in a row,
    share them."""
    model = decline_chain(SENSITIVE, N_LAYERS)
    weights = {t.name: nh.to_array(t) for t in model.graph.initializer}
    return model, [weights[f"W{i + 1}"] for i in range(N_LAYERS)]


def _rows(n: int = 20) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(12)
    return [{"x": rng.normal(size=(4, 16)).astype(np.float32)} for _ in range(n)]


def _float64(weights: list[np.ndarray], x: np.ndarray) -> np.ndarray:
    """The chain computed in numpy, float64."""
    h = x.astype(np.float64)
    for i, w in enumerate(weights):
        h = h @ w.astype(np.float64)
        if i < len(weights) - 1:
            h = np.maximum(h, 0.0)
    return h


def _sqnr_db(want: np.ndarray, got: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(want ** 2) / max(np.sum((want - got) ** 2), 1e-300)))


def _written(q: optcc.ir.Model | onnx.ModelProto) -> bytes:
    return (q if isinstance(q, onnx.ModelProto) else optcc.ir.serialize(q)).SerializeToString()


def _run(model_bytes: bytes, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _meets_the_target(model_bytes: bytes, weights: list[np.ndarray], float_layers=()) -> None:
    """The written model keeps ``float_layers`` float (MatMul) and meets the target against
    numpy's float64 chain on 5 rows."""
    kinds = {n.name: n.op_type for n in onnx.load_from_string(model_bytes).graph.node}
    assert all(kinds.get(name) == "MatMul" for name in float_layers)
    for feeds in _rows(5):
        got = _run(model_bytes, feeds).astype(np.float64)
        assert _sqnr_db(_float64(weights, feeds["x"]), got) >= TARGET.min_sqnr_db


def _never_bounded(speedup, of_floats, required) -> SpeedBound:
    """A ``SpeedBound`` with no bound below the requirement: the search never stops for speed."""
    return SpeedBound(speedup, lambda floats: float("inf"), required)


def _quantize(min_speedup: float, **options) -> tuple[optcc.ir.Model | onnx.ModelProto, dict]:
    model, _ = _chain()
    return quantize_int8(model, _rows(), "minmax", min_speedup=min_speedup, target=TARGET, metric=None, **options)


def test_the_fastest_accepted_candidate_ships_when_the_fewest_float_is_too_slow() -> None:
    model, weights = _chain()
    free_model, free = _quantize(1e-9)
    report = free["fallback"]
    # the budget (8, in a row) meets, the probes 1, 2, 4 miss, then 6 and 5 meet: the five sensitive layers float
    assert [(t["order"], t["float_layers"], t["passed"]) for t in report["tried"]] == [
        ("local", 8, True), ("estimate", 1, False), ("estimate", 2, False), ("estimate", 4, False),
        ("estimate", 6, True), ("estimate", 5, True)]
    assert set(report["kept_float"]) == set(SENSITIVE) and "speed_choice" not in report
    fewest = free["latency"]["after_fallback"]["modelled_speedup"]

    # a requirement just above the fewest-float model's speed, below another accepted one's
    q, stats = _quantize(fewest * 1.0001)
    choice = stats["fallback"]["speed_choice"]
    speeds = [c["modelled_speedup"] for c in choice["candidates"]]
    assert speeds == sorted(speeds, reverse=True) and speeds[0] >= fewest * 1.0001
    assert stats["modified"] is True and "declined" not in stats
    shipped = stats["fallback"]["kept_float"]
    assert len(shipped) == choice["candidates"][0]["float_layers"] and set(SENSITIVE) <= set(shipped)
    assert stats["latency"]["after_fallback"]["modelled_speedup"] == speeds[0]
    assert "the fastest candidate measured to meet the target" in choice["chosen"]
    # deterministic: the same command writes the same bytes
    again, _ = _quantize(fewest * 1.0001)
    assert _written(again) == _written(q) != _written(free_model)
    # the model shipped keeps its float layers float and meets the target against numpy's float64 chain
    _meets_the_target(_written(q), weights, shipped)

    # above every accepted candidate's speed: declined for speed, the float model written
    q, stats = _quantize(speeds[0] * 1.0001)
    assert stats["modified"] is False and stats["declined"] == "speed"
    assert "chosen" not in stats["fallback"]["speed_choice"]
    for feeds in _rows(3):
        np.testing.assert_allclose(_run(_written(q), feeds), _float64(weights, feeds["x"]), rtol=1e-4, atol=1e-4)


def test_the_pipeline_confirms_the_faster_candidate_on_every_sample(tmp_path) -> None:
    """Through ``optcc.optimize`` the fallback's result is confirmed on every sample (the
    verifier's judgement); the faster candidate shipped in its place is confirmed there
    too, and the verification then passes it."""
    model, weights = _chain()
    path = tmp_path / "chain.onnx"
    onnx.save(model, path)

    def run(min_speedup: float) -> tuple[optcc.OptimizeResult, dict]:
        result = optcc.optimize(str(path), int8_calibration=_rows(40),
                                int8_options={"min_speedup": min_speedup, "metric": "sqnr"})
        (int8,) = [p for p in result.report.passes if "fallback" in p.stats]
        return result, int8.stats

    _, free = run(1e-9)
    assert free["fallback"]["confirmation"]["passed"] and free["fallback"]["kept_float"]
    fewest = free["latency"]["after_fallback"]["modelled_speedup"]
    result, stats = run(fewest * 1.0001)
    best = stats["fallback"]["speed_choice"]["candidates"][0]
    assert best["passed_again"] == {"judged": True, "confirmation": True} and best["modelled_speedup"] > fewest
    assert stats["modified"] is True and result.report.verification["status"] == "passed"
    assert len(stats["fallback"]["kept_float"]) == best["float_layers"]
    _meets_the_target(_written(result.model), weights)


def test_the_search_stops_once_no_candidate_left_could_ship(monkeypatch) -> None:
    """Where no candidate is bias-corrected (each is modelled as it would ship), when every
    candidate the bisection has left is modelled below the requirement and the one it holds
    is the fastest met, it measures none of them: the model written is the one the speed
    choice ships when the search measures on. With bias correction (a candidate's speed
    known only once corrected) the search measures on."""
    model, weights = _chain()
    _, slowest = _quantize(0.0, bias_correction=False)  # the fewest float layers meeting the target: too slow below
    fewest = slowest["latency"]["after_fallback"]["modelled_speedup"]
    _, measured_on = _quantize(fewest * 1.0001, bias_correction=False)
    budget, *others = measured_on["fallback"]["speed_choice"]["candidates"]
    assert budget["order"] == "local" and all(c["modelled_speedup"] < budget["modelled_speedup"] for c in others)
    required = (max(c["modelled_speedup"] for c in others) + budget["modelled_speedup"]) / 2
    q, stats = _quantize(required, bias_correction=False)
    report = stats["fallback"]
    assert "none left to measure could ship" in report["search_stopped"]
    assert "speed_choice" not in report and stats["modified"] is True
    # the budget and the probes measured, nothing after them
    assert [(t["order"], t["float_layers"]) for t in report["tried"]] == [
        ("local", 8), ("estimate", 1), ("estimate", 2), ("estimate", 4)]
    assert stats["latency"]["after_fallback"]["modelled_speedup"] == budget["modelled_speedup"] >= required
    corrected, measured = _quantize(required)
    assert "search_stopped" not in measured["fallback"] and _written(corrected) == _written(q)

    # with no bound below the requirement the search measures on, and the speed choice ships the same bytes
    monkeypatch.setattr(driver, "SpeedBound", _never_bounded)
    same, on = _quantize(required, bias_correction=False)
    assert "search_stopped" not in on["fallback"] and len(on["fallback"]["tried"]) > 4
    assert "8 layers float (local order)" in on["fallback"]["speed_choice"]["chosen"]
    assert _written(same) == _written(q)
    _meets_the_target(_written(q), weights, report["kept_float"])


def test_the_speed_bound_builds_no_more_than_the_bisection_judges(monkeypatch) -> None:
    """With a budget of 12 layers the probes leave the range (4, 12): showing that none of
    5 to 11 could ship would build up to seven candidates where the bisection judges at
    most four, so none is built there; the bisection measures 6 and 5 (both met, too
    slow) and the speed choice ships the budget's model: the bytes of the search that
    never stops for speed, and a chain that meets the target against numpy's float64."""
    model, weights = _chain()
    required = 0.42  # between the budget's modelled speed (12 float in a row) and every other candidate's
    built: list[int] = []

    def counting(speedup, of_floats, required):
        def of(floats):
            built.append(len(floats))
            return of_floats(floats)
        return SpeedBound(speedup, of, required)

    monkeypatch.setattr(driver, "SpeedBound", counting)
    q, stats = _quantize(required, bias_correction=False, max_float_layers=12)
    report = stats["fallback"]
    assert [(t["order"], t["float_layers"], t["passed"]) for t in report["tried"]] == [
        ("local", 12, True), ("estimate", 1, False), ("estimate", 2, False), ("estimate", 4, False),
        ("estimate", 6, True), ("estimate", 5, True)]
    assert built == [] and "search_stopped" not in report
    assert "12 layers float (local order)" in report["speed_choice"]["chosen"] and stats["modified"] is True
    assert all(c["modelled_speedup"] < required for c in report["speed_choice"]["candidates"][1:])

    monkeypatch.setattr(driver, "SpeedBound", _never_bounded)
    never_stops, _ = _quantize(required, bias_correction=False, max_float_layers=12)
    assert _written(never_stops) == _written(q)
    _meets_the_target(_written(q), weights, report["kept_float"])
