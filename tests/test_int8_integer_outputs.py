"""Integer outputs (decoded ids, labels, flags) of an INT8 candidate are judged by the task
(``labels``: rows that agree exactly, against float32's own noise floor), not compared
exactly: an argmax inside the graph flips where the float scores before it move, as
float32's own do under input noise. A float16 candidate's are accepted when equal, or when
the task decides them over enough rows and passes them."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
import onnx.numpy_helper as nh
import pytest
from onnx import TensorProto as TP

import optcc
from optcc.numerics import task as tm
from optcc.numerics.verify import Verifier
from reference import expected_outputs_float64

CLASSES, FEATURES, STEPS = 6, 12, 16


def _reader(weight: np.ndarray) -> onnx.ModelProto:
    """``scores = x @ weight`` ([N, T, C]) and ``ids = ArgMax(scores)`` ([N, T], int64)."""
    graph = oh.make_graph(
        [oh.make_node("MatMul", ["x", "w"], ["scores"]),
         oh.make_node("ArgMax", ["scores"], ["ids"], axis=-1, keepdims=0)],
        "reader", [oh.make_tensor_value_info("x", TP.FLOAT, ["N", STEPS, FEATURES])],
        [oh.make_tensor_value_info("scores", TP.FLOAT, ["N", STEPS, CLASSES]),
         oh.make_tensor_value_info("ids", TP.INT64, ["N", STEPS])],
        [nh.from_array(weight, "w")])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


def test_integer_rows_are_judged_by_agreement_with_float32s_own_changes_excused() -> None:
    ref = [np.array([[1, 2, 3], [4, 5, 6]], np.int64), np.array([[7, 8, 9], [1, 1, 1]], np.int64)]
    moved = [ref[0].copy(), ref[1].copy()]
    moved[1][1, 0] = 2  # float32 itself reads row 1 of sample 1 differently under two draws
    judge = tm.TaskJudge({"ids": ref}, {"ids": ref}, draws=[{"ids": moved}, {"ids": moved}])
    assert judge.floor["ids"]["labels"] == 0.0  # no draw changes a row the others keep
    assert judge.metric_names() == {"ids": "labels"} and judge.excuses()
    assert judge({"ids": moved})["passed"] is True  # float32's own change is noise
    other = [ref[0].copy(), ref[1].copy()]
    other[0][0, 2] = 0  # a row no draw changes: 1 of 4 rows is the candidate's error
    row = judge({"ids": other})["metrics"]["ids:labels"]
    assert row["deviation"] == pytest.approx(0.25) and row["items"] == 4 and row["passed"] is False
    assert "sqnr" not in " ".join(judge({"ids": other})["metrics"])  # no SQNR of ids stands in
    # a sample whose shape changed disagrees in every row
    assert tm.deviations("labels", ref, [ref[0], ref[1][:1]])["labels"] == pytest.approx(2 / 4)
    assert tm.deviations("labels", [np.array([3, 1, 2])], [np.array([3, 1, 0])])["labels"] == pytest.approx(1 / 3)


def test_labels_cannot_be_named_for_a_float_output() -> None:
    scores = [np.zeros((2, 3), np.float32)]
    with pytest.raises(optcc.BadInputError, match="unknown INT8 metric 'labels'"):
        tm.TaskJudge({"s": scores}, {"s": scores}, metric="labels")


def _flips(weight: np.ndarray, other: np.ndarray, feeds: list[dict[str, np.ndarray]]) -> int:
    """Lines (rows of ``ids``) with an argmax that differs between the two weights, in
    float64 (the reference)."""
    return sum(int(np.count_nonzero(np.any(np.argmax(f["x"].astype(np.float64) @ weight, -1)
                                           != np.argmax(f["x"].astype(np.float64) @ other, -1), axis=-1)))
               for f in feeds)


def _case(scale: float) -> tuple[np.ndarray, np.ndarray, list[dict[str, np.ndarray]]]:
    """The reader's weight, the same moved by ``scale`` (as a lossy conversion moves it), and
    20 samples of 16 lines."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((FEATURES, CLASSES)).astype(np.float32)
    moved = (weight + scale * rng.standard_normal(weight.shape)).astype(np.float32)
    return weight, moved, [{"x": rng.standard_normal((16, STEPS, FEATURES)).astype(np.float32)} for _ in range(20)]


@pytest.mark.parametrize("scale, passes", [(0.001, True), (0.3, False)])
def test_int8_verification_judges_decoded_ids_by_the_task(tmp_path, scale: float, passes: bool) -> None:
    """A candidate whose weights moved a little (as quantization moves them) flips a few of
    320 rows of ids: within the margin over float32's floor it passes, where an exact
    comparison failed it; moved a lot, the rows it flips fail it, whatever its scores' SQNR."""
    weight, moved, feeds = _case(scale)
    flips = _flips(weight.astype(np.float64), moved.astype(np.float64), feeds)
    assert (0 < flips <= 4) if passes else flips > 20  # the case this parametrization stands for
    original = tmp_path / "m.onnx"
    onnx.save(_reader(weight), original)
    verifier = Verifier(str(original), inputs=feeds, providers=["CPUExecutionProvider"])
    result = verifier.check(ir.from_proto(_reader(moved)), numerics="int8")
    row = result.task["metrics"]["ids:labels"]
    assert row["items"] == 20 * 16 and row["deviation"] == pytest.approx(flips / 320)
    assert row["floor"] == 0.0 and row["passed"] is passes
    ids = next(m for m in result.outputs if m.name == "ids")
    assert ids.problem is None  # its values are the task's to judge, its shape still compared
    assert (result.status == "passed") is (passes and result.task["passed"])
    if result.status == "passed":  # the summary line says the deviation next to the floor's allowance
        line = result.describe()
        assert "against float32's noise floor: 'scores' " in line
        assert f"'ids' labels {row['deviation']:.3g} <= {row['allowed']:.3g} (floor 0, 320 items)" in line
    got = expected_outputs_float64(_reader(moved), feeds[0])[1]  # the candidate is what numpy says
    assert np.array_equal(got, np.argmax(feeds[0]["x"].astype(np.float64) @ moved.astype(np.float64), -1))


def test_float16_verification_accepts_ids_the_task_decides_and_passes(tmp_path) -> None:
    """Scores within the SQNR rule, 2 of 320 lines of ids changed: accepted by the task (an
    exact comparison failed it); a candidate changing many lines is not."""
    weight, moved, feeds = _case(0.001)
    assert 0 < _flips(weight.astype(np.float64), moved.astype(np.float64), feeds) <= 4
    original = tmp_path / "m.onnx"
    onnx.save(_reader(weight), original)
    verifier = Verifier(str(original), inputs=feeds, providers=["CPUExecutionProvider"])
    result = verifier.check(ir.from_proto(_reader(moved)), numerics="fp16")
    ids = next(m for m in result.outputs if m.name == "ids")
    assert result.status == "passed" and ids.accepted_by == "task" and ids.values_differ
    assert result.task["metrics"]["ids:labels"]["passed"] is True
    assert f"'ids' on CPU ({ids.values_differ} values differ, labels " in result.describe()
    _, far, _ = _case(0.3)
    failed = verifier.check(ir.from_proto(_reader(far)), numerics="fp16")
    assert failed.status == "failed" and "'ids' on CPUExecutionProvider" in (failed.reason or "")


def test_integer_outputs_computed_from_no_float_value_are_compared_exactly_not_judged() -> None:
    """Ids passed through and shapes read by Shape cannot move under any precision: no
    ``labels`` row (and no warning about its few rows) for them, only for what a float
    value decides (an ArgMax, a Cast of a float)."""
    graph = oh.make_graph(
        [oh.make_node("Identity", ["ids"], ["ids_out"]), oh.make_node("Shape", ["x"], ["shape"]),
         oh.make_node("Add", ["shape", "one"], ["grown"]), oh.make_node("ArgMax", ["x"], ["top"], axis=-1, keepdims=0),
         oh.make_node("Cast", ["x"], ["rounded"], to=TP.INT64)],
        "g", [oh.make_tensor_value_info("ids", TP.INT64, ["N", 4]), oh.make_tensor_value_info("x", TP.FLOAT, ["N", 3])],
        [oh.make_tensor_value_info(n, TP.INT64, None) for n in ("ids_out", "grown", "top", "rounded")],
        [nh.from_array(np.array([1, 1], np.int64), "one")])
    model = ir.from_proto(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]))
    exact = tm.float_free_outputs(model)
    assert exact == {"ids_out", "grown"}
    outputs = {n: [np.zeros((2, 3), np.int64)] for n in ("ids_out", "grown", "top", "rounded")}
    judge = tm.TaskJudge(outputs, outputs, exact=exact)
    assert judge.metric_names() == {"top": "labels", "rounded": "labels"}


VOCAB, TOKENS = 40, 24


def _tagger(weight: np.ndarray, table: np.ndarray) -> onnx.ModelProto:
    """A token tagger: ``tags = ArgMax(table[input_ids] @ weight)`` ([N, T] int64, one tag
    per token of ``input_ids``)."""
    graph = oh.make_graph(
        [oh.make_node("Gather", ["table", "input_ids"], ["x"]),
         oh.make_node("MatMul", ["x", "w"], ["scores"]),
         oh.make_node("ArgMax", ["scores"], ["tags"], axis=-1, keepdims=0)],
        "tagger", [oh.make_tensor_value_info("input_ids", TP.INT64, ["N", "T"])],
        [oh.make_tensor_value_info("tags", TP.INT64, ["N", "T"])],
        [nh.from_array(table, "table"), nh.from_array(weight, "w")])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


def test_a_taggers_labels_are_judged_per_token(tmp_path) -> None:
    """Integer labels with one per token of a token-id input (a tagger's tags) are judged by
    the share of tokens whose tag changed, as its user counts them: a candidate changing 10
    of 1920 tags passes, though they fall in 10 of 80 lines (judged by lines, one changed tag
    anywhere failed the whole line)."""
    rng = np.random.default_rng(4)
    table = rng.standard_normal((VOCAB, FEATURES)).astype(np.float32)
    weight = rng.standard_normal((FEATURES, CLASSES)).astype(np.float32)
    rare = VOCAB - 1  # a token 10 lines hold once each
    feeds = [{"input_ids": rng.integers(0, rare, (4, TOKENS)).astype(np.int64)} for _ in range(20)]
    for line in range(10):
        feeds[2 * line]["input_ids"][line % 4, line] = rare
    moved = table.copy()

    def tags(t: np.ndarray) -> list[np.ndarray]:  # the float64 reference
        return [np.argmax(t.astype(np.float64)[f["input_ids"]] @ weight.astype(np.float64), -1) for f in feeds]

    own = np.argmax(table.astype(np.float64) @ weight.astype(np.float64), -1)
    moved[rare] = table[int(np.flatnonzero(own != own[rare])[0])]  # a lossy change moved its embedding row
    flipped = sum(int(np.count_nonzero(a != b)) for a, b in zip(tags(table), tags(moved)))
    lines = sum(int(np.count_nonzero(np.any(a != b, -1))) for a, b in zip(tags(table), tags(moved)))
    total = 20 * 4 * TOKENS
    assert flipped == lines == 10  # the case this test stands for
    original = tmp_path / "t.onnx"
    onnx.save(_tagger(weight, table), original)
    verifier = Verifier(str(original), inputs=feeds, providers=["CPUExecutionProvider"])
    result = verifier.check(ir.from_proto(_tagger(weight, moved)), numerics="int8")
    row = result.task["metrics"]["tags:labels"]
    assert result.task["chosen"]["tags"]["metric"] == "token-labels"
    assert row["items"] == total and row["deviation"] == pytest.approx(flipped / total)
    assert row["passed"] is True and result.status == "passed"
