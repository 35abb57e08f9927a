"""fuse-ort-packed-attention at -O3 on a BERT-style self-attention layer built with onnx helpers:
the MultiHeadAttention that fuse-ort-attention writes and its Q/K/V projections of one input
become one ``com.microsoft.Attention`` with packed weights, with and without a padding mask
(the shape reads that expand the mask then read the input's shape); the optimized model run
by onnxruntime matches onnx's reference evaluator running the original. Cross-attention, a
weight fed at run time and a KV cache keep MultiHeadAttention, each with its reason."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

import optcc
from optcc.passes.fuse_attention import FuseOrtAttentionPass
from optcc.passes.fuse_ort_packed_attention import FUSED, FuseOrtPackedAttentionPass

HEADS, HEAD = 2, 8  # hidden 16: fuse-parallel-matmuls leaves weights this wide apart
HIDDEN = HEADS * HEAD
TOL = 1e-4  # the fusion tolerance


def _const(name: str, array: np.ndarray) -> onnx.TensorProto:
    return onnx.numpy_helper.from_array(array, name)


def attention_layer(mask: bool = False, keys_from: str = "x", weight_input: bool = False,
                    cache: bool = False) -> onnx.ModelProto:
    """``y = Add(MatMul(attention(x), wo), bo)`` with q/k/v = ``Add(MatMul(src, W), b)`` split into
    heads, scores ``MatMul(q, kt) * 1/sqrt(d)`` plus, with ``mask``, the additive
    ``(1 - attention_mask) * -10000`` on the key axis; keys and values projected from
    ``keys_from`` (``"x"`` or another input ``"memory"``); with ``weight_input`` the key weight
    is a graph input; with ``cache`` the keys and values are ``Concat(past, new, axis=2)``,
    returned as presents."""
    rng = np.random.default_rng(0)
    inits = [_const(f"w{n}", (rng.standard_normal((HIDDEN, HIDDEN)) / 3).astype(np.float32)) for n in "qvo"]
    inits += [_const(f"b{n}", rng.standard_normal(HIDDEN).astype(np.float32)) for n in "qkvo"]
    inits += [_const("split", np.array([0, 0, HEADS, HEAD], np.int64)),
              _const("merge", np.array([0, 0, HIDDEN], np.int64)),
              _const("scale", np.array(1 / np.sqrt(HEAD), np.float32)),
              _const("one_f", np.array(1.0, np.float32)), _const("fill", np.array(-10000.0, np.float32)),
              _const("axes12", np.array([1, 2], np.int64))]
    wk = (rng.standard_normal((HIDDEN, HIDDEN)) / 3).astype(np.float32)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", HIDDEN])]
    if weight_input:
        inputs.append(helper.make_tensor_value_info("wk", TensorProto.FLOAT, [HIDDEN, HIDDEN]))
    else:
        inits.append(_const("wk", wk))
    if keys_from != "x":
        inputs.append(helper.make_tensor_value_info(keys_from, TensorProto.FLOAT, ["batch", "kv_seq", HIDDEN]))
    nodes = []
    for name, src in (("q", "x"), ("k", keys_from), ("v", keys_from)):
        nodes += [helper.make_node("MatMul", [src, f"w{name}"], [f"{name}_mm"]),
                  helper.make_node("Add", [f"{name}_mm", f"b{name}"], [f"{name}_flat"]),
                  helper.make_node("Reshape", [f"{name}_flat", "split"], [f"{name}_split"]),
                  helper.make_node("Transpose", [f"{name}_split"], [f"{name}_heads"], perm=[0, 2, 1, 3])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", HIDDEN])]
    keys, values = "k_heads", "v_heads"
    if cache:
        for name, new in (("key", "k_heads"), ("value", "v_heads")):
            inputs.append(helper.make_tensor_value_info(f"past_{name}", TensorProto.FLOAT,
                                                        ["batch", HEADS, "past", HEAD]))
            outputs.append(helper.make_tensor_value_info(f"present_{name}", TensorProto.FLOAT,
                                                         ["batch", HEADS, "total", HEAD]))
            nodes.append(helper.make_node("Concat", [f"past_{name}", new], [f"present_{name}"], axis=2))
        keys, values = "present_key", "present_value"
    nodes += [helper.make_node("Transpose", [keys], ["kt"], perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["q_heads", "kt"], ["qk"]),
              helper.make_node("Mul", ["qk", "scale"], ["scores" if mask else "logits"])]
    if mask:
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]))
        nodes += [helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
                  helper.make_node("Sub", ["one_f", "mask_f"], ["masked"]),
                  helper.make_node("Mul", ["masked", "fill"], ["bias2"]),
                  helper.make_node("Unsqueeze", ["bias2", "axes12"], ["bias"]),
                  helper.make_node("Add", ["scores", "bias"], ["logits"])]
    nodes += [helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
              helper.make_node("MatMul", ["probs", values], ["ctx"]),
              helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ctx_t", "merge"], ["ctx_flat"]),
              helper.make_node("MatMul", ["ctx_flat", "wo"], ["o_mm"]),
              helper.make_node("Add", ["o_mm", "bo"], ["y"])]
    graph = helper.make_graph(nodes, "layer", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _feeds(model: onnx.ModelProto, batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {"x": rng.standard_normal((batch, seq, HIDDEN)).astype(np.float32)}
    names = {i.name for i in model.graph.input}
    if "attention_mask" in names:
        mask = np.ones((batch, seq), np.int64)
        for row in range(1, batch):
            mask[row, seq - row:] = 0  # right padding, one more per row
        feeds["attention_mask"] = mask
    return feeds


def _ops(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in model.graph.node)


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _packed_stats(result: optcc.OptimizeResult) -> dict:
    entries = [p for p in result.report.passes if p.name == "fuse-ort-packed-attention"]
    return entries[-1].stats


@pytest.mark.parametrize("mask", [False, True])
def test_self_attention_becomes_packed_attention_and_matches_the_reference(mask: bool) -> None:
    model = attention_layer(mask=mask)
    result = optcc.optimize(model, level=3, verify=False)
    ops = _ops(result.model)
    assert ops["com.microsoft.Attention"] == 1 and ops["com.microsoft.MultiHeadAttention"] == 0, ops
    assert ops["MatMul"] == 1 and "Softmax" not in ops  # only the output projection stays
    attention = next(n for n in result.model.graph.node if n.op_type == "Attention")
    assert attention.input[0] == "x"
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in result.model.graph.initializer}
    assert inits[attention.input[1]].shape == (HIDDEN, 3 * HIDDEN) and inits[attention.input[2]].shape == (3 * HIDDEN,)
    assert (len(attention.input) == 6 and attention.input[5] != "") == mask  # the mask as attention_bias
    if mask:  # the Expand of the mask reads its sizes from x's shape, no projection is kept for it
        assert _packed_stats(result)["shape_reads"] > 0
    reference, fused = ReferenceEvaluator(model), _session(result.model)
    for batch, seq, seed in ((1, 5, 0), (3, 7, 1)):
        feeds = _feeds(model, batch, seq, seed)
        want = reference.run(None, feeds)[0]
        got = fused.run(None, feeds)[0]
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL * np.abs(want).max())


def test_pass_alone_reports_per_layer_and_is_idempotent() -> None:
    model = ir.from_proto(attention_layer(mask=True))
    FuseOrtAttentionPass()(model)
    first = FuseOrtPackedAttentionPass()(model)
    assert first.modified and first.stats["fused_layers"] == 1
    assert list(first.stats["layers"].values()) == [FUSED]
    second = FuseOrtPackedAttentionPass()(model)
    assert not second.modified and second.stats == {}


@pytest.mark.parametrize(("kwargs", "reason"), [
    ({"keys_from": "memory"}, "different inputs"),
    ({"weight_input": True}, "weight is not a 2-D float32 initializer"),
    ({"cache": True}, "KV cache"),
])
def test_other_attention_keeps_multi_head_attention_and_says_why(kwargs: dict, reason: str) -> None:
    model = ir.from_proto(attention_layer(**kwargs))
    FuseOrtAttentionPass()(model)
    assert sum(n.op_type == "MultiHeadAttention" for n in model.graph) == 1
    result = FuseOrtPackedAttentionPass()(model)
    assert not result.modified and result.stats["fused_layers"] == 0
    (verdict,) = result.stats["layers"].values()
    assert reason in verdict, verdict
    optimized = optcc.optimize(attention_layer(**kwargs), level=3, verify=False).model
    assert _ops(optimized)["com.microsoft.MultiHeadAttention"] == 1
