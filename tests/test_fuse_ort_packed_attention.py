"""fuse-ort-packed-attention at -O3 on a BERT-style self-attention layer built with onnx helpers:
the MultiHeadAttention that fuse-ort-attention writes and its Q/K/V projections of one input
become one ``com.microsoft.Attention`` with packed weights, with and without a padding mask
(the shape reads that expand the mask then read the input's shape); the optimized model run
by onnxruntime matches onnx's reference evaluator running the original; a query split into
heads and merged back, whose split is also read for its shape, is packed too (against numpy).
Cross-attention, a weight fed at run time and a KV cache keep MultiHeadAttention, each with
its reason."""

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
                    cache: bool = False, computed_split: bool = False) -> onnx.ModelProto:
    """``y = Add(MatMul(attention(x), wo), bo)`` with q/k/v = ``Add(MatMul(src, W), b)`` split into
    heads, scores ``MatMul(q, kt) * 1/sqrt(d)`` plus, with ``mask``, the additive
    ``(1 - attention_mask) * -10000`` on the key axis; keys and values projected from
    ``keys_from`` (``"x"`` or another input ``"memory"``); with ``weight_input`` the key weight
    is a graph input; with ``cache`` the keys and values are ``Concat(past, new, axis=2)``,
    returned as presents; with ``computed_split`` each head split's target is computed from the
    projection's shape, ``Concat(Shape(p)[0:2], [heads, head])``, as TorchScript's eager export
    writes it."""
    rng = np.random.default_rng(0)
    inits = [_const(f"w{n}", (rng.standard_normal((HIDDEN, HIDDEN)) / 3).astype(np.float32)) for n in "qvo"]
    inits += [_const(f"b{n}", rng.standard_normal(HIDDEN).astype(np.float32)) for n in "qkvo"]
    inits += [_const("split", np.array([0, 0, HEADS, HEAD], np.int64)),
              _const("merge", np.array([0, 0, HIDDEN], np.int64)),
              _const("scale", np.array(1 / np.sqrt(HEAD), np.float32)),
              _const("one_f", np.array(1.0, np.float32)), _const("fill", np.array(-10000.0, np.float32)),
              _const("axes12", np.array([1, 2], np.int64)), _const("zero", np.array([0], np.int64)),
              _const("two", np.array([2], np.int64)), _const("heads_dims", np.array([HEADS, HEAD], np.int64))]
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
        split = "split"
        nodes += [helper.make_node("MatMul", [src, f"w{name}"], [f"{name}_mm"]),
                  helper.make_node("Add", [f"{name}_mm", f"b{name}"], [f"{name}_flat"])]
        if computed_split:
            split = f"{name}_target"
            nodes += [helper.make_node("Shape", [f"{name}_flat"], [f"{name}_shape"]),
                      helper.make_node("Slice", [f"{name}_shape", "zero", "two"], [f"{name}_lead"]),
                      helper.make_node("Concat", [f"{name}_lead", "heads_dims"], [split], axis=0)]
        nodes += [helper.make_node("Reshape", [f"{name}_flat", split], [f"{name}_split"]),
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


@pytest.mark.parametrize(("mask", "computed_split"), [(False, False), (True, False), (True, True)])
def test_self_attention_becomes_packed_attention_and_matches_the_reference(mask: bool, computed_split: bool) -> None:
    model = attention_layer(mask=mask, computed_split=computed_split)
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


def _mha_with_merged_query() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A MultiHeadAttention as -O3 leaves some exports: the query split into heads and merged
    back (``Reshape(Reshape(q, [0, 0, H, D]), [0, 0, -1])``), its split also transposed and read
    for its shape alone, which sizes the mask's Expand."""
    rng = np.random.default_rng(1)
    weights = {f"w{n}": (rng.standard_normal((HIDDEN, HIDDEN)) / 3).astype(np.float32) for n in "qkv"}
    weights.update({f"b{n}": rng.standard_normal(HIDDEN).astype(np.float32) for n in "qkv"})
    inits = [_const(k, v) for k, v in weights.items()]
    inits += [_const("split", np.array([0, 0, HEADS, HEAD], np.int64)), _const("flat", np.array([0, 0, -1], np.int64)),
              _const("lead", np.array([1, 1], np.int64)), _const("seq_axis", np.array([2], np.int64))]
    nodes = []
    for name in "qkv":
        nodes += [helper.make_node("MatMul", ["x", f"w{name}"], [f"{name}_mm"]),
                  helper.make_node("Add", [f"{name}_mm", f"b{name}"], [f"{name}_flat"]),
                  helper.make_node("Reshape", [f"{name}_flat", "split"], [f"{name}_split"])]
    nodes += [helper.make_node("Transpose", [f"{n}_split"], [f"{n}_heads"], perm=[0, 2, 1, 3]) for n in "qkv"]
    nodes += [helper.make_node("Reshape", ["q_split", "flat"], ["q"]),
              helper.make_node("Shape", ["q_heads"], ["q_shape"]),
              helper.make_node("Gather", ["q_shape", "seq_axis"], ["seq"], axis=0),
              helper.make_node("Concat", ["lead", "seq", "seq"], ["mask_target"], axis=0),
              helper.make_node("Expand", ["bias", "mask_target"], ["mask"]),
              helper.make_node("MultiHeadAttention", ["q", "k_heads", "v_heads", "", "", "mask"], ["y"],
                               domain="com.microsoft", num_heads=HEADS)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", HIDDEN]),
              helper.make_tensor_value_info("bias", TensorProto.FLOAT, ["batch", 1, 1, "seq"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", HIDDEN])]
    graph = helper.make_graph(nodes, "mha", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=9), weights


def _numpy_attention(weights: dict[str, np.ndarray], x: np.ndarray, bias: np.ndarray) -> np.ndarray:
    batch, seq, _ = x.shape
    q, k, v = ((x.astype(np.float64) @ weights[f"w{n}"] + weights[f"b{n}"]).reshape(batch, seq, HEADS, HEAD)
               .transpose(0, 2, 1, 3) for n in "qkv")
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(HEAD) + bias
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return (probs @ v).transpose(0, 2, 1, 3).reshape(batch, seq, HIDDEN)


def test_a_merged_query_and_shape_only_readers_are_packed() -> None:
    model, weights = _mha_with_merged_query()
    result = optcc.optimize(model, passes=["fuse-ort-packed-attention", "eliminate-dead-nodes"], verify=False)
    ops = _ops(result.model)
    assert ops["com.microsoft.Attention"] == 1 and "com.microsoft.MultiHeadAttention" not in ops, ops
    assert "MatMul" not in ops and "Reshape" not in ops and "Transpose" not in ops, ops
    assert _packed_stats(result)["shape_reads"] == 1
    rng = np.random.default_rng(2)
    for batch, seq in ((1, 3), (2, 6)):
        x = rng.standard_normal((batch, seq, HIDDEN)).astype(np.float32)
        bias = np.where(rng.random((batch, 1, 1, seq)) < 0.3, -10000.0, 0.0).astype(np.float32)
        bias[..., 0] = 0.0  # every row keeps a key
        got = _session(result.model).run(None, {"x": x, "bias": bias})[0]
        want = _numpy_attention(weights, x, bias)
        np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL * np.abs(want).max())


def _stacked(layers: int) -> onnx.ModelProto:
    """``layers`` MultiHeadAttentions, each reading the previous one's output directly (no
    residual between), each with its own Q/K/V projections ``Add(MatMul(src, W), b)``."""
    rng = np.random.default_rng(3)
    inits, nodes, src = [], [], "x"
    for layer in range(layers):
        for n in "qkv":
            inits += [_const(f"w{n}{layer}", (rng.standard_normal((HIDDEN, HIDDEN)) / 3).astype(np.float32)),
                      _const(f"b{n}{layer}", rng.standard_normal(HIDDEN).astype(np.float32))]
            nodes += [helper.make_node("MatMul", [src, f"w{n}{layer}"], [f"{n}{layer}_mm"]),
                      helper.make_node("Add", [f"{n}{layer}_mm", f"b{n}{layer}"], [f"{n}{layer}"])]
        nodes.append(helper.make_node("MultiHeadAttention", [f"q{layer}", f"k{layer}", f"v{layer}"], [f"y{layer}"],
                                      domain="com.microsoft", num_heads=HEADS))
        src = f"y{layer}"
    graph = helper.make_graph(nodes, "stacked", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                               ["batch", "seq", HIDDEN])],
                              [helper.make_tensor_value_info(src, TensorProto.FLOAT, ["batch", "seq", HIDDEN])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=9)


def test_a_layer_reading_the_previous_layers_output_is_packed_too() -> None:
    model = _stacked(2)
    result = optcc.optimize(model, passes=["fuse-ort-packed-attention", "eliminate-dead-nodes"], verify=False)
    record = next(r for r in result.report.passes if r.name == "fuse-ort-packed-attention")
    assert record.status == "changed" and record.stats["fused_layers"] == 2
    assert collections.Counter(n.op_type for n in result.model.graph.node)["Attention"] == 2
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    original = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    packed = ort.InferenceSession(result.model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    for batch, seq in ((1, 5), (2, 3)):
        x = np.random.default_rng(batch).standard_normal((batch, seq, HIDDEN)).astype(np.float32)
        (want,), (got,) = original.run(None, {"x": x}), packed.run(None, {"x": x})
        np.testing.assert_allclose(got, want, rtol=0, atol=TOL * np.abs(want).max())


def test_weight_only_keeps_the_projections_separate_so_they_are_quantized() -> None:
    """-O3 with weight-only quantization leaves MultiHeadAttention and its three projections:
    packed into com.microsoft.Attention, their weights would stay float32."""
    model = attention_layer(mask=True)
    result = optcc.optimize(model, level=3, weight_only={"bits": 8, "block_size": 16}, verify=False)
    ops = _ops(result.model)
    assert ops["com.microsoft.Attention"] == 0 and ops["com.microsoft.MultiHeadAttention"] == 1, ops
    assert ops["com.microsoft.MatMulNBits"] == 4 and "MatMul" not in ops  # Q, K, V and the output projection
    floats = [i.name for i in result.model.graph.initializer
              if i.data_type == onnx.TensorProto.FLOAT and np.prod(i.dims) >= HIDDEN * HIDDEN]
    assert floats == []  # no weight matrix left in float32
    reference, quantized = ReferenceEvaluator(model), _session(result.model)
    feeds = _feeds(model, 2, 6, 3)
    want = reference.run(None, feeds)[0]
    got = quantized.run(None, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=0.05, atol=0.05 * np.abs(want).max())


def _with_body_value(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """``model`` with an If on a new bool input ``b`` (a new output ``z``) whose then-branch
    computes a value named ``name``."""
    then = helper.make_graph([helper.make_node("Neg", ["x"], [name]), helper.make_node("Abs", [name], ["z1"])],
                             "then", [], [helper.make_tensor_value_info("z1", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Sigmoid", ["x"], ["z2"])], "else", [],
                              [helper.make_tensor_value_info("z2", TensorProto.FLOAT, None)])
    graph = model.graph
    graph.input.append(helper.make_tensor_value_info("b", TensorProto.BOOL, []))
    graph.node.append(helper.make_node("If", ["b"], ["z"], then_branch=then, else_branch=other))
    graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", "seq", HIDDEN]))
    return model


def test_the_packed_weights_take_no_name_a_body_holds() -> None:
    """The packed weights are new main-graph initializers, named against every graph of the
    model: named against the main graph alone, the body's value of that name would shadow
    one, onnx's checker would refuse the model and the pass would be reverted."""
    found = optcc.optimize(_with_body_value(attention_layer(mask=True), "unused"), level=3, verify=False).model
    weight = next(n for n in found.graph.node if n.op_type == "Attention").input[1]  # its name, no body holding it
    model = _with_body_value(attention_layer(mask=True), weight)
    onnx.checker.check_model(model, full_check=True)
    result = optcc.optimize(model, level=3, verify=False)
    onnx.checker.check_model(result.model, full_check=True)
    statuses = [p.status for p in result.report.passes if p.name == "fuse-ort-packed-attention"]
    assert "changed" in statuses and "reverted" not in statuses, statuses
    attention = next(n for n in result.model.graph.node if n.op_type == "Attention")
    assert attention.input[1] != weight
    reference, fused = ReferenceEvaluator(model), _session(result.model)
    for b in (True, False):
        feeds = {**_feeds(model, 3, 7, 1), "b": np.array(b)}
        for got, want in zip(fused.run(None, feeds), reference.run(None, feeds), strict=True):
            np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL * np.abs(want).max())
