"""A lossy result of a KV-cache decoder is judged by its free-running greedy decode over
``FREE_RUNNING_STEPS`` steps: a candidate whose own decode parts from the original's late
(checked with a numpy float64 decode of both) is refused, one whose decode keeps every
token is accepted."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

import optcc
from optcc.numerics.decode import DECODE_STEPS, FREE_RUNNING_AGREEMENT, FREE_RUNNING_STEPS

VOCAB, WIDTH, PROMPT = 24, 16, 4


def _weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    return {"E": rng.normal(size=(VOCAB, WIDTH)), "Wq": rng.normal(size=(WIDTH, WIDTH)) * 0.5,
            "Wk": rng.normal(size=(WIDTH, WIDTH)) * 0.5, "Wv": rng.normal(size=(WIDTH, WIDTH)),
            "U": rng.normal(size=(WIDTH, VOCAB)) * 2}


def _decoder(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """One attention layer over a KV cache: x = E[ids]; K, V = past ++ x Wk, x Wv;
    h = x + softmax(x Wq K^T / 4) V; logits = tanh(h) U."""
    nodes = [
        oh.make_node("Gather", ["E", "input_ids"], ["x"]),
        oh.make_node("MatMul", ["x", "Wq"], ["q"]),
        oh.make_node("MatMul", ["x", "Wk"], ["k"]),
        oh.make_node("MatMul", ["x", "Wv"], ["v"]),
        oh.make_node("Concat", ["past_key", "k"], ["present_key"], axis=1),
        oh.make_node("Concat", ["past_value", "v"], ["present_value"], axis=1),
        oh.make_node("Transpose", ["present_key"], ["kt"], perm=[0, 2, 1]),
        oh.make_node("MatMul", ["q", "kt"], ["s"]),
        oh.make_node("Mul", ["s", "scale"], ["scaled"]),
        oh.make_node("Softmax", ["scaled"], ["p"], axis=-1),
        oh.make_node("MatMul", ["p", "present_value"], ["a"]),
        oh.make_node("Add", ["x", "a"], ["h"]),
        oh.make_node("Tanh", ["h"], ["t"]),
        oh.make_node("MatMul", ["t", "U"], ["logits"]),
    ]
    past = [oh.make_tensor_value_info(n, TP.FLOAT, ["B", "T", WIDTH]) for n in ("past_key", "past_value")]
    present = [oh.make_tensor_value_info(n, TP.FLOAT, ["B", "T2", WIDTH]) for n in ("present_key", "present_value")]
    graph = oh.make_graph(
        nodes, "decoder", [oh.make_tensor_value_info("input_ids", TP.INT64, ["B", "S"]), *past],
        [oh.make_tensor_value_info("logits", TP.FLOAT, ["B", "S", VOCAB]), *present],
        [nh.from_array(w.astype(np.float32), name) for name, w in weights.items()]
        + [nh.from_array(np.array(0.25, np.float32), "scale")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _numpy_decode(weights: dict[str, np.ndarray], prompt: np.ndarray, steps: int) -> np.ndarray:
    """The greedy tokens of ``_decoder(weights)`` in float64 numpy (from its float32 weights):
    [rows, steps], each step's argmax at the last position fed back."""
    w = {name: v.astype(np.float32).astype(np.float64) for name, v in weights.items()}
    ids = prompt
    keys = values = np.zeros((prompt.shape[0], 0, WIDTH))
    tokens = []
    for _ in range(steps):
        x = w["E"][ids]
        keys = np.concatenate([keys, x @ w["Wk"]], axis=1)
        values = np.concatenate([values, x @ w["Wv"]], axis=1)
        s = (x @ w["Wq"]) @ keys.transpose(0, 2, 1) * 0.25
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        logits = np.tanh(x + p @ values) @ w["U"]
        token = logits[:, -1].argmax(-1)
        tokens.append(token)
        ids = token[:, None]
    return np.stack(tokens, axis=1)


def _prompt() -> dict[str, np.ndarray]:
    ids = np.random.default_rng(2).integers(0, VOCAB, (2, PROMPT))
    empty = np.zeros((2, 0, WIDTH), np.float32)
    return {"input_ids": ids.astype(np.int64), "past_key": empty, "past_value": empty}


def _moved(weights: dict[str, np.ndarray], scale: float, seed: int) -> dict[str, np.ndarray]:
    """The weights with ``U`` moved by ``scale`` times a random normal matrix (a lossy rewrite)."""
    rng = np.random.default_rng(seed)
    return {**weights, "U": weights["U"] + scale * rng.normal(size=weights["U"].shape)}


def _late_flip(weights: dict[str, np.ndarray], want: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A move of ``U`` whose float64 decode keeps the first half of every row and parts from
    ``want`` after it, in more tokens than ``FREE_RUNNING_AGREEMENT`` allows."""
    for seed in range(200):
        for scale in (0.01, 0.02, 0.05, 0.1):
            moved = _moved(weights, scale, seed)
            got = _numpy_decode(moved, _prompt()["input_ids"], FREE_RUNNING_STEPS)
            differs = got != want
            first = [int(np.argmax(row)) if row.any() else FREE_RUNNING_STEPS for row in differs]
            if differs.any() and min(first) >= FREE_RUNNING_STEPS // 2 \
                    and differs.mean() > 1 - FREE_RUNNING_AGREEMENT:
                return moved, got
    raise AssertionError("no late flip found")


@pytest.fixture(scope="module")
def reference() -> tuple[dict[str, np.ndarray], np.ndarray]:
    weights = _weights()
    return weights, _numpy_decode(weights, _prompt()["input_ids"], FREE_RUNNING_STEPS)


@pytest.mark.parametrize("numerics", ["int8", "fp16"])
def test_a_decode_that_parts_late_is_refused(reference, numerics: str) -> None:
    weights, want = reference
    moved, got = _late_flip(weights, want)
    verification = optcc.verify(_decoder(weights), _decoder(moved), numerics=numerics, inputs=[_prompt()])
    assert verification.status == "failed", verification.describe()
    run = verification.free_running["CPUExecutionProvider"]
    assert run["steps"] == FREE_RUNNING_STEPS and run["tokens"] == want.size
    assert run["agreement"] == pytest.approx(float((got == want).mean()))
    assert "free-running greedy tokens" in verification.reason
    # the flip comes after the short decode fed the original's tokens ends: only the free-running decode sees it
    assert all(row[:DECODE_STEPS].all() for row in got == want)


@pytest.mark.parametrize("numerics", ["int8", "fp16"])
def test_a_decode_that_keeps_every_token_is_accepted(reference, numerics: str) -> None:
    weights, want = reference
    moved = _moved(weights, 1e-4, 0)
    assert np.array_equal(_numpy_decode(moved, _prompt()["input_ids"], FREE_RUNNING_STEPS), want)
    original, candidate = _decoder(weights), _decoder(moved)
    verification = optcc.verify(original, candidate, numerics=numerics, inputs=[_prompt()])
    assert verification.status == "passed", verification.describe()
    assert verification.free_running["CPUExecutionProvider"]["agreement"] == 1.0


def test_generated_prompts_leave_room_for_the_free_running_decode(reference) -> None:
    weights, _ = reference
    verification = optcc.verify(_decoder(weights), _decoder(_moved(weights, 1e-4, 0)), numerics="int8")
    run = verification.free_running["CPUExecutionProvider"]
    assert verification.status == "passed" and run["steps"] == FREE_RUNNING_STEPS


def test_the_decode_stops_once_the_candidate_cannot_pass(reference) -> None:
    """Prompts one row each, the one whose float64 decode parts first: more of its tokens
    differ than 1% of all the prompts' tokens, so the other prompt is not decoded."""
    weights, want = reference
    moved, got = _late_flip(weights, want)
    parting = [row for row in range(want.shape[0]) if (got[row] != want[row]).any()]
    order = parting + [row for row in range(want.shape[0]) if row not in parting]
    prompt = _prompt()
    samples = [{**{k: v[row:row + 1] for k, v in prompt.items()}} for row in order]
    verification = optcc.verify(_decoder(weights), _decoder(moved), numerics="int8", inputs=samples)
    run = verification.free_running["CPUExecutionProvider"]
    assert verification.status == "failed"
    assert run["tokens"] == FREE_RUNNING_STEPS and run["stopped"].startswith(f"after 1 of {len(samples)} prompts")
    assert run["agreement"] == pytest.approx(float((got[order[0]] == want[order[0]]).mean()))
