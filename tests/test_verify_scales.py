"""Outputs holding quantities of different magnitudes: wrong candidates a whole output's
scale or SQNR let through (a decoded detector's class scores beside its box coordinates,
mask fills beside real values; the first two known gaps, strict xfails), and correct ones
that must still pass. The expected values
come from numpy or onnx's reference evaluator, never from optcc."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import optcc

ANCHORS = 200
SENTINEL = -3.4e38


def _model(nodes: list, inputs: list, outputs: list, inits: list = ()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _yolo(score_shift: float) -> onnx.ModelProto:
    """A decoded YOLOv5-type head [1, A, 85]: 4 box coordinates in pixels (up to ~900),
    objectness and 80 class scores (sigmoids), the scores moved by ``score_shift``."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, ANCHORS, 85])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, ANCHORS, 85])
    scale = np.r_[np.full(4, 160.0), np.ones(81)].astype(np.float32).reshape(1, 1, 85)
    shift = np.r_[np.full(4, 320.0), np.full(81, -1.0)].astype(np.float32).reshape(1, 1, 85)
    inits = [numpy_helper.from_array(scale, "scale"), numpy_helper.from_array(shift, "shift"),
             numpy_helper.from_array(np.array([4, 81], np.int64), "split"),
             numpy_helper.from_array(np.array(score_shift, np.float32), "moved")]
    nodes = [helper.make_node("Mul", ["x", "scale"], ["m"]), helper.make_node("Add", ["m", "shift"], ["z"]),
             helper.make_node("Split", ["z", "split"], ["box", "logit"], axis=2),
             helper.make_node("Sigmoid", ["logit"], ["p"]), helper.make_node("Add", ["p", "moved"], ["q"]),
             helper.make_node("Concat", ["box", "q"], ["y"], axis=2)]
    return _model(nodes, [x], [y], inits)


def _samples(shape: tuple[int, ...], count: int = 3) -> list[dict[str, np.ndarray]]:
    return [{"x": np.random.default_rng(i).standard_normal(shape).astype(np.float32)} for i in range(count)]


@pytest.mark.xfail(strict=True, reason="known gap: max rel is relative to the output's largest magnitude, so class "
                   "scores beside box coordinates in pixels get the coordinates' tolerance (a per-slice scale "
                   "closed it, and reverted correct BatchNorm fusions on ppocrv4-det's saturated map)")
@pytest.mark.parametrize("numerics, shift", [("exact", 0.008), ("fusion", 0.076)])
def test_class_scores_off_beyond_their_own_scale_fail(numerics: str, shift: float) -> None:
    samples = _samples((1, ANCHORS, 85))
    original, candidate = _yolo(0.0), _yolo(shift)
    tolerance = {"exact": 1e-5, "fusion": 1e-4}[numerics]
    for feeds in samples:
        (expected,), (got,) = ReferenceEvaluator(original).run(None, feeds), ReferenceEvaluator(candidate).run(None, feeds)
        scores, moved = expected[..., 4:], got[..., 4:]
        # wrong by far more than the tolerance of the scores' own scale (at most 1) ...
        assert np.abs(moved - scores).max() > 50 * tolerance * np.abs(scores).max()
        # ... and within that of the box coordinates' (what the whole output's largest value allows)
        assert np.abs(moved - scores).max() < tolerance * np.abs(expected).max()
    result = optcc.verify(original, candidate, numerics=numerics, inputs=samples)
    assert not result.passed, result.describe()


def _regrouped_head() -> onnx.ModelProto:
    """``_yolo(0)`` with its box coordinates computed as (x * 2 + 4) * 80 instead of
    x * 160 + 320: equal in real arithmetic, rounded differently in float32."""
    model = _yolo(0.0)
    first = np.r_[np.full(4, 2.0), np.ones(81)].astype(np.float32).reshape(1, 1, 85)
    shift = np.r_[np.full(4, 4.0), np.full(81, -1.0)].astype(np.float32).reshape(1, 1, 85)
    then = np.r_[np.full(4, 80.0), np.ones(81)].astype(np.float32).reshape(1, 1, 85)
    for name, value in (("scale", first), ("shift", shift)):
        next(t for t in model.graph.initializer if t.name == name).CopyFrom(numpy_helper.from_array(value, name))
    model.graph.initializer.append(numpy_helper.from_array(then, "then"))
    model.graph.node[1].output[0] = "z0"
    model.graph.node.insert(2, helper.make_node("Mul", ["z0", "then"], ["z"]))
    return model


def test_a_correct_regrouping_of_the_head_passes() -> None:
    samples = _samples((1, ANCHORS, 85))
    original, candidate = _yolo(0.0), _regrouped_head()
    for feeds in samples:
        (expected,), (got,) = ReferenceEvaluator(original).run(None, feeds), ReferenceEvaluator(candidate).run(None, feeds)
        exact = feeds["x"][..., :4].astype(np.float64) * 160 + 320
        assert not np.array_equal(got[..., :4], expected[..., :4])  # rounded differently ...
        assert np.abs(got[..., :4] - exact).max() < 1e-6 * np.abs(exact).max()  # ... and correct
        assert np.array_equal(got[..., 4:], expected[..., 4:])
    result = optcc.verify(original, candidate, numerics="fusion", inputs=samples)
    assert result.passed, result.describe()


def _masked(factor: float) -> onnx.ModelProto:
    """y = Where(x > 0, factor * x, -3.4e38): a finite mask fill beside real values."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 64])
    inits = [numpy_helper.from_array(np.array(factor, np.float32), "factor"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array(SENTINEL, np.float32), "fill")]
    nodes = [helper.make_node("Greater", ["x", "zero"], ["positive"]), helper.make_node("Mul", ["x", "factor"], ["m"]),
             helper.make_node("Where", ["positive", "m", "fill"], ["y"])]
    return _model(nodes, [x], [y], inits)


def test_a_mask_fill_does_not_hide_the_other_elements() -> None:
    samples = _samples((4, 64))
    for feeds in samples:
        x = feeds["x"].astype(np.float64)
        expected = ReferenceEvaluator(_masked(2.0)).run(None, feeds)[0]
        assert np.array_equal(expected, np.where(x > 0, 2 * x, SENTINEL).astype(np.float32))
        got = ReferenceEvaluator(_masked(3.0)).run(None, feeds)[0]
        assert np.abs(got - expected).max() > 0.5  # the positive half off by x
    for numerics in ("exact", "fusion"):
        result = optcc.verify(_masked(2.0), _masked(3.0), numerics=numerics, inputs=samples)
        assert not result.passed, result.describe()
    assert optcc.verify(_masked(2.0), _masked(2.0), numerics="exact", inputs=samples).passed


def test_a_mask_fill_moved_fails() -> None:
    samples = _samples((4, 64))
    moved = _masked(2.0)
    fill = next(t for t in moved.graph.initializer if t.name == "fill")
    fill.CopyFrom(numpy_helper.from_array(np.array(-3.0e38, np.float32), "fill"))
    result = optcc.verify(_masked(2.0), moved, numerics="fusion", inputs=samples)
    assert not result.passed and "mask" in result.describe(), result.describe()


def _rounded_head(*, scores_lost: bool) -> onnx.ModelProto:
    """The head of ``_yolo(0)`` with its output rounded to float16 and back (a float16
    conversion's error); ``scores_lost``: the objectness and class scores all 0."""
    model = _yolo(0.0)
    if scores_lost:
        model.graph.initializer.append(numpy_helper.from_array(np.array(0.0, np.float32), "nothing"))
        model.graph.node[4].CopyFrom(helper.make_node("Mul", ["p", "nothing"], ["q"]))
    model.graph.node[-1].output[0] = "y32"
    model.graph.node.extend([helper.make_node("Cast", ["y32"], ["y16"], to=TensorProto.FLOAT16),
                             helper.make_node("Cast", ["y16"], ["y"], to=TensorProto.FLOAT)])
    return model


@pytest.mark.xfail(strict=True, reason="known gap: float16's SQNR over a whole [1, A, 85] output is met by the box "
                   "coordinates' energy (a per-slice SQNR closed it, and declined correct float16 conversions of "
                   "ppocrv4-det and ppocrv4-rec on real images: a blank row, a rare class)")
def test_a_float16_result_that_lost_every_score_fails() -> None:
    samples = _samples((1, ANCHORS, 85), count=4)
    original, candidate = _yolo(0.0), _rounded_head(scores_lost=True)
    for feeds in samples:
        (expected,), (got,) = ReferenceEvaluator(original).run(None, feeds), ReferenceEvaluator(candidate).run(None, feeds)
        confident = expected[..., 4:5] * expected[..., 5:] > 0.25  # what a user keeps
        assert confident.sum() > 10 and not (got[..., 4:5] * got[..., 5:] > 0.25).any()
        error, signal = got[..., :4] - expected[..., :4], expected[..., :4]
        assert 10 * np.log10((signal ** 2).sum() / max((error ** 2).sum(), 1e-30)) > 40  # the boxes kept
    result = optcc.verify(original, candidate, numerics="fp16", inputs=samples)
    assert not result.passed, result.describe()


def test_a_float16_rounding_of_the_head_passes() -> None:
    samples = _samples((1, ANCHORS, 85), count=4)
    original, candidate = _yolo(0.0), _rounded_head(scores_lost=False)
    for feeds in samples:
        (expected,), (got,) = ReferenceEvaluator(original).run(None, feeds), ReferenceEvaluator(candidate).run(None, feeds)
        assert np.allclose(got, expected, rtol=2 ** -10, atol=0)  # float16's rounding, per element
    result = optcc.verify(original, candidate, numerics="fp16", inputs=samples)
    assert result.passed, result.describe()


def _dead_dims() -> onnx.ModelProto:
    """y = x * gain over 64 hidden dims, two of them dead (gains 1e-32 and 1e-7, as a real
    MiniLM's last_hidden_state has), then rounded to float16 and back: a correct float16
    conversion that flushes the dead dims to zero and subnormal steps."""
    gain = np.ones((1, 1, 64), np.float32)
    gain[..., 3], gain[..., 7] = 1e-32, 1e-7
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 64])
    nodes = [helper.make_node("Mul", ["x", "gain"], ["y32"]),
             helper.make_node("Cast", ["y32"], ["y16"], to=TensorProto.FLOAT16),
             helper.make_node("Cast", ["y16"], ["y"], to=TensorProto.FLOAT)]
    return _model(nodes, [x], [y], [numpy_helper.from_array(gain, "gain")])


def test_float16_flushing_dead_dimensions_passes() -> None:
    samples = _samples((1, 32, 64))
    candidate = _dead_dims()
    original = _model([candidate.graph.node[0]], list(candidate.graph.input), list(candidate.graph.output),
                      list(candidate.graph.initializer))
    original.graph.node[0].output[0] = "y"
    for feeds in samples:
        (expected,), (got,) = ReferenceEvaluator(original).run(None, feeds), ReferenceEvaluator(candidate).run(None, feeds)
        assert not got[..., 3].any() and np.abs(expected[..., 3]).max() > 0  # the dead dim flushed to zero
        live = np.delete(np.arange(64), [3, 7])
        assert np.allclose(got[..., live], expected[..., live], rtol=2 ** -10, atol=0)  # float16's rounding
    result = optcc.verify(original, candidate, numerics="fp16", inputs=samples)
    assert result.passed, result.describe()
