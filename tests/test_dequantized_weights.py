"""Weights stored as int8 and dequantized in the graph (``Mul(Cast<float>(q), scale)``) are
quantized like constant weights by --int8-dynamic and --weights int8: the chain is evaluated,
the MatMul/Gemm rewritten, and the Cast/Mul and the stored levels removed. Outputs are
compared with numpy in float64."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

import optcc
from optcc.passes.quantize_dynamic import QuantizeDynamicPass
from optcc.passes.quantize_weights import QuantizeWeightsPass

RNG = np.random.default_rng(11)
Q1 = RNG.integers(-127, 128, size=(64, 96), dtype=np.int8)   # MatMul weight [K, N]
S1 = (RNG.uniform(0.5, 2.0, size=(1, 96)) / 1270).astype(np.float32)
Q2 = RNG.integers(-127, 128, size=(16, 96), dtype=np.int8)   # Gemm transB weight [N, K]
S2 = (RNG.uniform(0.5, 2.0, size=(16, 1)) / 1270).astype(np.float32)


def _model(shared_with_add: bool = False) -> onnx.ModelProto:
    """x -> MatMul(Mul(Cast(Q1), S1)) -> Relu -> Gemm(r, Mul(S2, Cast(Q2)), transB) -> y;
    ``shared_with_add``: the first dequantized weight is also added to a second output."""
    nodes = [
        oh.make_node("Cast", ["Q1"], ["q1f"], to=TP.FLOAT),
        oh.make_node("Mul", ["q1f", "S1"], ["W1"]),
        oh.make_node("MatMul", ["x", "W1"], ["h"], name="mm"),
        oh.make_node("Relu", ["h"], ["r"]),
        oh.make_node("Cast", ["Q2"], ["q2f"], to=TP.FLOAT),
        oh.make_node("Mul", ["S2", "q2f"], ["W2"]),  # scale first: either operand order
        oh.make_node("Gemm", ["r", "W2"], ["y"], name="gemm", transB=1),
    ]
    outputs = [oh.make_tensor_value_info("y", TP.FLOAT, [8, 16])]
    if shared_with_add:
        nodes.append(oh.make_node("Add", ["W1", "W1"], ["w1_twice"]))
        outputs.append(oh.make_tensor_value_info("w1_twice", TP.FLOAT, [64, 96]))
    inits = [nh.from_array(Q1, "Q1"), nh.from_array(S1, "S1"), nh.from_array(Q2, "Q2"), nh.from_array(S2, "S2")]
    graph = oh.make_graph(nodes, "dequantized", [oh.make_tensor_value_info("x", TP.FLOAT, [8, 64])], outputs, inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


def _weights64() -> tuple[np.ndarray, np.ndarray]:
    """The float weights the graph computes, [K, N] each (float32 products, as Mul computes them)."""
    w1 = (Q1.astype(np.float32) * S1).astype(np.float64)
    w2 = (Q2.astype(np.float32) * S2).astype(np.float64).T
    return w1, w2


def _forward(x: np.ndarray, matmul) -> np.ndarray:
    w1, w2 = _weights64()
    return matmul(np.maximum(matmul(x.astype(np.float64), w1), 0), w2)


def _dynamic_matmul(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """uint8 DynamicQuantizeLinear of ``a`` (ONNX spec) times int8 per-column levels within +-64."""
    a32 = a.astype(np.float32)
    lo, hi = min(0.0, float(a32.min())), max(0.0, float(a32.max()))
    a_scale = np.float32((hi - lo) / 255.0)
    a_zero = int(np.clip(np.rint(-lo / a_scale), 0, 255))
    aq = np.clip(np.rint(a32 / a_scale) + a_zero, 0, 255).astype(np.float64)
    scale = (np.abs(w).max(axis=0) / 64.0).astype(np.float32).astype(np.float64)
    wq = np.clip(np.rint(w / scale), -64, 64)
    return ((aq - a_zero) @ wq) * (np.float64(a_scale) * scale)


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def _chain_left(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node if n.op_type == "Cast" and n.input[0] in ("Q1", "Q2")] + [
        name for name in ("Q1", "S1", "Q2", "S2") if name in {t.name for t in model.graph.initializer}]


def test_dynamic_int8_quantizes_a_weight_dequantized_in_the_graph() -> None:
    model = _model()
    result = QuantizeDynamicPass(count_fused=False)(optcc.ir.load(model))
    q = optcc.ir.serialize(result.model)
    onnx.checker.check_model(q, full_check=True)
    ops = [n.op_type for n in q.graph.node]
    assert result.stats["MatMul"] == 1 and result.stats["Gemm"] == 1 and not result.stats["kept_float"]
    assert ops.count("MatMulInteger") == 2 and "MatMul" not in ops and "Gemm" not in ops
    assert not _chain_left(q), _chain_left(q)  # no dead Cast/Mul, no stored levels or scales left
    assert result.stats["dequantized_weight_bytes_removed"] == Q1.nbytes + S1.nbytes + Q2.nbytes + S2.nbytes
    assert not QuantizeDynamicPass(count_fused=False)(optcc.ir.load(q)).modified

    x = np.random.default_rng(12).normal(size=(8, 64)).astype(np.float32)
    got = _run(q, x)[0]
    emulated = _forward(x, _dynamic_matmul)
    exact = _forward(x, np.matmul)
    np.testing.assert_allclose(got, emulated, rtol=1e-4, atol=1e-4 * np.abs(emulated).max())
    sqnr = 10 * np.log10((exact ** 2).sum() / ((got - exact) ** 2).sum())
    assert sqnr > 30, sqnr


def test_weight_only_int4_requantizes_a_weight_stored_as_int8() -> None:
    model = _model()
    result = QuantizeWeightsPass(bits=4, block_size=32, symmetric=True, head_bits=None)(optcc.ir.load(model))
    q = optcc.ir.serialize(result.model)
    onnx.checker.check_model(q, full_check=True)
    ops = [n.op_type for n in q.graph.node]
    assert result.stats["quantized"] == {"MatMul int4": 1, "Gemm int4": 1}
    assert ops.count("DequantizeLinear") == 2 and not _chain_left(q) and "Cast" not in ops

    x = np.random.default_rng(13).normal(size=(8, 64)).astype(np.float32)
    got = _run(q, x)[0].astype(np.float64)
    exact = _forward(x, np.matmul)
    # each weight moves by at most half a step of a symmetric int4 block (max|block| / 7)
    w1, w2 = _weights64()
    h = np.maximum(x.astype(np.float64) @ w1, 0)
    bound1 = np.abs(x).sum(axis=1, keepdims=True) * np.abs(w1).max() / 14
    bound = (bound1 @ np.ones((1, 96))) @ np.abs(w2) + np.abs(h).sum(axis=1, keepdims=True) * np.abs(w2).max() / 14
    assert (np.abs(got - exact) <= bound + 1e-5 * np.abs(exact).max()).all()


def test_weight_only_int8_keeps_a_weight_stored_as_int8() -> None:
    """Re-rounding int8 levels to int8 blocks only loses accuracy and adds scales: they stay."""
    result = QuantizeWeightsPass(bits=8, block_size=32, symmetric=True)(optcc.ir.load(_model()))
    assert result.stats["kept_float"] == {"weight already stored as 8-bit integers": 2}
    q = optcc.ir.serialize(result.model)
    assert [n.op_type for n in q.graph.node].count("Cast") == 2 and "DequantizeLinear" not in {
        n.op_type for n in q.graph.node}
    x = np.random.default_rng(13).normal(size=(8, 64)).astype(np.float32)
    np.testing.assert_allclose(_run(q, x)[0], _forward(x, np.matmul), rtol=1e-5, atol=1e-6)


def test_a_dequantized_weight_read_by_another_op_stays() -> None:
    model = _model(shared_with_add=True)
    result = QuantizeDynamicPass(count_fused=False)(optcc.ir.load(model))
    q = optcc.ir.serialize(result.model)
    assert result.stats["kept_float"] == {"weight shared with another op": 1} and result.stats["Gemm"] == 1
    assert [n.op_type for n in q.graph.node].count("MatMul") == 1
    assert {"Q1", "S1"} <= {t.name for t in q.graph.initializer}
    x = np.random.default_rng(14).normal(size=(8, 64)).astype(np.float32)
    w1, _ = _weights64()
    np.testing.assert_allclose(_run(q, x)[1], 2 * w1, rtol=1e-6)


def test_the_summary_says_why_matmuls_stayed_float() -> None:
    """A MatMul of two activations has no weight to quantize: the summary counts it by reason."""
    model = _model()
    model.graph.node.append(oh.make_node("MatMul", ["y", "y_t"], ["gram"]))
    model.graph.node.insert(len(model.graph.node) - 1, oh.make_node("Transpose", ["y"], ["y_t"]))
    model.graph.output.append(oh.make_tensor_value_info("gram", TP.FLOAT, [8, 8]))
    result = optcc.optimize(model, int8_dynamic=True, verify=False)
    assert "quantize-dynamic kept float: 1 weight not constant" in result.report.summary().splitlines()
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("MatMulInteger") == 2 and ops.count("MatMul") == 1
