"""--target-opset / optimize(target_opset=N): the model converted to a newer default opset
(onnx's version converter), checked against numpy; never downgraded; large weights kept
as they are."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import optcc
from optcc import cli
from optcc.errors import BadInputError

RNG = np.random.default_rng(3)


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _opset10_model(weight: np.ndarray) -> onnx.ModelProto:
    """Ops whose attributes became inputs by opset 13 (Split's split, ReduceSum's and
    Unsqueeze's axes), and a MatMul with ``weight``."""
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["m"]),
        helper.make_node("Split", ["m"], ["a", "b"], axis=1, split=[3, weight.shape[1] - 3]),
        helper.make_node("ReduceSum", ["b"], ["r"], axes=[1], keepdims=0),
        helper.make_node("Unsqueeze", ["r"], ["u"], axes=[1]),
        helper.make_node("Clip", ["a"], ["c"], min=-0.5, max=0.5),
        helper.make_node("Concat", ["c", "u"], ["y"], axis=1),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, weight.shape[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                              [numpy_helper.from_array(weight, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 10)], ir_version=5)


def _reference(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    m = x.astype(np.float64) @ weight.astype(np.float64)
    return np.concatenate([np.clip(m[:, :3], -0.5, 0.5), m[:, 3:].sum(axis=1, keepdims=True)], axis=1)


@pytest.mark.parametrize("rows", [8, 512], ids=["small-weight", "weight-over-1MiB"])
def test_upgraded_model_computes_what_numpy_computes(rows: int) -> None:
    weight = (RNG.standard_normal((rows, 600)) / np.sqrt(rows)).astype(np.float32)
    model = _opset10_model(weight)
    x = RNG.standard_normal((2, rows)).astype(np.float32)
    result = optcc.optimize(model, passes=[], target_opset=17, inputs=[{"x": x}])
    upgraded = result.model
    assert optcc.ir.default_opset(optcc.ir.load(upgraded)) == 17
    onnx.checker.check_model(upgraded, full_check=True)
    split = next(n for n in upgraded.graph.node if n.op_type == "Split")
    assert len(split.input) == 2  # the split sizes are an input from opset 13
    np.testing.assert_allclose(_run(upgraded, {"x": x})[0], _reference(x, weight), rtol=1e-5, atol=1e-5)
    stored = next(t for t in upgraded.graph.initializer if t.name == "W")
    np.testing.assert_array_equal(numpy_helper.to_array(stored), weight)
    assert any(r.name == "upgrade-opset" and r.status == "changed" for r in result.report.passes)


def test_target_opset_lets_o2_fuse_standard_attention() -> None:
    from fixtures.transformers import bert_feeds, bert_layer, bert_reference

    proto, weights = bert_layer("sdpa", opset=17)
    feeds = bert_feeds()
    plain = optcc.optimize(proto, level=2, inputs=[feeds])
    assert not any(n.op_type == "Attention" for n in plain.model.graph.node)  # opset 17 has no Attention
    upgraded = optcc.optimize(proto, level=2, inputs=[feeds], target_opset=23)
    assert sum(n.op_type == "Attention" for n in upgraded.model.graph.node) == 1
    expected = bert_reference(weights, feeds["hidden_states"], feeds["attention_mask"])
    np.testing.assert_allclose(_run(upgraded.model, feeds)[0], expected, rtol=1e-4, atol=1e-4)


def test_a_model_is_never_downgraded(tmp_path) -> None:
    weight = RNG.standard_normal((8, 600)).astype(np.float32)
    model = _opset10_model(weight)
    with pytest.raises(BadInputError, match="never downgraded"):
        optcc.optimize(model, target_opset=9)
    with pytest.raises(BadInputError, match="newer than the installed onnx"):
        optcc.optimize(model, target_opset=onnx.defs.onnx_opset_version() + 1)
    path, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(model, path)
    before = path.read_bytes()
    assert cli.main([str(path), "--target-opset", "9", "-o", str(out)]) == 2
    assert not out.exists() and path.read_bytes() == before


def test_a_failed_upgrade_is_reverted_and_said() -> None:
    """A model with functions: the converter would leave their bodies at the old opset."""
    body = [helper.make_node("Relu", ["a"], ["b"])]
    function = helper.make_function("local", "MyRelu", ["a"], ["b"], body, [helper.make_opsetid("", 10)])
    graph = helper.make_graph([helper.make_node("MyRelu", ["x"], ["y"], domain="local")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])])
    model = helper.make_model(graph, functions=[function],
                              opset_imports=[helper.make_opsetid("", 10), helper.make_opsetid("local", 1)])
    x = np.array([-1.0, 0.0, 2.0], np.float32)
    result = optcc.optimize(model, passes=[], target_opset=17, inputs=[{"x": x}])
    assert optcc.ir.default_opset(optcc.ir.load(result.model)) == 10
    assert any(w.startswith("opset not upgraded to 17") and "functions" in w for w in result.report.warnings)
    np.testing.assert_array_equal(_run(result.model, {"x": x})[0], np.maximum(x, 0))
