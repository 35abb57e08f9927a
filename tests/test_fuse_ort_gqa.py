"""onnxruntime's GroupQueryAttention at -O3 (fuse-ort-gqa) on Llama-style decoders with grouped
key/value heads (fixtures/llama_decoder.py): with a causal mask made from shapes only, every
layer becomes one GroupQueryAttention whose presents are the graph's, and a decode fed back
through onnxruntime matches onnx's reference evaluator on the original model step by step
(empty first past, batch 2, prompts of several tokens after a past); a mask that reads the
padding ``attention_mask`` keeps MultiHeadAttention and says why."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx.reference import ReferenceEvaluator

import optcc
from fixtures.llama_decoder import llama_decoder, past_names
from optcc.passes.fuse_attention import FuseOrtAttentionPass
from optcc.passes.fuse_ort_gqa import FUSED, FuseOrtGroupQueryAttentionPass

LAYERS, HEADS, KV_HEADS, HIDDEN, VOCAB = 2, 4, 2, 32, 96
HEAD = HIDDEN // HEADS
PASTS = past_names(LAYERS)
TOL = 1e-4


def _model(rotary: str = "computed", padding: bool = False, opset: int = 17, kv_heads: int = KV_HEADS) -> onnx.ModelProto:
    return llama_decoder(layers=LAYERS, hidden=HIDDEN, heads=HEADS, kv_heads=kv_heads, vocab=VOCAB,
                         rotary=rotary, opset=opset, padding=padding)


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _ops(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in model.graph.node)


def _feeds(batch: int, past: int, seq: int, seed: int, kv_heads: int = KV_HEADS) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {"input_ids": rng.integers(0, VOCAB, (batch, seq)).astype(np.int64),
             "position_ids": np.broadcast_to(past + np.arange(seq), (batch, seq)).astype(np.int64)}
    feeds.update({p: (0.5 * rng.standard_normal((batch, kv_heads, past, HEAD))).astype(np.float32) for p in PASTS})
    return feeds


def _decode(run, first: dict[str, np.ndarray], steps: int) -> list[list[np.ndarray]]:  # noqa: ANN001
    """Outputs of each step of a decode from ``first``: the next tokens are drawn from a
    fixed generator (the same for both models), position + 1, present fed back as past."""
    rng = np.random.default_rng(7)
    feeds, outs = dict(first), []
    for _ in range(steps):
        outputs = run(feeds)
        outs.append(outputs)
        batch = feeds["input_ids"].shape[0]
        feeds = {"input_ids": rng.integers(0, VOCAB, (batch, 1)).astype(np.int64),
                 "position_ids": feeds["position_ids"][:, -1:] + 1, **dict(zip(PASTS, outputs[1:]))}
    return outs


@pytest.mark.parametrize(("rotary", "kv_heads"), [("computed", KV_HEADS), ("table", KV_HEADS), ("computed", HEADS)])
def test_causal_decoder_gets_group_query_attention_and_decodes_like_the_reference(rotary: str, kv_heads: int) -> None:
    """``kv_heads == heads``: repeat_kv by 1, one key/value head per query head."""
    model = _model(rotary, kv_heads=kv_heads)
    result = optcc.optimize(model, level=3, verify=False)
    optimized = result.model
    ops = _ops(optimized)
    assert ops["com.microsoft.GroupQueryAttention"] == LAYERS and ops["com.microsoft.MultiHeadAttention"] == 0, ops
    assert "Softmax" not in ops
    assert not [n for n in optimized.graph.node if n.op_type == "Concat" and n.output[0].startswith("present")]
    assert [o.name for o in optimized.graph.output] == [o.name for o in model.graph.output]
    gqa = [n for n in optimized.graph.node if n.op_type == "GroupQueryAttention"]
    assert {tuple(n.input[3:5]) for n in gqa} == {tuple(PASTS[2 * i:2 * i + 2]) for i in range(LAYERS)}
    assert {n.output[1] for n in gqa} == {p.replace("past_key_values", "present") for p in PASTS[::2]}
    kv_attr = {onnx.helper.get_attribute_value(a) for n in gqa for a in n.attribute if a.name == "kv_num_heads"}
    assert kv_attr == {kv_heads}
    graph_inputs = {i.name for i in optimized.graph.input}
    assert graph_inputs == {i.name for i in model.graph.input}  # lengths come from shapes, no new input
    reference, fused = ReferenceEvaluator(model), _session(optimized)
    # empty past, batch 1 and 2; a multi-token step after a past with batch 2 (query_seqlens)
    for batch, past, seq, seed in ((1, 0, 4, 0), (2, 0, 3, 1), (2, 5, 3, 2), (3, 2, 1, 3)):
        first = _feeds(batch, past, seq, seed, kv_heads)
        want = _decode(lambda f: reference.run(None, f), first, 4)
        got = _decode(lambda f: fused.run(None, f), first, 4)
        for step_want, step_got in zip(want, got):
            for w, g in zip(step_want, step_got):
                assert g.shape == w.shape
                np.testing.assert_allclose(g, w, rtol=TOL, atol=TOL * np.abs(w).max())


def test_padding_mask_keeps_multi_head_attention_and_says_why() -> None:
    model = ir.from_proto(_model(padding=True))
    FuseOrtAttentionPass()(model)
    result = FuseOrtGroupQueryAttentionPass()(model)
    assert not result.modified
    assert set(result.stats["layers"].values()) == {
        "the attention bias reads graph input 'attention_mask' (it may hold padding zeros)"}
    assert result.stats["fused_layers"] == 0


def test_pass_alone_reports_and_is_idempotent() -> None:
    model = ir.from_proto(_model())
    FuseOrtAttentionPass()(model)
    result = FuseOrtGroupQueryAttentionPass()(model)
    assert result.modified and set(result.stats["layers"].values()) == {FUSED}
    assert not FuseOrtGroupQueryAttentionPass()(result.model).modified
    proto = ir.to_proto(result.model)
    onnx.checker.check_model(proto)
    reference, fused = ReferenceEvaluator(_model()), _session(proto)
    feeds = _feeds(2, 3, 2, 4)
    for w, g in zip(reference.run(None, feeds), fused.run(None, feeds)):
        np.testing.assert_allclose(g, w, rtol=TOL, atol=TOL * np.abs(w).max())


def test_a_mask_with_another_offset_is_refused(tmp_path, monkeypatch) -> None:
    """A bias whose query positions start one later than the past (j <= i + past + 1) is
    not the op's causal mask: its rows are not the query length (onnxruntime's shape
    inference finds them one short, or leaves the inconsistent broadcast unknown)."""
    proto = _model()
    ranges = [n for n in proto.graph.node if n.op_type == "Range"]
    rows = next(n for n in ranges if not n.input[0].startswith("c"))  # Range(total - seq, total)
    bump = onnx.numpy_helper.from_array(np.int64(1), "one_more")
    proto.graph.initializer.append(bump)
    shifted = onnx.helper.make_node("Add", [rows.input[0], "one_more"], ["rows_start_shifted"])
    proto.graph.node.insert(list(proto.graph.node).index(rows), shifted)
    rows.input[0] = "rows_start_shifted"
    model = ir.from_proto(proto)
    monkeypatch.chdir(tmp_path)
    FuseOrtAttentionPass()(model)
    result = FuseOrtGroupQueryAttentionPass()(model)
    assert not result.modified
    assert set(result.stats["layers"].values()) <= {"the causal bias is not proved to be (query length, key length)",
                                                    "shapes of the query, key or bias not inferred"}
    assert not list(tmp_path.iterdir())  # shape inference wrote no file


def test_a_soft_mask_fill_is_refused() -> None:
    """A fill of -10 leaves masked keys a probability above 0: not the op's causal mask."""
    proto = _model()
    where = next(n for n in proto.graph.node if n.op_type == "Where")
    fill = next(t for t in proto.graph.initializer if t.name == where.input[2])
    fill.CopyFrom(onnx.numpy_helper.from_array(np.float32(-10.0), fill.name))
    model = ir.from_proto(proto)
    FuseOrtAttentionPass()(model)
    result = FuseOrtGroupQueryAttentionPass()(model)
    assert not result.modified
    assert set(result.stats["layers"].values()) == {
        "the attention bias is not 0 where allowed and a constant <= -1e+09 elsewhere"}


def _with_body_value(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """``model`` with an If on a new bool input ``b`` (a new last output ``z``) whose
    then-branch computes a value named ``name``."""
    helper = onnx.helper
    then = helper.make_graph([helper.make_node("Neg", ["position_ids"], [name]),
                              helper.make_node("Abs", [name], ["z1"])],
                             "then", [], [helper.make_tensor_value_info("z1", onnx.TensorProto.INT64, None)])
    other = helper.make_graph([helper.make_node("Identity", ["position_ids"], ["z2"])], "else", [],
                              [helper.make_tensor_value_info("z2", onnx.TensorProto.INT64, None)])
    graph = model.graph
    graph.input.append(helper.make_tensor_value_info("b", onnx.TensorProto.BOOL, []))
    graph.node.append(helper.make_node("If", ["b"], ["z"], then_branch=then, else_branch=other))
    graph.output.append(helper.make_tensor_value_info("z", onnx.TensorProto.INT64, ["batch", "seq"]))
    return model


def test_the_new_constants_take_no_name_a_body_holds() -> None:
    """The constants the pass computes the sequence lengths with are new main-graph
    initializers, named against every graph of the model: named against the main graph
    alone, the body's value of that name would shadow one, onnx's checker would refuse the
    model and the pass would be reverted."""
    found = optcc.optimize(_with_body_value(_model(), "unused"), level=3, verify=False).model
    name = next(i.name for i in found.graph.initializer if i.name.endswith("_scalar"))  # one of the pass's
    model = _with_body_value(_model(), name)
    onnx.checker.check_model(model, full_check=True)
    result = optcc.optimize(model, level=3, verify=False)
    onnx.checker.check_model(result.model, full_check=True)
    statuses = [p.status for p in result.report.passes if p.name == "fuse-ort-gqa"]
    assert "changed" in statuses and "reverted" not in statuses, statuses
    assert _ops(result.model)["com.microsoft.GroupQueryAttention"] == LAYERS
    assert name not in {i.name for i in result.model.graph.initializer}
    reference, fused = ReferenceEvaluator(model), _session(result.model)
    for b in (True, False):
        feeds = {**_feeds(2, 5, 3, 2), "b": np.array(b)}
        for got, want in zip(fused.run(None, feeds), reference.run(None, feeds), strict=True):
            np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL * max(np.abs(want).max(), 1))
