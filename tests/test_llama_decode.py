"""Llama-style KV-cache decoders (fixtures/llama_decoder.py: rotary cos/sin gathered from
cached tables, computed from the position ids as torch exports write them, or the standard
RotaryEmbedding op) get generated inputs that start a valid decode: the position ids are
found from the graph (not only by name), run ``past + arange(seq)`` and stay within the
rotary table for every step of the verification decode; the mask covers past and current
tokens; every past has one length. ``optcc -O2`` (opset 23: RotaryEmbedding and Attention
fused) then verifies the multi-step decode, and the optimized model's decode is checked
here against onnx's reference evaluator on the original, with a feed-back loop written
here, not optcc's."""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx.reference import ReferenceEvaluator

import optcc
from fixtures.llama_decoder import llama_decoder, past_names
from optcc import cli
from optcc.errors import BadInputError
from optcc.numerics.inputs import DECODE_STEPS, generate_inputs, input_roles

LAYERS, HEADS, KV_HEADS, HIDDEN, VOCAB = 2, 4, 2, 32, 96
HEAD = HIDDEN // HEADS
PASTS = past_names(LAYERS)


def _model(rotary: str, opset: int = 23, positions: int = 64, name: str = "position_ids") -> onnx.ModelProto:
    return llama_decoder(layers=LAYERS, hidden=HIDDEN, heads=HEADS, kv_heads=KV_HEADS, vocab=VOCAB,
                         positions=positions, rotary=rotary, position_name=name, opset=opset)


def _reference(model: onnx.ModelProto):  # noqa: ANN202 - a run callable
    evaluator = ReferenceEvaluator(model)
    return lambda feeds: evaluator.run(None, feeds)


def _onnxruntime(model: onnx.ModelProto):  # noqa: ANN202 - a run callable
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return lambda feeds: session.run(None, feeds)


def _decode(run, first: dict[str, np.ndarray], steps: int, name: str,
            tokens: list[np.ndarray] | None = None) -> tuple[list[dict], list[list[np.ndarray]], list[np.ndarray]]:
    """Feeds and outputs of each step of a greedy decode from ``first`` (the given
    ``tokens`` instead of the greedy ones when given): one token a step, position + 1,
    the mask one 1 longer, present fed back as past."""
    feeds, fed, outs, chosen = dict(first), [], [], []
    for step in range(steps):
        fed.append(feeds)
        outputs = run(feeds)
        outs.append(outputs)
        token = tokens[step] if tokens is not None else np.argmax(outputs[0][:, -1], axis=-1)[:, None].astype(np.int64)
        chosen.append(token)
        mask = feeds["attention_mask"]
        feeds = {"input_ids": token, name: feeds[name][:, -1:] + 1,
                 "attention_mask": np.concatenate([mask, np.ones((mask.shape[0], 1), mask.dtype)], axis=1),
                 **dict(zip(PASTS, outputs[1:]))}
    return fed, outs, chosen


def _check_step(feeds: dict[str, np.ndarray], name: str, table: int | None) -> None:
    batch, current = feeds["input_ids"].shape
    past = feeds[PASTS[0]].shape[2]
    assert all(feeds[p].shape == (batch, KV_HEADS, past, HEAD) for p in PASTS)
    np.testing.assert_array_equal(feeds[name], np.broadcast_to(past + np.arange(current), (batch, current)))
    assert table is None or feeds[name].max() < table
    assert 0 <= feeds["input_ids"].min() and feeds["input_ids"].max() < VOCAB
    assert feeds["attention_mask"].shape == (batch, past + current) and (feeds["attention_mask"] == 1).all()


@pytest.mark.parametrize("rotary", ["table", "computed", "op"])
@pytest.mark.parametrize("name", ["position_ids", "pos"])
def test_position_ids_are_found_from_the_graph(rotary: str, name: str) -> None:
    roles = input_roles(optcc.ir.load(_model(rotary, name=name)))
    assert roles == {"input_ids": "index", "attention_mask": "mask", name: "position", **{p: "past" for p in PASTS}}


@pytest.mark.parametrize(("rotary", "positions"), [("table", 64), ("table", 12), ("computed", 64), ("op", 64),
                                                   ("op", 12)])
def test_generated_inputs_start_a_valid_decode(rotary: str, positions: int) -> None:
    model = _model(rotary, positions=positions, name="pos")
    firsts = generate_inputs(optcc.ir.load(model), samples=2, seed=3)
    assert not np.array_equal(firsts[0]["input_ids"], firsts[1]["input_ids"])
    for first in firsts:
        fed, outs, _ = _decode(_reference(model), first, DECODE_STEPS, "pos")
        table = None if rotary == "computed" else positions  # computed angles have no table
        for step in fed:
            _check_step(step, "pos", table)
        assert all(np.isfinite(o).all() for step in outs for o in step)


def test_a_given_past_beyond_the_rotary_op_table_is_refused() -> None:
    model = optcc.ir.load(_model("op", positions=16))
    with pytest.raises(BadInputError, match="beyond the position table of 16 rows"):
        generate_inputs(model, {p: [1, KV_HEADS, 20, HEAD] for p in PASTS})


@pytest.mark.parametrize(("rotary", "opset", "level", "fused"), [
    ("table", 23, "-O2", {"RotaryEmbedding": 4, "Attention": 2}),
    ("computed", 23, "-O2", {"RotaryEmbedding": 4, "Attention": 2}),
    ("op", 23, "-O2", {"RotaryEmbedding": 4, "Attention": 2}),
    ("computed", 17, "-O3", {"com.microsoft.MultiHeadAttention": 2, "com.microsoft.RotaryEmbedding": 2}),
])
def test_the_decode_is_verified_and_matches_the_reference(tmp_path, rotary, opset, level, fused) -> None:
    model = _model(rotary, opset=opset)
    path, out, report = tmp_path / "llama.onnx", tmp_path / "llama.opt.onnx", tmp_path / "report.json"
    onnx.save(model, path)
    assert cli.main([str(path), level, "-o", str(out), "--report", str(report), "-q"]) == 0
    verification = json.loads(report.read_text())["verification"]
    assert verification["status"] == "passed" and verification["decode_steps"] == DECODE_STEPS
    optimized = onnx.load(out)
    ops = collections.Counter(f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in optimized.graph.node)
    assert all(ops[op] >= count for op, count in fused.items()), ops  # at least these fused
    # the optimized decode, fed the reference's tokens, against the reference evaluator's
    for first in generate_inputs(optcc.ir.load(model), samples=2, seed=5):
        _, want, tokens = _decode(_reference(model), first, DECODE_STEPS, "position_ids")
        _, got, _ = _decode(_onnxruntime(optimized), first, DECODE_STEPS, "position_ids", tokens)
        for step_want, step_got in zip(want, got):
            for w, g in zip(step_want, step_got):
                np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * np.abs(w).max())
