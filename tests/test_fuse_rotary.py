"""fuse-rotary (-O2, opset >= 23: RotaryEmbedding) and fuse-ort-rotary (-O3, below opset 23:
com.microsoft RotaryEmbedding): HF Llama's rotate_half rotary on the query and the key, the
fused models on onnxruntime (and onnx's reference evaluator) against a float64 NumPy
reference, and what the fusion refuses."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx.reference import ReferenceEvaluator

import optcc
from fixtures.rotary import llama_rotary, rotary_feeds, rotary_reference
from optcc.infra.levels import level_of

TOL = 2e-5  # float32 products and sums of O(1) values against float64


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})


def _ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in model.graph.node)


def _fuse(model: onnx.ModelProto, opset: int) -> tuple[onnx.ModelProto, dict]:
    name = "fuse-rotary" if opset >= 23 else "fuse-ort-rotary"
    result = optcc.optimize(model, passes=[name, "eliminate-dead-nodes"], verify=False)
    return result.model, result.report.passes[0].stats


def _fused_op(opset: int) -> str:
    return "RotaryEmbedding" if opset >= 23 else "com.microsoft::RotaryEmbedding"


def _check_outputs(fused: onnx.ModelProto, w: dict, feeds: dict, **ref_options: object) -> None:
    expected = rotary_reference(w, feeds, **ref_options)
    got = _run(fused, feeds)
    for e, g in zip(expected, got):
        assert g.shape == e.shape
        np.testing.assert_allclose(g, e, rtol=0, atol=TOL)


@pytest.mark.parametrize("opset", [23, 18])
@pytest.mark.parametrize("source", ["computed", "table"])
@pytest.mark.parametrize("annotated", ["none", "all", "stale"])
def test_query_and_key_fuse(opset: int, source: str, annotated: str) -> None:
    """``annotated``: "all": every value's shape declared (as the dynamo exporter writes them);
    "none": the dims come from onnx shape inference (as for TorchScript exports); "stale": the
    heads are declared with symbolic dims unrelated to the inputs' (as an earlier inference
    run leaves them), which inference from the graph's inputs alone sees through."""
    model, w = llama_rotary(opset=opset, source=source)
    if annotated == "all":
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    elif annotated == "stale":
        model.graph.value_info.extend(
            onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [f"unk__{i}" for i in range(4)])
            for name in ("q_t", "k_t"))
    fused, stats = _fuse(model, opset)
    ops = _ops(fused)
    assert ops[_fused_op(opset)] == 2, ops
    assert stats["applied"] == {"rotary": 2}
    assert not {"Neg", "Slice", "Concat"} & set(ops), ops
    feeds = rotary_feeds(w)
    _check_outputs(fused, w, feeds)
    # the fused op against the decomposed graph on the same runtime: products and sums, no more
    for a, b in zip(_run(fused, feeds), _run(model, feeds)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_standard_op_on_the_reference_evaluator() -> None:
    """onnx's own RotaryEmbedding (opset 23) agrees: the fusion follows the spec, not only
    onnxruntime's kernel."""
    model, w = llama_rotary(opset=23, rotary_dim=4)
    fused, _ = _fuse(model, 23)
    feeds = rotary_feeds(w)
    got = ReferenceEvaluator(fused).run(None, feeds)
    for e, g in zip(rotary_reference(w, feeds, rotary_dim=4), got):
        np.testing.assert_allclose(g, e, rtol=0, atol=TOL)


@pytest.mark.parametrize("opset", [23, 18])
def test_partial_rotary(opset: int) -> None:
    model, w = llama_rotary(opset=opset, rotary_dim=4)
    fused, stats = _fuse(model, opset)
    assert stats["applied"] == {"rotary-partial": 2}
    nodes = [n for n in fused.graph.node if n.op_type == "RotaryEmbedding"]
    assert [a.i for n in nodes for a in n.attribute if a.name == "rotary_embedding_dim"] == [4, 4]
    assert "Concat" not in _ops(fused)
    _check_outputs(fused, w, rotary_feeds(w), rotary_dim=4)


@pytest.mark.parametrize("opset", [23, 18])
def test_position_ids_of_batch_one_are_expanded(opset: int) -> None:
    """Position ids (1, seq), as HF builds them from cache_position: the decomposed Mul
    broadcasts cos over the batch; the fused op gets them expanded to the input's batch."""
    model, w = llama_rotary(opset=opset, position_batch=1)
    fused, stats = _fuse(model, opset)
    assert _ops(fused)[_fused_op(opset)] == 2 and "Expand" in _ops(fused)
    _check_outputs(fused, w, rotary_feeds(w, batch=3, position_batch=1))


def test_attention_scaling_and_casts_are_replayed_on_the_half() -> None:
    model, w = llama_rotary(opset=23, scaling=0.5)
    fused, _ = _fuse(model, 23)
    assert _ops(fused)["RotaryEmbedding"] == 2
    _check_outputs(fused, w, rotary_feeds(w), scaling=0.5)


@pytest.mark.parametrize("options, reason", [
    ({"split": 3}, "slices are not the two halves of the rotary dim"),
    ({"negate": "x1"}, "slices are not the two halves of the rotary dim"),
    ({"source": "table-input"}, "cos/sin table is not a constant"),
    ({"source": "table-uneven"}, "cos/sin table halves differ"),
    ({"position_batch": "other"}, "cannot prove cos/sin batch and seq equal the input's"),
    ({"neg_output": True}, "intermediate 'q_neg' is a graph output"),
    ({"rotated_output": True}, "intermediate 'q_rotated' is a graph output"),
    ({"rotated_reader": True}, "intermediate 'q_rotated' has readers outside the match"),
])
@pytest.mark.parametrize("opset", [23, 18])
def test_refused(options: dict, reason: str, opset: int) -> None:
    model, w = llama_rotary(opset=opset, **options)
    fused, stats = _fuse(model, opset)
    rejected = stats.get("rejected", {}).get("rotary", {})
    assert reason in rejected, stats
    if {"neg_output", "rotated_output", "rotated_reader"} & set(options):
        assert stats["applied"] == {"rotary": 1}  # the key still fuses
    else:
        assert stats["applied"] == {} and _fused_op(opset) not in _ops(fused)
    feeds = rotary_feeds(w)
    if "table" in options.get("source", ""):
        feeds.update(cos_table=w["cos_table"], sin_table=w["sin_table"])
    for a, b in zip(_run(fused, feeds), _run(model, feeds)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_flipped_sign_does_not_match() -> None:
    """Concat(v2, -v1) is minus rotate_half: not the pattern at all."""
    model, _ = llama_rotary(opset=23, negate="flip")
    _, stats = _fuse(model, 23)
    assert stats["applied"] == {} and not stats.get("rejected")


def test_standard_op_needs_opset_23_and_contrib_is_only_below() -> None:
    old, _ = llama_rotary(opset=18)
    assert _fuse_named(old, "fuse-rotary")["applied"] == {}
    new, _ = llama_rotary(opset=23)
    stats = _fuse_named(new, "fuse-ort-rotary")
    assert stats["applied"] == {}
    assert "opset >= 23: fuse-rotary writes the standard RotaryEmbedding" in stats["rejected"]["rotary"]


def _fuse_named(model: onnx.ModelProto, name: str) -> dict:
    return optcc.optimize(model, passes=[name], verify=False).report.passes[0].stats


@pytest.mark.parametrize("opset", [23, 18])
def test_second_run_changes_nothing(opset: int) -> None:
    model, _ = llama_rotary(opset=opset)
    fused, _ = _fuse(model, opset)
    result = optcc.optimize(fused, passes=["fuse-rotary" if opset >= 23 else "fuse-ort-rotary"], verify=False)
    assert result.report.passes[0].status == "unchanged" and result.report.passes[0].stats["applied"] == {}


def test_levels() -> None:
    assert level_of("fuse-rotary") == 2 and level_of("fuse-ort-rotary") == 3


@pytest.mark.parametrize("opset, level, op", [(23, 2, "RotaryEmbedding"), (23, 3, "RotaryEmbedding"),
                                              (18, 2, None), (18, 3, "com.microsoft::RotaryEmbedding")])
def test_pipelines(opset: int, level: int, op: str | None) -> None:
    model, w = llama_rotary(opset=opset)
    optimized = optcc.optimize(model, level=level, verify=False).model
    ops = _ops(optimized)
    if op is None:
        assert not any("RotaryEmbedding" in k for k in ops)
    else:
        assert ops[op] == 2, ops
    _check_outputs(optimized, w, rotary_feeds(w))
