"""A dropped result of ``optimize`` on a large model is freed by the next call, with the
automatic collector off: a loop over large models holds one dropped model at most."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
from onnx import TensorProto as TP

import optcc
from optcc.ir.collector import LARGE_MODEL_BYTES
from reference import EXACT_RTOL, assert_close, expected_outputs


def _large_matmul() -> onnx.ModelProto:
    columns = LARGE_MODEL_BYTES // (4 * 64) + 1  # one float32 weight just over the size
    weight = np.random.default_rng(0).normal(size=(64, columns)).astype(np.float32)
    graph = oh.make_graph([oh.make_node("MatMul", ["x", "w"], ["y"])], "large",
                          [oh.make_tensor_value_info("x", TP.FLOAT, [2, 64])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, [2, columns])], [nh.from_array(weight, "w")])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


def test_a_dropped_large_result_is_freed_by_the_next_call():
    model = _large_matmul()
    feeds = {"x": np.random.default_rng(1).normal(size=(2, 64)).astype(np.float32)}
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        first = optcc.optimize(model, level=2, verify=False)
        assert_close(expected_outputs(first.model, feeds), expected_outputs(model, feeds), EXACT_RTOL)
        dropped = weakref.ref(first.ir_model.graph)
        del first
        assert dropped() is not None  # a cycle: only a collection frees it
        second = optcc.optimize(model, level=2, verify=False)
        assert dropped() is None
        assert_close(expected_outputs(second.model, feeds), expected_outputs(model, feeds), EXACT_RTOL)
    finally:
        if was_enabled:
            gc.enable()
