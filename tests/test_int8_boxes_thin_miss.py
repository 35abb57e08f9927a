"""A detector whose fully quantized model misses the box judgement and whose held-out
pictures, when few, hold fewer than ``FEW_EXPECTED_ERRORS`` box changes at the allowed
rate. On those few pictures even the budget's model (the most layers the fallback may
return to float) misses, and the search ends there: every candidate below the budget
keeps more layers quantized, and one passing so thin a judgement would pass by one or two
boxes, by chance. The decline says the verdict was thin. Given more pictures of the same
kind, the same detector ships INT8, and its boxes on other pictures stay within the margin
of float32's own +-1-grey-level noise there. Every number is checked against a numpy
decode (best class, per-class NMS, one-to-one matching) of onnxruntime's outputs of the
original model."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper as oh
from onnx import numpy_helper as nh

from image_heads import picture_model, pictures
from optcc import ir
from optcc.numerics.task import FEW_EXPECTED_ERRORS
from optcc.quant.driver import quantize_int8
from test_int8_boxes_plain import _numpy_boxes, _one_to_one, _rows_of_class_rows

MARGIN = 1.5  # the driver's default ``metric_margin``
DRAWS = 4  # float32's own +-1 grey level draws the floor here averages


def _three_conv_detector() -> onnx.ModelProto:
    """image [1, 3, 64, 64] -> YOLOv8 ``[1, 5, 64]``: two 3x3 Conv+Relu layers, then one
    class score per cell of an 8x8 grid (Sigmoid of a stride-8 Conv, weights +-0.05, bias
    -2: a few cells per picture above 0.25), fixed disjoint boxes in [0, 1] coordinates."""
    rng = np.random.default_rng(3)
    w1 = rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32)
    b1 = rng.normal(0, 0.1, 4).astype(np.float32)
    head = rng.choice([-0.05, 0.05], size=(1, 4, 8, 8)).astype(np.float32)
    w2 = rng.normal(0, 0.4, (4, 4, 3, 3)).astype(np.float32)
    cells = np.arange(64)
    coords = np.stack([(cells % 8 + 0.5) / 8, (cells // 8 + 0.5) / 8, np.full(64, 0.09), np.full(64, 0.09)])
    nodes = [oh.make_node("Conv", ["image", "w1", "b1"], ["h1"], pads=[1, 1, 1, 1]),
             oh.make_node("Relu", ["h1"], ["r1"]),
             oh.make_node("Conv", ["r1", "w2", "b2"], ["h2"], pads=[1, 1, 1, 1]),
             oh.make_node("Relu", ["h2"], ["r2"]),
             oh.make_node("Conv", ["r2", "head", "bias"], ["c"], strides=[8, 8]),
             oh.make_node("Reshape", ["c", "flat"], ["logits"]),
             oh.make_node("Sigmoid", ["logits"], ["scores"]),
             oh.make_node("Concat", ["coords", "scores"], ["output"], axis=1)]
    inits = [nh.from_array(w1, "w1"), nh.from_array(b1, "b1"), nh.from_array(w2, "w2"),
             nh.from_array(np.zeros(4, np.float32), "b2"), nh.from_array(head, "head"),
             nh.from_array(np.array([-2.0], np.float32), "bias"), nh.from_array(np.array([1, 1, 64], np.int64), "flat"),
             nh.from_array(coords[None].astype(np.float32), "coords")]
    return picture_model("thin-miss", nodes, inits, [1, 5, 64])


def _run(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [session.run(None, f)[0] for f in feeds]


def _changes(refs: list[np.ndarray], gots: list[np.ndarray]) -> tuple[int, int]:
    """(boxes of either side unmatched, boxes of both sides) at score 0.25: 1 - F1 is their ratio."""
    unmatched = items = 0
    for r, g in zip(refs, gots):
        rb, gb = _numpy_boxes(_rows_of_class_rows(r), 0.25), _numpy_boxes(_rows_of_class_rows(g), 0.25)
        unmatched += len(rb) + len(gb) - 2 * _one_to_one(rb, gb)
        items += len(rb) + len(gb)
    return unmatched, items


def _moved(feeds: list[dict[str, np.ndarray]], seed: int) -> list[dict[str, np.ndarray]]:
    """Every pixel one grey level up or down (clipped to [0, 1]), drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    return [{"image": np.clip(f["image"] + rng.choice([-1.0, 1.0], f["image"].shape) / 255, 0, 1).astype(np.float32)}
            for f in feeds]


def _floor(proto: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> tuple[float, int]:
    """float32's own 1 - F1 under +-1 grey level, the mean over ``DRAWS`` draws, and the
    boxes of the first draw's comparison."""
    ref = _run(proto, feeds)
    rows = [_changes(ref, _run(proto, _moved(feeds, 100 + d))) for d in range(DRAWS)]
    return float(np.mean([u / n if n else 0.0 for u, n in rows])), rows[0][1]


def test_a_thin_miss_declines_and_more_pictures_ship_a_model_within_the_floor() -> None:
    proto = _three_conv_detector()
    few = pictures(24, np.random.default_rng(4))
    model, stats = quantize_int8(ir.load(proto), few, "minmax", holdout_fraction=0.5, require_speedup=False)
    fallback = stats["fallback"]
    assert not stats["modified"] and stats["declined"] == "accuracy"
    assert [row["float_layers"] for row in fallback["tried"]] == [len(fallback["kept_float"])]  # the budget alone
    assert "the budget allows" in fallback["hopeless"]
    # thin, by the independent count: float32's own changes on the held-out half, at the margin
    held = few[len(few) - stats["acceptance"]["judged_samples"]:]
    floor, items = _floor(proto, held)
    expected = items * MARGIN * max(floor, 0.01)
    assert items >= 10 and expected < FEW_EXPECTED_ERRORS
    assert stats["acceptance"]["thin"] in stats["reason"]  # the decline says so

    many = pictures(192, np.random.default_rng(4))  # 96 judged: about 20 changes allowed
    shipped, stats = quantize_int8(ir.load(proto), many, "minmax", holdout_fraction=0.5, require_speedup=False)
    assert stats["modified"] and "thin" not in stats["acceptance"]
    # other pictures than any calibrated or judged: the shipped model's boxes against the
    # original's, within the margin of float32's own floor there
    other = pictures(96, np.random.default_rng(7))
    unmatched, boxes = _changes(_run(proto, other), _run(ir.serialize(shipped), other))
    floor, _ = _floor(proto, other)
    assert boxes >= 100 and not math.isnan(floor)
    assert unmatched / boxes <= MARGIN * max(floor, 0.01)
