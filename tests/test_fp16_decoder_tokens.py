"""``--fp16`` on a KV-cache decoder: the model the float16 pass would write is confirmed by
the check its verification applies (next-token agreement on the verifier's prompts), and
when it is refused, more layers of the accuracy check's ranking go back to float32.

The decoder is built so that the SQNR rule and the next tokens disagree:
``fixtures.gpt2_decoder`` with float16-exact weights, token rows in near-duplicate pairs
(their logits nearly tie, so a small logit error flips the greedy choice between them), and
its last block's MLP LayerNormalization reading ``x + 80`` (the same normalization in
float32: it removes the mean) where float16 rounds ``x + 80`` to 1/16. onnxruntime's CPU
runs LayerNormalization in float16 itself, so the written model rounds there too: fully
float16 every output keeps about 46 dB SQNR, which the SQNR rule accepts, while about 2% of
the next tokens change. Every verdict is checked against onnxruntime's greedy decodes,
written in this file, of the float32 original and of the model judged.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import optcc
import optcc.api
from fixtures.gpt2_decoder import gpt2_decoder
from optcc.numerics.decode import NEXT_TOKEN_AGREEMENT, NEXT_TOKEN_STEPS

LAYERS, HIDDEN, HEADS, VOCAB = 2, 32, 2, 2000
LIFT = 80.0  # float16 rounds x + 80 to 1/16


def _decoder(pairs: float = 0.002) -> onnx.ModelProto:
    """The decoder of the module doc: odd token rows are their even neighbours moved by
    ``pairs`` (rows of std 0.3); every weight float16-exact, the token rows too when ``pairs``
    is within float16's resolution there (below it, float16 rounds most pairs together)."""
    model = gpt2_decoder(layers=LAYERS, hidden=HIDDEN, heads=HEADS, vocab=VOCAB, seed=0)
    rng = np.random.default_rng(100)
    for i, tensor in enumerate(model.graph.initializer):
        array = numpy_helper.to_array(tensor)
        if array.dtype != np.float32 or array.size < 64:
            continue
        array = array.astype(np.float16).astype(np.float32)  # storing a weight in float16 is exact
        if tensor.name == "wte":
            array[1::2] = array[0::2] + pairs * rng.standard_normal(array[0::2].shape).astype(np.float32)
            array = array.astype(np.float16).astype(np.float32) if pairs >= 1e-3 else array
        model.graph.initializer[i].CopyFrom(numpy_helper.from_array(array, tensor.name))
    nodes = list(model.graph.node)
    at, norm = [(i, n) for i, n in enumerate(nodes) if n.op_type == "LayerNormalization"][-2]  # before ln_f
    model.graph.initializer.append(numpy_helper.from_array(np.float32(LIFT), "lift"))
    lift = helper.make_node("Add", [norm.input[0], "lift"], ["lifted"], name="lift")
    norm.input[0] = "lifted"
    del model.graph.node[:]
    model.graph.node.extend([*nodes[:at], lift, *nodes[at:]])
    onnx.checker.check_model(model, full_check=True)
    return model


def _prompts(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    """``count`` prompts of 2 rows of 8 random token ids each, from an empty cache."""
    rng = np.random.default_rng(seed)
    empty = np.zeros((2, HEADS, 0, HIDDEN // HEADS), np.float32)
    return [{"input_ids": rng.integers(0, VOCAB, (2, 8)), "position_ids": np.tile(np.arange(8), (2, 1)),
             "attention_mask": np.ones((2, 8), np.int64),
             **{f"past_{kind}_{i}": empty for i in range(LAYERS) for kind in ("key", "value")}}
            for _ in range(count)]


def _session(model: onnx.ModelProto | optcc.OptimizeResult) -> ort.InferenceSession:
    proto = model if isinstance(model, onnx.ModelProto) else model.model
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _decode(session: ort.InferenceSession, first: dict[str, np.ndarray], fed: np.ndarray | None = None,
            steps: int = NEXT_TOKEN_STEPS) -> np.ndarray:
    """[rows, steps]: each step's argmax at the last position; the next step is fed it (or
    ``fed``'s column of that step), the presents as pasts, the mask and position one on."""
    names = [o.name for o in session.get_outputs()]
    feeds, chosen = dict(first), []
    for step in range(steps):
        outputs = dict(zip(names, session.run(None, feeds)))
        chosen.append(outputs["logits"][:, -1].argmax(-1))
        token = chosen[-1] if fed is None else fed[:, step]
        feeds = {"input_ids": token[:, None].astype(np.int64), "position_ids": feeds["position_ids"][:, -1:] + 1,
                 "attention_mask": np.ones((token.shape[0], feeds["attention_mask"].shape[1] + 1), np.int64),
                 **{n.replace("present", "past"): v for n, v in outputs.items() if n.startswith("present")}}
    return np.stack(chosen, axis=1)


def _agreement(original: ort.InferenceSession, model: ort.InferenceSession,
               prompts: list[dict[str, np.ndarray]]) -> float:
    """The share of steps whose argmax is the original's, ``model`` fed the original's tokens."""
    equal = [_decode(model, p, fed=want) == want for p in prompts for want in [_decode(original, p)]]
    return float(np.concatenate(equal).mean())


def _sqnr_db(original: ort.InferenceSession, model: ort.InferenceSession,
             prompts: list[dict[str, np.ndarray]]) -> float:
    """The worst output's SQNR over ``prompts`` (the SQNR rule's measure), in float64."""
    names = [o.name for o in original.get_outputs()]
    worst = np.inf
    for i, name in enumerate(names):
        want = np.concatenate([original.run(None, p)[i].astype(np.float64).ravel() for p in prompts])
        got = np.concatenate([model.run([name], p)[0].astype(np.float64).ravel() for p in prompts])
        worst = min(worst, float(10 * np.log10((want ** 2).sum() / ((got - want) ** 2).sum())))
    return worst


@pytest.fixture(scope="module")
def confirmed_run() -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]], optcc.OptimizeResult, list]:
    """``--fp16 -O2`` on the decoder with the user's prompts, every model the pass had
    confirmed recorded with the check's verdict on it."""
    model, prompts = _decoder(), _prompts(8, seed=1)
    confirmed: list[tuple[onnx.ModelProto, str | None, object]] = []
    gate = optcc.api._gate_reason

    def recorded(verifier, candidate, numerics="int8"):  # noqa: ANN001, ANN202
        reason = gate(verifier, candidate, numerics)
        if numerics == "fp16":
            confirmed.append((optcc.ir.serialize(candidate), reason, verifier))
        return reason

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(optcc.api, "_gate_reason", recorded)
        result = optcc.optimize(model, level=2, fp16=True, inputs=prompts)
    return model, prompts, result, confirmed


def test_the_sqnr_rules_choice_is_refused_by_its_next_tokens_and_more_float32_is_confirmed(confirmed_run):
    model, prompts, result, confirmed = confirmed_run
    original = _session(model)
    # the SQNR rule's choice, whole float16: over 40 dB on every output, under 99% of the tokens
    (first, refused, verification), *rest = confirmed
    assert _sqnr_db(original, _session(first), prompts) >= 40.0
    # the verdict on the SQNR rule's choice is onnxruntime's on the user's prompts: under 99%
    assert _agreement(original, _session(first), prompts) < NEXT_TOKEN_AGREEMENT
    assert refused is not None and "next tokens on CPUExecutionProvider" in refused
    # the models chosen because it was refused are judged on other prompts than the
    # verification's, which then judges the one chosen afresh (next test)
    assert rest and all(checker is not verification for _, _, checker in rest)
    assert rest[-1][1] is None and all(reason is not None for _, reason, _ in rest[:-1])
    record = next(r for r in result.report.passes if r.name == "convert-float16")
    assert record.status == "changed" and record.stats["confirmations"] == [reason for _, reason, _ in confirmed]
    assert {"lift"} <= set(record.stats["returned_to_float32"])


def test_the_float16_decoder_shipped_is_the_one_confirmed_and_verified(confirmed_run):
    model, prompts, result, confirmed = confirmed_run
    assert result.precision == {"fp16": None}
    verification = result.report.verification
    assert verification["status"] == "passed"
    # what the pass confirmed last is what it wrote
    assert confirmed[-1][0].SerializeToString() == result.model.SerializeToString()
    assert confirmed[-1][2] is not confirmed[0][2]  # chosen on prompts apart from the verification's
    original, shipped = _session(model), _session(result)
    # the verification's number is onnxruntime's, on its prompts (the user's); other prompts agree too
    agreement = _agreement(original, shipped, prompts)
    assert verification["next_token"]["CPUExecutionProvider"]["agreement"] == agreement >= NEXT_TOKEN_AGREEMENT
    assert _agreement(original, shipped, _prompts(8, seed=2)) >= NEXT_TOKEN_AGREEMENT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in result.model.graph.initializer)


def test_a_decoder_whose_sqnr_choice_keeps_its_tokens_is_written_as_without_the_check():
    """Token rows 0.03 apart: the whole float16 model keeps its next tokens, so the check
    confirms the SQNR rule's choice at once, and the bytes are those of the run without
    verification (where nothing confirms)."""
    model, prompts = _decoder(pairs=0.03), _prompts(8, seed=1)
    checked = optcc.optimize(model, level=2, fp16=True, inputs=prompts)
    unchecked = optcc.optimize(model, level=2, fp16=True, inputs=prompts, verify=False)
    assert checked.model.SerializeToString() == unchecked.model.SerializeToString()
    record = next(r for r in checked.report.passes if r.name == "convert-float16")
    assert record.stats["confirmations"] == [None] and not record.stats["returned_to_float32"]
    assert _agreement(_session(model), _session(checked), _prompts(8, seed=2)) >= NEXT_TOKEN_AGREEMENT


def test_a_decoder_the_float16_pass_declines_says_the_verifications_reason():
    """Token rows 1e-4 apart, below float16's resolution there: the token table stored in
    float16 flips the choice between most pairs, so no model the pass confirms keeps the
    tokens. The pass declines with the check's own reason; onnxruntime's decode of the
    table rounded to float16 confirms that reason."""
    model, prompts = _decoder(pairs=1e-4), _prompts(8, seed=1)
    with pytest.raises(optcc.PrecisionNotAppliedError) as raised:
        optcc.optimize(model, level=2, fp16=True, inputs=prompts)
    said = str(raised.value)
    assert "the next-token check refused" in said and "next tokens on CPUExecutionProvider" in said \
        and "% needed" in said, said
    record = next(r for r in raised.value.result.report.passes if r.name == "convert-float16")
    assert record.status == "unchanged" and record.stats["reason"] in said
    assert 1 < len(record.stats["confirmations"]) <= 4 and None not in record.stats["confirmations"]
    assert record.stats["confirmations"][-1] in record.stats["reason"]
    rounded = onnx.ModelProto()
    rounded.CopyFrom(model)
    table = next(t for t in rounded.graph.initializer if t.name == "wte")
    table.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(table).astype(np.float16).astype(np.float32), "wte"))
    assert _agreement(_session(model), _session(rounded), prompts) < NEXT_TOKEN_AGREEMENT
