"""Dynamic INT8 of a KV-cache decoder searches the layers to leave float: a decoder one of
whose layers reads an activation with one channel 1000x the rest (its weight row 1000x
smaller, so the float product is unchanged) loses that layer to dynamic INT8's per-tensor
rounding of the activation and flips tokens; the search returns that layer alone to float,
and the shipped model agrees with a numpy float64 decode of the original on prompts the
search and the verification never saw. A check no candidate passes declines, within the
search's budget. The search's confirmation of its choice and the verification of the model
it ships are one check: each model's next-token decode runs once on each prompt."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

import optcc
from fixtures.attention_decoder import attention_nodes, float_matmul_weights, forced_agreement, numpy_attention
from optcc.numerics.decode import NEXT_TOKEN_AGREEMENT, NEXT_TOKEN_STEPS
from optcc.passes.quantize_dynamic import QuantizeDynamicPass
from optcc.quant import FLOAT_LAYER_CANDIDATES, fewest_float_layers

VOCAB, WIDTH, PROMPT, ROWS = 8, 16, 4, 16
OUTLIER = 1000.0  # the scale of the one activation channel that ruins its layer's dynamic rounding
DAMAGED = "z"  # the output of the layer that reads it


SEED = 1  # weights whose greedy decodes hold no near-tie that int8 rounding of the other layers flips


def _weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)
    return {"E": rng.normal(size=(VOCAB, WIDTH)), "Wq": rng.normal(size=(WIDTH, WIDTH)) * 0.5,
            "Wk": rng.normal(size=(WIDTH, WIDTH)) * 0.5, "Wv": rng.normal(size=(WIDTH, WIDTH)),
            "Wz": rng.normal(size=(WIDTH, WIDTH)) * 0.5, "U": rng.normal(size=(WIDTH, VOCAB)) * 4}


def _stored(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The float32 initializers: channel 0 of ``h`` scaled by ``OUTLIER`` (``D``), row 0 of
    ``Wz`` divided by it."""
    wz = weights["Wz"].copy()
    wz[0] /= OUTLIER
    scale = np.ones(WIDTH)
    scale[0] = OUTLIER
    return {**{k: v.astype(np.float32) for k, v in weights.items()}, "Wz": wz.astype(np.float32),
            "D": scale.astype(np.float32)}


def _decoder() -> onnx.ModelProto:
    """One attention layer over a KV cache: x = E[ids]; K, V = past ++ x Wk, x Wv;
    h = x + softmax(x Wq K^T / 4) V; z = (h * D) Wz; logits = tanh(z) U."""
    nodes = [
        *attention_nodes(),
        oh.make_node("Mul", ["h", "D"], ["hd"]),
        oh.make_node("MatMul", ["hd", "Wz"], [DAMAGED]),
        oh.make_node("Tanh", [DAMAGED], ["t"]),
        oh.make_node("MatMul", ["t", "U"], ["logits"]),
    ]
    past = [oh.make_tensor_value_info(n, TP.FLOAT, ["B", "T", WIDTH]) for n in ("past_key", "past_value")]
    present = [oh.make_tensor_value_info(n, TP.FLOAT, ["B", "T2", WIDTH]) for n in ("present_key", "present_value")]
    graph = oh.make_graph(
        nodes, "decoder", [oh.make_tensor_value_info("input_ids", TP.INT64, ["B", "S"]), *past],
        [oh.make_tensor_value_info("logits", TP.FLOAT, ["B", "S", VOCAB]), *present],
        [nh.from_array(w, name) for name, w in _stored(_weights()).items()]
        + [nh.from_array(np.array(0.25, np.float32), "scale")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _numpy_decode(prompt: np.ndarray) -> np.ndarray:
    """The original's greedy tokens ([rows, NEXT_TOKEN_STEPS]) in float64 numpy, from its
    float32 initializers."""
    w = {name: v.astype(np.float64) for name, v in _stored(_weights()).items()}
    ids = prompt
    keys = values = np.zeros((prompt.shape[0], 0, WIDTH))
    tokens = []
    for _ in range(NEXT_TOKEN_STEPS):
        h, keys, values = numpy_attention(w, ids, keys, values)
        logits = (np.tanh((h * w["D"]) @ w["Wz"]) @ w["U"])[:, -1]
        tokens.append(logits.argmax(-1))
        ids = tokens[-1][:, None]
    return np.stack(tokens, axis=1)


def _agreement(model: onnx.ModelProto, prompt: np.ndarray) -> float:
    """``forced_agreement`` of ``model`` with the float64 original's greedy decode of ``prompt``."""
    return forced_agreement(model, prompt, _numpy_decode(prompt))


def _unseen_prompt() -> np.ndarray:
    """Prompts of a seed neither the verification (generated prompts) nor the search uses."""
    return np.random.default_rng(2024).integers(0, VOCAB, (ROWS, PROMPT))


def test_every_layer_at_int8_flips_tokens_the_numpy_reference_keeps() -> None:
    """The premise: without the search, dynamic INT8 of every layer misses 1% of steps."""
    quantized = QuantizeDynamicPass()(optcc.ir.load(_decoder()))
    assert "Wz" not in float_matmul_weights(optcc.ir.serialize(quantized.model))
    assert _agreement(optcc.ir.serialize(quantized.model), _unseen_prompt()) < NEXT_TOKEN_AGREEMENT


def test_the_search_returns_the_damaged_layer_alone_to_float() -> None:
    result = optcc.optimize(_decoder(), int8_dynamic=True)
    assert result.precision == {"int8-dynamic": None}
    shipped = result.model
    assert float_matmul_weights(shipped) == {"Wz"}  # the damaged layer float, every other one integer
    ops = [n.op_type for n in shipped.graph.node]
    assert ops.count("MatMulInteger") == 4
    record = next(r for r in result.report.passes if r.name == "quantize-dynamic")
    assert record.stats["search"]["float_layers"] == [DAMAGED]
    assert record.stats["kept_float"].get("left float by the search") == 1
    line = next(t for t in result.report.summary().splitlines() if t.startswith("quantize-dynamic: "))
    assert f"1 of 5 left float, the most damaging by their output error: {DAMAGED} " in line
    assert _agreement(shipped, _unseen_prompt()) >= NEXT_TOKEN_AGREEMENT


def test_the_confirmed_choice_is_decoded_once_for_its_confirmation_and_the_verification(monkeypatch) -> None:
    verify_module = sys.modules["optcc.numerics.verify"]
    forced = verify_module.forced_tokens
    decodes: list[tuple[int, bytes]] = []  # per forced decode: its prompt, and the model's first logits on it

    def counted(run, names, plan, first, tokens, allowed=None):  # noqa: ANN001, ANN202
        decodes.append((id(first), np.asarray(run(first)[list(names).index(plan.logits)]).tobytes()))
        return forced(run, names, plan, first, tokens, allowed)

    monkeypatch.setattr(verify_module, "forced_tokens", counted)
    result = optcc.optimize(_decoder(), int8_dynamic=True)
    assert result.precision == {"int8-dynamic": None} and result.report.verification["status"] == "passed"
    search = next(r for r in result.report.passes if r.name == "quantize-dynamic").stats["search"]
    assert search["checks"][-1]["check"] == "confirm" and search["checks"][-1]["passed"]
    assert decodes and len(decodes) == len(set(decodes))  # no model decoded twice from one prompt
    assert _agreement(result.model, _unseen_prompt()) >= NEXT_TOKEN_AGREEMENT


def test_a_check_no_candidate_passes_declines_within_the_budget() -> None:
    judged: list[int] = []

    def refuse(candidate) -> str:  # noqa: ANN001
        judged.append(sum(n.op_type == "MatMulInteger" for n in candidate.graph))
        return "refused"

    model = optcc.ir.load(_decoder())
    result = QuantizeDynamicPass(gate=refuse)(model)
    assert not result.modified and "refused" in result.stats["reason"]
    assert float_matmul_weights(optcc.ir.serialize(result.model)) == {"Wq", "Wk", "Wv", "Wz", "U"}
    # no layer float, then 1, 2 and 4 of the 5 (one at least stays quantized)
    assert judged == [5, 4, 3, 1]
    assert len(judged) <= FLOAT_LAYER_CANDIDATES


@pytest.mark.parametrize("refused_by_confirm", [(), (2,), (0, 2, 3)])
def test_the_search_takes_the_fewest_that_pass_and_confirms_them(refused_by_confirm: tuple[int, ...]) -> None:
    """A judge that passes 2 or more of 6 ranked layers float: the search finds 2 by doubling;
    where the confirmation refuses a count, the next one up is judged and confirmed."""
    ranked = ["a", "b", "c", "d", "e", "f"]
    seen: list[tuple[str, int]] = []

    def judge(layers) -> str | None:  # noqa: ANN001
        seen.append(("judge", len(layers)))
        return None if len(layers) >= 2 else "too few"

    def confirm(layers) -> str | None:  # noqa: ANN001
        seen.append(("confirm", len(layers)))
        return "refused" if len(layers) in refused_by_confirm else None

    search = fewest_float_layers(lambda: ranked, judge, confirm)
    want = next(n for n in range(2, 6) if n not in refused_by_confirm)
    assert search.chosen == ranked[:want]
    assert seen[:3] == [("judge", 0), ("judge", 1), ("judge", 2)]
    assert seen[-1] == ("confirm", want)


def test_a_model_that_is_no_decoder_is_quantized_once_and_not_searched(monkeypatch) -> None:
    # its verification holds no prompts apart, so nothing could judge a search's candidates
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    graph = oh.make_graph([oh.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                          [oh.make_tensor_value_info("x", TP.FLOAT, [4, 64])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, [4, 32])], [nh.from_array(w, "w")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    built = []
    quantized = QuantizeDynamicPass._quantized
    monkeypatch.setattr(QuantizeDynamicPass, "_quantized",
                        lambda self, m, exclude, count: built.append(sorted(exclude)) or quantized(self, m, exclude, count))
    result = optcc.optimize(model, int8_dynamic=True, verify=True)
    assert built == [[]]
    record = next(r for r in result.report.passes if r.name == "quantize-dynamic")
    assert record.status == "changed" and "search" not in record.stats
    x = rng.standard_normal((4, 64)).astype(np.float32)
    got = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    want = x.astype(np.float64) @ w.astype(np.float64)
    assert 10 * np.log10(np.sum(want ** 2) / np.sum((got - want) ** 2)) > 30  # dynamic INT8's rounding only


def test_the_layer_estimate_is_the_error_onnxruntime_runs() -> None:
    # the ranking's per-layer error (numpy, streamed over runs) against the relative error of
    # the layer dynamic INT8 writes, run by onnxruntime, both against a float64 product
    from optcc.quant import dynamic_int8_errors

    rng = np.random.default_rng(7)
    w = rng.standard_normal((32, 24)).astype(np.float32)
    runs = [{"x": (rng.standard_normal((5, 32)) * scale).astype(np.float32)} for scale in (0.5, 3.0, 1.0)]
    graph = oh.make_graph([oh.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                          [oh.make_tensor_value_info("x", TP.FLOAT, [5, 32])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, [5, 32 - 8])], [nh.from_array(w, "w")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    quantized = optcc.optimize(model, passes=["quantize-dynamic"], verify=False).model
    session = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"])
    error = energy = 0.0
    for run in runs:
        want = run["x"].astype(np.float64) @ w.astype(np.float64)
        error += float(np.sum((session.run(None, run)[0] - want) ** 2))
        energy += float(np.sum(want ** 2))
    estimate = dynamic_int8_errors({"y": ("x", w)}, iter(runs))["y"]
    assert estimate == pytest.approx(error / energy, rel=0.05)
