"""INT8 acceptance on enough items: every sample judged when the held-out part lacks items
for the task metric, groups of inputs judged apart, and a detection map's boxes added
beyond float32's count; the counts are the tests' own (onnx's reference evaluator,
onnxruntime, hand-placed boxes)."""

from __future__ import annotations

import math

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx.reference import ReferenceEvaluator

import optcc
from optcc.errors import BadInputError
from optcc.numerics import task as tm
from optcc.numerics.verify import FEW_EXPECTED_ERRORS, _few_items
from optcc.quant.driver import quantize_int8

TINYCNN = Path(__file__).resolve().parent.parent / "fixtures" / "tinycnn.onnx"


def _images(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"image": (rng.integers(0, 256, (1, 3, 32, 32)) / 255.0).astype(np.float32)} for _ in range(n)]


def _agreement(quantized: "optcc.ir.Model", data: list[dict[str, np.ndarray]]) -> tuple[int, float]:
    """(confident samples, 1 - top-1 agreement on them): float32 by onnx's reference
    evaluator, the INT8 model by onnxruntime with its integer kernels."""
    import onnxruntime as ort

    reference = ReferenceEvaluator(str(TINYCNN))
    session = ort.InferenceSession(optcc.ir.serialize(quantized).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    ref = np.concatenate([reference.run(None, f)[0] for f in data]).astype(np.float64)
    got = np.concatenate([session.run(None, f)[0] for f in data])
    p = np.exp(ref - ref.max(1, keepdims=True))
    p = np.sort(p / p.sum(1, keepdims=True), 1)
    confident = p[:, -1] - p[:, -2] >= 0.1
    if not confident.any():
        confident[:] = True
    return int(confident.sum()), float(1.0 - np.mean(ref.argmax(1)[confident] == got.argmax(1)[confident]))


def test_too_few_items_held_out_every_sample_is_judged() -> None:
    data = _images(12)
    quantized, stats = quantize_int8(str(TINYCNN), data, require_speedup=False, require_target=False,
                                     accuracy_fallback=False, bias_correction=False)
    acceptance = stats["acceptance"]
    # the 2 held out are widened to half (6), which still hold fewer than 10 items
    assert acceptance["held_out_samples"] == 6 and acceptance["judged_samples"] == 12
    assert "logits:argmax" in acceptance["held_out_widened"]
    assert "logits:argmax" in acceptance["all_samples_judged"]
    row = stats["fallback"]["evaluation"]["task"]["metrics"]["logits:argmax"]
    items, deviation = _agreement(quantized, data)
    assert items >= tm.MIN_ITEMS  # the test's own count: all 12 decide where the 2 held out could not
    assert row["items"] == items and row["deviation"] == pytest.approx(deviation, abs=1e-6)
    assert "passed" in row and row.get("judged", True)


def test_enough_items_held_out_only_they_are_judged() -> None:
    """A margin of 40 allows 0.4 of the top-1s to change: 12 held-out samples hold several
    errors at that rate, so the 20% split stands."""
    data = _images(60)
    _, stats = quantize_int8(str(TINYCNN), data, require_speedup=False, require_target=False,
                             accuracy_fallback=False, bias_correction=False, metric_margin=40.0)
    acceptance = stats["acceptance"]
    assert acceptance["held_out_samples"] == acceptance["judged_samples"] == 12
    assert stats["calibration"]["held_out_samples"] == 12
    assert "all_samples_judged" not in acceptance and "held_out_widened" not in acceptance
    assert stats["fallback"]["evaluation"]["task"]["metrics"]["logits:argmax"]["items"] <= 12


def test_held_out_items_too_few_to_show_the_margin_widen_to_half() -> None:
    """At the default margin 12 held-out samples hold 0.18 top-1 errors at the allowed
    rate: the last 30 of the 60 are held out instead, and the first 30 calibrate. The
    judged row counts the test's own confident samples among those 30."""
    data = _images(60)
    quantized, stats = quantize_int8(str(TINYCNN), data, require_speedup=False, require_target=False,
                                     accuracy_fallback=False, bias_correction=False)
    acceptance = stats["acceptance"]
    assert acceptance["held_out_samples"] == acceptance["judged_samples"] == 30
    assert acceptance["held_out_widened"].startswith("logits:argmax on 12 held-out samples")
    assert stats["calibration"]["held_out_samples"] == 30 and stats["calibration"]["samples"] == 30
    row = stats["fallback"]["evaluation"]["task"]["metrics"]["logits:argmax"]
    items, deviation = _agreement(quantized, data[30:])
    assert row["items"] == items and row["deviation"] == pytest.approx(deviation, abs=1e-6)


def test_the_verifier_judges_every_calibration_sample() -> None:
    data = _images(12)
    result = optcc.optimize(str(TINYCNN), int8_calibration=data, int8_options={"require_speedup": False})
    assert result.report.verification["samples"] == 12


def test_an_int8_acceptance_over_too_few_items_says_so() -> None:
    """24 samples hold 0.4 top-1 errors at the allowed rate (1.5 x the 0.01 minimum): the
    result passes, and the report says the items could not tell the floor from a few
    times it."""
    result = optcc.optimize(str(TINYCNN), int8_calibration=_images(24), int8_options={"require_speedup": False})
    assert result.applied_precision == ["int8"]
    weak = [w for w in result.report.warnings if "'logits:argmax' passed over" in w]
    assert len(weak) == 1 and weak[0].startswith("the verification's samples could hardly show an error: ")
    row = result.report.verification["task"]["metrics"]["logits:argmax"]
    assert f"over only {row['items']} items" in weak[0] and row["items"] * row["allowed"] < FEW_EXPECTED_ERRORS
    more = math.ceil(FEW_EXPECTED_ERRORS / (row["items"] * row["allowed"]))  # samples that would hold enough
    assert weak[0].endswith(f"give about {more}x as many samples") and more >= 2


def test_only_passing_count_rows_with_few_expected_errors_get_a_note() -> None:
    verdict = {"metrics": {"a:argmax": {"passed": True, "items": 400, "allowed": 0.015},  # 6 errors: enough
                           "b:argmax": {"passed": True, "items": 40, "allowed": 0.015},  # 0.6: too few
                           "c:box_f1": {"passed": False, "items": 10, "allowed": 0.03},  # failed: a problem
                           "d:sqnr": {"passed": True, "allowed": 0.01}}}  # no items: not a count
    notes = _few_items(verdict)
    assert len(notes) == 1 and notes[0].startswith("'b:argmax' passed over only 40 items")
    assert _few_items(None) == []


def test_a_note_on_too_few_items_says_whose_samples_to_add() -> None:
    """What to do, in words: a group's row asks for more of that group's samples, a row on
    generated samples for real ones (--inputs); 3 errors / (40 x 0.015) -> 5x as many."""
    row = {"passed": True, "items": 40, "allowed": 0.015}
    grouped = _few_items({"metrics": {"logits@day:argmax": row}, "groups": {"day": {"samples": 4, "passed": True}}})
    assert len(grouped) == 1 and grouped[0].endswith("give group 'day' about 5x as many samples")
    generated = _few_items({"metrics": {"logits:argmax": row}}, generated=True)
    assert len(generated) == 1
    assert generated[0].endswith("give real samples with --inputs, about 5x as many as were generated")


def test_group_labels_must_match_the_samples() -> None:
    with pytest.raises(BadInputError, match="group labels"):
        quantize_int8(str(TINYCNN), _images(6), require_speedup=False, groups=["a"] * 5)


def _page(boxes: int, h: int = 64) -> np.ndarray:
    """``[1, 1, h, 8 * boxes]``: ``boxes`` separate 4x6 boxes at 0.9."""
    m = np.zeros((1, 1, h, 8 * max(boxes, 1)), np.float32)
    for b in range(boxes):
        m[0, 0, 10:16, 8 * b:8 * b + 4] = 0.9
    return m


def test_added_boxes_counts_boxes_beyond_the_references() -> None:
    ref, got = _page(4), _page(4)
    got[0, 0, 40:46, 0:4] = 0.9  # a fifth box
    parts = tm.deviations("detection-map", [ref], [got])
    assert parts["added_boxes"] == pytest.approx(1 / 4) and parts["extra_boxes"] == 1.0
    lost = ref.copy()
    lost[0, 0, 10:16, 24:28] = 0.0  # the fourth box gone
    fewer = tm.deviations("detection-map", [ref], [lost])
    assert fewer["added_boxes"] == 0.0  # boxes lost are box F1's concern, not added ones
    empty = np.zeros_like(ref)
    assert tm.deviations("detection-map", [empty], [got])["added_boxes"] == 5.0  # over at least 1 box


def test_groups_are_judged_apart_a_pooled_metric_hides_a_false_positive() -> None:
    # 4 pages of 50 boxes each, identical in the candidate; 4 photos with nothing on them,
    # where the candidate finds one box
    pages = [_page(50) for _ in range(4)]
    photos = [np.zeros((1, 1, 64, 400), np.float32) for _ in range(4)]
    got_photos = [p.copy() for p in photos]
    got_photos[2][0, 0, 20:26, 100:104] = 0.9
    reference = {"map": pages + photos}
    candidate = {"map": pages + got_photos}
    pooled = tm.TaskJudge(reference, reference)(candidate)
    # the test's own arithmetic: F1 = 2 * 200 / (200 + 201), added = 1 / 200, both within 1.5 * 0.01
    assert pooled["metrics"]["map:box_f1"]["deviation"] == pytest.approx(1 - 400 / 401, abs=1e-6)
    assert pooled["metrics"]["map:added_boxes"]["deviation"] == pytest.approx(1 / 200)
    assert pooled["passed"] is True
    grouped = tm.TaskJudge(reference, reference, groups=["page"] * 4 + ["photo"] * 4)(candidate)
    rows = grouped["metrics"]
    assert rows["map@page:box_f1"]["deviation"] == 0.0 and rows["map@page:box_f1"]["passed"] is True
    assert rows["map@photo:added_boxes"]["deviation"] == 1.0 and rows["map@photo:added_boxes"]["passed"] is False
    assert grouped["passed"] is False
    # float32 itself finding that box under noise makes it the floor: within the margin
    moved = {"map": pages + got_photos}
    again = tm.TaskJudge(reference, moved, groups=["page"] * 4 + ["photo"] * 4)(candidate)
    assert again["metrics"]["map@photo:added_boxes"]["floor"] == 1.0 and again["passed"] is True


def test_a_user_target_does_not_replace_the_added_boxes_bound() -> None:
    ref = [_page(20)]
    got = [_page(20)]
    got[0][0, 0, 40:46, 0:4] = 0.9  # 21 boxes: F1 0.976 meets a 0.9 target, 1 / 20 added does not
    verdict = tm.TaskJudge({"map": ref}, {"map": ref}, metric_target=0.9)({"map": got})
    assert verdict["metrics"]["map:box_f1"]["passed"] is True
    assert verdict["metrics"]["map:added_boxes"]["passed"] is False and verdict["passed"] is False


def test_a_group_of_negatives_is_judged_by_the_boxes_added() -> None:
    # photos with nothing to detect: float32 finds 3 spurious boxes, the candidate 2 others
    # (box F1 0, mask IoU 0: meaningless there), or 4
    pages = [_page(20) for _ in range(2)]
    photo, fewer, more = (np.zeros((1, 1, 64, 160), np.float32) for _ in range(3))
    for x in (0, 40, 80):
        photo[0, 0, 5:11, x:x + 4] = 0.9
    for x in (20, 60):
        fewer[0, 0, 30:36, x:x + 4] = 0.9
    more[:] = photo
    more[0, 0, 40:46, 120:124] = 0.9
    reference = {"map": pages + [photo]}
    groups = ["page", "page", "photo"]
    judge = tm.TaskJudge(reference, reference, metric={"@photo": "added-boxes"}, groups=groups)
    assert judge.metric_names() == {"map@page": "detection-map", "map@photo": "added-boxes"}
    verdict = judge({"map": pages + [fewer]})
    assert set(k for k in verdict["metrics"] if k.startswith("map@photo")) == {"map@photo:added_boxes"}
    assert verdict["metrics"]["map@photo:added_boxes"]["deviation"] == 0.0 and verdict["passed"] is True
    verdict = judge({"map": pages + [more]})
    assert verdict["metrics"]["map@photo:added_boxes"]["deviation"] == pytest.approx(1 / 3)
    assert verdict["passed"] is False
    # the most specific name wins: output@group over @group over output
    named = tm.TaskJudge(reference, reference, groups=groups,
                         metric={"map": "sqnr", "@photo": "added-boxes", "map@page": "detection-map"})
    assert named.metric_names() == {"map@page": "detection-map", "map@photo": "added-boxes"}
    with pytest.raises(BadInputError, match="unknown INT8 metric"):
        tm.TaskJudge(reference, reference, groups=groups, metric={"@photo": "no-such-metric"})


def test_the_driver_judges_each_group_on_its_own_samples() -> None:
    data = _images(24)
    groups = ["even", "odd"] * 12
    quantized, stats = quantize_int8(str(TINYCNN), data, require_speedup=False, require_target=False,
                                     accuracy_fallback=False, bias_correction=False, groups=groups)
    assert stats["acceptance"]["metrics"] == {"logits@even": "argmax", "logits@odd": "argmax"}
    rows = stats["fallback"]["evaluation"]["task"]["metrics"]
    judged = data if stats["acceptance"]["judged_samples"] == 24 else data[-stats["acceptance"]["judged_samples"]:]
    offset = len(data) - len(judged)
    for label in ("even", "odd"):
        subset = [f for i, f in enumerate(judged) if groups[offset + i] == label]
        items, deviation = _agreement(quantized, subset)
        row = rows[f"logits@{label}:argmax"]
        assert row["items"] == items and row["deviation"] == pytest.approx(deviation, abs=1e-6)


def test_a_judge_of_some_samples_equals_one_built_on_them() -> None:
    rng = np.random.default_rng(3)
    reference = {"map": [_page(int(rng.integers(1, 30))) for _ in range(6)]}
    moved = {"map": [m + (rng.random(m.shape) < 0.01).astype(np.float32) * 0.9 for m in reference["map"]]}
    groups = ["a", "b", "a", "b", "a", "b"]
    picked = [1, 2, 5]
    subset = tm.TaskJudge(reference, moved, groups=groups).select(picked)
    direct = tm.TaskJudge({"map": [reference["map"][i] for i in picked]}, {"map": [moved["map"][i] for i in picked]},
                          groups=[groups[i] for i in picked])
    assert subset.floor == direct.floor and subset.floor_items == direct.floor_items
    got = {"map": [moved["map"][i] for i in picked]}
    assert subset(got) == direct(got)


def test_optimize_judges_int8_with_the_verifiers_judge() -> None:
    # the pass and the final verification judge the same 12 samples against one floor: the
    # original's, measured once
    data = _images(12)
    result = optcc.optimize(str(TINYCNN), int8_calibration=data, int8_options={"require_speedup": False})
    stats = next(r.stats for r in result.report.passes if r.name == "quantize-int8-calibrated")
    acceptance = stats["acceptance"]
    assert acceptance["reference"].startswith("the verifier's")
    assert acceptance["judged_samples"] == 12
    verification = result.report.verification
    assert verification["task"]["metrics"]["logits:argmax"]["floor"] == acceptance["floor"]["logits"]["argmax"]
    assert stats["modified"]
    items, deviation = _agreement(result.ir_model, data)  # the test's own count, on onnx's reference
    row = verification["task"]["metrics"]["logits:argmax"]
    assert row["items"] == items and row["deviation"] == pytest.approx(deviation, abs=1e-6)


def test_the_final_verification_judges_each_group_apart() -> None:
    data = _images(24)
    groups = ["even", "odd"] * 12
    result = optcc.optimize(str(TINYCNN), int8_calibration=data,
                            int8_options={"require_speedup": False, "groups": groups})
    rows = result.report.verification["task"]["metrics"]
    assert {"logits@even:argmax", "logits@odd:argmax"} <= set(rows)
    stats = next(r.stats for r in result.report.passes if r.name == "quantize-int8-calibrated")
    assert stats["acceptance"]["reference"].startswith("the verifier's")
    assert stats["modified"]
    for label in ("even", "odd"):
        items, deviation = _agreement(result.ir_model, [f for f, g in zip(data, groups) if g == label])
        assert rows[f"logits@{label}:argmax"]["items"] == items
        assert rows[f"logits@{label}:argmax"]["deviation"] == pytest.approx(deviation, abs=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(), reason="no CUDA execution provider")
def test_the_report_keeps_one_task_shape_on_several_providers() -> None:
    """``task`` is the first provider's verdict whatever the providers; each provider's is in
    ``task_by_provider`` when there are several."""
    result = optcc.optimize(str(TINYCNN), int8_calibration=_images(12), int8_options={"require_speedup": False},
                            providers=["cpu", "cuda"])
    verification = result.report.verification
    assert "logits:argmax" in verification["task"]["metrics"]
    assert set(verification["task_by_provider"]) == {"CPUExecutionProvider", "CUDAExecutionProvider"}
    assert verification["task_by_provider"]["CPUExecutionProvider"] == verification["task"]


def _sigmoid_map_model() -> bytes:
    """``y = Sigmoid(Conv(x))`` on ``[1, 1, 16, 16]``, a 1x1 kernel of 4: inputs of +-1 give
    a map saturated at 0 or 1 (0.018 or 0.982), inputs near 0 a soft one."""
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.full((1, 1, 1, 1), 4.0, np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Sigmoid", ["c"], ["y"])],
        "sigmoid_map", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 16, 16])], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _maps_saturated_then_soft(n: int, soft: int) -> list[dict[str, np.ndarray]]:
    """``n`` inputs, the last ``soft`` of them near 0 (a soft map), the others +-1."""
    rng = np.random.default_rng(7)
    hard = [{"x": rng.choice([-1.0, 1.0], (1, 1, 16, 16)).astype(np.float32)} for _ in range(n - soft)]
    return hard + [{"x": rng.uniform(-0.05, 0.05, (1, 1, 16, 16)).astype(np.float32)} for _ in range(soft)]


def test_a_judge_of_some_samples_keeps_the_metrics_chosen_on_all() -> None:
    """The auto rule reads every sample's values: 1 soft map among 20 leaves the output a
    detection map, while the last 4 (the held-out part), the soft one among them, are a
    soft map (SQNR). The judge of those 4, selected from the judge of all 20, still judges
    a detection map (the rows it plans are the whole judge's, labels and a callable
    included)."""
    data = _maps_saturated_then_soft(20, 1)
    session = ort.InferenceSession(_sigmoid_map_model(), providers=["CPUExecutionProvider"])
    maps = [session.run(None, f)[0] for f in data]
    assert tm.choose_metric(maps, "y") == "detection-map" and tm.choose_metric(maps[-4:], "y") == "sqnr"
    ids = [np.array([[i % 3]], np.int64) for i in range(20)]
    reference, moved = {"y": maps, "ids": ids}, {"y": [m + np.float32(1e-4) for m in maps], "ids": ids}
    judge = tm.TaskJudge(reference, moved)
    assert judge.metric_names() == {"y": "detection-map", "ids": "labels"}
    assert judge.select([16, 17, 18, 19]).metric_names() == judge.metric_names()
    assert tm.TaskJudge({n: v[-4:] for n, v in reference.items()},
                        {n: v[-4:] for n, v in moved.items()}).metric_names()["y"] == "sqnr"

    def agreement(ref: dict, got: dict) -> float:
        return float(np.mean([np.array_equal(a, b) for a, b in zip(ref["y"], got["y"])]))

    assert tm.TaskJudge(reference, moved, metric=agreement).select([16, 17, 18, 19]).plan == {"*": agreement}


def test_the_int8_pass_judges_each_output_as_the_verification_does() -> None:
    """Through ``optimize`` the pass judges the held-out part of the verifier's samples:
    with the metric the verification chose on all of them (detection-map), not one chosen
    again on the held-out soft maps (SQNR), which let the pass accept what the final
    verification then judged otherwise and reverted (rembg's u2netp: 11 minutes, then
    reverted on box F1)."""
    data = _maps_saturated_then_soft(20, 1)
    result = optcc.optimize(_sigmoid_map_model(), int8_calibration=data,
                            int8_options={"require_speedup": False}, allow_float_fallback=True)
    stats = next(r.stats for r in result.report.passes if r.name == "quantize-int8-calibrated")
    assert stats["acceptance"]["reference"].startswith("the verifier's")
    assert stats["acceptance"]["metrics"] == {"y": "detection-map"}
    task = result.report.verification["task"]
    if task is not None:  # verified by the task (INT8 applied): the same metric
        assert {row["metric"] for row in task["metrics"].values() if row["metric"] != "sqnr"} == {"detection-map"}


def test_a_probability_one_ulp_above_one_is_still_a_probability() -> None:
    """onnxruntime's float32 Sigmoid returns one ulp above 1 at some inputs: a detection
    map or per-frame probability holding such a pixel is judged as one all the same; a
    value clearly above 1 is no probability, and the map is judged by SQNR."""
    session = ort.InferenceSession(_sigmoid_map_model(), providers=["CPUExecutionProvider"])
    maps = [session.run(None, f)[0] for f in _maps_saturated_then_soft(6, 0)]
    assert tm.choose_metric(maps, "y") == "detection-map"
    above = np.nextafter(np.float32(1.0), np.float32(2.0))
    assert float(above) > 1.0
    rounded = [m.copy() for m in maps]
    rounded[2][0, 0, 3, 5] = above
    assert tm.choose_metric(rounded, "y") == "detection-map"
    rounded[2][0, 0, 3, 5] = np.float32(1.01)
    assert tm.choose_metric(rounded, "y") == "sqnr"
    frames = np.zeros((1, 12, 1), np.float32)
    frames[0, 4:8, 0] = above
    assert tm.choose_metric([frames], "speech") == "threshold"
    frames[0, 4:8, 0] = 1.01
    assert tm.choose_metric([frames], "speech") == "sqnr"
