"""The dynamic INT8 search of a KV-cache decoder within a budget that runs out during its
bisection: a decoder with three layers each reading an activation with one channel 1000x
the rest (their weight rows 1000x smaller, so the float products are unchanged) needs those
three float; with a budget of four candidates the search judges 0, 1, 2 and 4 layers float
and cannot build 3, so it ships the 4 that passed, confirmed by the verification's own
check, says the search was bounded, and the shipped model agrees with a numpy float64
decode of the original on prompts neither the search nor the verification saw."""

from __future__ import annotations

import weakref

import numpy as np
import onnx
import onnx_ir as ir

import optcc
import optcc.quant.float_layers
from fixtures.attention_decoder import chain_decoder, chain_tokens, float_matmul_weights, forced_agreement
from optcc.numerics.decode import NEXT_TOKEN_AGREEMENT, NEXT_TOKEN_STEPS
from optcc.passes import quantize_weights
from optcc.passes.quantize_dynamic import _LEVELS_KEY, QuantizeDynamicPass
from optcc.quant import KeptCandidates, fewest_float_layers

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


def test_a_refused_confirmation_returns_to_a_candidate_judged_before(monkeypatch) -> None:
    """The three damaged layers ranked first: the judge (a forced decode against the numpy
    float64 original on its own prompts) passes 4 and then 3 layers float; a confirmation
    stricter than the judge (the same decode on other prompts, and at least 4 layers float)
    refuses 3, so the search returns to the 4 it judged before the bisection's 3. 3 is
    confirmed as kept (not built again); 4, no longer kept, is built once more; the
    embedding table is quantized once for all of them; the model shipped with those 4
    float agrees with the float64 decode on prompts neither check saw."""
    weights = _weights()
    builds: list[frozenset[str]] = []
    quantized = QuantizeDynamicPass._quantized
    tables: list[tuple[int, ...]] = []
    row_int8 = quantize_weights.row_int8
    monkeypatch.setattr(quantize_weights, "row_int8", lambda table: tables.append(table.shape) or row_int8(table))

    def counted(self, model, exclude, count_fused):  # noqa: ANN001, ANN202
        if model is not original:  # a candidate, not the model the pass rewrites last
            builds.append(frozenset(exclude))
        return quantized(self, model, exclude, count_fused)

    monkeypatch.setattr(QuantizeDynamicPass, "_quantized", counted)

    def decoded_by(seed: int, least: int = 0):
        prompt = np.random.default_rng(seed).integers(0, VOCAB, (ROWS, PROMPT))
        tokens = chain_tokens(weights, DAMAGED, prompt, NEXT_TOKEN_STEPS)

        def check(candidate) -> str | None:  # noqa: ANN001
            proto = optcc.ir.serialize(candidate)
            floating = len(float_matmul_weights(proto))
            share = forced_agreement(proto, prompt, tokens)
            return None if share >= NEXT_TOKEN_AGREEMENT and floating >= least else f"{share:.3f}, {floating} float"
        return check

    def samples() -> list[dict[str, np.ndarray]]:
        empty = np.zeros((1, 0, WIDTH), np.float32)
        prompt = np.random.default_rng(7).integers(0, VOCAB, (4, PROMPT))
        return [{"input_ids": row[None], "past_key": empty, "past_value": empty} for row in prompt]

    original = optcc.ir.load(_decoder())
    result = QuantizeDynamicPass(gate=decoded_by(7), held_out=decoded_by(8, least=4), samples=samples)(original)
    search = result.stats["search"]
    assert [(c["float_layers"], c["check"], c["passed"]) for c in search["checks"]] == [
        (0, "judge", False), (1, "judge", False), (2, "judge", False), (4, "judge", True), (3, "judge", True),
        (3, "confirm", False), (4, "confirm", True)]
    assert len(set(builds)) == search["candidates"] == 5 and len(builds) == 6  # 4 built again, 3 kept
    assert builds[-1] == builds[3] and builds.count(builds[4]) == 1
    assert tables == [(VOCAB, WIDTH)]  # E, quantized once: by the first candidate
    shipped = optcc.ir.serialize(result.model)
    assert {"W" + name for name in DAMAGED} <= float_matmul_weights(shipped) and len(search["float_layers"]) == 4
    assert _agreement(shipped) >= NEXT_TOKEN_AGREEMENT


def test_kept_candidates_build_each_count_once_and_keep_only_those_awaiting_confirmation() -> None:
    """The search above (judge from 9, confirmation from 16, budget 12), its candidates built
    through ``KeptCandidates``: the bisection ends on 9, confirmed without a build again;
    only the fewest-layer candidate awaiting confirmation is kept (a bound that does not
    grow with the layers), so those the refused confirmations return to (10, 12, 16) are
    built again, each once more at most."""
    layers = [f"mm{i}" for i in range(20)]
    built: list[int] = []
    alive: weakref.WeakSet = weakref.WeakSet()  # the candidates not yet freed
    most_alive = 0

    class Candidate:
        def __init__(self, floating) -> None:  # noqa: ANN001
            self.count = len(floating)
            built.append(self.count)
            alive.add(self)

    candidate = KeptCandidates(Candidate)

    def check(least: int):
        def run(floating):
            nonlocal most_alive
            count = candidate(floating).count
            most_alive = max(most_alive, len(alive))
            return None if count >= least else "too few"
        return run

    search = fewest_float_layers(lambda: layers, check(9), check(16), budget=12, retain=candidate.retain)
    assert search.chosen == layers[:16]
    assert most_alive <= optcc.quant.float_layers.KEPT_CANDIDATES + 1  # those kept and the one judged
    assert max(built.count(c) for c in built) <= 2  # built for its judge, at most once more for its confirmation
    assert built.count(9) == 1  # the one kept: the bisection's last count that passed
    assert sorted(set(built)) == sorted({c["float_layers"] for c in search.checks})


def test_candidates_share_each_weights_int8_levels_which_the_pass_releases() -> None:
    """Every candidate of the search, and the model shipped, reads one int8 array per
    quantized weight, made once (no candidate holds levels of its own); once the pass
    returns, no tensor of the model it was given keeps them; the shipped model agrees with
    the numpy float64 decode of the original on prompts no check saw."""
    levels: dict[str, list[np.ndarray]] = {}

    def gate(candidate) -> str | None:  # noqa: ANN001
        for value in candidate.graph.initializers.values():
            if value.name.endswith("_quantized") and value.const_value.dtype == ir.DataType.INT8:
                levels.setdefault(value.name, []).append(value.const_value.numpy())
        floating = len(float_matmul_weights(optcc.ir.serialize(candidate)))
        return None if floating >= 3 else f"{floating} float"

    def samples() -> list[dict[str, np.ndarray]]:
        empty = np.zeros((1, 0, WIDTH), np.float32)
        prompt = np.random.default_rng(7).integers(0, VOCAB, (4, PROMPT))
        return [{"input_ids": row[None], "past_key": empty, "past_value": empty} for row in prompt]

    original = optcc.ir.load(_decoder())
    tensors = [value.const_value for value in original.graph.initializers.values()]
    result = QuantizeDynamicPass(gate=gate, samples=samples)(original)
    assert result.stats["search"]["candidates"] >= 3 and set(result.stats["search"]["float_layers"]) == set(DAMAGED)
    shipped = {v.name: v.const_value.numpy() for v in result.model.graph.initializers.values() if v.name in levels}
    assert shipped and all(len(levels[name]) >= 2 for name in shipped)
    for name, arrays in levels.items():  # the same memory in every candidate that quantized the weight
        assert all(np.shares_memory(arrays[0], other) for other in arrays[1:]), name
        if name in shipped:
            assert np.shares_memory(arrays[0], shipped[name]), name
    assert not any(key in tensor.meta for tensor in tensors for key in (_LEVELS_KEY, quantize_weights.ROWS_KEY))
    assert _agreement(optcc.ir.serialize(result.model)) >= NEXT_TOKEN_AGREEMENT
