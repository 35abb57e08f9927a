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


def test_yolo_boxes_keep_the_best_of_overlapping_anchors() -> None:
    # [1, 4 + 2 classes, 3 anchors]: anchors 0 and 1 overlap (class 0), anchor 2 is class 1
    pred = np.array([[[10, 11, 50], [10, 10, 50], [8, 8, 6], [8, 8, 6],
                      [0.9, 0.6, 0.1], [0.1, 0.1, 0.7]]], np.float32)
    ((boxes, classes, scores),) = tm.yolo_boxes(pred)
    assert boxes.tolist() == [[6, 6, 14, 14], [47, 47, 53, 53]] and classes.tolist() == [0, 1]
    assert scores.tolist() == pytest.approx([0.9, 0.7])
    # a detection crossing the threshold (0.3 -> 0.2) is no error; a confident one lost is
    crossing = pred.copy()
    crossing[0, 4, 0], crossing[0, 4, 1] = 0.3, 0.2
    lowered = crossing.copy()
    lowered[0, 4, 0] = 0.2
    assert tm.deviations("boxes", [crossing], [lowered])["box_f1"] == 0.0
    lost = pred.copy()
    lost[0, 5, 2] = 0.05  # the class-1 box (0.7) disappears: 1 error over 2 + 1 confident boxes
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
    assert tm.choose_metric(np.full((2, 10), 0.1, np.float32)) == "argmax"
    assert tm.choose_metric(np.full((1, 40, 10), 0.1, np.float32)) == "ctc"
    assert tm.choose_metric(np.random.default_rng(0).random((1, 1, 64, 64)).astype(np.float32)) == "detection-map"
    assert tm.choose_metric(np.random.default_rng(0).random((1, 7, 100)).astype(np.float32)) == "boxes"
    assert tm.choose_metric(np.random.default_rng(0).normal(size=(1, 8, 4, 4)).astype(np.float32)) == "sqnr"


def test_perturbation_at_the_inputs_resolution() -> None:
    image = _images(1)[0]["image"]
    scalars = np.linspace(1, 2, 16, dtype=np.float32).reshape(4, 4)
    ids = np.arange(6, dtype=np.int64)
    moved, how = tm.perturb({"image": image, "x": scalars, "ids": ids})
    span = image.max(axis=(0, 2, 3), keepdims=True) - image.min(axis=(0, 2, 3), keepdims=True)
    assert np.allclose(np.abs(moved["image"] - image), span / 255.0, atol=1e-7)
    assert np.array_equal(np.abs(moved["x"] - scalars), np.spacing(scalars))
    assert moved["ids"] is ids or np.array_equal(moved["ids"], ids)
    assert set(how) == {"image", "x"}
    again, _ = tm.perturb({"image": image, "x": scalars, "ids": ids})
    assert np.array_equal(again["image"], moved["image"])  # a fixed seed: the floor is reproducible


def test_driver_reports_the_floor_next_to_the_result() -> None:
    _, stats = quantize_int8(str(TINYCNN), _images(10), require_speedup=False)
    acceptance = stats["acceptance"]
    assert acceptance["metrics"] == {"logits": "argmax"} and acceptance["floor"]["logits"].keys() == {"argmax"}
    assert "8-bit image" in acceptance["perturbation"]["image"]
    row = stats["fallback"]["evaluation"]["task"]["metrics"]["logits:argmax"]
    assert {"deviation", "floor", "allowed", "passed"} <= row.keys()


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
