"""INT8 acceptance by the task: built-in metrics against hand-computed references, the
noise-floor perturbation, and the driver deciding on the metric (built-in or a callback)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from optcc.numerics import task as tm
from optcc.quant.driver import quantize_int8

TINYCNN = Path(__file__).resolve().parent.parent / "fixtures" / "tinycnn.onnx"


def _images(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    # 8-bit pictures, normalized: each value a multiple of 1/255
    return [{"image": (rng.integers(0, 256, (1, 3, 32, 32)) / 255.0).astype(np.float32)} for _ in range(n)]


def _one_hot(labels: list[int], classes: int = 5) -> np.ndarray:
    return np.eye(classes, dtype=np.float32)[labels][None]  # [1, T, C]


def test_ctc_greedy_merges_repeats_and_drops_blanks() -> None:
    probs = _one_hot([0, 3, 3, 0, 3, 1, 1, 0, 2])
    assert tm.ctc_greedy(probs) == [[3, 3, 1, 2]]
    got = _one_hot([0, 3, 3, 0, 4, 1, 1, 0, 2])  # one substitution in four characters
    parts = tm.deviations("ctc", [probs], [got])
    assert parts == {"ctc_exact": 1.0, "cer": 0.25}
    assert tm.deviations("ctc", [probs], [probs]) == {"ctc_exact": 0.0, "cer": 0.0}


def test_detection_map_boxes_f1_and_iou() -> None:
    ref = np.zeros((1, 1, 20, 30), np.float32)
    ref[0, 0, 2:5, 3:10] = 0.9  # box x 3..10, y 2..5
    ref[0, 0, 10:15, 20:28] = 0.8
    assert [b.tolist() for b in tm.map_boxes(ref)] == [[[3, 2, 10, 5], [20, 10, 28, 15]]]
    got = ref.copy()
    got[0, 0, 16:19, 0:3] = 0.5  # one extra detection (3x3 pixels)
    got[0, 0, 0, 25] = 0.9  # a speckle: in the mask, too small for a box
    parts = tm.deviations("detection-map", [ref], [got])
    # F1 = 2*2 / (2 + 3); IoU = (21 + 40) / (21 + 40 + 9 + 1)
    assert parts["box_f1"] == pytest.approx(1 - 4 / 5)
    assert parts["mask_iou"] == pytest.approx(1 - 61 / 71)
    assert parts["extra_boxes"] == 1.0
    labels, count = tm._label_numpy(got[0, 0] > 0.3)
    assert count == 4 and len(np.unique(labels)) == 5


def _brute_force_boxes(mask: np.ndarray) -> list[list[int]]:
    """Boxes ``[x0, y0, x1, y1]`` of the 4-connected components of ``mask`` by flood fill,
    in the order of each component's first pixel in row-major order."""
    seen = np.zeros_like(mask, bool)
    boxes = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, ys, xs = [(y0, x0)], [], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            ys.append(y)
            xs.append(x)
            for v, u in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= v < mask.shape[0] and 0 <= u < mask.shape[1] and mask[v, u] and not seen[v, u]:
                    seen[v, u] = True
                    stack.append((v, u))
        boxes.append([min(xs), min(ys), max(xs) + 1, max(ys) + 1])
    return boxes


@pytest.mark.parametrize("seed", range(6))
def test_component_boxes_match_a_flood_fill(seed: int) -> None:
    rng = np.random.default_rng(seed)
    mask = rng.random((23, 31)) < (0.3 + 0.1 * seed)  # from speckles to one sprawling component
    expected = _brute_force_boxes(mask)
    assert tm._components(mask).tolist() == expected
    assert tm._extents(*tm._label_numpy(mask)).tolist() == expected  # without scipy
    kept = [b for b in expected if min(b[2] - b[0], b[3] - b[1]) >= tm.MIN_BOX_SIDE]
    assert [b.tolist() for b in tm.map_boxes(mask[None, None].astype(np.float32))] == [kept]
    assert tm._components(np.zeros((4, 5), bool)).shape == (0, 4)
    assert tm._extents(*tm._label_numpy(np.zeros((4, 5), bool))).shape == (0, 4)


def test_yolo_boxes_keep_the_best_of_overlapping_anchors() -> None:
    # [1, 4 + 2 classes, 3 anchors]: anchors 0 and 1 overlap (class 0), anchor 2 is class 1
    pred = np.array([[[10, 11, 50], [10, 10, 50], [8, 8, 6], [8, 8, 6],
                      [0.9, 0.6, 0.1], [0.1, 0.1, 0.7]]], np.float32)
    ((boxes, classes, scores),) = tm.yolo_boxes(pred)
    assert boxes.tolist() == [[6, 6, 14, 14], [47, 47, 53, 53]] and classes.tolist() == [0, 1]
    assert scores.tolist() == pytest.approx([0.9, 0.7])
    # a detection that falls below the deployment score (0.3 -> 0.2) is lost to a user
    # thresholding at 0.25, as much as a confident one: 1 error over 2 + 1 boxes either way
    crossing = pred.copy()
    crossing[0, 4, 0], crossing[0, 4, 1] = 0.3, 0.2
    lowered = crossing.copy()
    lowered[0, 4, 0] = 0.2
    assert tm.deviations("boxes", [crossing], [lowered]) == {"box_f1": pytest.approx(1 / 3), "extra_boxes": 0.0}
    lost = pred.copy()
    lost[0, 5, 2] = 0.05  # the class-1 box (0.7) disappears
    assert tm.deviations("boxes", [pred], [lost]) == {"box_f1": pytest.approx(1 / 3), "extra_boxes": 0.0}


def test_sqnr_is_summed_over_all_samples() -> None:
    refs = [np.zeros(4, np.float32), np.array([1, 2, 3, 4], np.float32)]
    gots = [np.full(4, 0.1, np.float32), np.array([1, 2, 3, 4.5], np.float32)]
    noise = 4 * 0.1**2 + 0.5**2
    signal = 1 + 4 + 9 + 16
    assert tm.deviations("sqnr", refs, gots)["sqnr"] == pytest.approx(noise / signal, rel=1e-5)


def test_argmax_on_confident_samples_only() -> None:
    ref = np.array([[0.9, 0.1], [0.52, 0.48], [0.2, 0.8]], np.float32)
    got = np.array([[0.8, 0.2], [0.45, 0.55], [0.6, 0.4]], np.float32)  # the unsure row flips, and row 3
    assert tm.deviations("argmax", [ref], [got])["argmax"] == pytest.approx(0.5)


def test_metric_chosen_from_the_output() -> None:
    assert tm.choose_metric(np.eye(10, dtype=np.float32)[[2, 7]] * 5) == "argmax"
    assert tm.choose_metric(np.full((2, 10), 0.1, np.float32)) == "sqnr"  # confident nowhere: no class scores
    line = np.eye(10, dtype=np.float32)[[0, 3, 0, 0, 5, 5, 0, 7, 0, 0] * 4][None] * 0.9 + 0.01  # blanks, spikes
    assert tm.choose_metric(line) == "ctc"
    ink = (np.random.default_rng(0).random((1, 1, 64, 64)) > 0.9).astype(np.float32)  # pixels decided: 0 or 1
    assert tm.choose_metric(ink) == "detection-map"
    assert tm.choose_metric(np.random.default_rng(0).random((1, 7, 100)).astype(np.float32)) == "boxes"
    assert tm.choose_metric(np.random.default_rng(0).normal(size=(1, 8, 4, 4)).astype(np.float32)) == "sqnr"


def test_a_map_most_of_whose_pixels_are_undecided_is_judged_by_sqnr() -> None:
    """A saliency map or soft mask in [0, 1] is no detector's map: thresholding it at 0.3
    would draw boxes no user draws. The value rule reads every sample, not the first."""
    rng = np.random.default_rng(1)
    ink = [(rng.random((1, 1, 64, 64)) > 0.9).astype(np.float32) for _ in range(3)]
    soft = [rng.random((1, 1, 64, 64)).astype(np.float32) for _ in range(3)]
    edges = [np.clip(m + 0.5 * (rng.random(m.shape) < 0.05), 0, 1).astype(np.float32) for m in ink]  # 5% between
    assert tm.choose_metric(ink) == tm.choose_metric(edges) == "detection-map"
    assert tm.choose_metric(soft) == tm.choose_metric([ink[0], *soft]) == "sqnr"
    assert tm.choose_metric(soft[0][0]) == "sqnr"  # [N, H, W]: not an embedding either
    judge = tm.TaskJudge(reference={"saliency": soft, "map": ink}, perturbed={"saliency": soft, "map": ink})
    assert judge.metric_names() == {"saliency": "sqnr", "map": "detection-map"}


def test_perturbation_at_the_inputs_resolution() -> None:
    image = _images(1)[0]["image"]
    scalars = np.linspace(1, 2, 16, dtype=np.float32).reshape(4, 4)
    ids = np.arange(6, dtype=np.int64)
    moved, how = tm.perturb({"image": image, "x": scalars, "ids": ids})
    span = image.max(axis=(0, 2, 3), keepdims=True) - image.min(axis=(0, 2, 3), keepdims=True)
    assert np.allclose(np.abs(moved["image"] - image), span / 255.0, atol=1e-7)
    whole = scalars == np.trunc(scalars)  # 1.0 and 2.0: whole numbers stay (a Cast would truncate them)
    assert np.array_equal(np.abs(moved["x"] - scalars), np.where(whole, 0, np.spacing(scalars)))
    assert moved["ids"] is ids or np.array_equal(moved["ids"], ids)
    assert set(how) == {"image", "x"}
    again, _ = tm.perturb({"image": image, "x": scalars, "ids": ids})
    assert np.array_equal(again["image"], moved["image"])  # a fixed seed: the floor is reproducible


def test_driver_reports_the_floor_next_to_the_result() -> None:
    _, stats = quantize_int8(str(TINYCNN), _images(6), require_speedup=False)
    acceptance = stats["acceptance"]
    assert acceptance["metrics"] == {"logits": "argmax"} and acceptance["floor"]["logits"].keys() == {"argmax"}
    assert "8-bit image" in acceptance["perturbation"]["image"]
    # 1 held-out sample, widened to 3, then all 6: still fewer than 10 confident samples, so
    # the output is judged by SQNR against its floor as well; argmax, float32's own flips
    # excused over the floor's draws, still counts the flips float32 makes under none of them
    assert acceptance["held_out_samples"] == 3 and acceptance["judged_samples"] == 6
    rows = stats["fallback"]["evaluation"]["task"]["metrics"]
    assert {"deviation", "floor", "allowed", "items", "passed"} <= rows["logits:argmax"].keys()
    assert rows["logits:argmax"]["items"] <= 6 and "SQNR judges too" in rows["logits:argmax"]["why"]
    assert {"deviation", "floor", "allowed", "passed", "sqnr_db", "floor_sqnr_db"} <= rows["logits:sqnr"].keys()


def _floor_and_int8_error(data: list[dict[str, np.ndarray]]) -> tuple[float, float]:
    """Largest logit change on the held-out samples: float32 under the +-1 grey level
    perturbation, and the fully quantized model (computed here, with onnxruntime)."""
    import onnxruntime as ort

    import optcc

    held = data[-2:]
    float_session = ort.InferenceSession(str(TINYCNN), providers=["CPUExecutionProvider"])
    quantized, _ = quantize_int8(str(TINYCNN), data, require_speedup=False, require_target=False,
                                 accuracy_fallback=False)
    int8_session = ort.InferenceSession(optcc.ir.serialize(quantized).SerializeToString(),
                                        providers=["CPUExecutionProvider"])
    ref = [float_session.run(None, f)[0] for f in held]
    moved = [float_session.run(None, tm.perturb(f, seed=i)[0])[0] for i, f in enumerate(held)]
    int8 = [int8_session.run(None, f)[0] for f in held]
    return (max(float(np.abs(r - m).max()) for r, m in zip(ref, moved)),
            max(float(np.abs(r - q).max()) for r, q in zip(ref, int8)))


def test_a_callback_metric_decides() -> None:
    data = _images(10)
    floor, error = _floor_and_int8_error(data)
    assert error > 2 * floor  # INT8 moves the logits more than twice what one grey level does
    calls = []

    def strict(ref: dict, got: dict) -> float:  # 1 when no logit moved more than 2x the floor
        calls.append(1)
        return float(all(np.abs(r - g).max() <= 2 * floor for r, g in zip(ref["logits"], got["logits"])))

    q, stats = quantize_int8(str(TINYCNN), data, require_speedup=False, metric=strict, max_float_fraction=0.0)
    assert calls and stats["modified"] is False and stats["declined"] == "accuracy"
    assert "*:score deviation 1" in stats["reason"]
    # the same callback with a user target the quantized model meets: shipped
    q, stats = quantize_int8(str(TINYCNN), data, require_speedup=False, metric=strict, metric_target=0.0)
    assert stats["modified"] is True and stats["fallback"]["kept_float"] == []


def test_unknown_metric_is_bad_input() -> None:
    from optcc.errors import BadInputError

    with pytest.raises(BadInputError, match="unknown INT8 metric"):
        quantize_int8(str(TINYCNN), _images(4), require_speedup=False, metric="bleu")


# --------------------------------------------------------------------------- too few items


def _sqnr_noise(refs: list[np.ndarray], gots: list[np.ndarray]) -> float:
    """Noise power / signal power over all samples, in float64 (the test's own reference)."""
    signal = sum(np.sum(np.asarray(r, np.float64) ** 2) for r in refs)
    return float(sum(np.sum((np.asarray(r, np.float64) - np.asarray(g, np.float64)) ** 2)
                     for r, g in zip(refs, gots)) / signal)


def _yolo(boxes: int, anchors: int = 40, seed: int = 0) -> np.ndarray:
    """``[1, 4 + 2, anchors]``: the first ``boxes`` anchors confident (class 0, score 0.9) and
    200 pixels apart; the others score 0.01."""
    rng = np.random.default_rng(seed)
    pred = np.full((1, 6, anchors), 0.01, np.float32)
    pred[0, 0] = 200.0 * np.arange(anchors) + 50.0
    pred[0, 1] = rng.uniform(50, 250, anchors)
    pred[0, 2:4] = rng.uniform(20, 40, (2, anchors))
    pred[0, 4, :boxes] = 0.9
    return pred


def _moved(pred: np.ndarray, scale: float, seed: int = 1) -> np.ndarray:
    """The box coordinates moved by ``scale`` times a fixed noise (class scores unchanged)."""
    out = pred.copy()
    out[:, :4] += scale * np.random.default_rng(seed).normal(size=out[:, :4].shape).astype(np.float32)
    return out


def test_one_confident_box_is_not_decisive_the_output_is_judged_by_sqnr() -> None:
    ref = _yolo(1)
    moved = _moved(ref, 1.0)
    floor = _sqnr_noise([ref[:, :4]], [moved[:, :4]])
    judge = tm.TaskJudge({"output0": [ref]}, {"output0": [moved]}, min_sqnr_db=100.0)  # the floor alone decides
    for scale, expected in ((1.1, True), (2.0, False)):
        got = _moved(ref, scale)  # the box kept, its coordinates moved
        verdict = judge({"output0": [got]})
        box = verdict["metrics"]["output0:box_f1"]
        assert box["deviation"] == 0.0 and box["items"] == 2 and box["judged"] is False and "passed" not in box
        coordinates = verdict["metrics"]["output0:sqnr_coordinates"]
        noise = _sqnr_noise([ref[:, :4]], [got[:, :4]])
        assert coordinates["deviation"] == pytest.approx(noise, rel=1e-4)
        assert coordinates["floor"] == pytest.approx(floor, rel=1e-4)
        assert coordinates["sqnr_db"] == pytest.approx(-10 * np.log10(noise), abs=1e-3)
        assert "box_f1 over 2 boxes" in coordinates["why"] and "judged by SQNR" in coordinates["why"]
        assert bool(noise <= 1.5 * floor) is expected  # the test's own arithmetic
        assert coordinates["passed"] is expected and verdict["passed"] is expected
        assert verdict["metrics"]["output0:sqnr_scores"]["deviation"] == 0.0
    # the one confident box lost: 1 - F1 = 1 over 1 box, not decisive; the class scores'
    # SQNR (0.9 -> 0.05 against 79 scores of 0.01) is 0.54 dB, the coordinates' 40 dB
    lost = moved.copy()
    lost[0, 4, 0] = 0.05
    scores = _sqnr_noise([ref[:, 4:]], [lost[:, 4:]])
    assert -10 * np.log10(scores) == pytest.approx(0.54, abs=0.01)
    for min_sqnr_db, expected in ((25.0, False), (0.5, True)):
        verdict = tm.TaskJudge({"output0": [ref]}, {"output0": [moved]}, min_sqnr_db=min_sqnr_db)({"output0": [lost]})
        rows = verdict["metrics"]
        assert rows["output0:box_f1"]["deviation"] == 1.0 and rows["output0:box_f1"]["items"] == 1
        assert "box_f1 over 1 box:" in rows["output0:sqnr_scores"]["why"]
        assert rows["output0:sqnr_scores"]["sqnr_db"] == pytest.approx(-10 * np.log10(scores), abs=1e-3)
        assert rows["output0:sqnr_coordinates"]["passed"] is True
        assert rows["output0:sqnr_scores"]["passed"] is expected and verdict["passed"] is expected


def test_enough_confident_boxes_the_box_metric_decides() -> None:
    ref = _yolo(6)
    judge = tm.TaskJudge({"output0": [ref]}, {"output0": [_moved(ref, 0.1)]})
    assert judge.floor["output0"]["box_f1"] == 0.0
    got = ref.copy()
    got[0, 4, 5] = 0.05  # one of 6 boxes lost: 1 error over 6 + 5 confident boxes; SQNR ~ 60 dB
    verdict = judge({"output0": [got]})
    assert -10 * np.log10(_sqnr_noise([ref], [got])) > 50
    box = verdict["metrics"]["output0:box_f1"]
    assert box["deviation"] == pytest.approx(1 / 11, abs=1e-6) and box["items"] == 11
    assert box["passed"] is False and verdict["passed"] is False and "output0:sqnr" not in verdict["metrics"]
    verdict = judge({"output0": [_moved(ref, 0.2)]})
    assert verdict["passed"] is True and verdict["metrics"]["output0:box_f1"]["items"] == 12


def _logits(rows: int, seed: int = 0) -> np.ndarray:
    """``[rows, 4]`` logits, each row confidently one class."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(rows, 4)).astype(np.float32)
    logits[np.arange(rows), rng.integers(0, 4, rows)] += 6.0
    return logits


def _flip_first(logits: np.ndarray) -> np.ndarray:
    out = logits.copy()
    top = int(out[0].argmax())
    out[0, (top + 1) % 4] = out[0, top] + 0.5
    return out


def test_argmax_on_few_confident_samples_is_judged_by_sqnr() -> None:
    ref = _logits(3)
    moved = ref + np.float32(0.05) * np.random.default_rng(1).normal(size=ref.shape).astype(np.float32)
    judge = tm.TaskJudge({"logits": [ref]}, {"logits": [moved]}, min_sqnr_db=100.0)  # the floor alone decides
    floor = _sqnr_noise([ref], [moved])
    for got in (_flip_first(ref), ref + np.float32(1.0)):
        verdict = judge({"logits": [got]})
        row = verdict["metrics"]["logits:argmax"]
        assert row["items"] == 3 and row["judged"] is False
        noise = _sqnr_noise([ref], [got])
        assert verdict["passed"] is (noise <= 1.5 * floor) is False  # both move the logits far more than the floor
        assert "argmax over 3 confident samples" in verdict["metrics"]["logits:sqnr"]["why"]
    verdict = judge({"logits": [ref + np.float32(1.1) * (moved - ref)]})
    assert verdict["passed"] is True and verdict["metrics"]["logits:argmax"]["deviation"] == 0.0
    # or the SQNR target, as for an output judged by SQNR: the flip (5.5 dB) meets 5 dB, not 25
    flipped = _flip_first(ref)
    assert -10 * np.log10(_sqnr_noise([ref], [flipped])) == pytest.approx(5.49, abs=0.01)
    for min_sqnr_db, expected in ((5.0, True), (25.0, False)):
        verdict = tm.TaskJudge({"logits": [ref]}, {"logits": [moved]}, min_sqnr_db=min_sqnr_db)({"logits": [flipped]})
        assert verdict["passed"] is expected and verdict["metrics"]["logits:sqnr"]["passed"] is expected


def test_argmax_on_enough_confident_samples_decides() -> None:
    ref = _logits(12)
    judge = tm.TaskJudge({"logits": [ref]}, {"logits": [ref.copy()]})
    verdict = judge({"logits": [_flip_first(ref)]})
    row = verdict["metrics"]["logits:argmax"]
    assert row["items"] == 12 and row["deviation"] == pytest.approx(1 / 12, abs=1e-6) and row["passed"] is False
    assert verdict["passed"] is False and "logits:sqnr" not in verdict["metrics"]


def test_ctc_exact_match_counts_lines_cer_counts_characters() -> None:
    # 3 lines of 8 characters; one character differs: exact match over 3 lines is not
    # decisive, the CER over 24 characters is, and SQNR judges the output too
    labels = [[1, 0, 2, 0, 3, 0, 4, 0, 1, 0, 2, 0, 3, 0, 4, 0], [2, 0] * 8, [3, 0, 4, 0] * 4]
    ref = np.concatenate([_one_hot(line) for line in labels])
    moved = 0.8 * ref + 0.05  # float32 under noise: every probability moves, no decode changes
    judge = tm.TaskJudge({"probs": [ref]}, {"probs": [moved]})
    got = ref.copy()
    got[0, 0] = np.eye(5, dtype=np.float32)[4]  # line 1: 1 -> 4
    assert _sqnr_noise([ref], [got]) <= 1.5 * _sqnr_noise([ref], [moved])  # the test's own arithmetic
    verdict = judge({"probs": [got]})
    rows = verdict["metrics"]
    assert rows["probs:ctc_exact"]["items"] == 3 and rows["probs:ctc_exact"]["judged"] is False
    assert rows["probs:cer"]["items"] == 24 and rows["probs:cer"]["deviation"] == pytest.approx(1 / 24, abs=1e-6)
    assert rows["probs:cer"]["passed"] is False and rows["probs:sqnr"]["passed"] is True
    assert verdict["passed"] is False


def test_detection_map_few_boxes_mask_iou_still_decides_when_it_has_the_pixels() -> None:
    small = np.zeros((1, 1, 32, 32), np.float32)
    small[0, 0, 4:7, 4:7] = 0.9  # one 3x3 box: 1 box, 9 mask pixels
    large = np.zeros((1, 1, 32, 32), np.float32)
    large[0, 0, 4:14, 4:14] = 0.9  # one 10x10 box: 1 box, 100 mask pixels
    for ref, pixels, lost in ((small, 9, 1), (large, 100, 10)):
        moved = np.clip(ref + np.float32(0.1) * np.sign(np.random.default_rng(0).normal(size=ref.shape)), 0, 1)
        judge = tm.TaskJudge({"map": [ref]}, {"map": [moved.astype(np.float32)]})
        got = ref.copy()
        got[0, 0, 4, 4:4 + lost] = 0.2  # pixels leave the mask; the box stays
        assert _sqnr_noise([ref], [got]) <= 1.5 * _sqnr_noise([ref], [moved])  # the test's own arithmetic
        rows = judge({"map": [got]})["metrics"]
        assert rows["map:box_f1"]["items"] == 2 and rows["map:box_f1"]["judged"] is False
        assert rows["map:mask_iou"]["items"] == pixels
        assert rows["map:mask_iou"]["deviation"] == pytest.approx(lost / pixels, rel=1e-5)
        if pixels < tm.MIN_ITEMS:
            assert rows["map:mask_iou"]["judged"] is False and rows["map:sqnr"]["passed"] is True
            assert "box_f1 over 2 boxes; mask_iou over 9 mask pixels" in rows["map:sqnr"]["why"]
        else:
            assert rows["map:mask_iou"]["passed"] is False and "map:sqnr" in rows


def test_a_kv_cache_named_as_not_an_image_moves_by_one_ulp():
    """A past key/value cache [batch, 2 heads, 16, 16] has the shape of a 2-channel picture:
    named in ``not_images`` it moves by one unit in the last place, not a grey level."""
    rng = np.random.default_rng(3)
    cache = rng.standard_normal((1, 2, 16, 16)).astype(np.float32)
    as_image, how_image = tm.perturb({"past": cache}, seed=1)
    as_cache, how_cache = tm.perturb({"past": cache}, seed=1, not_images={"past"})
    assert "8-bit image" in how_image["past"] and how_cache["past"] == "+-1 ulp"
    np.testing.assert_array_equal(np.abs(as_cache["past"] - cache), np.abs(np.spacing(cache)))
    assert np.abs(as_image["past"] - cache).max() > 100 * np.spacing(np.abs(cache)).max()


def test_the_verifier_moves_a_decoders_caches_by_one_ulp():
    from fixtures.gpt2_decoder import gpt2_decoder

    import optcc
    from optcc.numerics.inputs import input_roles

    model = gpt2_decoder(heads=2, hidden=32)
    pasts = [n for n, role in input_roles(optcc.ir.load(model)).items() if role == "past"]
    assert pasts
    with optcc.Verifier(model) as verifier:
        judge = verifier.task_judge(verifier.providers[0])
    assert all(judge.perturbation[name] == "+-1 ulp" for name in pasts)


def test_embedding_ranking_counts_its_pairs_so_few_samples_cannot_decide():
    """The ranking component is a fraction over pairs of samples: with 3 pooled vectors
    (3 pairs) one swapped pair moves Spearman by 0.5, so it reports its pair count and the
    judge treats fewer than MIN_ITEMS pairs as undecided."""
    from optcc.numerics.task import MIN_ITEMS, measure

    rng = np.random.default_rng(3)
    for n in (3, 6):
        refs = [rng.standard_normal((1, 4, 8)) for _ in range(n)]
        gots = [r + 0.01 * rng.standard_normal(r.shape) for r in refs]
        deviation, items = measure("embedding", refs, gots)
        pairs = n * (n - 1) // 2
        assert items["ranking"] == pairs
        assert (pairs < MIN_ITEMS) == (n == 3)
        # Spearman of the pairwise cosine similarities, recomputed with numpy
        def sims(vs):
            pooled = np.stack([v.mean(1)[0] for v in vs])
            unit = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
            return (unit @ unit.T)[np.triu_indices(n, 1)]
        a, b = np.argsort(np.argsort(sims(refs))), np.argsort(np.argsort(sims(gots)))
        assert deviation["ranking"] == pytest.approx(1.0 - np.corrcoef(a, b)[0, 1])


def test_a_judge_with_few_ranked_pairs_leaves_the_decision_to_the_pooled_cosine():
    """Through the judge (not only ``measure``): a ranking over fewer than MIN_ITEMS pairs
    says so and leaves the decision to the cosine of the pooled embeddings, with no SQNR
    row (raw hidden states' SQNR has no floor when token ids are the inputs)."""
    rng = np.random.default_rng(5)
    refs = [rng.standard_normal((1, 4, 8)).astype(np.float32) for _ in range(3)]
    moved = [r + 1e-3 * rng.standard_normal(r.shape).astype(np.float32) for r in refs]

    def cosine_deviation(outs):  # 1 - mean cosine of the position means, in numpy
        pairs = [(r[0].mean(0).astype(np.float64), o[0].mean(0).astype(np.float64)) for r, o in zip(refs, outs)]
        return 1.0 - np.mean([a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in pairs])

    judge = tm.TaskJudge({"h": refs}, {"h": moved}, metric="embedding", min_sqnr_db=100.0)
    floor = cosine_deviation(moved)
    for scale in (1e-2, 1.0):
        gots = [r + scale * rng.standard_normal(r.shape).astype(np.float32) for r in refs]
        verdict = judge({"h": gots})
        rows = verdict["metrics"]
        assert rows["h:ranking"]["items"] == 3 and rows["h:ranking"]["judged"] is False
        why = rows["h:ranking"]["why"]
        assert "ranking over 3 ranked pairs" in why and "cosine decides" in why
        assert "h:sqnr" not in rows
        deviation = cosine_deviation(gots)
        assert rows["h:cosine"]["deviation"] == pytest.approx(deviation, rel=1e-4, abs=1e-7)
        expected = bool(deviation <= 1.5 * max(floor, tm.MIN_DEVIATION))
        assert expected is (scale == 1e-2)  # the test's own arithmetic: a small error passes, a large one fails
        assert rows["h:cosine"]["passed"] is expected and verdict["passed"] is expected


def test_a_pooled_embedding_output_is_judged_as_it_is():
    """docs/int8.md: a ``[N, C]`` embedding is judged as a classifier unless ``metric=`` says
    otherwise. Named, ``embedding`` takes each ``[1, C]`` sample as the vector itself (there are
    no positions to pool; averaging over C left one number per sample and the cosine raised)."""
    from optcc.numerics.task import measure

    rng = np.random.default_rng(7)
    refs = [rng.standard_normal((1, 16)) for _ in range(6)]
    gots = [r + 0.1 * rng.standard_normal(r.shape) for r in refs]
    deviation, items = measure("embedding", refs, gots)
    cosines = [float(r[0] @ g[0] / np.linalg.norm(r[0]) / np.linalg.norm(g[0])) for r, g in zip(refs, gots)]
    assert deviation["cosine"] == pytest.approx(1.0 - np.mean(cosines), rel=1e-9)
    assert items["ranking"] == 15 and 0.0 <= deviation["ranking"] <= 2.0


def test_int8_with_the_embedding_metric_on_a_pooled_output(tmp_path: Path):
    from optcc import cli

    data = tmp_path / "calib.npz"
    np.savez(data, image=np.stack([d["image"] for d in _images(12)]))
    out = tmp_path / "q.onnx"
    # the 12 images' pair ranking sits at the edge of what the default margin allows; a
    # margin of 3 lets the embedding metric accept, which is what this test checks
    code = cli.main([str(TINYCNN), "--int8", "--calibration", str(data), "--int8-metric", "embedding",
                     "--int8-metric-margin", "3", "--no-int8-speed-check", "-q", "-o", str(out)])
    assert code == 0 and out.is_file()


def test_a_time_major_sequence_is_decoded_along_its_first_axis() -> None:
    """A CRNN's ``[T, batch, C]`` output, one sample of batch 1: ``[T, 1, C]``. Decoded along
    T (as numpy's argmax over the transposed array says), chosen as ``ctc`` when its rows
    are probabilities, and a flipped low-confidence step that changes the text fails."""
    rng = np.random.default_rng(3)
    steps = np.array([1, 1, 0, 2, 0, 3, 3, 0, 4, 0])  # decodes to [1, 2, 3, 4]
    logits = rng.normal(scale=0.1, size=(len(steps), 1, 5)).astype(np.float32)
    logits[np.arange(len(steps)), 0, steps] += 4.0
    logits[4, 0, [0, 1]] = [0.30, 0.25]  # a blank held by a small margin
    assert tm.ctc_greedy(logits) == [[1, 2, 3, 4]] == tm.ctc_greedy(logits.transpose(1, 0, 2))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    assert tm.choose_metric(probs, "probs") == "ctc" and tm.choose_metric(logits, "logits") == "ctc"
    assert tm.choose_metric(logits.transpose(1, 0, 2), "logits") == "argmax"  # [N, T, C] logits: per step
    assert tm.choose_metric(logits, "387") == "ctc"  # unnamed, but deciding a class step by step
    flipped = logits.copy()
    flipped[4, 0, 1] = 0.35  # the blank becomes a 1: [1, 2, 1, 3, 4]
    assert tm.ctc_greedy(flipped) == [[1, 2, 1, 3, 4]]
    draws = [{"logits": [logits + np.float32(0.001) * d]} for d in (1, 2, 3)]
    judge = tm.TaskJudge({"logits": [logits]}, {"logits": [logits + np.float32(0.001)]}, metric="ctc", draws=draws)
    row = judge({"logits": [flipped]})["metrics"]["logits:ctc_exact"]
    assert row["items"] == 1 and row["deviation"] == 1.0 and row["passed"] is False


def test_time_major_hidden_states_are_not_read_as_class_scores() -> None:
    """``[T, 1, H]`` states that decide no class step by step stay embeddings: an RNN's
    (tanh-bounded: confident nowhere) and a transformer's whose outlier channel dominates
    every step (confident, but one class throughout: decoding it would say nothing)."""
    rng = np.random.default_rng(5)
    rnn = np.tanh(rng.normal(size=(30, 1, 64))).astype(np.float32)
    outlier = rng.normal(size=(30, 1, 64)).astype(np.float32)
    outlier[:, :, 7] = 12.0
    assert tm.choose_metric([rnn, rnn[:20]], "out") == "embedding"
    assert tm.choose_metric([outlier, outlier[:20]], "out") == "embedding"
    steps = outlier.copy()
    steps[::3, :, 9] = 20.0  # another class wins every third step: per-step decisions
    assert tm.choose_metric(steps, "out") == "ctc"


def test_an_sqnr_row_passed_by_the_fixed_target_says_so() -> None:
    """Float32's floor under one-ulp noise is ~1e-14 of the signal: a 30 dB candidate is far
    beyond the floor's margin and passes on the 25 dB target, which the row names."""
    rng = np.random.default_rng(0)
    reference = {"y": [rng.standard_normal((1, 7, 3)).astype(np.float32) for _ in range(4)]}
    moved = {"y": [v * np.float32(1 + 1e-7) for v in reference["y"]]}
    judge = tm.TaskJudge(reference, moved, metric="sqnr", min_sqnr_db=25.0)
    got = {"y": [v + np.float32(10 ** (-30 / 20)) * np.sqrt(np.mean(v.astype(np.float64) ** 2)).astype(np.float32)
                 * rng.choice([-1, 1], v.shape).astype(np.float32) for v in reference["y"]]}
    row = judge(got)["metrics"]["y:sqnr"]
    assert row["passed"] and row["deviation"] > row["allowed"]
    assert row["why"] == f"SQNR {row['sqnr_db']:.1f} dB meets the 25 dB target (not the floor's margin)"
    assert "why" not in judge(reference)["metrics"]["y:sqnr"]  # identical: within the floor
