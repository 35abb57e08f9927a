"""Weight-only (quantize-weights) and dynamic INT8 (quantize-dynamic) on graph inputs that
have an initializer default (IR >= 4: the caller may feed another value). A fed MatMul
weight or embedding table is no weight: the node stays float. A fed Gemm C is read as
fed (``beta * C`` is computed, not folded from the default). Each fed value must give
what the float model gives on it (float64 reference)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
import onnx_ir as ir
import pytest
from onnx import TensorProto as TP

from optcc.passes.quantize_dynamic import QuantizeDynamicPass
from optcc.passes.quantize_weights import QuantizeWeightsPass
from reference import expected_outputs_float64, onnxruntime_outputs

K, N = 64, 32
RTOL = 1e-5  # a node left float computes exactly what it did
# 8-bit weights (RTN, per block or per channel) and onnxruntime's dynamic 8-bit activations
LOSSY_RTOL = 0.05

PASSES = {
    "weights-int8": lambda: QuantizeWeightsPass(bits=8),
    "weights-int4-nbits": lambda: QuantizeWeightsPass(bits=4, target="onnxruntime"),
    "dynamic": lambda: QuantizeDynamicPass(count_fused=False),
}


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], output: onnx.ValueInfoProto,
           inits: list[onnx.TensorProto]) -> onnx.ModelProto:
    graph = oh.make_graph(nodes, "g", inputs, [output], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def _fed_matmul() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    model = _model([oh.make_node("MatMul", ["x", "B"], ["y"], name="mm")],
                   [oh.make_tensor_value_info("x", TP.FLOAT, [2, K]), oh.make_tensor_value_info("B", TP.FLOAT, [K, N])],
                   oh.make_tensor_value_info("y", TP.FLOAT, [2, N]), [nh.from_array(np.full((K, N), 1e-3, np.float32), "B")])
    rng = np.random.default_rng(0)
    return model, {"x": rng.normal(size=(2, K)).astype(np.float32), "B": rng.normal(size=(K, N)).astype(np.float32)}


def _fed_gemm_bias() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    model = _model([oh.make_node("Gemm", ["x", "W", "C"], ["y"], name="gemm", beta=0.5)],
                   [oh.make_tensor_value_info("x", TP.FLOAT, [2, K]), oh.make_tensor_value_info("C", TP.FLOAT, [N])],
                   oh.make_tensor_value_info("y", TP.FLOAT, [2, N]),
                   [nh.from_array(rng.normal(size=(K, N)).astype(np.float32), "W"),
                    nh.from_array(np.zeros(N, np.float32), "C")])
    return model, {"x": rng.normal(size=(2, K)).astype(np.float32), "C": np.full(N, 100.0, np.float32)}


def _fed_table() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    model = _model([oh.make_node("Gather", ["T", "ids"], ["y"], name="embed")],
                   [oh.make_tensor_value_info("ids", TP.INT64, [1, 2]), oh.make_tensor_value_info("T", TP.FLOAT, [8, K])],
                   oh.make_tensor_value_info("y", TP.FLOAT, [1, 2, K]), [nh.from_array(np.zeros((8, K), np.float32), "T")])
    rng = np.random.default_rng(2)
    return model, {"ids": np.array([[1, 3]], np.int64), "T": rng.normal(size=(8, K)).astype(np.float32)}


def _outputs(model: onnx.ModelProto, make_pass, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, dict]:
    result = make_pass()(ir.from_proto(model))
    got = onnxruntime_outputs(ir.to_proto(result.model), feeds)[0].astype(np.float64)
    return got, expected_outputs_float64(model, feeds)[0], result.stats


@pytest.mark.parametrize("name", sorted(PASSES))
def test_fed_matmul_weight_stays_float(name: str) -> None:
    model, feeds = _fed_matmul()
    got, want, stats = _outputs(model, PASSES[name], feeds)
    assert sum(stats["kept_float"].values()) == 1
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * np.abs(want).max())


@pytest.mark.parametrize("name", sorted(PASSES))
def test_fed_gemm_bias_is_read_as_fed(name: str) -> None:
    """The weight W is quantized; ``beta * C`` reads the fed C."""
    model, feeds = _fed_gemm_bias()
    got, want, _ = _outputs(model, PASSES[name], feeds)
    np.testing.assert_allclose(got, want, rtol=LOSSY_RTOL, atol=LOSSY_RTOL * np.abs(want).max())


@pytest.mark.parametrize("name", ["weights-int8-embeddings", "dynamic"])
def test_fed_embedding_table_stays_float(name: str) -> None:
    make = PASSES.get(name, lambda: QuantizeWeightsPass(bits=8, embeddings=True))
    model, feeds = _fed_table()
    got, want, _ = _outputs(model, make, feeds)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * np.abs(want).max())
