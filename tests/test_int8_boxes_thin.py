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
from test_int8_boxes_plain import _numpy_boxes, _plain, _rows_of_class_rows, grid_detector

SAMPLES = 16


def _sparse_detector() -> onnx.ModelProto:
    """``grid_detector`` with weights +-0.1 and a bias of -1.9: on random pictures about one
    cell in forty scores above 0.25."""
    return grid_detector("sparse", seed=5, weight=0.1, bias=-1.9)


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
