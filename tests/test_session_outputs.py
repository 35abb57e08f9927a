"""Outputs optcc keeps from onnxruntime own their memory: onnxruntime hands out its output
buffers without a copy, and such an array keeps the session's whole memory arena alive."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from optcc.runtime import detached, make_session, run


def _model() -> bytes:
    graph = helper.make_graph([helper.make_node("Mul", ["x", "x"], ["y"]), helper.make_node("Relu", ["y"], ["z"])],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 64]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, [64, 64])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_run_returns_arrays_that_own_their_memory() -> None:
    x = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)
    session = make_session(_model())
    y, z = run(session, {"x": x})
    assert y.base is None and z.base is None and y.flags.owndata and z.flags.owndata
    np.testing.assert_array_equal(y, x * x)  # numpy's own product: the same float32 rounding
    np.testing.assert_array_equal(z, np.maximum(x * x, 0))
    del session
    assert float(y.sum()) == float((x * x).sum())  # still readable with the session gone


def test_detached_copies_only_what_borrows() -> None:
    x = np.ones((64, 64), np.float32)
    raw = ort.InferenceSession(_model(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    own = np.arange(4.0)
    out = detached([*raw, own])
    assert all(a.base is None for a in out)
    assert out[2] is own  # an array that owns its memory is not copied
    np.testing.assert_array_equal(out[0], x)
