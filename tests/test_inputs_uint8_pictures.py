"""A picture fed as its 8-bit pixels (uint8 [N, C, H, W] or [N, H, W, C], 1, 3 or 4
channels) is generated as a picture in grey levels 0..255, not as the 0/1 of a mask or the
0..3 of an unknown integer: it is cast to float and scaled, which reads like a mask's use."""

from __future__ import annotations

import numpy as np
import onnx.helper as oh
import onnx.numpy_helper as nh
import onnx_ir as ir
from onnx import TensorProto as TP
from onnx.reference import ReferenceEvaluator

from optcc.numerics.inputs import generate_inputs, input_roles


def _model(name: str, shape: list, channels_last: bool = False) -> tuple[ir.Model, object]:
    """``name`` cast to float, scaled to [0, 1] and summed over its channels: a model that
    reads pixels."""
    axis = 3 if channels_last else 1
    nodes = [oh.make_node("Cast", [name], ["f"], to=TP.FLOAT), oh.make_node("Mul", ["f", "scale"], ["s"]),
             oh.make_node("ReduceSum", ["s", "axes"], ["y"], keepdims=0)]
    inits = [nh.from_array(np.array(1 / 255, np.float32), "scale"), nh.from_array(np.array([axis], np.int64), "axes")]
    graph = oh.make_graph(nodes, "m", [oh.make_tensor_value_info(name, TP.UINT8, shape)],
                          [oh.make_tensor_value_info("y", TP.FLOAT, None)], inits)
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)])
    return ir.from_proto(proto), proto


def test_uint8_pictures_are_generated_in_grey_levels() -> None:
    for shape, last in (([1, 3, 32, 48], False), ([2, 1, "h", "w"], False), ([1, 24, 24, 4], True)):
        model, proto = _model("pixels", shape, last)
        assert input_roles(model) == {"pixels": "image"}, shape
        feeds = generate_inputs(model, {"pixels": [2, 1, 40, 40]} if "h" in shape else None, samples=2)
        for feed in feeds:
            pixels = feed["pixels"]
            assert pixels.dtype == np.uint8
            assert len(np.unique(pixels)) > 100 and pixels.max() > 200 and pixels.min() < 55  # a picture's range
            # smooth: neighbouring pixels along a spatial axis mostly within a few grey levels
            rows = np.abs(np.diff(pixels.astype(np.int64), axis=2 if last else 3))
            assert np.median(rows) <= 20
            y = ReferenceEvaluator(proto).run(None, feed)[0]
            expected = (pixels.astype(np.float64) / 255).sum(axis=3 if last else 1)
            assert np.allclose(y, expected, atol=1e-5)


def test_a_uint8_mask_and_other_uint8_inputs_keep_their_roles() -> None:
    assert input_roles(_model("mask", [1, 1, 32, 32])[0]) == {"mask": "mask"}  # named a mask
    # 5 channels: no picture's; cast and scaled, it reads as a mask by use
    assert input_roles(_model("planes", [1, 5, 32, 32])[0]) == {"planes": "mask"}
