"""The int4/int8 mixed-width search of a KV-cache decoder within a budget that runs out
during its bisection: a decoder with three layers whose weight row 0 is 24x the rest (their
input's channel 0 24x smaller, so the float products are unchanged) loses its next tokens
at int4 (that row takes the block's range) and keeps them at int8; the search ranks those
three first and needs them raised. With a budget of four candidates it judges 0, 1, 2 and 4
raised weights and cannot build 3, so it ships the 4 that passed, confirmed by the
verification's own check, and says the search was bounded; the shipped model agrees with a
numpy float64 decode of the original on prompts neither the search nor the verification
saw, where the all-int4 model does not."""

from __future__ import annotations

import numpy as np
import onnx

import optcc
import optcc.quant.float_layers
from fixtures.attention_decoder import chain_decoder, chain_tokens, forced_agreement
from optcc.numerics.decode import NEXT_TOKEN_AGREEMENT, NEXT_TOKEN_STEPS
from optcc.passes.quantize_weights import QuantizeWeightsPass

VOCAB, WIDTH, PROMPT, ROWS = 8, 16, 4, 16
OUTLIER = 24.0  # the scale of the weight row that ruins each damaged layer's int4 blocks
DAMAGED = ("z1", "z2", "z3")  # the outputs of the layers that read it
BUDGET = 4  # candidates: 0, 1, 2 and 4 weights raised; the bisection's 3 would be a fifth


def _weights() -> dict[str, np.ndarray]:
    """The float32 initializers: row 0 of each damaged layer's weight multiplied by
    ``OUTLIER`` (its input's channel 0 divided by it, ``D``); the attention's weights small,
    so that its int4 rounding moves no token."""
    rng = np.random.default_rng(1)
    weights = {"E": rng.normal(size=(VOCAB, WIDTH)), "Wq": rng.normal(size=(WIDTH, WIDTH)) * 0.1,
               "Wk": rng.normal(size=(WIDTH, WIDTH)) * 0.1, "Wv": rng.normal(size=(WIDTH, WIDTH)) * 0.1,
               "U": rng.normal(size=(WIDTH, VOCAB)) * 4}
    for name in DAMAGED:
        w = rng.normal(size=(WIDTH, WIDTH)) * 0.5
        w[0] *= OUTLIER
        weights["W" + name] = w
    scale = np.ones(WIDTH)
    scale[0] = 1 / OUTLIER
    return {**{k: v.astype(np.float32) for k, v in weights.items()}, "D": scale.astype(np.float32)}


def _agreement(model: onnx.ModelProto) -> float:
    """``forced_agreement`` of ``model`` with the float64 original's greedy decode, on prompts
    of a seed neither the verification nor the search uses."""
    prompt = np.random.default_rng(2024).integers(0, VOCAB, (ROWS, PROMPT))
    return forced_agreement(model, prompt, chain_tokens(_weights(), DAMAGED, prompt, NEXT_TOKEN_STEPS))


def _mixed(result: optcc.OptimizeResult) -> dict:
    return next(r for r in result.report.passes if r.name == "quantize-weights").stats["mixed"]


def test_a_budget_spent_in_the_bisection_raises_the_fewest_that_passed(monkeypatch) -> None:
    monkeypatch.setattr(optcc.quant.float_layers, "FLOAT_LAYER_CANDIDATES", BUDGET)
    result = optcc.optimize(chain_decoder(_weights(), DAMAGED), weight_only="int4")
    assert result.precision == {"weights": None}
    mixed = _mixed(result)
    assert [(c["int8_weights"], bool(c.get("held_out")), c["passed"]) for c in mixed["checks"]] == \
        [(0, False, False), (1, False, False), (2, False, False), (4, False, True), (4, True, True)]
    assert mixed["bounded"] and len(mixed["raised"]) == 4 and {"W" + n for n in DAMAGED} <= set(mixed["raised"])
    assert "the search was bounded" in mixed["summary"]
    assert _agreement(result.model) >= NEXT_TOKEN_AGREEMENT


def test_the_same_decoder_with_the_whole_budget_raises_the_three_damaged_weights() -> None:
    result = optcc.optimize(chain_decoder(_weights(), DAMAGED), weight_only="int4")
    mixed = _mixed(result)
    assert sorted(mixed["raised"]) == sorted("W" + n for n in DAMAGED) and "bounded" not in mixed
    assert _agreement(result.model) >= NEXT_TOKEN_AGREEMENT


def test_all_int4_misses_the_reference() -> None:
    # the damage the search repairs: without a gate every body weight is int4
    quantized = QuantizeWeightsPass(bits=4)(optcc.ir.load(chain_decoder(_weights(), DAMAGED))).model
    assert _agreement(optcc.ir.serialize(quantized)) < NEXT_TOKEN_AGREEMENT
