"""smooth-activations: LayerNorm output outliers moved into the reading MatMuls' weights;
the model computes the same (float64 numpy reference) and the MatMuls' input channels
become even."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import optcc

RNG = np.random.default_rng(11)
K, N = 16, 8


def _model(residual: bool) -> tuple:
    gamma = np.ones(K, np.float32)
    gamma[3] = 60.0  # one outlier channel, as transformer LayerNorms have
    beta = (0.1 * RNG.standard_normal(K)).astype(np.float32)
    w1 = (RNG.standard_normal((K, N)) / 4).astype(np.float32)
    w2 = (RNG.standard_normal((K, N)) / 4).astype(np.float32)
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-5),
             helper.make_node("MatMul", ["y", "W1"], ["a"]), helper.make_node("MatMul", ["y", "W2"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["out"])]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 5, N])]
    if residual:  # the LayerNorm's output is also read by something other than a MatMul
        nodes.append(helper.make_node("ReduceSum", ["y"], ["skip"], keepdims=0))
        outputs.append(helper.make_tensor_value_info("skip", TensorProto.FLOAT, []))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, K])], outputs,
                              [numpy_helper.from_array(a, n) for a, n in
                               ((gamma, "gamma"), (beta, "beta"), (w1, "W1"), (w2, "W2"))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), gamma, beta, w1, w2


def _reference(x, gamma, beta, w1, w2):
    x = x.astype(np.float64)
    y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * gamma + beta
    return y @ w1 + y @ w2, y.sum()


def _run(model, x):
    session = ort.InferenceSession(optcc.ir.serialize(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def _matmul_input_ratio(model, x) -> float:
    """max / min over channels of the largest |value| the MatMuls read, in numpy."""
    node = next(n for n in model.graph if n.op_type == "MatMul")
    probe = model.clone()
    value = next(v for n in probe.graph for v in n.outputs if v.name == node.inputs[0].name)
    probe.graph.outputs.append(value)
    got = np.abs(_run(probe, x)[-1]).reshape(-1, K).max(axis=0)
    return float(got.max() / got.min())


def test_smoothing_keeps_the_function_and_evens_the_channels() -> None:
    for residual in (False, True):
        proto, gamma, beta, w1, w2 = _model(residual)
        samples = [{"x": RNG.standard_normal((2, 5, K)).astype(np.float32)} for _ in range(4)]
        model = optcc.ir.load(proto)
        before = _matmul_input_ratio(model, samples[0]["x"])
        result = optcc.create_pass("smooth-activations", samples=samples)(model)
        assert result.modified and result.stats["layers"] == 1
        after = _matmul_input_ratio(result.model, samples[0]["x"])
        assert before > 20 and after < before / 4  # the outlier channel no longer sets the range
        assert any(n.op_type == "Mul" for n in result.model.graph) is residual  # divided only for the MatMuls
        for feeds in samples:
            out, *rest = _run(result.model, feeds["x"])
            expected, skip = _reference(feeds["x"], gamma, beta, w1, w2)
            np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
            if residual:
                np.testing.assert_allclose(rest[0], skip, rtol=1e-4, atol=1e-3)


def test_shared_weights_and_graph_outputs_are_left_alone() -> None:
    proto, *_ = _model(False)
    proto.graph.node[2].input[1] = "W1"  # both MatMuls read W1: rescaling it for one changes the other
    samples = [{"x": RNG.standard_normal((2, 5, K)).astype(np.float32)}]
    result = optcc.create_pass("smooth-activations", samples=samples)(optcc.ir.load(proto))
    assert not result.modified
    proto, *_ = _model(False)
    proto.graph.output.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, K]))
    result = optcc.create_pass("smooth-activations", samples=samples)(optcc.ir.load(proto))
    assert not result.modified


def test_the_int8_driver_smooths_when_asked() -> None:
    from optcc.quant.driver import quantize_int8

    proto, gamma, beta, w1, w2 = _model(False)
    samples = [{"x": RNG.standard_normal((2, 5, K)).astype(np.float32)} for _ in range(8)]
    _, stats = quantize_int8(proto, samples, require_speedup=False, require_target=False, smooth=True)
    assert stats["smooth"]["layers"] == 1 and stats["smooth"]["modified"]
    _, plain = quantize_int8(proto, samples, require_speedup=False, require_target=False)
    assert "smooth" not in plain
