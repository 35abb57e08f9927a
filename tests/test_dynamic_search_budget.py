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

import optcc
import optcc.quant.float_layers
from fixtures.attention_decoder import chain_decoder, chain_tokens, float_matmul_weights, forced_agreement
from optcc.numerics.decode import NEXT_TOKEN_AGREEMENT, NEXT_TOKEN_STEPS
from optcc.quant import fewest_float_layers

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
    """``chain_decoder`` through the damaged layers: each reads ``t * D``."""
    return chain_decoder(_weights(), DAMAGED)


def _agreement(model: onnx.ModelProto) -> float:
    """``forced_agreement`` of ``model`` with the float64 original's greedy decode, on prompts
    of a seed neither the verification nor the search uses."""
    prompt = np.random.default_rng(2024).integers(0, VOCAB, (ROWS, PROMPT))
    return forced_agreement(model, prompt, chain_tokens(_weights(), DAMAGED, prompt, NEXT_TOKEN_STEPS))


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


def test_a_spent_budget_still_confirms_a_larger_candidate_already_built():
    """Twenty layers; a candidate passes the judge with 9 or more float, the confirmation
    with 16 or more, and the budget allows 12 candidates. The judge's search builds 0, 1,
    2, 4, 8, 16 (the first to pass), then 12, 10, 9; the confirmation refuses 9, and one
    more layer at a time (10 to 14) spends the budget. Past it, the 16 built before is
    still confirmed and chosen: every candidate judged once by each check."""
    layers = [f"mm{i}" for i in range(20)]
    judged: list[tuple[int, str]] = []

    def check(name: str, least: int):
        def run(floating):
            judged.append((len(floating), name))
            return None if len(floating) >= least else f"{len(floating)} < {least}"
        return run

    search = fewest_float_layers(lambda: layers, check("judge", 9), check("confirm", 16), budget=12)
    assert search.chosen == layers[:16] and search.bounded
    assert len(judged) == len(set(judged))  # no candidate judged twice by one check
    assert {count for count, _ in judged} <= {0, 1, 2, 4, 8, 16, 12, 10, 9, 11, 13, 14}
    assert (16, "confirm") in judged and search.candidates <= 12
