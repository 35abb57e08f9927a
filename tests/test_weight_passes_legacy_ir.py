"""Weight-only and dynamic INT8 on a model below IR version 4, where every initializer must
also be listed as a graph input. There such an input is a constant no caller can feed
(onnxruntime reads it so), so its MatMul weight, Gemm weight and C are quantized or
folded as constants, and the model moves to IR 4 (the new initializers need not be
inputs). Outputs against numpy in float64."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
import pytest
from onnx import TensorProto as TP

import optcc
from reference import onnxruntime_outputs

K, N, ROWS = 64, 32, 4
LOSSY_RTOL = 0.05  # 8-bit weights (and onnxruntime's dynamic 8-bit activations)
MODES = {"weights-int8": {"weight_only": "int8"}, "dynamic": {"int8_dynamic": True}}
QUANTIZED_OPS = {"DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "MatMulNBits"}


def _legacy(op: str) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray, np.ndarray]:
    """An IR 3 model ``y = x @ W`` (MatMul) or ``y = x @ W + 0.5 C`` (Gemm) whose W (and C)
    are initializers listed as graph inputs, as IR 3 requires."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(K, N)).astype(np.float32)
    c = rng.normal(size=N).astype(np.float32)
    inputs = [oh.make_tensor_value_info("x", TP.FLOAT, [ROWS, K]), oh.make_tensor_value_info("W", TP.FLOAT, [K, N])]
    inits = [nh.from_array(w, "W")]
    if op == "Gemm":
        node = oh.make_node("Gemm", ["x", "W", "C"], ["y"], name="gemm", beta=0.5)
        inputs.append(oh.make_tensor_value_info("C", TP.FLOAT, [N]))
        inits.append(nh.from_array(c, "C"))
    else:
        node = oh.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    graph = oh.make_graph([node], "g", inputs, [oh.make_tensor_value_info("y", TP.FLOAT, [ROWS, N])], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 13)], ir_version=3)
    x = rng.normal(size=(ROWS, K)).astype(np.float32)
    want = x.astype(np.float64) @ w.astype(np.float64)
    if op == "Gemm":
        want = want + 0.5 * c.astype(np.float64)
    return model, x, want, w


@pytest.mark.parametrize("op", ["MatMul", "Gemm"])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_legacy_ir_weights_are_quantized(mode: str, op: str) -> None:
    model, x, want, _ = _legacy(op)
    result = optcc.optimize(model, passes=[], verify=False, **MODES[mode])
    assert result.applied_precision, result.precision
    proto = result.model
    assert QUANTIZED_OPS & {n.op_type for n in proto.graph.node}
    assert proto.ir_version >= 4
    assert [i.name for i in proto.graph.input] == ["x"]  # the constants are no longer listed
    got = onnxruntime_outputs(proto, {"x": x})[0].astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=LOSSY_RTOL, atol=LOSSY_RTOL * np.abs(want).max())


@pytest.mark.parametrize("mode", sorted(MODES))
def test_legacy_ir_embedding_table_is_quantized(mode: str) -> None:
    """A Gather's table listed as an input below IR 4 is a constant: int8 rows."""
    rng = np.random.default_rng(4)
    table = rng.normal(size=(8, K)).astype(np.float32)
    graph = oh.make_graph([oh.make_node("Gather", ["T", "ids"], ["y"], name="embed")], "g",
                          [oh.make_tensor_value_info("ids", TP.INT64, [1, 3]),
                           oh.make_tensor_value_info("T", TP.FLOAT, [8, K])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, [1, 3, K])], [nh.from_array(table, "T")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 13)], ir_version=3)
    options = {"weight_only": {"bits": 8, "embeddings": True}} if mode == "weights-int8" else MODES[mode]
    result = optcc.optimize(model, passes=[], verify=False, **options)
    assert result.applied_precision, result.precision
    proto = result.model
    assert [i.name for i in proto.graph.input] == ["ids"]
    assert all(t.data_type != TP.FLOAT or t.name != "T" for t in proto.graph.initializer)  # the float table is gone
    ids = np.array([[1, 7, 1]], np.int64)
    got = onnxruntime_outputs(proto, {"ids": ids})[0].astype(np.float64)
    want = table.astype(np.float64)[ids]
    np.testing.assert_allclose(got, want, rtol=LOSSY_RTOL, atol=LOSSY_RTOL * np.abs(want).max())
