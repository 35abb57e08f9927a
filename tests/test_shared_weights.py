"""Sessions over a light proto (weights handed to onnxruntime in place) compute what a
session of the full model computes, bit for bit, with and without graph optimizations."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

import optcc
from optcc.runtime.session import session_options
from optcc.runtime.shared_weights import MIN_SHARED_BYTES, light_proto, release_memory, weighted_session


def _mlp() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = nh.from_array(rng.normal(size=(32, 64)).astype(np.float32), "W1")  # 8 KiB: shared
    b1 = nh.from_array(rng.normal(size=(64,)).astype(np.float32), "B1")  # 256 B: stays in the proto
    w2 = nh.from_array(rng.normal(size=(64, 16)).astype(np.float32), "W2")
    graph = oh.make_graph(
        [oh.make_node("MatMul", ["x", "W1"], ["h"]), oh.make_node("Add", ["h", "B1"], ["a"]),
         oh.make_node("Relu", ["a"], ["r"]), oh.make_node("MatMul", ["r", "W2"], ["y"])],
        "mlp", [oh.make_tensor_value_info("x", TP.FLOAT, ["N", 32])],
        [oh.make_tensor_value_info("y", TP.FLOAT, ["N", 16])], [w1, b1, w2])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


@pytest.mark.parametrize("inline_max", [0, None], ids=["handed-over", "inline"])
def test_light_proto_sessions_compute_what_the_full_model_computes(inline_max, monkeypatch) -> None:
    if inline_max is not None:  # 0: every weight handed to onnxruntime, none copied into the proto
        monkeypatch.setattr("optcc.runtime.shared_weights.INLINE_MAX_BYTES", inline_max)
    proto = _mlp()
    model = optcc.ir.load(proto)
    light, weights = light_proto(model)
    assert set(weights) == {"W1", "W2"} and all(a.nbytes >= MIN_SHARED_BYTES for a in weights.values())
    assert light.ByteSize() < 1024  # the graph, not the weights
    x = {"x": np.random.default_rng(1).normal(size=(5, 32)).astype(np.float32)}
    w1, b1, w2 = (nh.to_array(t).astype(np.float64) for t in proto.graph.initializer)
    expected = np.maximum(x["x"].astype(np.float64) @ w1 + b1, 0) @ w2
    for level in (False, "all"):
        full = ort.InferenceSession(proto.SerializeToString(), session_options(optimize=level),
                                    providers=["CPUExecutionProvider"]).run(None, x)[0]
        light, weights = light_proto(model)
        shared = weighted_session(light, weights, session_options(optimize=level)).run(None, x)[0]
        assert np.array_equal(full, shared), level
        np.testing.assert_allclose(shared, expected, rtol=1e-4, atol=1e-4)
    release_memory()  # a no-op where the C library has no malloc_trim


def test_a_tensor_read_from_a_protobuf_is_copied_once() -> None:
    model = optcc.ir.load(_mlp())
    first, second = light_proto(model)[1], light_proto(model)[1]
    assert first["W1"] is second["W1"] and not first["W1"].flags.writeable
    np.testing.assert_array_equal(first["W1"], nh.to_array(_mlp().graph.initializer[0]))
