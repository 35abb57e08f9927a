"""A detector whose held-out pictures hold few boxes, few of them near the score
threshold: at float32's own rate of box changes the allowed deviation is under one box, so
one box decides the verdict. The driver says so (``stats["acceptance"]["thin"]``, and in a
decline's reason) with the numbers a user can act on: the items, the errors they hold at
the allowed rate, and about how many samples would hold ``FEW_EXPECTED_ERRORS``. Every
number is checked against an independent numpy decode of onnxruntime's outputs of the
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
from optcc.numerics.task import FEW_EXPECTED_ERRORS, FLOOR_DRAWS, perturbation_draws
from optcc.quant.driver import quantize_int8
from test_int8_boxes_plain import _numpy_boxes, _plain, _rows_of_class_rows

SAMPLES = 16


def _sparse_detector() -> onnx.ModelProto:
    """image [1, 3, 64, 64] -> YOLOv8 ``[1, 5, 64]``: disjoint boxes on an 8x8 grid, one
    class score per cell, Sigmoid of a stride-8 Conv (weights +-0.1) with a bias of -1.9: on
    random pictures about one cell in forty scores above 0.25."""
    rng = np.random.default_rng(5)
    w = rng.choice([-0.1, 0.1], size=(1, 3, 8, 8)).astype(np.float32)
    cx = (8.0 * (np.arange(64) % 8) + 4.0).astype(np.float32)
    cy = (8.0 * (np.arange(64) // 8) + 4.0).astype(np.float32)
    coords = np.stack([cx, cy, np.full(64, 6.0, np.float32), np.full(64, 6.0, np.float32)])[None]
    nodes = [oh.make_node("Conv", ["image", "w", "b"], ["c"], strides=[8, 8]),
             oh.make_node("Reshape", ["c", "flat"], ["logits"]),
             oh.make_node("Sigmoid", ["logits"], ["scores"]),
             oh.make_node("Concat", ["coords", "scores"], ["output"], axis=1)]
    inits = [nh.from_array(w, "w"), nh.from_array(np.array([-1.9], np.float32), "b"),
             nh.from_array(np.array([1, 1, 64], np.int64), "flat"), nh.from_array(coords, "coords")]
    return picture_model("sparse", nodes, inits, [1, 5, 64])


def test_a_thin_box_judgement_is_reported_with_the_samples_that_would_decide() -> None:
    proto = _sparse_detector()
    samples = pictures(SAMPLES, np.random.default_rng(3))
    _, stats = quantize_int8(ir.load(proto), samples, "minmax", holdout_fraction=0.5, require_speedup=False)
    acceptance = stats["acceptance"]
    judged = samples[SAMPLES - acceptance["judged_samples"]:]  # the last half held out, or every sample
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    run = lambda feeds: [session.run(None, f)[0] for f in feeds]  # noqa: E731
    boxes = lambda outs: sum(len(_numpy_boxes(_rows_of_class_rows(o), 0.25)) for o in outs)  # noqa: E731
    ref = run(judged)
    moved, _ = perturbation_draws(judged, FLOOR_DRAWS)
    floor = float(np.mean([_plain(ref, run(d), _rows_of_class_rows) for d in moved]))
    items = boxes(ref) + boxes(run(moved[0]))  # the floor's items: both sides' boxes at 0.25, the first draw's
    expected = items * 1.5 * max(floor, 0.01)
    assert items >= 10 and expected < FEW_EXPECTED_ERRORS  # the case: thin, yet enough items to be judged
    need = math.ceil(len(judged) * FEW_EXPECTED_ERRORS / expected)
    words = acceptance["thin"]
    assert words.startswith(f"output:box_f1 over {items} items holds {expected:.1f} errors at the allowed rate on "
                            f"these {len(judged)} samples; about {need} would hold 3")
    if not stats["modified"]:  # a decline says how fragile its verdict is
        assert words in stats["reason"]
