"""The final verification judges a quantized model with the kernels its users run:
onnxruntime with its graph optimizations, which fuse a block-wise int4 DequantizeLinear
and its MatMul into MatMulNBits (int8 activations inside the kernel), not the model as
written, which onnxruntime would evaluate in float."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import optcc
from optcc.numerics import verify

ROWS, K, N, BLOCK = 4, 128, 64, 32


def _models() -> tuple[onnx.ModelProto, onnx.ModelProto, np.ndarray]:
    """``x @ W`` in float32, the same with W stored as symmetric int4 blocks of 32 rows
    (opset 21 block-wise DequantizeLinear), and W in float64."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((K, N)).astype(np.float32) * np.float32(0.1)
    blocks = weight.reshape(K // BLOCK, BLOCK, N)
    scale = (np.abs(blocks).max(axis=1) / 7).astype(np.float32)
    q = np.clip(np.round(blocks / scale[:, None, :]), -8, 7).astype(np.int8).reshape(K, N)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [ROWS, K])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [ROWS, N])
    opset = [helper.make_opsetid("", 21)]
    original = helper.make_model(helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "f", [x], [y],
                                                   [numpy_helper.from_array(weight, "w")]), opset_imports=opset)
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws"], ["wd"], axis=0, block_size=BLOCK),
             helper.make_node("MatMul", ["x", "wd"], ["y"])]
    inits = [helper.make_tensor("wq", TensorProto.INT4, [K, N], q.ravel().tolist()),
             numpy_helper.from_array(scale, "ws")]
    quantized = helper.make_model(helper.make_graph(nodes, "q", [x], [y], inits), opset_imports=opset)
    return original, quantized, weight.astype(np.float64)


def _max_abs(model: onnx.ModelProto, feeds: list[dict], level: ort.GraphOptimizationLevel,
             reference: list[np.ndarray]) -> float:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return max(float(np.max(np.abs(session.run(None, f)[0] - r))) for f, r in zip(feeds, reference))


def test_int8_verification_measures_the_kernels_onnxruntime_fuses() -> None:
    original, quantized, weight = _models()
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((ROWS, K)).astype(np.float32)} for _ in range(4)]
    reference = [f["x"].astype(np.float64) @ weight for f in feeds]

    fused = _max_abs(quantized, feeds, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, reference)
    as_written = _max_abs(quantized, feeds, ort.GraphOptimizationLevel.ORT_DISABLE_ALL, reference)
    assert abs(fused - as_written) > 1e-3  # MatMulNBits quantizes the activations: another result

    report = verify(original, optcc.ir.load(quantized), numerics="int8", inputs=feeds)
    (output,) = report.outputs
    assert abs(output.max_abs - fused) < 1e-4, (output.max_abs, fused, as_written)
