"""FuseOrtSkipLayerNormPass and FuseOrtTransformerPass (-O3): Add + LayerNormalization ->
SkipLayerNormalization (with the projection bias folded in; a pre-LayerNorm residual sum
that is read again comes from its sum output), Gelu(x + b) -> BiasGelu / FastGelu,
decomposed Gelu below opset 20 -> com.microsoft Gelu; judged against float64 NumPy on tiny
BERT / GPT-2 layers."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

import optcc
from fixtures.transformers import (bert_feeds, bert_layer, bert_reference, gpt2_feeds, gpt2_layer,
                                   gpt2_reference)
from optcc.passes.fuse_normalization import FuseNormalizationPass
from optcc.passes.fuse_ort_skip_layernorm import FuseOrtSkipLayerNormPass
from optcc.passes.fuse_ort_transformer import FuseOrtTransformerPass


def _run(model: ir.Model, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _close(got: np.ndarray, ref: np.ndarray) -> None:
    assert np.abs(got.astype(np.float64) - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_bert_layer_gets_skip_layernorm_and_bias_gelu() -> None:
    proto, weights = bert_layer("eager", opset=17)
    skip = FuseOrtSkipLayerNormPass()(ir.from_proto(proto))
    assert skip.stats["applied"] == {"skip-layernorm-bias": 2}
    result = FuseOrtTransformerPass()(skip.model)
    onnx.checker.check_model(ir.to_proto(result.model), full_check=True)
    hist = optcc.ir.op_histogram(result.model)
    assert hist.get("com.microsoft::SkipLayerNormalization") == 2
    assert hist.get("com.microsoft::BiasGelu") == 1
    assert "LayerNormalization" not in hist and "Erf" not in hist
    assert result.model.opset_imports["com.microsoft"] == 1
    assert not FuseOrtTransformerPass()(result.model).modified
    assert not FuseOrtSkipLayerNormPass()(result.model).modified
    feeds = bert_feeds()
    _close(_run(result.model, feeds)[0], bert_reference(weights, feeds["hidden_states"], feeds["attention_mask"]))


def test_standard_gelu_with_bias_becomes_bias_gelu_at_opset_20() -> None:
    proto, weights = bert_layer("sdpa", opset=20)
    model = FuseNormalizationPass()(ir.from_proto(proto)).model  # erf formula -> Gelu
    assert optcc.ir.op_histogram(model).get("Gelu") == 1
    result = FuseOrtTransformerPass()(model)
    assert result.stats["applied"].get("bias-gelu") == 1
    assert "gelu-erf" not in result.stats["applied"]
    feeds = bert_feeds()
    _close(_run(result.model, feeds)[0], bert_reference(weights, feeds["hidden_states"], feeds["attention_mask"]))


def test_pre_layernorm_residual_read_twice_uses_the_sum_output() -> None:
    # GPT-2's h1 = attn + x feeds both the second LayerNorm and the final residual Add: the
    # SkipLayerNormalization's fourth output (input + skip) replaces h1 for that Add
    proto, weights = gpt2_layer(opset=17)
    result = FuseOrtSkipLayerNormPass()(ir.from_proto(proto))
    fused = ir.to_proto(result.model)
    onnx.checker.check_model(fused, full_check=True)
    hist = optcc.ir.op_histogram(result.model)
    assert hist.get("com.microsoft::SkipLayerNormalization") == 1
    assert hist.get("LayerNormalization") == 1  # the first reads a graph input, not a sum
    assert list(result.stats["skip_layernorm_sum"].values()) == ["fused"]
    (skip,) = [n for n in fused.graph.node if n.op_type == "SkipLayerNormalization"]
    assert skip.output[1] == skip.output[2] == "" and skip.output[3]
    assert any(skip.output[3] in n.input for n in fused.graph.node if n.op_type == "Add")
    assert not FuseOrtSkipLayerNormPass()(result.model).modified
    for feeds in (gpt2_feeds(), gpt2_feeds(seq=4, past=0)):
        got = _run(result.model, feeds)
        ref = gpt2_reference(weights, feeds["hidden_states"], feeds["past_key"], feeds["past_value"],
                             feeds["attention_mask"])
        for g, r in zip(got, ref):
            _close(g, r)


def test_sum_output_refused_when_layernorm_statistics_are_read() -> None:
    proto, weights = gpt2_layer(opset=17)
    ln = next(n for n in proto.graph.node if n.op_type == "LayerNormalization" and n.input[0] != "hidden_states")
    ln.output.extend(["ln_mean"])
    proto.graph.output.append(onnx.helper.make_tensor_value_info("ln_mean", onnx.TensorProto.FLOAT, None))
    result = FuseOrtSkipLayerNormPass()(ir.from_proto(proto))
    assert "com.microsoft::SkipLayerNormalization" not in optcc.ir.op_histogram(result.model)
    (reason,) = result.stats["skip_layernorm_sum"].values()
    assert "mean/inv_std" in reason
    feeds = gpt2_feeds()
    got = _run(result.model, feeds)
    ref = gpt2_reference(weights, feeds["hidden_states"], feeds["past_key"], feeds["past_value"],
                         feeds["attention_mask"])
    for g, r in zip(got[:3], ref):  # ln_mean comes last
        _close(g, r)
