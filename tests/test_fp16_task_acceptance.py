"""FP16 acceptance: an output below the SQNR rule (40 dB, cosine 0.9999) is accepted when
the task judge decides it with enough items and finds it at float32's noise floor; never
with too few items, never with infinities float32 does not have. The expected numbers come
from numpy, not from optcc's verifier."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP

import optcc
from optcc.errors import PrecisionNotAppliedError
from optcc import verify
from optcc.passes.convert_float16 import ConvertFloat16Pass

ROWS, CLASSES = 100, 10
OFFSET = 1000.0  # float16's spacing at 1000 is 0.5: (x + 1000) - 1000 rounds x to halves


def _model(float16_round: bool = False, scale: float = 1.0) -> onnx.ModelProto:
    """logits = ((x * scale) + 1000) - 1000; ``float16_round``: the sum rounded through
    float16 by an explicit Cast pair (what a float16 kernel stores)."""
    nodes = [oh.make_node("Mul", ["x", "s"], ["xs"]), oh.make_node("Add", ["xs", "c"], ["a"])]
    if float16_round:
        nodes += [oh.make_node("Cast", ["a"], ["a16"], to=TP.FLOAT16),
                  oh.make_node("Cast", ["a16"], ["a32"], to=TP.FLOAT)]
    nodes.append(oh.make_node("Sub", ["a32" if float16_round else "a", "c"], ["logits"]))
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TP.FLOAT, [ROWS, CLASSES])],
                          [oh.make_tensor_value_info("logits", TP.FLOAT, [ROWS, CLASSES])],
                          [nh.from_array(np.array(scale, np.float32), "s"),
                           nh.from_array(np.array(OFFSET, np.float32), "c")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _samples(count: int, seed: int = 0, top: float = 6.0) -> list[dict[str, np.ndarray]]:
    """Rows with one class at ``top`` (plus noise), the others within [-3, 3]: confident,
    separated by far more than float16's rounding at 1000."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        x = rng.uniform(-3, 3, (ROWS, CLASSES))
        x[np.arange(ROWS), rng.integers(0, CLASSES, ROWS)] = top + rng.uniform(0, 1, ROWS)
        out.append({"x": x.astype(np.float32)})
    return out


def _sqnr_db(refs: list[np.ndarray], gots: list[np.ndarray]) -> float:
    signal = sum(float(np.sum(np.float64(r) ** 2)) for r in refs)
    noise = sum(float(np.sum((np.float64(r) - np.float64(g)) ** 2)) for r, g in zip(refs, gots))
    return 10 * np.log10(signal / noise)


def _run(model: onnx.ModelProto | bytes, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    data = model if isinstance(model, bytes) else model.SerializeToString()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return [session.run(None, f)[0] for f in feeds]


def test_float16_below_sqnr_with_unchanged_top1_is_accepted_by_the_task() -> None:
    feeds = _samples(3)
    # the reference: numpy in float64; float16 rounding of the sum, as numpy computes it
    reference = [np.float64(f["x"]) for f in feeds]
    rounded = [(np.float16(np.float32(f["x"]) + np.float32(OFFSET)).astype(np.float64) - OFFSET) for f in feeds]
    assert _sqnr_db(reference, rounded) < 40.0  # the SQNR rule fails ...
    assert all((r.argmax(-1) == g.argmax(-1)).all() for r, g in zip(reference, rounded))  # ... the top-1 holds
    candidate = _model(float16_round=True)
    got = _run(candidate, feeds)
    np.testing.assert_allclose(np.concatenate(got), np.concatenate(rounded), atol=1e-4)

    check = verify(_model(), candidate, numerics="fp16", inputs=feeds)
    assert check.passed, check.reason
    [logits] = check.outputs
    assert logits.accepted_by == "task" and logits.sqnr_db < 40.0
    row = check.task["metrics"]["logits:argmax"]
    assert row["items"] == 3 * ROWS and row["deviation"] == 0.0 and row["passed"]
    assert check.task["accepted_by"] == {"logits": "task"}
    assert "accepted by the task" in check.describe() and "argmax 0 <=" in check.describe()


def test_the_sqnr_rule_still_accepts_alone() -> None:
    feeds = _samples(3)
    candidate = _model(float16_round=True, scale=1.0)
    # values 100x larger: the same rounding at 1000 (steps of 0.5 to 1) is small beside them
    small = [{"x": f["x"] * np.float32(100.0)} for f in feeds]
    check = verify(_model(), candidate, numerics="fp16", inputs=small)
    assert check.passed and check.outputs[0].accepted_by == "sqnr" and check.task is None


def test_too_few_items_leave_the_sqnr_rule_alone() -> None:
    # 1 sample of 100 confident rows: at the allowed rate (1.5 x 0.01) they hold 1.5 errors,
    # fewer than 3: a model a few times worse than float32 would often pass, so the task
    # cannot accept and the SQNR rule declines
    feeds = _samples(1)
    check = verify(_model(), _model(float16_round=True), numerics="fp16", inputs=feeds)
    assert not check.passed and check.outputs[0].accepted_by is None
    assert "SQNR" in check.reason
    assert check.task is not None and check.task["decided_by_task"] == []


def test_float16_overflow_fails_whatever_the_top1() -> None:
    # one class at 70000 > 65504: float32 finite, float16 inf; the top-1 stays that class
    feeds = _samples(3, top=70000.0)
    candidate = _model(float16_round=True)
    got = _run(candidate, feeds)
    assert all(np.isinf(g).any() for g in got)
    assert all((np.argmax(g, -1) == np.argmax(f["x"], -1)).all() for g, f in zip(got, feeds))
    check = verify(_model(), candidate, numerics="fp16", inputs=feeds)
    assert not check.passed and "infinities differ" in check.reason


def test_fp16_conversion_keeps_float16_that_the_task_accepts() -> None:
    feeds = _samples(3)
    result = optcc.optimize(_model(), fp16=True, inputs=feeds)
    stats = next(r.stats for r in result.report.passes if r.name == "convert-float16")
    assert stats["accepted_by"] == {"logits": "task"}, stats
    assert stats["sqnr_db"]["logits"] < 40.0
    assert not stats["returned_to_float32"] and stats["converted"].get("Add") and stats["converted"].get("Sub")
    row = stats["task"]["CPUExecutionProvider"]["metrics"]["logits:argmax"]
    assert row["items"] == 3 * ROWS and row["passed"]
    assert result.report.verification["status"] == "passed"
    # against numpy: every top-1 of the written model is float64's
    got = _run(result.model.SerializeToString(), feeds)
    assert all((np.argmax(g, -1) == np.argmax(np.float64(f["x"]), -1)).all() for g, f in zip(got, feeds))
    # the pass alone, with the user's samples, measures the same judge itself
    alone = ConvertFloat16Pass(inputs=feeds)(optcc.ir.load(_model()))
    assert alone.stats["accepted_by"] == {"logits": "task"} and not alone.stats["returned_to_float32"]


def test_fp16_conversion_with_too_few_items_declines() -> None:
    feeds = _samples(1)
    with pytest.raises(PrecisionNotAppliedError) as raised:
        optcc.optimize(_model(), fp16=True, inputs=feeds)
    stats = next(r.stats for r in raised.value.result.report.passes if r.name == "convert-float16")
    assert stats["accepted_by"]["logits"] == "sqnr"  # only float32 was left to accept
    assert stats["returned_to_float32"]
