"""fuse-ort-rotary at -O3 on decoders whose attention is fused: every layer's rotary becomes
com.microsoft.RotaryEmbedding (onnxruntime's shape inference proves the cos/sin batch and
sequence after the first layer), and a rotary whose heads layout only serves a head transpose
back to tokens (a fused attention's query or key) runs on the ``(batch, seq, hidden)`` tokens
instead (``token_layout``): no Transpose is left around it. Outputs are compared with onnx's
reference evaluator on the original model over a fed-back decode, and the layout move alone
with numpy."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

import optcc
from fixtures.llama_decoder import llama_decoder, past_names
from tests.test_fuse_ort_gqa import _ops, _session

LAYERS, HEADS, KV_HEADS, HIDDEN, VOCAB = 3, 4, 2, 32, 96
HEAD = HIDDEN // HEADS
PASTS = past_names(LAYERS)
TOL = 1e-4


def _feeds(batch: int, past: int, seq: int, seed: int, padding: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {"input_ids": rng.integers(0, VOCAB, (batch, seq)).astype(np.int64),
             "position_ids": np.broadcast_to(past + np.arange(seq), (batch, seq)).astype(np.int64)}
    if padding:
        feeds["attention_mask"] = np.ones((batch, past + seq), np.int64)
    feeds.update({p: (0.5 * rng.standard_normal((batch, KV_HEADS, past, HEAD))).astype(np.float32) for p in PASTS})
    return feeds


def _decode(run, first: dict[str, np.ndarray], steps: int) -> list[list[np.ndarray]]:  # noqa: ANN001
    """Outputs of each step from ``first``: next tokens from a fixed generator, position + 1,
    the mask one longer, present fed back as past."""
    rng = np.random.default_rng(7)
    feeds, outs = dict(first), []
    for _ in range(steps):
        outputs = run(feeds)
        outs.append(outputs)
        batch = feeds["input_ids"].shape[0]
        step = {"input_ids": rng.integers(0, VOCAB, (batch, 1)).astype(np.int64),
                "position_ids": feeds["position_ids"][:, -1:] + 1, **dict(zip(PASTS, outputs[1:]))}
        if "attention_mask" in feeds:
            step["attention_mask"] = np.concatenate([feeds["attention_mask"], np.ones((batch, 1), np.int64)], 1)
        feeds = step
    return outs


def _rotary_stats(result: optcc.OptimizeResult) -> tuple[int, int]:
    """(rotary ops fused, rotary ops moved to the token layout) over the pass's runs."""
    records = [r.stats for r in result.report.passes if r.name == "fuse-ort-rotary"]
    fused = sum(sum((s.get("applied") or {}).values()) for s in records)
    return fused, sum(s.get("token_layout", 0) for s in records)


@pytest.mark.parametrize(("rotary", "padding"), [("table", False), ("computed", False), ("table", True)])
def test_every_layer_rotary_fuses_in_token_layout_and_decodes_like_the_reference(rotary: str, padding: bool) -> None:
    """Causal only: every rotary fuses, GroupQueryAttention reads query and key as tokens, both
    rotaries move and no Transpose is left. With a padding mask: MultiHeadAttention reads the
    query as tokens (a fused query rotary moves) and the key in heads layout through repeat_kv
    (its rotary stays); this fixture declares the mask's length as its own name, which
    onnxruntime's shape inference cannot equate with past + seq, so only the first layer's
    rotaries are proved."""
    model = llama_decoder(layers=LAYERS, hidden=HIDDEN, heads=HEADS, kv_heads=KV_HEADS, vocab=VOCAB,
                          rotary=rotary, padding=padding)
    result = optcc.optimize(model, level=3, verify=False)
    optimized = result.model
    ops = _ops(optimized)
    attention = "com.microsoft.MultiHeadAttention" if padding else "com.microsoft.GroupQueryAttention"
    assert ops[attention] == LAYERS, ops
    rotaries = [n for n in optimized.graph.node if n.op_type == "RotaryEmbedding"]
    heads = sorted(helper.get_attribute_value(a) for n in rotaries for a in n.attribute if a.name == "num_heads")
    if padding:
        assert _rotary_stats(result) == (2, 1) and heads == [HEADS]
    else:
        assert ops["com.microsoft.RotaryEmbedding"] == 2 * LAYERS and "Neg" not in ops, ops
        assert _rotary_stats(result) == (2 * LAYERS, 2 * LAYERS)
        assert heads == sorted([HEADS, KV_HEADS] * LAYERS)
        assert "Transpose" not in ops, ops
        gqa = [n for n in optimized.graph.node if n.op_type == "GroupQueryAttention"]
        assert len({(*n.input[5:7], n.input[16]) for n in gqa}) == 1  # the layers share their lengths
    reference, fused = ReferenceEvaluator(model), _session(optimized)
    for batch, past, seq, seed in ((1, 0, 5, 0), (2, 3, 2, 1)):
        first = _feeds(batch, past, seq, seed, padding)
        want = _decode(lambda f: reference.run(None, f), first, 3)
        got = _decode(lambda f: fused.run(None, f), first, 3)
        for step_want, step_got in zip(want, got):
            for w, g in zip(step_want, step_got):
                assert g.shape == w.shape
                np.testing.assert_allclose(g, w, rtol=TOL, atol=TOL * np.abs(w).max())


# ------------------------------------------------- the layout move alone, on one rotary op

B, S, H, D, POSITIONS = 2, 5, 3, 8, 16


def _rotary_between_transposes(also_read_in_heads_layout: bool = False) -> onnx.ModelProto:
    """tokens (B, S, H*D) -> Reshape (B, S, H, D) -> Transpose -> RotaryEmbedding (heads) ->
    Transpose -> Reshape (B, S, H*D); optionally the heads-layout rotary is an output too."""
    shape = helper.make_tensor("split", TensorProto.INT64, [4], [0, 0, H, D])
    merge = helper.make_tensor("merge", TensorProto.INT64, [3], [0, 0, H * D])
    nodes = [helper.make_node("Reshape", ["x", "split"], ["heads_split"]),
             helper.make_node("Transpose", ["heads_split"], ["heads"], perm=[0, 2, 1, 3]),
             helper.make_node("RotaryEmbedding", ["heads", "ids", "cos", "sin"], ["rotated"], domain="com.microsoft",
                              interleaved=0),
             helper.make_node("Transpose", ["rotated"], ["back"], perm=[0, 2, 1, 3]),
             helper.make_node("Reshape", ["back", "merge"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", H * D])]
    if also_read_in_heads_layout:
        outputs.append(helper.make_tensor_value_info("rotated", TensorProto.FLOAT, ["batch", H, "seq", D]))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", H * D]),
              helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("cos", TensorProto.FLOAT, [POSITIONS, D // 2]),
              helper.make_tensor_value_info("sin", TensorProto.FLOAT, [POSITIONS, D // 2])]
    graph = helper.make_graph(nodes, "rotary", inputs, outputs, [shape, merge])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def _rotary_feeds() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    angles = rng.uniform(0, 6, (POSITIONS, D // 2))
    return {"x": rng.standard_normal((B, S, H * D)).astype(np.float32),
            "ids": rng.integers(0, POSITIONS, (B, S)).astype(np.int64),
            "cos": np.cos(angles).astype(np.float32), "sin": np.sin(angles).astype(np.float32)}


def _numpy_rotary(f: dict[str, np.ndarray]) -> np.ndarray:
    """rotate_half rotary in float64 on (B, S, H, D) rows, as (B, S, H*D)."""
    x = f["x"].astype(np.float64).reshape(B, S, H, D)
    cos = f["cos"].astype(np.float64)[f["ids"]][:, :, None, :]
    sin = f["sin"].astype(np.float64)[f["ids"]][:, :, None, :]
    x1, x2 = x[..., :D // 2], x[..., D // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).reshape(B, S, H * D)


def test_rotary_between_head_transposes_runs_on_tokens_bit_for_bit() -> None:
    model = _rotary_between_transposes()
    result = optcc.optimize(model, passes=["fuse-ort-rotary"], verify=False)
    optimized = result.model
    ops = _ops(optimized)
    assert "Transpose" not in ops and ops["com.microsoft.RotaryEmbedding"] == 1, ops
    rotary = next(n for n in optimized.graph.node if n.op_type == "RotaryEmbedding")
    assert rotary.input[0] == "x"
    assert {a.name: helper.get_attribute_value(a) for a in rotary.attribute} == {"interleaved": 0, "num_heads": H}
    feeds = _rotary_feeds()
    got = _session(optimized).run(None, feeds)[0]
    np.testing.assert_allclose(got, _numpy_rotary(feeds), rtol=1e-5, atol=1e-5)
    assert np.array_equal(got, _session(model).run(None, feeds)[0])  # the same arithmetic per row
    assert not optcc.optimize(optimized, passes=["fuse-ort-rotary"], verify=False).report.passes[0].stats[
        "token_layout"]


def test_rotary_also_read_in_heads_layout_stays() -> None:
    result = optcc.optimize(_rotary_between_transposes(also_read_in_heads_layout=True), passes=["fuse-ort-rotary"],
                            verify=False)
    assert result.report.passes[0].stats["token_layout"] == 0
    assert _ops(result.model)["Transpose"] == 2
