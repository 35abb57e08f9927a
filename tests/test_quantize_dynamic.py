"""QuantizeDynamicPass on MatMul and Gemm: the float weights are gone, per-column scales,
outputs equal to a numpy emulation of the integer arithmetic and close to float64."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

import optcc
from optcc.passes.quantize_dynamic import QuantizeDynamicPass


def _mlp_with_gemms(constant_node_weight: bool = False) -> onnx.ModelProto:
    """x -> MatMul(W1) -> Relu -> Gemm(W2^T, transB, alpha, beta, C) -> Gemm(W3, C3)."""
    rng = np.random.default_rng(3)
    w1 = (rng.normal(size=(64, 96)) * 0.1).astype(np.float32)
    w2 = (rng.normal(size=(48, 96)) * 0.1).astype(np.float32)  # [N, K], read transposed
    c2 = rng.normal(size=(48,)).astype(np.float32)
    w3 = (rng.normal(size=(48, 16)) * 0.1).astype(np.float32)
    c3 = rng.normal(size=(16,)).astype(np.float32)
    nodes = [
        oh.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
        oh.make_node("Relu", ["h"], ["r"], name="relu"),
        oh.make_node("Gemm", ["r", "W2", "C2"], ["g"], name="gemm2", transB=1, alpha=0.5, beta=2.0),
        oh.make_node("Gemm", ["g", "W3", "C3"], ["y"], name="gemm3"),
    ]
    inits = [nh.from_array(w2, "W2"), nh.from_array(c2, "C2"), nh.from_array(w3, "W3"), nh.from_array(c3, "C3")]
    if constant_node_weight:
        nodes.insert(0, oh.make_node("Constant", [], ["W1"], value=nh.from_array(w1, "W1c")))
    else:
        inits.append(nh.from_array(w1, "W1"))
    graph = oh.make_graph(nodes, "mlp", [oh.make_tensor_value_info("x", TP.FLOAT, [8, 64])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, [8, 16])], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


def _dynamic_quantize(a: np.ndarray) -> tuple[np.ndarray, float, int]:
    """DynamicQuantizeLinear as the ONNX spec defines it (uint8, range includes 0)."""
    lo, hi = min(0.0, float(a.min())), max(0.0, float(a.max()))
    scale = np.float32((hi - lo) / 255.0)
    zero = int(np.clip(np.rint(-lo / scale), 0, 255))
    q = np.clip(np.rint(a / scale) + zero, 0, 255).astype(np.int64)
    return q, float(scale), zero


def _reference(model: onnx.ModelProto, x: np.ndarray, quantized: bool) -> np.ndarray:
    """float64 forward pass; ``quantized``: with int8 per-column weights and dynamic uint8 activations."""
    w = {t.name: nh.to_array(t).astype(np.float64) for t in model.graph.initializer}
    if "W1" not in w:
        w["W1"] = nh.to_array(model.graph.node[0].attribute[0].t).astype(np.float64)

    def matmul(a: np.ndarray, weight: np.ndarray) -> np.ndarray:
        if not quantized:
            return a @ weight
        scale = (np.abs(weight).max(axis=0) / 64.0).astype(np.float32).astype(np.float64)
        wq = np.clip(np.rint(weight / scale), -64, 64)
        aq, a_scale, a_zero = _dynamic_quantize(a.astype(np.float32))
        return ((aq - a_zero) @ wq) * (np.float64(np.float32(a_scale)) * scale)

    h = np.maximum(matmul(x.astype(np.float64), w["W1"]), 0)
    g = 0.5 * matmul(h, w["W2"].T) + 2.0 * w["C2"]
    return matmul(g, w["W3"]) + w["C3"]


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_matmul_and_gemm_are_quantized_and_the_float_weights_removed() -> None:
    for constant_node in (False, True):
        model = _mlp_with_gemms(constant_node)
        result = QuantizeDynamicPass(count_fused=False)(optcc.ir.load(model))
        q = optcc.ir.serialize(result.model)
        ops = [n.op_type for n in q.graph.node]
        assert result.stats["quantized"] == 3 and result.stats["Gemm"] == 2 and result.stats["MatMul"] == 1
        assert "MatMul" not in ops and "Gemm" not in ops and "Constant" not in ops
        assert ops.count("MatMulInteger") == 3
        float_inits = {t.name for t in q.graph.initializer if t.data_type == TP.FLOAT and len(t.dims) == 2}
        assert not float_inits, f"float weights left behind: {float_inits}"
        assert result.stats["float_weight_bytes_removed"] == 4 * (64 * 96 + 48 * 96 + 48 * 16)
        assert len(q.SerializeToString()) < 0.35 * len(model.SerializeToString())  # int8 + scales + nodes
        onnx.checker.check_model(q, full_check=True)

        # the transposed Gemm weight is stored [K, N] with one scale per output column
        w2 = nh.to_array(next(t for t in model.graph.initializer if t.name == "W2"))
        stored = {t.name: nh.to_array(t) for t in q.graph.initializer}
        w2q = next(a for name, a in stored.items() if a.dtype == np.int8 and a.shape == (96, 48))
        np.testing.assert_array_equal(
            w2q, np.clip(np.rint(w2.T.astype(np.float64) / (np.abs(w2).max(axis=1) / 64.0).astype(np.float32)), -64, 64))

        x = np.random.default_rng(4).normal(size=(8, 64)).astype(np.float32)
        got = _run(q, x)
        emulated = _reference(model, x, quantized=True)
        exact = _reference(model, x, quantized=False)
        np.testing.assert_allclose(got, emulated, rtol=1e-4, atol=1e-4 * np.abs(emulated).max())
        sqnr = 10 * np.log10((exact ** 2).sum() / ((got - exact) ** 2).sum())
        assert sqnr > 30, sqnr


def test_gemm_with_transA_and_mixed_transpose_stay_float() -> None:
    rng = np.random.default_rng(5)
    w = (rng.normal(size=(16, 16)) * 0.1).astype(np.float32)
    graph = oh.make_graph(
        [oh.make_node("Gemm", ["x", "W"], ["a"], name="ta", transA=1),
         oh.make_node("Gemm", ["a", "W"], ["b"], name="tb", transB=1),
         oh.make_node("MatMul", ["b", "W"], ["y"], name="mm")],
        "g", [oh.make_tensor_value_info("x", TP.FLOAT, [16, 16])],
        [oh.make_tensor_value_info("y", TP.FLOAT, [16, 16])], [nh.from_array(w, "W")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    result = QuantizeDynamicPass(count_fused=False)(optcc.ir.load(model))
    assert result.stats["quantized"] == 0
    assert result.stats["kept_float"] == {"Gemm with transA": 1, "weight read transposed and not": 2}
    assert "W" in result.model.graph.initializers


def test_embedding_gather_becomes_int8_rows() -> None:
    rng = np.random.default_rng(6)
    table = rng.normal(size=(100, 24)).astype(np.float32)
    w = (rng.normal(size=(24, 8)) * 0.2).astype(np.float32)
    graph = oh.make_graph(
        [oh.make_node("Gather", ["E", "ids"], ["e"], name="embed"),
         oh.make_node("MatMul", ["e", "W"], ["y"], name="mm")],
        "emb", [oh.make_tensor_value_info("ids", TP.INT64, [2, 5])],
        [oh.make_tensor_value_info("y", TP.FLOAT, [2, 5, 8])], [nh.from_array(table, "E"), nh.from_array(w, "W")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    result = QuantizeDynamicPass(count_fused=False)(optcc.ir.load(model))
    assert result.stats["Gather"] == 1 and result.stats["MatMul"] == 1
    q = optcc.ir.serialize(result.model)
    onnx.checker.check_model(q, full_check=True)
    assert {t.name: t.data_type for t in q.graph.initializer if len(t.dims) == 2 and t.dims[0] == 100} == {
        "E_q8": TP.INT8, "E_row_scale": TP.FLOAT}

    ids = np.array([[0, 5, 99, 5, 17], [3, 3, 64, 1, 0]], np.int64)
    session = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"ids": ids})[0]
    # int8 rows (largest magnitude -> -128), then the dynamic MatMul emulated in numpy
    v = table[np.arange(100), np.abs(table).argmax(axis=1)].astype(np.float64)
    s = (v / -128).astype(np.float32).astype(np.float64)[:, None]
    rows = (np.clip(np.rint(table / s), -128, 127) * s).astype(np.float32)
    e = rows[ids]
    aq, a_scale, a_zero = _dynamic_quantize(e)
    w_scale = (np.abs(w).max(axis=0) / 64.0).astype(np.float32).astype(np.float64)
    wq = np.clip(np.rint(w / w_scale), -64, 64)
    expected = ((aq - a_zero) @ wq) * (np.float64(np.float32(a_scale)) * w_scale)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    exact = table.astype(np.float64)[ids] @ w.astype(np.float64)
    assert 10 * np.log10((exact ** 2).sum() / ((got - exact) ** 2).sum()) > 30
    # the row scales ([100, 1], gathered too) are no embedding table: a second run changes nothing
    again = QuantizeDynamicPass(count_fused=False)(optcc.ir.load(q))
    assert not again.modified, again.stats
