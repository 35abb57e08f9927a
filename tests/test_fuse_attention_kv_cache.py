"""The KV-cache Concats of a decoder layer folded into the fused attention's past inputs and
present outputs (standard Attention at opset 23, com.microsoft.MultiHeadAttention at -O3),
judged against a float64 NumPy decoder layer over a decode step and a prefill without past;
what must keep its Concats (an upstream reader that is not a Shape, a key that is not a
cache) is reported."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

import optcc
from fixtures.transformers import gpt2_feeds, gpt2_layer, gpt2_reference
from optcc.passes.fuse_attention import FuseAttentionPass, FuseOrtAttentionPass, fold_kv_cache

TOL = 1e-4


def _run(proto: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def _close(got: np.ndarray, ref: np.ndarray) -> None:
    assert got.shape == ref.shape
    assert np.abs(got.astype(np.float64) - ref).max() <= TOL * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("kind", ["standard", "ort"])
def test_gpt2_layer_cache_folds_into_present_outputs(kind: str) -> None:
    proto, weights = gpt2_layer(opset=23 if kind == "standard" else 17)
    pass_ = FuseAttentionPass() if kind == "standard" else FuseOrtAttentionPass()
    result = pass_(ir.from_proto(proto))
    assert list(result.stats["kv_cache"].values()) == ["folded"]
    fused = ir.to_proto(result.model)
    onnx.checker.check_model(fused, full_check=True)
    attention = next(n for n in result.model.graph if n.op_type.endswith("Attention"))
    assert [o.name for o in result.model.graph.outputs] == ["y", "present_key", "present_value"]
    assert result.model.graph.outputs[1] is attention.outputs[1]
    assert result.model.graph.outputs[2] is attention.outputs[2]
    assert not any(n.op_type == "Concat" and n.attributes["axis"].as_int() == 2 for n in result.model.graph)
    # the fixture's causal mask reads the total length from Shape(present_key): now from the pieces
    assert not any(n.op_type == "Shape" and n.inputs[0] is attention.outputs[1] for n in result.model.graph)
    assert not type(pass_)()(result.model).modified
    for feeds in (gpt2_feeds(), gpt2_feeds(seq=5, past=0), gpt2_feeds(batch=1, seq=1, past=6)):
        ref = gpt2_reference(weights, feeds["hidden_states"], feeds["past_key"], feeds["past_value"],
                             feeds["attention_mask"])
        for got, want in zip(_run(fused, feeds), ref):
            _close(got, want)


def _exported_attention(reader: str | None) -> onnx.ModelProto:
    """A standard Attention as the dynamo exporter writes it at opset 23, over cache
    Concats; ``reader``: an extra reader of the key Concat feeding the query scale."""
    nodes = [helper.make_node("Concat", ["past_key", "k"], ["present_key"], axis=2),
             helper.make_node("Concat", ["past_value", "v"], ["present_value"], axis=2),
             helper.make_node("Attention", ["q2", "present_key", "present_value"], ["y"], scale=0.25)]
    if reader == "reduce":  # a data reader upstream: folding would form a cycle
        nodes.insert(2, helper.make_node("ReduceMax", ["present_key"], ["m"], keepdims=0))
        nodes.insert(3, helper.make_node("Mul", ["q", "zero"], ["q0"]))
        nodes.insert(4, helper.make_node("Add", ["q0", "m"], ["q2"]))
    else:
        nodes.insert(0, helper.make_node("Identity", ["q"], ["q2"]))
    kv = ["B", 2, "P", 4]
    new = ["B", 2, "S", 4]
    graph = helper.make_graph(
        nodes, "exported",
        [helper.make_tensor_value_info("q", TensorProto.FLOAT, new), helper.make_tensor_value_info("k", TensorProto.FLOAT, new),
         helper.make_tensor_value_info("v", TensorProto.FLOAT, new),
         helper.make_tensor_value_info("past_key", TensorProto.FLOAT, kv),
         helper.make_tensor_value_info("past_value", TensorProto.FLOAT, kv)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, new),
         helper.make_tensor_value_info("present_key", TensorProto.FLOAT, ["B", 2, "T", 4]),
         helper.make_tensor_value_info("present_value", TensorProto.FLOAT, ["B", 2, "T", 4])],
        [onnx.numpy_helper.from_array(np.float32(0.0), "zero")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)


def _feeds(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"q": rng.standard_normal((2, 2, 3, 4)).astype(np.float32),
            "k": rng.standard_normal((2, 2, 3, 4)).astype(np.float32),
            "v": rng.standard_normal((2, 2, 3, 4)).astype(np.float32),
            "past_key": rng.standard_normal((2, 2, 5, 4)).astype(np.float32),
            "past_value": rng.standard_normal((2, 2, 5, 4)).astype(np.float32)}


def _numpy_attention(f: dict[str, np.ndarray], q: np.ndarray) -> list[np.ndarray]:
    k = np.concatenate([f["past_key"], f["k"]], 2).astype(np.float64)
    v = np.concatenate([f["past_value"], f["v"]], 2).astype(np.float64)
    s = q.astype(np.float64) @ k.swapaxes(-1, -2) * 0.25
    p = np.exp(s - s.max(-1, keepdims=True))
    return [(p / p.sum(-1, keepdims=True)) @ v, k, v]


def test_exported_standard_attention_takes_the_past() -> None:
    proto = _exported_attention(None)
    model = ir.from_proto(proto)
    report = fold_kv_cache(model, ("", "Attention"))
    assert list(report.values()) == ["folded"]
    folded = ir.to_proto(model)
    onnx.checker.check_model(folded, full_check=True)
    assert [n.op_type for n in folded.graph.node] == ["Identity", "Attention"]
    f = _feeds()
    ref = _numpy_attention(f, f["q"])
    for run in (_run(folded, f), ReferenceEvaluator(folded).run(None, f)):
        for got, want in zip(run, ref):
            _close(got, want)


def test_upstream_data_reader_keeps_the_concats() -> None:
    model = ir.from_proto(_exported_attention("reduce"))
    report = fold_kv_cache(model, ("", "Attention"))
    (reason,) = report.values()
    assert "upstream" in reason
    assert sum(n.op_type == "Concat" for n in model.graph) == 2
    f = _feeds(1)
    q = np.full_like(f["q"], np.concatenate([f["past_key"], f["k"]], 2).max())
    for got, want in zip(_run(ir.to_proto(model), f), _numpy_attention(f, q)):
        _close(got, want)


def test_key_that_is_not_a_cache_is_not_reported() -> None:
    proto = _exported_attention(None)
    proto.graph.node[1].attribute[0].i = 3  # Concat over head_size: not a cache
    proto.graph.output[1].type.tensor_type.shape.dim[2].dim_param = "P"
    model = ir.from_proto(proto)
    assert fold_kv_cache(model, ("", "Attention")) == {}
    assert sum(n.op_type == "Concat" for n in model.graph) == 2


def test_level3_decoder_verifies_with_folded_cache() -> None:
    proto, weights = gpt2_layer(opset=17)
    result = optcc.optimize(proto, level=3, verify=False)
    hist = optcc.ir.op_histogram(ir.from_proto(result.model))
    assert hist.get("com.microsoft::MultiHeadAttention") == 1
    model = ir.from_proto(result.model)
    attention = next(n for n in model.graph if n.op_type == "MultiHeadAttention")
    assert [o.name for o in model.graph.outputs[1:]] == ["present_key", "present_value"]
    assert list(model.graph.outputs[1:]) == list(attention.outputs[1:])
    feeds = gpt2_feeds()
    ref = gpt2_reference(weights, feeds["hidden_states"], feeds["past_key"], feeds["past_value"], feeds["attention_mask"])
    for got, want in zip(_run(result.model, feeds), ref):
        _close(got, want)
