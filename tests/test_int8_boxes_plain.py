"""The ``boxes`` judgement is what a user thresholding at the deployment score measures:
box F1 of the detections at ``BOX_SCORE`` (0.25) after per-class NMS, candidate against
float32, within the margin of float32's own F1 under +-1 grey level averaged over the
draws. A quantized model that shifts scores systematically moves many near-threshold boxes
across 0.25 while float32's noise moves a few: no confident box is lost (a banded count,
confident boxes matched down to a lower score, sees nothing), yet the user sees the
detections change. Every number is checked against an independent numpy decode, NMS
and one-to-one matching."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper as oh
from onnx import numpy_helper as nh

from image_heads import box_iou, picture_model, pictures
from optcc import ir
from optcc.numerics import task as tm
from optcc.numerics.task import FLOOR_DRAWS, perturbation_draws
from optcc.quant.driver import _task_judge

IMAGES = 12
ANCHORS = 40  # per image: boxes 20 pixels apart, 12 pixels wide: no two overlap


# ------------------------------------------------------------------ independent reference


def _numpy_boxes(rows: np.ndarray, threshold: float) -> list[tuple[np.ndarray, int, float]]:
    """``rows``: [A, 4 + K] (cx, cy, w, h, class confidences): best class, threshold,
    per-class greedy NMS at IoU 0.45, best first."""
    conf = rows[:, 4:]
    cls, score = conf.argmax(1), conf.max(1)
    kept: list[tuple[np.ndarray, int, float]] = []
    for i in [i for i in np.argsort(-score, kind="stable") if score[i] >= threshold]:
        cx, cy, w, h = rows[i, :4]
        box = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
        if all(c != cls[i] or box_iou(box, b) <= 0.45 for b, c, _ in kept):
            kept.append((box, int(cls[i]), float(score[i])))
    return kept


def _one_to_one(ref: list, got: list) -> int:
    pairs = sorted(((box_iou(r[0], g[0]), i, j) for i, r in enumerate(ref) for j, g in enumerate(got) if r[1] == g[1]),
                   reverse=True)
    used_r, used_g = set(), set()
    for iou, i, j in pairs:
        if iou >= 0.5 and i not in used_r and j not in used_g:
            used_r.add(i)
            used_g.add(j)
    return len(used_r)


def _plain(refs: list[np.ndarray], gots: list[np.ndarray], to_rows) -> float:
    """1 - F1 over all images at the deployment score 0.25."""
    tp = n = 0
    for r, g in zip(refs, gots):
        rb, gb = _numpy_boxes(to_rows(r), 0.25), _numpy_boxes(to_rows(g), 0.25)
        tp += _one_to_one(rb, gb)
        n += len(rb) + len(gb)
    return 1.0 - (2.0 * tp / n if n else 1.0)


def _banded(refs: list[np.ndarray], gots: list[np.ndarray], to_rows) -> int:
    """The errors a hysteresis count sees: boxes of either side at score >= 0.35 with no
    box of the same class at IoU >= 0.5 on the other side down to score 0.15."""
    errors = 0
    for r, g in zip(refs, gots):
        rb, gb = _numpy_boxes(to_rows(r), 0.15), _numpy_boxes(to_rows(g), 0.15)
        for mine, other in ((rb, gb), (gb, rb)):
            errors += sum(1 for b, c, s in mine if s >= 0.35 and
                          not any(c == oc and box_iou(b, ob) >= 0.5 for ob, oc, _ in other))
    return errors


# ------------------------------------------------------------------ synthetic detector outputs


def _scores(rng: np.random.Generator) -> np.ndarray:
    """Per anchor: 5 confident objects (0.8), 12 near the threshold (0.18-0.24 or 0.26-0.32),
    background."""
    s = np.full(ANCHORS, 0.02)
    s[:5] = 0.8
    s[5:17] = rng.uniform(0.01, 0.07, 12) * rng.choice([-1.0, 1.0], 12) + 0.25
    return s


def _class_rows(scores: np.ndarray) -> np.ndarray:
    """YOLOv8 ``[1, 4 + 2, A]``: class 0 carries the score, class 1 a small constant."""
    p = np.zeros((1, 6, ANCHORS), np.float32)
    p[0, 0] = 20.0 * np.arange(ANCHORS) + 10.0
    p[0, 1] = 30.0
    p[0, 2:4] = 12.0
    p[0, 4] = scores
    p[0, 5] = 0.01
    return p


def _anchor_rows(scores: np.ndarray) -> np.ndarray:
    """YOLOv5 ``[1, A, 5 + 2]``: objectness 0.9 on every object and near-threshold anchor
    (0.05 on background), the class score the rest of the confidence."""
    rows = _class_rows(scores)[0].T  # [A, 6]
    obj = np.where(scores > 0.1, 0.9, 0.05)
    out = np.concatenate([rows[:, :4], obj[:, None], rows[:, 4:5] / obj[:, None], rows[:, 5:6] / obj[:, None]], 1)
    return out[None].astype(np.float32)


def _rows_of_class_rows(p: np.ndarray) -> np.ndarray:
    return p[0].T.astype(np.float64)


def _rows_of_anchor_rows(p: np.ndarray) -> np.ndarray:
    r = p[0].astype(np.float64)
    return np.concatenate([r[:, :4], r[:, 5:] * r[:, 4:5]], 1)


LAYOUTS = {"class-rows": (_class_rows, _rows_of_class_rows), "anchor-rows": (_anchor_rows, _rows_of_anchor_rows)}


def _case(layout: str):
    """float32's outputs, 4 perturbation draws (each score moved by a random +-0.02, some
    near-threshold boxes crossing 0.25 either way), and candidates."""
    make, to_rows = LAYOUTS[layout]
    rng = np.random.default_rng(0)
    base = [_scores(rng) for _ in range(IMAGES)]
    ref = [make(s) for s in base]
    draws = [[make(s + np.where(s > 0.1, rng.uniform(-0.02, 0.02, ANCHORS), 0.0)) for s in base] for _ in range(4)]
    shifted = [make(s + np.where(s > 0.1, 0.05, 0.0)) for s in base]  # every detection's score up by 0.05
    jittered = [make(s + np.where(s > 0.1, 0.004, 0.0)) for s in base]  # no score within 0.01 of 0.25
    return ref, draws, shifted, jittered, to_rows


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_systematic_score_shift_is_judged_as_the_user_sees_it(layout: str) -> None:
    ref, draws, shifted, jittered, to_rows = _case(layout)
    assert tm.box_layout(ref[0]) == ("class-rows" if layout == "class-rows" else "anchor-rows")
    floor = float(np.mean([_plain(ref, d, to_rows) for d in draws]))
    deviation = _plain(ref, shifted, to_rows)
    assert 0 < floor and deviation > 1.5 * floor  # the test's own arithmetic: the shift is beyond the margin
    # the judgements differ: no confident box is lost or added under the shift, nor under any draw
    assert _banded(ref, shifted, to_rows) == 0 and all(_banded(ref, d, to_rows) == 0 for d in draws)
    judge = tm.TaskJudge({"out": ref}, {"out": draws[0]}, draws=[{"out": d} for d in draws[1:]])
    assert judge.metric_names() == {"out": "boxes"} and judge.wants_draws() and not judge.excuses()
    assert judge.floor["out"]["box_f1"] == pytest.approx(floor)  # the mean over the draws
    verdict = judge({"out": shifted})
    row = verdict["metrics"]["out:box_f1"]
    rb = sum(len(_numpy_boxes(to_rows(r), 0.25)) for r in ref)
    gb = sum(len(_numpy_boxes(to_rows(g), 0.25)) for g in shifted)
    assert row["deviation"] == pytest.approx(deviation, abs=1e-6) and row["items"] == rb + gb
    assert row["allowed"] == pytest.approx(1.5 * max(floor, tm.MIN_DEVIATION), abs=1e-6)
    assert row["passed"] is False and verdict["passed"] is False
    assert "deviation_with_float32s_own" not in row
    # a shift that crosses nothing passes, with the coordinates alike
    small = judge({"out": jittered})
    assert _plain(ref, jittered, to_rows) == 0.0 and small["metrics"]["out:box_f1"]["deviation"] == 0.0
    assert small["passed"] is True
    # with the floor's margin the user's own rule decides either way: 1.5 x the mean floor
    for d in draws:  # each draw of float32 against the mean of the draws
        plain = _plain(ref, d, to_rows)
        assert judge({"out": d})["passed"] is (plain <= 1.5 * max(floor, tm.MIN_DEVIATION))


# ------------------------------------------------------------------ the driver's floor


def grid_detector(name: str, seed: int, weight: float, bias: float) -> onnx.ModelProto:
    """image [1, 3, 64, 64] -> YOLOv8 ``[1, 5, 64]``: fixed, disjoint boxes on an 8x8 grid,
    and one class score per cell, Sigmoid of a stride-8 Conv (weights +-``weight`` per
    pixel, of ``seed``) plus ``bias``."""
    w = np.random.default_rng(seed).choice([-weight, weight], size=(1, 3, 8, 8)).astype(np.float32)
    cx = (8.0 * (np.arange(64) % 8) + 4.0).astype(np.float32)
    cy = (8.0 * (np.arange(64) // 8) + 4.0).astype(np.float32)
    coords = np.stack([cx, cy, np.full(64, 6.0, np.float32), np.full(64, 6.0, np.float32)])[None]
    nodes = [oh.make_node("Conv", ["image", "w", "b"], ["c"], strides=[8, 8]),
             oh.make_node("Reshape", ["c", "flat"], ["logits"]),
             oh.make_node("Sigmoid", ["logits"], ["scores"]),
             oh.make_node("Concat", ["coords", "scores"], ["output"], axis=1)]
    inits = [nh.from_array(w, "w"), nh.from_array(np.array([bias], np.float32), "b"),
             nh.from_array(np.array([1, 1, 64], np.int64), "flat"), nh.from_array(coords, "coords")]
    return picture_model(name, nodes, inits, [1, 5, 64])


def _near_threshold_model() -> onnx.ModelProto:
    """``grid_detector`` whose weights (+-2 per pixel) make one grey level of the input
    move scores near 0.25 across it."""
    return grid_detector("v8", seed=1, weight=2.0, bias=-0.5)


def test_the_driver_measures_the_boxes_floor_as_a_mean_over_draws() -> None:
    proto = _near_threshold_model()
    rng = np.random.default_rng(2)
    held = pictures(6, rng)
    judge = _task_judge(ir.load(proto), held, "auto", 1.5, None, 25.0)
    assert judge.metric_names() == {"output": "boxes"} and judge.draw_count == FLOOR_DRAWS
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    run = lambda feeds: [session.run(None, f)[0] for f in feeds]  # noqa: E731
    ref = run(held)
    moved, _ = perturbation_draws(held, FLOOR_DRAWS)
    per_draw = [_plain(ref, run(d), _rows_of_class_rows) for d in moved]
    assert max(per_draw) > 0  # one grey level moves some boxes across 0.25
    assert judge.floor["output"]["box_f1"] == pytest.approx(float(np.mean(per_draw)), abs=1e-6)


def _greedy_pairs(ref: list, got: list) -> int:
    """One-to-one matches of the same class: the pair of the highest IoU left, ties to the
    lowest (reference, candidate) index pair, while one at IoU 0.5 or more is left."""
    pairs = sorted(((-box_iou(r[0], g[0]), i, j) for i, r in enumerate(ref) for j, g in enumerate(got)
                    if r[1] == g[1]))
    used_r, used_g = set(), set()
    for negative, i, j in pairs:
        if -negative >= 0.5 and i not in used_r and j not in used_g:
            used_r.add(i)
            used_g.add(j)
    return len(used_r)


def test_crowded_detections_decode_and_match_as_the_pairwise_definitions() -> None:
    """Hundreds of overlapping boxes of two classes on a coarse grid of coordinates (many
    equal IoUs, so the tie order counts): the NMS and the matching behind box F1 give
    what the pairwise definitions give, box by box."""
    rng = np.random.default_rng(3)
    anchors = 400
    outputs = []
    for _ in range(4):
        p = np.zeros((1, 6, anchors), np.float32)
        p[0, :2] = rng.integers(0, 12, (2, anchors)) * 4.0  # centres on a 4-pixel grid: repeated boxes
        p[0, 2:4] = rng.integers(2, 5, (2, anchors)) * 4.0
        p[0, 4:] = np.round(rng.uniform(0.0, 1.0, (2, anchors)), 2)  # scores tied at 0.01 steps
        outputs.append(p)
    decoded = [tm.yolo_boxes(p, 0.25, "class-rows")[0] for p in outputs]
    expected = [_numpy_boxes(_rows_of_class_rows(p), 0.25) for p in outputs]
    for (boxes, classes, scores), want in zip(decoded, expected):
        assert len(want) > 20
        np.testing.assert_array_equal(boxes, np.array([b for b, _, _ in want]))
        assert classes.tolist() == [c for _, c, _ in want]
        np.testing.assert_array_equal(scores, np.array([s for _, _, s in want]))
    for first, second in [(0, 1), (1, 2), (2, 3), (0, 0)]:
        (rb, rc, _), (gb, gc, _) = decoded[first], decoded[second]
        matched = _greedy_pairs(expected[first], expected[second])
        assert tm._matches(rb, gb, rc, gc) == matched
        f1, false_positives = tm.box_f1([rb], [gb], [rc], [gc])
        assert f1 == pytest.approx(2.0 * matched / (len(rb) + len(gb)))
        assert false_positives == len(gb) - matched
