"""Grouped-query attention (HF ``repeat_kv`` of fewer key/value heads) fused into the standard
Attention with the un-repeated key and value (fixtures/gqa.py: TorchScript- and dynamo-style
exports, with and without mask and KV cache), judged against float64 NumPy attention;
graphs that only look like ``repeat_kv`` (tile order, the factor on another axis, an unknown
factor, an unrepeated value, a broadcast query) keep their repeat and say why."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx.reference import ReferenceEvaluator

import optcc
from fixtures.gqa import gqa_feeds, gqa_layer, gqa_reference
from optcc.passes.fuse_attention import FuseAttentionPass, FuseOrtAttentionPass

TOL = 1e-4


def _run(proto: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def _check(proto: onnx.ModelProto, w: dict, variant: str | None = None, **options: bool) -> None:
    for feeds in (gqa_feeds(variant=variant, **options), gqa_feeds(batch=1, seq=1, past=6, seed=2,
                                                                   variant=variant, **options)):
        ref = gqa_reference(w, feeds, variant=variant)
        got = _run(proto, feeds)
        for g, r in zip(got, ref):
            assert g.shape == r.shape
            assert np.abs(g.astype(np.float64) - r).max() <= TOL * max(1.0, np.abs(r).max())


def _attention(model: ir.Model) -> ir.Node:
    (node,) = [n for n in model.graph if n.op_type == "Attention"]
    return node


@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("style", ["torchscript", "dynamo"])
def test_repeat_kv_feeds_the_kv_heads(style: str, mask: bool, cache: bool) -> None:
    proto, w = gqa_layer(style, mask=mask, cache=cache)
    result = FuseAttentionPass()(ir.from_proto(proto))
    assert list(result.stats["grouped_kv"].values()) == ["grouped: key/value heads shared by 2 query heads"]
    node = _attention(result.model)
    if cache:
        assert list(result.stats["kv_cache"].values()) == ["folded"]
        # past and present stay un-repeated: 2 heads, the graph outputs are the op's presents
        assert [v.name for v in node.inputs[4:6]] == ["past_key", "past_value"]
        assert list(result.model.graph.outputs[1:]) == list(node.outputs[1:])
    else:
        key = node.inputs[1]
        assert key.producer() is None or key.producer().op_type == "Transpose"  # the head split, not the repeat
    assert not FuseAttentionPass()(result.model).modified
    fused = ir.to_proto(result.model)
    onnx.checker.check_model(fused, full_check=True)
    _check(fused, w, mask=mask, cache=cache)


def test_opset17_export_upgraded_at_o2() -> None:
    proto, w = gqa_layer("torchscript", mask=True, cache=True, opset=17)
    result = optcc.optimize(proto, level=2, target_opset=23, verify=False)
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("Attention") == 1 and "Softmax" not in ops
    (node,) = [n for n in result.model.graph.node if n.op_type == "Attention"]
    assert list(node.input[4:6]) == ["past_key", "past_value"]  # un-repeated, folded cache
    assert "Unsqueeze" not in ops  # the repeat is gone
    _check(result.model, w, mask=True, cache=True)


@pytest.mark.parametrize("variant, reason", [
    ("unsqueeze_axis", "repeat_kv kept: repeat_kv Unsqueeze is not on axis 2"),
    ("expand_axis", "repeat_kv kept: repeat_kv Expand target does not keep the other axes"),
    ("factor_input", "repeat_kv kept: repeat_kv factor is not a constant"),
    ("value_full", "repeat_kv kept: the value is not repeated"),
    ("transposed", None),  # Expand -> Transpose -> Reshape is no repeat_kv at all
])
def test_lookalikes_keep_the_repeat(variant: str, reason: str | None) -> None:
    proto, w = gqa_layer("torchscript", mask=True, cache=True, variant=variant)
    result = FuseAttentionPass()(ir.from_proto(proto))
    grouped = result.stats.get("grouped_kv")
    assert (grouped is None) if reason is None else list(grouped.values()) == [reason]
    node = _attention(result.model)
    assert node.inputs[1].producer().op_type == "Reshape"  # still the repeated key
    assert "kv_cache" not in result.stats  # the key is no cache Concat: the graph keeps its presents
    _check(ir.to_proto(result.model), w, variant=variant, mask=True, cache=True)


def test_repeated_key_read_elsewhere_stays_for_that_reader() -> None:
    proto, w = gqa_layer("torchscript", cache=True, variant="shared")
    result = FuseAttentionPass()(ir.from_proto(proto))
    assert "grouped" in next(iter(result.stats["grouped_kv"].values()))
    fused = ir.to_proto(result.model)
    onnx.checker.check_model(fused, full_check=True)
    feeds = gqa_feeds(cache=True)
    got = _run(fused, feeds)
    ref = gqa_reference(w, feeds)
    assert np.abs(got[0] - ref[0]).max() <= TOL
    np.testing.assert_allclose(got[3], np.repeat(ref[1], 2, axis=1), rtol=1e-6, atol=1e-6)


def test_broadcast_query_is_not_fused() -> None:
    proto, w = gqa_layer("torchscript", variant="query_broadcast")
    result = FuseAttentionPass()(ir.from_proto(proto))
    assert not result.modified
    assert "broadcasts" in next(iter(result.stats["layers"].values()))


def test_multihead_attention_keeps_the_repeat() -> None:
    proto, w = gqa_layer("torchscript", mask=True, opset=17)
    result = FuseOrtAttentionPass()(ir.from_proto(proto))
    assert next(iter(result.stats["layers"].values())) == "fused: com.microsoft.MultiHeadAttention"
    assert list(result.stats["grouped_kv"].values()) == [
        "repeat_kv kept: com.microsoft.MultiHeadAttention has no grouped key/value heads"]
    _check(ir.to_proto(result.model), w, mask=True)


def test_onnx_reference_agrees_on_the_grouped_op() -> None:
    """onnx's reference Attention (an implementation independent of onnxruntime) computes the
    fused grouped model as the NumPy repeat_kv reference does."""
    proto, w = gqa_layer("dynamo", mask=True, cache=True)
    fused = ir.to_proto(FuseAttentionPass()(ir.from_proto(proto)).model)
    feeds = gqa_feeds(mask=True, cache=True)
    for got, ref in zip(ReferenceEvaluator(fused).run(None, feeds), gqa_reference(w, feeds)):
        assert np.abs(got - ref).max() <= TOL * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("variant", [None, "unsqueeze_axis"])
def test_exporters_attention_takes_the_kv_heads(variant: str | None, cache: bool) -> None:
    """dynamo at opset 23 writes Attention itself on repeat_kv: it gets the kv heads (and
    its cache folded), unless the repeat is a lookalike."""
    proto, w = gqa_layer("dynamo" if variant is None else "torchscript", mask=True, cache=cache, variant=variant,
                         attention_op=True)
    result = FuseAttentionPass()(ir.from_proto(proto))
    (reason,) = result.stats["grouped_kv"].values()
    node = _attention(result.model)
    if variant is None:
        assert reason == "grouped: key/value heads shared by 2 query heads"
        assert node.inputs[1].producer() is None or node.inputs[1].producer().op_type != "Reshape"
        assert ("kv_cache" in result.stats) == cache
    else:
        assert reason == "repeat_kv kept: repeat_kv Unsqueeze is not on axis 2" and not result.modified
    assert not FuseAttentionPass()(result.model).modified
    fused = ir.to_proto(result.model)
    onnx.checker.check_model(fused, full_check=True)
    _check(fused, w, variant=variant, mask=True, cache=cache)


@pytest.mark.parametrize("attention_op", [False, True])
def test_cache_not_returned_stays_outside(attention_op: bool) -> None:
    """A cache Concat read only by the attention is not folded: onnxruntime refuses past
    inputs without present outputs, and nothing would read those."""
    proto, w = gqa_layer("dynamo", cache=True, variant="no_present", attention_op=attention_op)
    result = FuseAttentionPass()(ir.from_proto(proto))
    assert list(result.stats["grouped_kv"].values()) == ["grouped: key/value heads shared by 2 query heads"]
    assert list(result.stats["kv_cache"].values()) == [
        "a cache Concat is not read after the attention (its present output would be unused)"]
    fused = optcc.optimize(ir.to_proto(result.model), level=1, verify=False).model  # dead repeat removed
    _check(fused, w, cache=True)


@pytest.mark.parametrize("cache", [False, True])
def test_inferred_head_count_and_rotary_key_are_proved(cache: bool) -> None:
    """transformers 5's TorchScript shapes: the key's head count is what Reshape infers for
    its -1 (the projection's width over the head size) and passes through the rotary
    arithmetic (Mul, Add, Slice on the last axis, Concat) unchanged."""
    proto, w = gqa_layer("torchscript5", mask=True, cache=cache)
    result = FuseAttentionPass()(ir.from_proto(proto))
    assert list(result.stats["grouped_kv"].values()) == ["grouped: key/value heads shared by 2 query heads"]
    fused = ir.to_proto(result.model)
    onnx.checker.check_model(fused, full_check=True)
    _check(fused, w, mask=True, cache=cache)


def test_a_slice_over_the_heads_axis_is_not_proved_to_keep_it() -> None:
    proto, w = gqa_layer("torchscript5", mask=True, variant="slice_heads")
    result = FuseAttentionPass()(ir.from_proto(proto))
    assert list(result.stats["grouped_kv"].values()) == [
        "repeat_kv kept: repeat_kv Expand target does not keep the other axes"]
    _check(ir.to_proto(result.model), w, variant="slice_heads", mask=True)
