"""A large in-memory model run with onnxruntime's graph optimizations (an INT8 candidate as
its users run it) gets its weights handed over as arrays, not serialized, and computes what
a session of its bytes computes, bit for bit; both are checked against numpy."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
import onnxruntime as ort
import pytest

import optcc
from optcc.runtime import session as rs


def _qdq_model() -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """``y = DQ(Q(x)) @ DQ(w8) + b`` (per-channel int8 weights of 4.5 MiB: more than
    ``weighted_session`` copies into the proto), then Relu: the
    shape onnxruntime's optimizations fuse into an integer MatMul."""
    rng = np.random.default_rng(0)
    k, n = 1024, 4608
    w8 = rng.integers(-64, 65, (k, n)).astype(np.int8)
    scale = rng.uniform(1e-3, 1e-2, n).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    nodes = [oh.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             oh.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             oh.make_node("DequantizeLinear", ["w8", "ws", "wz"], ["wd"], axis=1),
             oh.make_node("MatMul", ["xd", "wd"], ["mm"]),
             oh.make_node("Add", ["mm", "b"], ["pre"]),
             oh.make_node("Relu", ["pre"], ["y"])]
    inits = [nh.from_array(np.array(0.02, np.float32), "xs"), nh.from_array(np.array(128, np.uint8), "xz"),
             nh.from_array(w8, "w8"), nh.from_array(scale, "ws"), nh.from_array(np.zeros(n, np.int8), "wz"),
             nh.from_array(bias, "b")]
    graph = oh.make_graph(nodes, "qdq", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, k])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, n])], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 13)]), w8.astype(np.float32) * scale, bias


@pytest.mark.parametrize("level", ["basic", "all"])
def test_an_optimized_session_of_handed_over_weights_computes_what_its_bytes_do(
        monkeypatch: pytest.MonkeyPatch, level: str) -> None:
    proto, w, bias = _qdq_model()
    model = optcc.ir.load(proto)
    monkeypatch.setattr(rs, "HANDOVER_MIN_BYTES", 1 << 20)  # this model's weights count as large
    x = np.random.default_rng(1).uniform(-2, 2, (4, w.shape[0])).astype(np.float32)
    handed = rs.make_session(model, options=rs.session_options(optimize=level))
    assert handed.optcc_weights and "w8" in handed.optcc_weights[0]  # the weight was handed over, not serialized
    from_bytes = ort.InferenceSession(proto.SerializeToString(), rs.session_options(optimize=level),
                                      providers=["CPUExecutionProvider"])
    got = handed.run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, from_bytes.run(None, {"x": x})[0])
    xq = (np.clip(np.round(x / np.float32(0.02)) + 128, 0, 255) - 128) * np.float64(0.02)  # Q/DQ of x
    expected = np.maximum(xq @ w.astype(np.float64) + bias, 0)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3)
