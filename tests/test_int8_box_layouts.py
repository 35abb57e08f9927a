"""YOLO-style box outputs in their three layouts (``optcc.numerics.task.box_layout``):
YOLOv8's ``[N, 4+K, A]``, YOLOv5's / decoded YOLOX's ``[N, A, 5+K]`` and raw YOLOX's
``[N, A, 5+K]`` on its anchor grid. Small ONNX models make the outputs; the box F1 the
judge reports is checked against an independent numpy decode, NMS and matching; outputs
of the same shape that are not boxes must not be read as boxes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh

from image_heads import box_iou, picture_model, pictures
from optcc.numerics import task as tm
from optcc.quant.driver import quantize_int8

SIDE = 64  # input side: strides 8, 16, 32 give 8x8 + 4x4 + 2x2 = 84 anchors
CLASSES = 2


def _grid(side: int = SIDE, strides: tuple[int, ...] = (8, 16, 32)) -> np.ndarray:
    """[A, 3]: cell x, cell y, stride, levels finest first, cells row-major (written out
    here independently of ``anchor_grid``)."""
    rows = []
    for s in strides:
        for y in range(side // s):
            for x in range(side // s):
                rows.append((x, y, s))
    return np.array(rows, np.float64)


def _raw_prediction(objects: list[tuple[int, int, float, float]], seed: int = 0) -> np.ndarray:
    """[1, A, 5 + CLASSES] raw YOLOX rows: background everywhere (objectness 0.001),
    and per (anchor, class, log w, log h) a confident object (objectness and score 0.95)."""
    rng = np.random.default_rng(seed)
    anchors = len(_grid())
    p = np.zeros((1, anchors, 5 + CLASSES), np.float32)
    p[0, :, :2] = rng.uniform(-0.5, 1.5, (anchors, 2))  # centre offsets in cells, some below 0
    p[0, :, 2:4] = rng.uniform(-1.0, 1.0, (anchors, 2))  # log sizes in strides
    p[0, :, 4] = 0.001
    p[0, :, 5:] = rng.uniform(0.0, 0.3, (anchors, CLASSES))
    for anchor, cls, log_w, log_h in objects:
        p[0, anchor, :4] = (0.5, 0.5, log_w, log_h)
        p[0, anchor, 4] = 0.95
        p[0, anchor, 5:] = 0.01
        p[0, anchor, 5 + cls] = 0.95
    return p


def _decode(raw: np.ndarray) -> np.ndarray:
    grid = _grid()
    out = raw.astype(np.float64).copy()
    out[0, :, :2] = (raw[0, :, :2] + grid[:, :2]) * grid[:, 2:]
    out[0, :, 2:4] = np.exp(raw[0, :, 2:4]) * grid[:, 2:]
    return out.astype(np.float32)


def _decoding_model() -> onnx.ModelProto:
    """raw [1, A, 5+K] -> decoded [1, A, 5+K] (xy + grid) * stride, exp(wh) * stride, as a
    YOLOX export with its decoding (and a YOLOv5 export) computes it in the graph."""
    grid = _grid()
    anchors, width = len(grid), 5 + CLASSES
    nodes = [
        oh.make_node("Split", ["raw", "split"], ["xy", "wh", "scores"], axis=2),
        oh.make_node("Add", ["xy", "cells"], ["xy1"]),
        oh.make_node("Mul", ["xy1", "stride"], ["xy2"]),
        oh.make_node("Exp", ["wh"], ["wh1"]),
        oh.make_node("Mul", ["wh1", "stride"], ["wh2"]),
        oh.make_node("Concat", ["xy2", "wh2", "scores"], ["boxes"], axis=2),
    ]
    inits = [nh.from_array(np.array([2, 2, width - 4], np.int64), "split"),
             nh.from_array(grid[None, :, :2].astype(np.float32), "cells"),
             nh.from_array(grid[None, :, 2:].astype(np.float32), "stride")]
    graph = oh.make_graph(nodes, "decode", [oh.make_tensor_value_info("raw", TensorProto.FLOAT, [1, anchors, width])],
                          [oh.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, anchors, width])], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 13)], ir_version=8)


def _run(model: onnx.ModelProto, raw: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"raw": raw})[0]


# ------------------------------------------------------------------ independent reference


def _numpy_boxes(decoded: np.ndarray, threshold: float = 0.25) -> list[tuple[np.ndarray, int]]:
    """YOLOv5's post-processing, plainly: confidence = objectness x class score, best class,
    threshold, per-class greedy NMS at IoU 0.45."""
    rows = decoded[0].astype(np.float64)
    conf = rows[:, 5:] * rows[:, 4:5]
    cls, score = conf.argmax(1), conf.max(1)
    order = [i for i in np.argsort(-score, kind="stable") if score[i] >= threshold]
    kept: list[tuple[np.ndarray, int]] = []
    for i in order:
        cx, cy, w, h = rows[i, :4]
        box = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
        if all(c != cls[i] or box_iou(box, b) <= 0.45 for b, c in kept):
            kept.append((box, int(cls[i])))
    return kept


def _numpy_f1(ref: list[tuple[np.ndarray, int]], got: list[tuple[np.ndarray, int]]) -> float:
    """F1 of one-to-one matches (same class, IoU >= 0.5, best pairs first)."""
    pairs = sorted(((box_iou(r, g), i, j) for i, (r, rc) in enumerate(ref) for j, (g, gc) in enumerate(got)
                    if rc == gc), reverse=True)
    used_r, used_g, tp = set(), set(), 0
    for iou, i, j in pairs:
        if iou >= 0.5 and i not in used_r and j not in used_g:
            used_r.add(i)
            used_g.add(j)
            tp += 1
    return 2 * tp / (len(ref) + len(got)) if ref or got else 1.0


# anchors: 0..63 stride 8, 64..79 stride 16, 80..83 stride 32
OBJECTS = [(9, 0, 1.5, 1.5), (10, 0, 1.5, 1.5), (27, 1, 0.0, 0.3), (45, 0, 1.0, 0.8), (66, 1, 0.2, 0.2),
           (81, 0, 0.0, 0.0)]  # anchors 9 and 10 see the same object: NMS keeps one


def _candidate_raw() -> np.ndarray:
    """The reference with three errors: the box of anchor 45 moved by three cells (IoU
    below 0.5: one missed, one added), anchor 66's object lost, a new one at anchor 33."""
    raw = _raw_prediction(OBJECTS)
    raw[0, 45, 0] += 3.0
    raw[0, 66, 4] = 0.01
    raw[0, 33, :5] = (0.5, 0.5, 0.0, 0.0, 0.95)
    raw[0, 33, 5:] = (0.01, 0.95)
    return raw


def test_anchor_grid_matches_the_pyramid_order() -> None:
    assert np.array_equal(tm.anchor_grid(84), _grid())
    assert np.array_equal(tm.anchor_grid(3549), _grid(416))  # a 416 x 416 YOLOX
    assert np.array_equal(tm.anchor_grid(85 * 4), _grid(128, (8, 16, 32, 64)))  # P6
    assert tm.anchor_grid(85) is not None  # a 64 x 64 P6 pyramid: 64 + 16 + 4 + 1
    assert tm.anchor_grid(86) is None and tm.anchor_grid(8400 * 3) is None  # 3 anchors per cell: YOLOv5, decoded


def test_layouts_are_recognized() -> None:
    raw = _raw_prediction(OBJECTS)
    decoded = _run(_decoding_model(), raw)
    assert np.allclose(decoded, _decode(raw), rtol=1e-5, atol=1e-4)
    assert tm.box_layout(raw) == "anchor-grid" and tm.choose_metric(raw, "output") == "boxes"
    assert tm.box_layout(decoded) == "anchor-rows" and tm.choose_metric(decoded, "output") == "boxes"
    v8 = np.ascontiguousarray(tm.class_rows(decoded).astype(np.float32))  # [1, 4+K, A]
    assert v8.shape == (1, 4 + CLASSES, 84) and tm.box_layout(v8) == "class-rows"
    # a sigmoid score rounded one ulp above 1 (onnxruntime's float32 Sigmoid does) is still a score
    above = np.nextafter(np.float32(1.0), np.float32(2.0))
    rounded, rounded_rows = v8.copy(), decoded.astype(np.float32)
    rounded[0, 4, 0], rounded_rows[0, 0, 4] = above, above
    assert tm.box_layout(rounded) == "class-rows" and tm.box_layout(rounded_rows) == "anchor-rows"
    rounded[0, 4, 0], rounded_rows[0, 0, 4] = 1.01, 1.01
    assert tm.box_layout(rounded) is None and tm.box_layout(rounded_rows) is None
    # every layout reads as the same boxes
    boxes = [tm.yolo_boxes(p)[0] for p in (raw, decoded, v8)]
    for b, c, s in boxes[1:]:
        assert np.allclose(b, boxes[0][0], atol=1e-3) and np.array_equal(c, boxes[0][1])
        assert np.allclose(s, boxes[0][2], atol=1e-6)


@pytest.mark.parametrize("layout", ["anchor-grid", "anchor-rows"])
def test_box_f1_against_numpy(layout: str) -> None:
    decoder = _decoding_model()
    make = (lambda r: r) if layout == "anchor-grid" else (lambda r: _run(decoder, r))  # noqa: E731
    ref, got = make(_raw_prediction(OBJECTS)), make(_candidate_raw())
    ref_boxes, got_boxes = _numpy_boxes(_decode(_raw_prediction(OBJECTS))), _numpy_boxes(_decode(_candidate_raw()))
    assert len(ref_boxes) == 5 and len(got_boxes) == 5  # 6 objects, two of them one box after NMS
    f1 = _numpy_f1(ref_boxes, got_boxes)
    assert f1 == pytest.approx(2 * 3 / 10)  # 3 boxes kept of 5 on each side
    parts = tm.deviations("boxes", [ref], [got])
    assert parts["box_f1"] == pytest.approx(1 - f1) and parts["extra_boxes"] == 2.0
    # the judge: metric chosen from the output, deviation next to a floor of float32 against
    # itself moved at the input's resolution (here: identical boxes)
    judge = tm.TaskJudge({"boxes": [ref]}, {"boxes": [ref + np.float32(1e-6)]})
    assert judge.metric_names() == {"boxes": "boxes"}
    verdict = judge({"boxes": [got]})
    row = verdict["metrics"]["boxes:box_f1"]
    assert row["deviation"] == pytest.approx(1 - f1, abs=1e-6) and row["floor"] == 0.0 and row["items"] == 10
    assert not row["passed"] and not verdict["passed"]
    assert judge({"boxes": [ref]})["passed"]


def test_scores_sqnr_is_over_the_confidences() -> None:
    """Over too few boxes, SQNR judges coordinates and scores apart: for anchor rows the
    scores are objectness x class score, the coordinates pixels (the raw ones decoded)."""
    raw, moved = _raw_prediction(OBJECTS), _candidate_raw()
    parts = tm._sqnr_parts("boxes", [raw], [moved])
    ref, got = tm.class_rows(raw), tm.class_rows(moved)
    want = np.sum((ref[:, 4:] - got[:, 4:]) ** 2) / np.sum(ref[:, 4:] ** 2)
    assert parts["sqnr_scores"] == pytest.approx(want)
    conf = raw[0, :, 5:].astype(np.float64) * raw[0, :, 4:5]
    assert np.allclose(ref[0, 4:], conf.T)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@pytest.mark.parametrize("name, sample", [
    ("embeddings", np.random.default_rng(1).normal(size=(1, 8400, 85)).astype(np.float32)),
    ("probabilities", np.random.default_rng(2).random((1, 8400, 85)).astype(np.float32)),
    ("sigmoid features", _sigmoid(np.random.default_rng(3).normal(size=(1, 8400, 85))).astype(np.float32)),
    # rows summing to 1: objectness low on the median anchor, but no pixel centres, no offsets below 0
    ("softmax rows", np.full((1, 8400, 85), 1 / 85, np.float32)),
])
def test_same_shape_not_boxes(name: str, sample: np.ndarray) -> None:
    assert tm.box_layout(sample) is None, name
    assert tm.choose_metric(sample, "output") != "boxes", name


def test_background_median_and_sizes_are_required() -> None:
    decoded = _run(_decoding_model(), _raw_prediction(OBJECTS))
    busy = decoded.copy()
    busy[0, :, 4] = 0.6  # most anchors confident: no detector's output
    assert tm.box_layout(busy) is None
    negative = decoded.copy()
    negative[0, 3, 2] = -4.0  # a negative width in pixels, and centres spread over pixels
    assert tm.box_layout(negative) is None
    odd = _raw_prediction(OBJECTS)[:, :83]  # 83 anchors: no square pyramid
    assert tm.box_layout(odd) is None
    flat = decoded.copy()
    flat[0, :, :2] = np.clip(flat[0, :, :2], 0, 10)  # centres within 10 units, none negative
    assert tm.box_layout(flat) is None


def _yolox_head_model() -> onnx.ModelProto:
    """image [1, 3, 64, 64] -> [1, 84, 6]: per stride a strided Conv to 6 channels (raw
    xy, log wh; objectness and one class through Sigmoid, objectness biased low),
    flattened row-major and concatenated finest first, as a YOLOX head exports."""
    rng = np.random.default_rng(0)
    nodes, inits, levels = [], [], []
    for s in (8, 16, 32):
        w = (rng.normal(size=(6, 3, s, s)) * 0.5 / s).astype(np.float32)
        b = np.array([0.5, 0.5, 0.0, 0.0, -5.0, 0.0], np.float32)
        inits += [nh.from_array(w, f"w{s}"), nh.from_array(b, f"b{s}")]
        nodes += [oh.make_node("Conv", ["image", f"w{s}", f"b{s}"], [f"c{s}"], strides=[s, s]),
                  oh.make_node("Reshape", [f"c{s}", "flat"], [f"r{s}"])]
        levels.append(f"r{s}")
    inits += [nh.from_array(np.array([1, 6, -1], np.int64), "flat"),
              nh.from_array(np.array([4, 2], np.int64), "split")]
    nodes += [oh.make_node("Concat", levels, ["cat"], axis=2),
              oh.make_node("Transpose", ["cat"], ["rows"], perm=[0, 2, 1]),
              oh.make_node("Split", ["rows", "split"], ["reg", "logits"], axis=2),
              oh.make_node("Sigmoid", ["logits"], ["probs"]),
              oh.make_node("Concat", ["reg", "probs"], ["output"], axis=2)]
    return picture_model("yolox", nodes, inits, [1, 84, 6])


def test_driver_judges_a_yolox_head_by_boxes() -> None:
    model = _yolox_head_model()
    rng = np.random.default_rng(0)
    samples = pictures(5, rng)
    out = _run_image(model, samples[0]["image"])
    assert tm.box_layout(out) == "anchor-grid"
    _, stats = quantize_int8(model, samples, require_speedup=False)
    assert stats["acceptance"]["metrics"] == {"output": "boxes"}
    rows = stats["fallback"]["evaluation"]["task"]["metrics"]
    assert "output:box_f1" in rows
    assert {"output:sqnr_coordinates", "output:sqnr_scores"} <= rows.keys()  # few confident boxes


def test_a_decline_judged_by_sqnr_says_the_boxes_were_too_few() -> None:
    """With no margin the head's INT8 misses; the reason names the SQNR rows that missed
    and why SQNR judged them: the held-out samples hold too few boxes to judge by."""
    model = _yolox_head_model()
    samples = pictures(5, np.random.default_rng(0))
    _, stats = quantize_int8(model, samples, require_speedup=False, metric_margin=0.0, accuracy_fallback=False)
    assert stats["declined"] == "accuracy"
    rows = stats["fallback"]["evaluation"]["task"]["metrics"]
    missed = [name for name, row in rows.items() if row.get("judged", True) and not row.get("passed", True)]
    assert missed and all(name.startswith("output:sqnr_") for name in missed)
    assert all(f"{name} deviation" in stats["reason"] for name in missed)
    assert "box_f1 over" in stats["reason"] and "not decisive; judged by SQNR" in stats["reason"]


def _run_image(model: onnx.ModelProto, image: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": image})[0]


# ------------------------------------------------------------ final detections [N, K, 6]


def _detections(objects: list[tuple[float, float, float, float, float, int]], rows: int = 32) -> np.ndarray:
    """[1, rows, 6] as an end-to-end export writes it (YOLOv10, YOLO26): x0, y0, x1, y1,
    score, class id, sorted by score; the rows past the objects are low-score candidates."""
    rng = np.random.default_rng(4)
    out = np.zeros((1, rows, 6), np.float32)
    for i, row in enumerate(objects):
        out[0, i] = row
    rest = rows - len(objects)
    x0, y0 = rng.uniform(0, 500, rest), rng.uniform(0, 500, rest)
    out[0, len(objects):, :4] = np.stack([x0, y0, x0 + rng.uniform(1, 90, rest), y0 + rng.uniform(1, 90, rest)], 1)
    out[0, len(objects):, 4] = np.sort(rng.uniform(0.0, 0.2, rest))[::-1]
    out[0, len(objects):, 5] = rng.integers(0, 3, rest)
    return out


DETECTIONS = [(10, 10, 60, 40, 0.95, 0), (70, 10, 120, 40, 0.9, 2), (200, 200, 260, 300, 0.8, 1),
              (300, 50, 340, 90, 0.6, 0), (12, 12, 58, 42, 0.3, 0)]  # the last overlaps the first: kept


def test_final_detections_are_read_as_they_are() -> None:
    """Each row is a box the model chose (no NMS over them); the judge's box F1 is that of
    the rows at score 0.25, same class, IoU >= 0.5, computed here plainly."""
    ref = _detections(DETECTIONS)
    got = _detections([(10, 10, 60, 40, 0.95, 0), (70, 10, 120, 40, 0.9, 1),  # class changed
                       (230, 250, 290, 350, 0.8, 1),  # moved: IoU below 0.5
                       (300, 50, 340, 90, 0.6, 0), (400, 400, 440, 440, 0.5, 0),  # one added
                       (12, 12, 58, 42, 0.2, 0)])  # below 0.25: lost
    assert tm.box_layout(ref) == "detections" and tm.choose_metric(ref, "output0") == "boxes"
    first = ref.copy()
    first[0, 0, 4] = np.nextafter(np.float32(1.0), np.float32(2.0))  # a sigmoid's score rounded above 1
    assert tm.box_layout(first) == "detections"

    def plain(d: np.ndarray) -> list[tuple[np.ndarray, int]]:
        return [(r[:4].astype(np.float64), int(r[5])) for r in d[0] if r[4] >= 0.25]

    assert len(plain(ref)) == 5 and len(plain(got)) == 5
    f1 = _numpy_f1(plain(ref), plain(got))
    assert f1 == pytest.approx(2 * 2 / 10)
    parts = tm.deviations("boxes", [ref], [got])
    assert parts["box_f1"] == pytest.approx(1 - f1) and parts["extra_boxes"] == 3.0
    (boxes, classes, scores), = tm.yolo_boxes(ref)
    assert np.array_equal(boxes, ref[0, :5, :4]) and np.array_equal(classes, [0, 2, 1, 0, 0])
    assert np.allclose(scores, ref[0, :5, 4])


def test_unsorted_or_fractional_rows_are_no_detections() -> None:
    ref = _detections(DETECTIONS)
    shuffled = ref[:, np.random.default_rng(0).permutation(ref.shape[1])]
    assert tm.box_layout(shuffled) != "detections"
    fractional = ref.copy()
    fractional[0, :, 5] = 0.5
    assert tm.box_layout(fractional) != "detections"
    one_class = _run(_decoding_model(), _raw_prediction(OBJECTS))[:, :, :6]  # YOLOv5 rows, one class
    assert tm.box_layout(one_class) == "anchor-rows"


def _end_to_end_model(rows: int = 16) -> onnx.ModelProto:
    """image [1, 3, 64, 64] -> [1, rows, 6]: a stride-8 Conv head (distances to the four
    sides through Relu, a score through Sigmoid, two class logits), boxes as corners around
    each cell's centre, the class id as ArgMax, and the best ``rows`` by TopK: what an
    end-to-end YOLO export computes after its head."""
    rng = np.random.default_rng(1)
    w = (rng.normal(size=(7, 3, 8, 8)) * 0.05).astype(np.float32)
    b = np.array([1.0, 1.0, 1.0, 1.0, -1.0, 0.0, 0.0], np.float32)
    ys, xs = np.divmod(np.arange(64), 8)
    centres = (np.stack([xs, ys, xs, ys], 1) * 8 + 4).astype(np.float32)[None]  # [1, 64, 4]
    sign = np.array([-1, -1, 1, 1], np.float32)
    nodes = [
        oh.make_node("Conv", ["image", "w", "b"], ["c"], strides=[8, 8]),
        oh.make_node("Reshape", ["c", "flat"], ["r"]),
        oh.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1]),  # [1, 64, 7]
        oh.make_node("Split", ["t", "split"], ["dist", "logit", "cls"], axis=2),
        oh.make_node("Relu", ["dist"], ["d"]),
        oh.make_node("Mul", ["d", "sign"], ["ds"]),
        oh.make_node("Mul", ["ds", "eight"], ["ds8"]),
        oh.make_node("Add", ["ds8", "centres"], ["corners"]),
        oh.make_node("Sigmoid", ["logit"], ["score"]),
        oh.make_node("ArgMax", ["cls"], ["ci"], axis=2, keepdims=1),
        oh.make_node("Cast", ["ci"], ["cf"], to=TensorProto.FLOAT),
        oh.make_node("Concat", ["corners", "score", "cf"], ["all"], axis=2),
        oh.make_node("Squeeze", ["score", "last"], ["s"]),
        oh.make_node("TopK", ["s", "k"], ["top", "index"], axis=1),
        oh.make_node("Squeeze", ["index", "first"], ["i"]),
        oh.make_node("Gather", ["all", "i"], ["output"], axis=1),
    ]
    inits = [nh.from_array(w, "w"), nh.from_array(b, "b"), nh.from_array(np.array([1, 7, -1], np.int64), "flat"),
             nh.from_array(np.array([4, 1, 2], np.int64), "split"), nh.from_array(sign, "sign"),
             nh.from_array(np.float32(8.0), "eight"), nh.from_array(centres, "centres"),
             nh.from_array(np.array([2], np.int64), "last"), nh.from_array(np.array([rows], np.int64), "k"),
             nh.from_array(np.array([0], np.int64), "first")]
    return picture_model("end2end", nodes, inits, [1, rows, 6])


def test_driver_judges_end_to_end_detections_by_boxes() -> None:
    """Judged by SQNR, such an output compares rows that one grey level reorders (a box
    moving past another in the top-K swaps whole rows), so float32's floor is a few dB and
    boxes that quantization adds or drops pass; judged by boxes, they are counted."""
    model = _end_to_end_model()
    samples = pictures(5, np.random.default_rng(0))
    out = _run_image(model, samples[0]["image"])
    assert out.shape == (1, 16, 6) and tm.box_layout(out) == "detections"
    _, stats = quantize_int8(model, samples, require_speedup=False)
    assert stats["acceptance"]["metrics"] == {"output": "boxes"}
    assert "output:box_f1" in stats["fallback"]["evaluation"]["task"]["metrics"]
