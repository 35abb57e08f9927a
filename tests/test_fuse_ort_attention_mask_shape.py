"""fuse-ort-attention on a KV-cache decoder layer whose padding mask is made from shapes, as
transformers' exports make it: the mask goes to MultiHeadAttention without an Expand when
onnxruntime's symbolic inference proves it (batch, 1, query length, key length), and the
exporter's head merge after the op is bypassed when proved to be the op's own output.
Numerics: the optimized model run by onnxruntime, decode fed back, against onnx's reference
evaluator running the original."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

import optcc

HEADS, HEAD = 2, 4
HIDDEN = HEADS * HEAD
FILL = float(np.finfo(np.float32).min)


def _int64(name: str, values: list[int]) -> onnx.TensorProto:
    return helper.make_tensor(name, TensorProto.INT64, [len(values)], values)


def decoder_layer(mask_len_from_key: bool = True, merge: list[int] | None = None) -> onnx.ModelProto:
    """One attention layer with a KV cache: q/k/v projections of ``x``, ``Concat(past, new)``
    presents, ``softmax(q kt / sqrt(d) + mask) v``, heads merged back by ``merge`` (default
    ``[0, 0, HIDDEN]``). The mask is ``Where(padding, 0, min)`` of ``attention_mask`` (batch,
    total) expanded to (batch, 1, seq, T): with ``mask_len_from_key``, ``T`` is the key's
    length and the padding of key ``j`` is ``attention_mask[:, j]`` (a Gather, as transformers'
    mask functions index it), else ``T`` is the mask input's own length."""
    rng = np.random.default_rng(0)
    weights = [helper.make_tensor(n, TensorProto.FLOAT, [HIDDEN, HIDDEN], rng.standard_normal((HIDDEN, HIDDEN))
                                  .astype(np.float32).ravel()) for n in ("wq", "wk", "wv")]
    consts = [_int64("split_shape", [0, 0, HEADS, HEAD]), _int64("merge_shape", merge or [0, 0, HIDDEN]),
              _int64("axes12", [1, 2]), _int64("one", [1]), _int64("zero", [0]), _int64("two", [2]),
              _int64("three", [3]), _int64("four", [4]),
              helper.make_tensor("zero_i", TensorProto.INT64, [], [0]),
              helper.make_tensor("one_i", TensorProto.INT64, [], [1]),
              helper.make_tensor("scale", TensorProto.FLOAT, [], [1 / np.sqrt(HEAD)]),
              helper.make_tensor("zero_f", TensorProto.FLOAT, [], [0.0]),
              helper.make_tensor("fill", TensorProto.FLOAT, [], [FILL])]
    nodes = []
    for name, w in (("q", "wq"), ("k", "wk"), ("v", "wv")):
        nodes += [helper.make_node("MatMul", ["x", w], [f"{name}_flat"]),
                  helper.make_node("Reshape", [f"{name}_flat", "split_shape"], [f"{name}_split"]),
                  helper.make_node("Transpose", [f"{name}_split"], [f"{name}_heads"], perm=[0, 2, 1, 3])]
    nodes += [helper.make_node("Concat", ["past_key", "k_heads"], ["present_key"], axis=2),
              helper.make_node("Concat", ["past_value", "v_heads"], ["present_value"], axis=2),
              helper.make_node("Shape", ["x"], ["x_shape"]),
              helper.make_node("Slice", ["x_shape", "zero", "one"], ["batch"]),
              helper.make_node("Slice", ["x_shape", "one", "two"], ["seq"])]
    nodes.append(helper.make_node("Cast", ["attention_mask"], ["keep_all"], to=TensorProto.BOOL))
    if mask_len_from_key:  # the padding of key j read as attention_mask[:, j], j < the key's length
        nodes += [helper.make_node("Shape", ["present_key"], ["total"], start=2, end=3),
                  helper.make_node("Squeeze", ["total", "zero"], ["total_scalar"]),
                  helper.make_node("Range", ["zero_i", "total_scalar", "one_i"], ["key_positions"]),
                  helper.make_node("Gather", ["keep_all", "key_positions"], ["keep"], axis=1)]
    else:
        nodes += [helper.make_node("Shape", ["attention_mask"], ["total"], start=1, end=2),
                  helper.make_node("Identity", ["keep_all"], ["keep"])]
    nodes += [helper.make_node("Concat", ["batch", "one", "seq", "total"], ["mask_shape"], axis=0),
              helper.make_node("Unsqueeze", ["keep", "axes12"], ["keep4"]),
              helper.make_node("Expand", ["keep4", "mask_shape"], ["keep_full"]),
              helper.make_node("Where", ["keep_full", "zero_f", "fill"], ["mask"]),
              helper.make_node("Transpose", ["present_key"], ["kt"], perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["q_heads", "kt"], ["qk"]),
              helper.make_node("Mul", ["qk", "scale"], ["scores"]),
              helper.make_node("Add", ["scores", "mask"], ["masked"]),
              helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
              helper.make_node("MatMul", ["probs", "present_value"], ["context"]),
              helper.make_node("Transpose", ["context"], ["context_t"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["context_t", "merge_shape"], ["merged"]),
              helper.make_node("Relu", ["merged"], ["y"])]
    cache = ["batch", HEADS, "past", HEAD]
    graph = helper.make_graph(
        nodes, "decoder_layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", HIDDEN]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
         helper.make_tensor_value_info("past_key", TensorProto.FLOAT, cache),
         helper.make_tensor_value_info("past_value", TensorProto.FLOAT, cache)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("present_key", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("present_value", TensorProto.FLOAT, None)],
        weights + consts)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _fused(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    result = optcc.optimize(model, passes=["fuse-ort-attention", "eliminate-dead-nodes"], verify=False)
    stats = next(p.stats for p in result.report.passes if p.name == "fuse-ort-attention")
    return result.model, stats


def _decode(run, batch: int, steps: int, pad: int, seed: int) -> list[np.ndarray]:  # noqa: ANN001
    """Feed the presents back for ``steps`` steps (a 3-token prompt, then one token each),
    the first ``pad`` positions of row 0 padded (mask 0)."""
    rng = np.random.default_rng(seed)
    past = [np.zeros((batch, HEADS, 0, HEAD), np.float32)] * 2
    outputs = []
    for step in range(steps):
        seq = 3 if step == 0 else 1
        total = past[0].shape[2] + seq
        mask = np.ones((batch, total), np.int64)
        mask[0, :pad] = 0
        feeds = {"x": rng.standard_normal((batch, seq, HIDDEN)).astype(np.float32), "attention_mask": mask,
                 "past_key": past[0], "past_value": past[1]}
        y, key, value = run(feeds)
        outputs.append(y)
        past = [key, value]
    return outputs


def _check_decode(original: onnx.ModelProto, fused: onnx.ModelProto) -> None:
    reference = ReferenceEvaluator(original)
    session = ort.InferenceSession(fused.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch, pad in ((1, 0), (2, 2)):
        want = _decode(lambda f: reference.run(None, f), batch, 4, pad, seed=batch)
        got = _decode(lambda f: session.run(None, f), batch, 4, pad, seed=batch)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _mha(model: onnx.ModelProto) -> onnx.NodeProto:
    (node,) = [n for n in model.graph.node if n.op_type == "MultiHeadAttention"]
    return node


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def test_mask_from_key_length_needs_no_expand_and_merge_is_bypassed() -> None:
    original = decoder_layer()
    fused, stats = _fused(original)
    mha = _mha(fused)
    assert mha.input[5] == "mask"  # the exporter's mask itself, no Expand in front
    assert stats["head_merges_bypassed"] == 1
    relu = next(n for n in fused.graph.node if n.op_type == "Relu")
    assert relu.input[0] == mha.output[0]  # the merged heads are the op's output
    ops = [n.op_type for n in fused.graph.node]
    assert "Expand" in ops and ops.count("Expand") == 1 and "Transpose" in ops  # q/k/v head splits stay
    _check_decode(original, fused)


def test_mask_of_declared_length_keeps_its_expand() -> None:
    """``total`` (the mask input's declared length) is not proved the key's length: the op
    gets the mask expanded to the key's length, as the decomposed Add broadcast it."""
    original = decoder_layer(mask_len_from_key=False)
    fused, _ = _fused(original)
    assert _producers(fused)[_mha(fused).input[5]].op_type == "Expand"
    _check_decode(original, fused)


@pytest.mark.parametrize("merge", [[0, 0, HEADS, HEAD], [0, -1, HEAD]])
def test_other_reshapes_after_the_heads_are_not_bypassed(merge: list[int]) -> None:
    """A reshape that does not merge the heads back into (batch, seq, hidden) stays."""
    original = decoder_layer(merge=merge)
    fused, stats = _fused(original)
    assert "head_merges_bypassed" not in stats
    relu = next(n for n in fused.graph.node if n.op_type == "Relu")
    assert _producers(fused)[relu.input[0]].op_type == "Reshape"
    _check_decode(original, fused)
