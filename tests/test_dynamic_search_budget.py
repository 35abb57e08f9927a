"""The dynamic INT8 search of a KV-cache decoder within a budget that runs out during its
bisection: a decoder with three layers each reading an activation with one channel 1000x
the rest (their weight rows 1000x smaller, so the float products are unchanged) needs those
three float; with a budget of four candidates the search judges 0, 1, 2 and 4 layers float
and cannot build 3, so it ships the 4 that passed, confirmed by the verification's own
check, says the search was bounded, and the shipped model agrees with a numpy float64
decode of the original on prompts neither the search nor the verification saw."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

import optcc
import optcc.quant.float_layers
from fixtures.attention_decoder import attention_nodes, float_matmul_weights, forced_agreement, numpy_attention
from optcc.numerics.decode import NEXT_TOKEN_AGREEMENT, NEXT_TOKEN_STEPS

VOCAB, WIDTH, PROMPT, ROWS = 8, 16, 4, 16
OUTLIER = 1000.0  # the scale of the activation channel that ruins each damaged layer's dynamic rounding
DAMAGED = ("z1", "z2", "z3")  # the outputs of the layers that read it
BUDGET = 4  # candidates: 0, 1, 2 and 4 layers float; the bisection's 3 would be a fifth


def _weights() -> dict[str, np.ndarray]:
    """The float32 initializers: row 0 of each damaged layer's weight divided by ``OUTLIER``
    (its input's channel 0 is multiplied by it, ``D``)."""
    rng = np.random.default_rng(1)
    weights = {"E": rng.normal(size=(VOCAB, WIDTH)), "Wq": rng.normal(size=(WIDTH, WIDTH)) * 0.5,
               "Wk": rng.normal(size=(WIDTH, WIDTH)) * 0.5, "Wv": rng.normal(size=(WIDTH, WIDTH)),
               "U": rng.normal(size=(WIDTH, VOCAB)) * 4}
    for name in DAMAGED:
        w = rng.normal(size=(WIDTH, WIDTH)) * 0.5
        w[0] /= OUTLIER
        weights["W" + name] = w
    scale = np.ones(WIDTH)
    scale[0] = OUTLIER
    return {**{k: v.astype(np.float32) for k, v in weights.items()}, "D": scale.astype(np.float32)}


def _decoder() -> onnx.ModelProto:
    """One attention layer over a KV cache (``attention_nodes``: ``h``), then for each damaged
    layer ``t = tanh((t * D) W)`` from ``t = h``, and ``logits = t U``."""
    nodes = attention_nodes()
    previous = "h"
    for name in DAMAGED:
        nodes += [oh.make_node("Mul", [previous, "D"], [name + "_in"]),
                  oh.make_node("MatMul", [name + "_in", "W" + name], [name]),
                  oh.make_node("Tanh", [name], [name + "_t"])]
        previous = name + "_t"
    nodes.append(oh.make_node("MatMul", [previous, "U"], ["logits"]))
    past = [oh.make_tensor_value_info(n, TP.FLOAT, ["B", "T", WIDTH]) for n in ("past_key", "past_value")]
    present = [oh.make_tensor_value_info(n, TP.FLOAT, ["B", "T2", WIDTH]) for n in ("present_key", "present_value")]
    graph = oh.make_graph(
        nodes, "decoder", [oh.make_tensor_value_info("input_ids", TP.INT64, ["B", "S"]), *past],
        [oh.make_tensor_value_info("logits", TP.FLOAT, ["B", "S", VOCAB]), *present],
        [nh.from_array(w, name) for name, w in _weights().items()] + [nh.from_array(np.array(0.25, np.float32), "scale")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _numpy_decode(prompt: np.ndarray) -> np.ndarray:
    """The original's greedy tokens ([rows, NEXT_TOKEN_STEPS]) in float64 numpy."""
    w = {name: v.astype(np.float64) for name, v in _weights().items()}
    ids = prompt
    keys = values = np.zeros((prompt.shape[0], 0, WIDTH))
    tokens = []
    for _ in range(NEXT_TOKEN_STEPS):
        t, keys, values = numpy_attention(w, ids, keys, values)
        for name in DAMAGED:
            t = np.tanh((t * w["D"]) @ w["W" + name])
        tokens.append((t @ w["U"])[:, -1].argmax(-1))
        ids = tokens[-1][:, None]
    return np.stack(tokens, axis=1)


def _agreement(model: onnx.ModelProto) -> float:
    """``forced_agreement`` of ``model`` with the float64 original's greedy decode, on prompts
    of a seed neither the verification nor the search uses."""
    prompt = np.random.default_rng(2024).integers(0, VOCAB, (ROWS, PROMPT))
    return forced_agreement(model, prompt, _numpy_decode(prompt))


def test_a_budget_spent_in_the_bisection_ships_the_fewest_that_passed(monkeypatch) -> None:
    monkeypatch.setattr(optcc.quant.float_layers, "FLOAT_LAYER_CANDIDATES", BUDGET)
    result = optcc.optimize(_decoder(), int8_dynamic=True)
    assert result.precision == {"int8-dynamic": None}
    search = next(r for r in result.report.passes if r.name == "quantize-dynamic").stats["search"]
    judged = [c["float_layers"] for c in search["checks"] if c["check"] == "judge"]
    assert judged == [0, 1, 2, 4] and search["candidates"] == BUDGET and search["bounded"]
    assert search["checks"][-1] == {"float_layers": 4, "check": "confirm", "passed": True}
    assert len(search["float_layers"]) == 4 and set(DAMAGED) <= set(search["float_layers"])
    assert {"W" + name for name in DAMAGED} <= float_matmul_weights(result.model)
    line = next(t for t in result.report.summary().splitlines() if t.startswith("quantize-dynamic: "))
    assert "the search was bounded" in line
    assert _agreement(result.model) >= NEXT_TOKEN_AGREEMENT


def test_the_same_decoder_with_the_whole_budget_leaves_the_three_damaged_layers_float() -> None:
    result = optcc.optimize(_decoder(), int8_dynamic=True)
    search = next(r for r in result.report.passes if r.name == "quantize-dynamic").stats["search"]
    assert sorted(search["float_layers"]) == sorted(DAMAGED) and "bounded" not in search
    assert _agreement(result.model) >= NEXT_TOKEN_AGREEMENT
