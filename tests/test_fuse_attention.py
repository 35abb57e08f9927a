"""FuseAttentionPass / FuseOrtAttentionPass on tiny transformer layers in the shapes today's
exporters write (fixtures/transformers.py: SDPA-with-guard and eager BERT layers, a GPT-2
layer with a KV cache), judged against float64 NumPy attention; what must not fuse (old
opset for the standard op, probabilities read elsewhere, non-constant scale) is reported
per layer."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

import optcc
from fixtures.transformers import (bert_feeds, bert_layer, bert_reference, gpt2_feeds, gpt2_layer,
                                   gpt2_reference)
from optcc.passes.fuse_attention import FuseAttentionPass, FuseOrtAttentionPass

TOL = 1e-4  # the fusion tolerance, relative to the output's scale


def _run(model: ir.Model | onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _close(got: np.ndarray, ref: np.ndarray) -> None:
    err = np.abs(got.astype(np.float64) - ref).max()
    assert err <= TOL * max(1.0, np.abs(ref).max()), err


def _fuse(pass_, proto: onnx.ModelProto) -> optcc.PassResult:
    result = pass_(ir.from_proto(proto))
    onnx.checker.check_model(ir.to_proto(result.model), full_check=True)
    again = type(pass_)()(result.model)
    assert not again.modified, "second run must be a no-op"
    return result


@pytest.mark.parametrize("style", ["sdpa", "eager"])
def test_bert_layer_fuses_to_standard_attention(style: str) -> None:
    proto, weights = bert_layer(style, opset=23)
    result = _fuse(FuseAttentionPass(), proto)
    hist = optcc.ir.op_histogram(result.model)
    assert hist.get("Attention") == 1 and "Softmax" not in hist and "IsNaN" not in hist
    assert result.stats["fused_layers"] == 1
    assert list(result.stats["layers"].values()) == ["fused: Attention"]
    feeds = bert_feeds()
    _close(_run(result.model, feeds)[0], bert_reference(weights, feeds["hidden_states"], feeds["attention_mask"]))


@pytest.mark.parametrize("style", ["sdpa", "eager"])
def test_bert_layer_fuses_to_multihead_attention(style: str) -> None:
    proto, weights = bert_layer(style, opset=17)
    result = _fuse(FuseOrtAttentionPass(), proto)
    hist = optcc.ir.op_histogram(result.model)
    assert hist.get("com.microsoft::MultiHeadAttention", hist.get("MultiHeadAttention")) == 1
    assert "Softmax" not in hist
    assert result.model.opset_imports.get("com.microsoft") == 1
    feeds = bert_feeds()
    _close(_run(result.model, feeds)[0], bert_reference(weights, feeds["hidden_states"], feeds["attention_mask"]))


@pytest.mark.parametrize("kind", ["standard", "ort"])
def test_gpt2_kv_cache_layer_fuses(kind: str) -> None:
    proto, weights = gpt2_layer(opset=23 if kind == "standard" else 17)
    pass_ = FuseAttentionPass() if kind == "standard" else FuseOrtAttentionPass()
    result = _fuse(pass_, proto)
    assert result.stats["fused_layers"] == 1
    assert sum(n.op_type in ("Attention", "MultiHeadAttention") for n in result.model.graph) == 1
    feeds = gpt2_feeds()
    got = _run(result.model, feeds)
    ref = gpt2_reference(weights, feeds["hidden_states"], feeds["past_key"], feeds["past_value"],
                         feeds["attention_mask"])
    for g, r in zip(got, ref):
        _close(g, r)
    # a first step without a past (P = 0) through the same fused graph
    first = gpt2_feeds(seq=5, past=0)
    ref0 = gpt2_reference(weights, first["hidden_states"], first["past_key"], first["past_value"],
                          first["attention_mask"])
    _close(_run(result.model, first)[0], ref0[0])


def test_standard_attention_needs_opset_23() -> None:
    proto, _ = bert_layer("sdpa", opset=17)
    result = FuseAttentionPass()(ir.from_proto(proto))
    assert not result.modified
    (reason,) = result.stats["layers"].values()
    assert "opset 17 < 23" in reason


def test_returned_probabilities_block_the_fusion() -> None:
    proto, _ = bert_layer("eager", opset=23)
    softmax = next(n for n in proto.graph.node if n.op_type == "Softmax")
    proto.graph.output.append(onnx.helper.make_tensor_value_info(softmax.output[0], onnx.TensorProto.FLOAT, None))
    result = FuseAttentionPass()(ir.from_proto(proto))
    assert not result.modified
    (reason,) = result.stats["layers"].values()
    assert "graph output" in reason


def test_non_constant_scale_is_refused_with_a_reason() -> None:
    proto, _ = bert_layer("eager", opset=23)
    div = next(n for n in proto.graph.node if n.op_type == "Div" and n.input[1] == "sqrt_head")
    proto.graph.input.append(onnx.helper.make_tensor_value_info("temperature", onnx.TensorProto.FLOAT, []))
    div.input[1] = "temperature"
    result = FuseAttentionPass()(ir.from_proto(proto))
    assert not result.modified
    (reason,) = result.stats["layers"].values()
    assert "scale" in reason or "scores are not" in reason


def test_level3_pipeline_fuses_and_verifies() -> None:
    proto, weights = bert_layer("sdpa", opset=17)
    result = optcc.optimize(proto, level=3, verify=False)
    hist = optcc.ir.op_histogram(ir.from_proto(result.model))
    # a self-attention layer without a KV cache: MultiHeadAttention, then packed with its projections
    assert hist.get("com.microsoft::Attention") == 1 and "com.microsoft::MultiHeadAttention" not in hist
    feeds = bert_feeds()
    _close(_run(result.model, feeds)[0], bert_reference(weights, feeds["hidden_states"], feeds["attention_mask"]))


def test_eager_gpt2_shape_cast_after_softmax_and_heads_from_split() -> None:
    """transformers' eager GPT-2 casts the probabilities to the value's type (a no-op Cast
    in float32) and splits heads with -1 from a Split of the fused QKV projection."""
    proto, weights = gpt2_layer(opset=17)
    for init in proto.graph.initializer:
        if init.name.startswith("split_"):
            dims = onnx.numpy_helper.to_array(init).copy()
            dims[2] = -1
            init.CopyFrom(onnx.numpy_helper.from_array(dims, init.name))
    softmax = next(n for n in proto.graph.node if n.op_type == "Softmax")
    reader = next(n for n in proto.graph.node if softmax.output[0] in n.input)
    reader.input[0] = "probs_cast"
    index = list(proto.graph.node).index(softmax)
    proto.graph.node.insert(index + 1, onnx.helper.make_node("Cast", [softmax.output[0]], ["probs_cast"],
                                                             to=onnx.TensorProto.FLOAT))
    result = _fuse(FuseOrtAttentionPass(), proto)
    assert result.stats["fused_layers"] == 1
    assert all(v.name != "probs_cast" for n in result.model.graph for v in n.outputs)
    feeds = gpt2_feeds()
    ref = gpt2_reference(weights, feeds["hidden_states"], feeds["past_key"], feeds["past_value"],
                         feeds["attention_mask"])
    for g, r in zip(_run(result.model, feeds), ref):
        _close(g, r)
