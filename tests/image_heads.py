"""Shared by the box-judge tests: a detector head over one 64x64 RGB picture, 8-bit
pictures to feed it, and the IoU of two boxes computed plainly (their independent
reference)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto
from onnx import helper as oh

PICTURE = (1, 3, 64, 64)


def picture_model(name: str, nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto],
                  output_shape: list[int]) -> onnx.ModelProto:
    """``nodes`` from the input ``image`` (``PICTURE``) to the output ``output``, at opset 13."""
    graph = oh.make_graph(nodes, name, [oh.make_tensor_value_info("image", TensorProto.FLOAT, list(PICTURE))],
                          [oh.make_tensor_value_info("output", TensorProto.FLOAT, output_shape)], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 13)], ir_version=8)


def pictures(count: int, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    """``count`` feeds of random 8-bit pictures scaled to [0, 1]."""
    return [{"image": (rng.integers(0, 256, PICTURE) / 255.0).astype(np.float32)} for _ in range(count)]


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two ``[x0, y0, x1, y1]`` boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
