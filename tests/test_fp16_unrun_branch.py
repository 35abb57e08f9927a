"""ConvertFloat16Pass keeps float32 the branch of an If that no sample ran: nothing would
verify float16 there. openWakeWord's 'hey jarvis' head runs a second (verifier) network in
an If only when the first one scores >= 0.5; on samples without the wake word that branch
never runs, and its float16 copy went out unverified."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
from onnx import TensorProto as TP

import optcc
from optcc.passes.convert_float16 import ConvertFloat16Pass
from reference import expected_outputs_float64

RNG = np.random.default_rng(11)
W1 = (RNG.standard_normal((16, 1)) * 0.3).astype(np.float32)
W2 = (RNG.standard_normal((16, 8)) * 0.3).astype(np.float32)
W3 = (RNG.standard_normal((16, 64)) * 0.3).astype(np.float32)  # most of the weights: float16 halves them


def _gated() -> onnx.ModelProto:
    """score = Sigmoid(x @ w1); if score >= 0.5: Sigmoid(mean(Relu(x) @ w2)) else score;
    beside it features = x @ w3."""
    then_nodes = [oh.make_node("Relu", ["x"], ["r"]), oh.make_node("MatMul", ["r", "w2"], ["v"]),
                  oh.make_node("ReduceMean", ["v"], ["m"], axes=[1]), oh.make_node("Sigmoid", ["m"], ["second"])]
    then_branch = oh.make_graph(then_nodes, "then", [], [oh.make_tensor_value_info("second", TP.FLOAT, [1, 1])])
    else_branch = oh.make_graph([oh.make_node("Identity", ["score"], ["first"])], "else", [],
                                [oh.make_tensor_value_info("first", TP.FLOAT, [1, 1])])
    nodes = [
        oh.make_node("MatMul", ["x", "w1"], ["logit"]),
        oh.make_node("Sigmoid", ["logit"], ["score"]),
        oh.make_node("GreaterOrEqual", ["score", "half"], ["gate"]),
        oh.make_node("If", ["gate"], ["y"], then_branch=then_branch, else_branch=else_branch),
        oh.make_node("MatMul", ["x", "w3"], ["features"]),
    ]
    inits = [nh.from_array(W1, "w1"), nh.from_array(W2, "w2"), nh.from_array(W3, "w3"),
             nh.from_array(np.array(0.5, np.float32), "half")]
    graph = oh.make_graph(nodes, "gated", [oh.make_tensor_value_info("x", TP.FLOAT, [1, 16])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, [1, 1]),
                           oh.make_tensor_value_info("features", TP.FLOAT, [1, 64])], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _samples(sign: float, n: int = 4) -> list[dict[str, np.ndarray]]:
    """Inputs whose first score is below (sign -1) or above (sign +1) 0.5."""
    out = []
    for _ in range(n):
        x = RNG.standard_normal((1, 16)).astype(np.float32)
        norm2 = (W1.T @ W1).item()
        x = x - (x @ W1) * W1.T / norm2 + sign * 2 * W1.T / np.sqrt(norm2)
        out.append({"x": x.astype(np.float32)})
    return out


def _then_nodes(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    node = next(n for n in proto.graph.node if n.op_type == "If")
    return list(next(a.g for a in node.attribute if a.name == "then_branch").node)


def test_a_branch_no_sample_ran_stays_float32():
    model = _gated()
    samples = _samples(-1.0)
    assert all(expected_outputs_float64(model, s)[0].item() < 0.5 for s in samples)
    result = ConvertFloat16Pass(inputs=samples)(optcc.ir.load(model))
    proto = optcc.ir.serialize(result.model)
    onnx.checker.check_model(proto, full_check=True)
    kept = result.stats["kept_float32"]
    assert [why for why in kept.values() if "then_branch, which no sample ran" in why], kept
    assert [n.op_type for n in _then_nodes(proto)] == ["Relu", "MatMul", "ReduceMean", "Sigmoid"]  # no Cast
    assert result.stats["converted"].get("MatMul") == 2  # the main graph's two convert
    w2 = next(t for t in proto.graph.initializer if t.name == "w2")
    assert w2.data_type == TP.FLOAT  # not rounded to float16 behind a Cast: no sample would check it
    # the branch computes as before on an input that takes it
    taking = _samples(1.0, 1)[0]
    want, got = expected_outputs_float64(model, taking)[0], expected_outputs_float64(proto, taking)[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_a_branch_some_sample_ran_converts():
    model = _gated()
    samples = _samples(-1.0, 2) + _samples(1.0, 2)
    result = ConvertFloat16Pass(inputs=samples)(optcc.ir.load(model))
    kept = result.stats["kept_float32"]
    assert not [why for why in kept.values() if "no sample ran" in why], kept
    assert result.stats["converted"].get("MatMul") == 3
