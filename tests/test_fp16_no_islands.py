"""Two causes of float32 islands in float16 transformers: an initializer's element type
is read from its tensor, so a weight a pass added without a declared type
(fuse-parallel-matmuls' joined q/k/v weight) is converted like every other; and a type
parameter that holds another type (Attention's bool mask) stays as it is while the node's
float tensors become float16."""

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


def test_attention_with_a_bool_mask_runs_in_float16():
    """Attention (opset 23) binds its mask to its own type parameter: a bool mask stays
    bool and the query/key/value and output become float16 (no float32 island per layer)."""
    rng = np.random.default_rng(7)
    wq, wk, wv = (rng.normal(size=(16, 16)).astype(np.float32) * 0.3 for _ in range(3))
    nodes = [oh.make_node("MatMul", ["x", n], [f"{n}_out"]) for n in ("wq", "wk", "wv")]
    nodes.append(oh.make_node("Attention", ["wq_out", "wk_out", "wv_out", "mask"], ["y"], q_num_heads=2, kv_num_heads=2))
    mask = np.tril(np.ones((4, 4), dtype=bool))
    graph = oh.make_graph(nodes, "attention", [oh.make_tensor_value_info("x", TP.FLOAT, [2, 4, 16])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, [2, 4, 16])],
                          [nh.from_array(wq, "wq"), nh.from_array(wk, "wk"), nh.from_array(wv, "wv"),
                           nh.from_array(mask, "mask")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 23)])
    onnx.checker.check_model(model, full_check=True)
    result = optcc.optimize(model, level=2, fp16=True)
    proto = result.model
    attention = next(n for n in proto.graph.node if n.op_type == "Attention")
    types = {t.name: t.data_type for t in proto.graph.initializer}
    casts = [n for n in proto.graph.node if n.op_type == "Cast"]
    assert types.get(attention.input[3]) == TP.BOOL
    assert all(next(a.i for a in c.attribute if a.name == "to") != TP.FLOAT or c.output[0] == "y" for c in casts)
    feeds = {"x": rng.normal(size=(2, 4, 16)).astype(np.float32)}
    want = expected_outputs_float64(model, feeds)[0]
    got = expected_outputs_float64(proto, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-2 * float(np.abs(want).max()))
