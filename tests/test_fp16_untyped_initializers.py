"""Float16 conversion reads an initializer's element type from its tensor: a weight a
pass added without a declared type (fuse-parallel-matmuls' joined q/k/v weight) is
converted like every other, not kept float32 with Casts around its MatMul."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
from onnx import TensorProto as TP

import optcc
from reference import expected_outputs_float64


def _parallel_matmuls() -> tuple[onnx.ModelProto, list[np.ndarray]]:
    rng = np.random.default_rng(5)
    weights = [rng.normal(size=(16, 8)).astype(np.float32) for _ in range(3)]
    nodes = [oh.make_node("LayerNormalization", ["x", "g", "b"], ["h"], axis=-1)]
    nodes += [oh.make_node("MatMul", ["h", f"w{i}"], [f"y{i}"]) for i in range(3)]
    inits = [nh.from_array(np.ones(16, np.float32), "g"), nh.from_array(np.zeros(16, np.float32), "b")]
    inits += [nh.from_array(w, f"w{i}") for i, w in enumerate(weights)]
    graph = oh.make_graph(nodes, "qkv", [oh.make_tensor_value_info("x", TP.FLOAT, [2, 4, 16])],
                          [oh.make_tensor_value_info(f"y{i}", TP.FLOAT, [2, 4, 8]) for i in range(3)], inits,
                          value_info=[oh.make_tensor_value_info("h", TP.FLOAT, [2, 4, 16])])  # every output declared
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)]), weights


def test_a_fused_weight_without_a_declared_type_is_converted_to_float16():
    model, _ = _parallel_matmuls()
    result = optcc.optimize(model, level=2, fp16=True)
    proto = result.model
    ops = [n.op_type for n in proto.graph.node]
    assert "Split" in ops  # the three MatMuls were joined into one
    float32_weights = [t.name for t in proto.graph.initializer if t.data_type == TP.FLOAT and len(t.dims) == 2]
    assert float32_weights == []
    feeds = {"x": np.random.default_rng(6).normal(size=(2, 4, 16)).astype(np.float32)}
    want = expected_outputs_float64(model, feeds)
    got = expected_outputs_float64(proto, feeds)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, rtol=0, atol=2e-2 * float(np.abs(w).max()))
