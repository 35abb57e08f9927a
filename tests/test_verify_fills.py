"""Mask fills (finite magnitudes from 1e30 up, standing for minus infinity) in an output:
a correct rewrite that rounds a fill passes, a wrong one beside fills fails, whatever the
tolerance and whatever the reference (float32 original, float64 re-evaluation, the INT8 task
judge). Expected values come from numpy or onnx's reference evaluator, never from optcc."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import optcc

F32 = np.float32
SHAPE = (1, 4, 32, 32)
FILL = F32(-3.4e37)


def _model(nodes: list, inits: list) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(SHAPE))],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, list(SHAPE))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _mask() -> np.ndarray:
    return np.random.default_rng(0).random(SHAPE) < 0.8


def _samples(count: int = 3) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"X": rng.standard_normal(SHAPE).astype(F32)} for _ in range(count)]


def _where(extra_nodes: list, extra_inits: list, fill: np.float32 = FILL) -> onnx.ModelProto:
    """S = Where(mask, X, fill), then ``extra_nodes`` from S to Y."""
    inits = [numpy_helper.from_array(_mask(), "M"), numpy_helper.from_array(np.array(fill, F32), "F"), *extra_inits]
    return _model([helper.make_node("Where", ["M", "X", "F"], ["S"]), *extra_nodes], inits)


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return ReferenceEvaluator(model).run(None, feeds)[0]


def test_a_fused_product_that_rounds_the_fills_by_an_ulp_passes() -> None:
    rng = np.random.default_rng(0)
    while True:  # two factors whose products round the fill differently
        a, b = F32(rng.uniform(0.1, 1)), F32(rng.uniform(0.1, 1))
        if F32(F32(FILL * a) * b) != F32(FILL * F32(a * b)):
            break
    original = _where([helper.make_node("Mul", ["S", "a"], ["Sa"]), helper.make_node("Mul", ["Sa", "b"], ["Y"])],
                      [numpy_helper.from_array(np.array(a), "a"), numpy_helper.from_array(np.array(b), "b")])
    fused = _where([helper.make_node("Mul", ["S", "ab"], ["Y"])], [numpy_helper.from_array(np.array(F32(a * b)), "ab")])
    samples = _samples()
    for feeds in samples:
        want = np.where(_mask(), feeds["X"].astype(np.float64), float(FILL)) * float(a) * float(b)
        got = _run(fused, feeds).astype(np.float64)
        assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()  # right, fills included
        assert (got != _run(original, feeds)).any()  # and not the original's bits
    result = optcc.verify(original, fused, numerics="fusion", inputs=samples)
    assert result.passed, result.describe()


def test_fills_are_not_compared_with_a_float64_reference_to_the_bit() -> None:
    # ((S * c) + 100) - 100 loses the small values' digits in float32; the candidate S * c
    # does not: it is beyond the float32 original's tolerance, so float64 judges it, where
    # the fills are S * c in float64 (no float32 number)
    inits = [numpy_helper.from_array(np.array(1e-3, F32), "c"), numpy_helper.from_array(np.array(100, F32), "h")]
    original = _where([helper.make_node("Mul", ["S", "c"], ["Sc"]), helper.make_node("Add", ["Sc", "h"], ["P"]),
                       helper.make_node("Sub", ["P", "h"], ["Y"])], inits)
    candidate = _where([helper.make_node("Mul", ["S", "c"], ["Y"])], inits)
    samples = _samples()
    for feeds in samples:
        want = np.where(_mask(), feeds["X"].astype(np.float64), float(FILL)) * float(F32(1e-3))
        got, before = _run(candidate, feeds), _run(original, feeds)
        real = _mask()
        assert np.abs(got - want)[real].max() < np.abs(before - want)[real].max()  # more accurate
        assert np.array_equal(got[~real], before[~real])  # the same fills
    result = optcc.verify(original, candidate, numerics="fusion", inputs=samples)
    assert result.passed, result.describe()


def test_a_fill_moved_beyond_the_tolerance_fails_under_exact() -> None:
    original, moved = _where([helper.make_node("Identity", ["S"], ["Y"])], []), \
        _where([helper.make_node("Identity", ["S"], ["Y"])], [], fill=F32(FILL * F32(1.001)))
    samples = _samples()
    assert not np.array_equal(_run(original, samples[0]), _run(moved, samples[0]))
    result = optcc.verify(original, moved, numerics="exact", inputs=samples)
    assert not result.passed and "mask" in result.describe(), result.describe()


def test_int8_sqnr_is_not_met_by_the_fills_energy() -> None:
    def where_of(gain: float) -> onnx.ModelProto:  # Where(mask, X * gain, -3.4e38): the fills kept
        inits = [numpy_helper.from_array(_mask(), "M"), numpy_helper.from_array(np.array(-3.4e38, F32), "F"),
                 numpy_helper.from_array(np.array(gain, F32), "gain")]
        return _model([helper.make_node("Mul", ["X", "gain"], ["Xg"]),
                       helper.make_node("Where", ["M", "Xg", "F"], ["Y"])], inits)

    original, halved = where_of(1.0), where_of(0.5)
    samples = _samples(8)
    for feeds in samples:
        want, got = _run(original, feeds), _run(halved, feeds)
        real = _mask()
        assert np.allclose(got[real], want[real] / 2) and not np.allclose(got[real], want[real], atol=0.1)
    result = optcc.verify(original, halved, numerics="int8", inputs=samples)
    assert not result.passed, result.describe()
