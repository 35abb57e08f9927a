"""Outputs empty on every sample compare nothing (a detector's boxes after its score
threshold, on inputs without objects). Where every output is empty, NaN or infinite the
check is a proof or skipped, never a pass, whatever the outputs' dtypes; an output empty
on every sample beside outputs that compare is a weak-verification note. The premise of
each test comes from onnx's reference evaluator."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import optcc

THRESHOLD = 5.0
# scores (column 4) below the threshold: no row is kept on any sample
QUIET = [{"x": np.random.default_rng(i).uniform(-1.0, 1.0, (16, 6)).astype(np.float32)} for i in range(3)]
BUSY = {"x": np.where(np.arange(6) == 4, 6.0, 0.5).astype(np.float32) * np.ones((16, 1), np.float32)}


def _detector(scale: float, *, count: bool = False) -> onnx.ModelProto:
    """dets = the rows of x * scale whose column 4 exceeds THRESHOLD, ids = their argmax
    (int64); with ``count`` also how many rows were kept (int64, never empty)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, 6])
    nodes = [helper.make_node("Gather", ["x", "four"], ["score"], axis=1),
             helper.make_node("Greater", ["score", "threshold"], ["keep"]),
             helper.make_node("Mul", ["x", "scale"], ["scaled"]),
             helper.make_node("Compress", ["scaled", "keep"], ["dets"], axis=0),
             helper.make_node("ArgMax", ["x"], ["classes"], axis=1, keepdims=0),
             helper.make_node("Compress", ["classes", "keep"], ["ids"], axis=0)]
    outputs = [helper.make_tensor_value_info("dets", TensorProto.FLOAT, ["K", 6]),
               helper.make_tensor_value_info("ids", TensorProto.INT64, ["K"])]
    if count:
        nodes += [helper.make_node("Cast", ["keep"], ["kept"], to=TensorProto.INT64),
                  helper.make_node("ReduceSum", ["kept"], ["count"], keepdims=0)]
        outputs.append(helper.make_tensor_value_info("count", TensorProto.INT64, []))
    inits = [numpy_helper.from_array(np.array(4, np.int64), "four"),
             numpy_helper.from_array(np.array(THRESHOLD, np.float32), "threshold"),
             numpy_helper.from_array(np.full((1, 6), scale, np.float32), "scale")]
    graph = helper.make_graph(nodes, "g", [x], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _premise(count: bool) -> None:
    """The two models differ where rows are kept, and keep none on QUIET."""
    original, candidate = _detector(1.0, count=count), _detector(2.0, count=count)
    assert not np.allclose(ReferenceEvaluator(original).run(None, BUSY)[0],
                           ReferenceEvaluator(candidate).run(None, BUSY)[0])
    for feeds in QUIET:
        outs = ReferenceEvaluator(original).run(None, feeds)
        assert outs[0].size == 0 and outs[1].size == 0


def test_a_wrong_model_whose_outputs_are_all_empty_is_not_passed() -> None:
    _premise(count=False)
    report = optcc.verify(_detector(1.0), _detector(2.0), inputs=QUIET)
    assert report.status == "skipped" and not report.passed
    assert "empty on every sample" in (report.reason or "")


def test_an_output_empty_on_every_sample_beside_one_that_compares_is_a_note() -> None:
    _premise(count=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # an empty output averages nothing
        report = optcc.verify(_detector(1.0, count=True), _detector(2.0, count=True), inputs=QUIET)
    assert report.status == "passed"  # 'count' compares, and agrees
    assert "output 'dets' is empty on every sample (nothing compared)" in report.notes
    assert "output 'ids' is empty on every sample (nothing compared)" in report.notes
    (dets,) = [o for o in report.outputs if o.name == "dets"]
    assert dets.argmax_agreement is None


def _dead_relu() -> onnx.ModelProto:
    """``y = Relu(Conv(x) - 100)``: on inputs in [0, 1] the Conv stays far below 100, so
    ``y`` is 0 everywhere."""
    weight = np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32) * 0.3
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])],
        "dead", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.full(4, -100.0, np.float32), "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_note_on_the_users_own_samples_asks_for_others_not_for_inputs(tmp_path) -> None:
    """The note on an output the samples barely exercise says what to do: with samples of
    the user's own (--inputs), samples on which the outputs vary; it asks for --inputs only
    where the samples were generated."""
    path = tmp_path / "dead.onnx"
    onnx.save(_dead_relu(), path)
    samples = [{"x": np.random.default_rng(i).uniform(0.0, 1.0, (1, 3, 16, 16)).astype(np.float32)} for i in range(3)]
    reference = ReferenceEvaluator(str(path))
    assert all(not reference.run(None, s)[0].any() for s in samples)  # the premise: y is 0 throughout
    result = optcc.optimize(str(path), inputs=samples, weight_only="int8")
    weak = [w for w in result.report.warnings if "output 'y' has the same value" in w]
    assert len(weak) == 1 and weak[0].endswith("give samples on which the outputs vary for a stronger check")
    assert "--inputs" not in weak[0]
