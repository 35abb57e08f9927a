"""KV-cache decoders are verified over a short decode: each step feeds a model's own present
outputs back as past. Checked against onnxruntime runs of the original, step by step."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import optcc
from fixtures.transformers import gpt2_layer
from optcc.numerics.decode import NEXT_TOKEN_AGREEMENT, NEXT_TOKEN_STEPS, decode_plan, run_decode
from optcc.quant import weight_only

VOCAB, HIDDEN = 50, 16


def _decoder() -> onnx.ModelProto:
    """Token embedding -> one GPT-2 layer with a KV cache -> vocabulary logits."""
    model, _ = gpt2_layer(hidden=HIDDEN)
    graph = model.graph
    rng = np.random.default_rng(3)
    graph.initializer.extend([
        numpy_helper.from_array(rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32), "embed"),
        numpy_helper.from_array(rng.standard_normal((HIDDEN, VOCAB)).astype(np.float32), "unembed"),
    ])
    graph.node.insert(0, helper.make_node("Gather", ["embed", "input_ids"], ["hidden_states"]))
    graph.node.append(helper.make_node("MatMul", ["y", "unembed"], ["logits"]))
    inputs = [i for i in graph.input if i.name != "hidden_states"]
    del graph.input[:]
    graph.input.extend([helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "S"]), *inputs])
    outputs = [o for o in graph.output if o.name != "y"]
    del graph.output[:]
    graph.output.extend([helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "S", VOCAB]), *outputs])
    onnx.checker.check_model(model)
    return model


def prompt(ids: list[int]) -> dict[str, np.ndarray]:
    """The first decode step's feeds for ``_decoder``: one row of ``ids``, an empty cache."""
    return {"input_ids": np.array([ids], np.int64),
            "past_key": np.zeros((1, 2, 0, HIDDEN // 2), np.float32),
            "past_value": np.zeros((1, 2, 0, HIDDEN // 2), np.float32),
            "attention_mask": np.ones((1, len(ids)), np.int64)}


def test_the_decode_plan_pairs_past_and_present():
    plan = decode_plan(optcc.ir.load(_decoder()))
    assert plan is not None
    assert plan.past_to_present == {"past_key": "present_key", "past_value": "present_value"}
    assert (plan.ids, plan.mask, plan.logits) == ("input_ids", "attention_mask", "logits")


@pytest.mark.parametrize("level", [2, 3])
def test_a_decoder_is_verified_over_a_three_step_decode(level):
    """-O3's fusions are verified by a 3-step decode; -O2's exact rewrites are proved
    equivalent (no samples needed), else decoded the same way."""
    model = _decoder()
    result = optcc.optimize(model, level=level)
    verification = result.report.verification
    proved = bool(verification.get("proof")) and all(verification["proof"]["outputs"].values())
    assert verification["status"] == "passed"
    assert verification["decode_steps"] == 3 or (level == 2 and proved), verification
    if not proved:  # the verify line says the samples were decoded
        assert "sample(s) of 3 decode steps each" in verification["summary"]
    # independently: the same decode on onnxruntime, original against optimized, step by step
    names = [o.name for o in model.graph.output]
    sessions = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
                for m in (model, result.model)]
    plan = decode_plan(optcc.ir.load(model))
    first = prompt([1, 2, 3])
    want, tokens = run_decode(lambda f: sessions[0].run(None, dict(f)), names, plan, first, steps=4)
    got, _ = run_decode(lambda f: sessions[1].run(None, dict(f)), names, plan, first, steps=4, tokens=tokens)
    assert [w[1].shape[2] for w in want] == [3, 4, 5, 6]  # the cache grows by one token a step
    for step_want, step_got in zip(want, got):
        for a, b in zip(step_want, step_got):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * float(np.abs(a).max()))


def _greedy(session: ort.InferenceSession, first: dict, steps: int, fed: list[int] | None = None) -> list[int]:
    """A plain greedy decode: each step's argmax; the next step is fed it (or ``fed``'s token
    of that step), the presents as pasts and a mask one longer."""
    feeds, tokens = dict(first), []
    names = [o.name for o in session.get_outputs()]
    for step in range(steps):
        outs = dict(zip(names, session.run(None, feeds)))
        tokens.append(int(np.argmax(outs["logits"][0, -1])))
        token = tokens[-1] if fed is None else fed[step]
        feeds = {"input_ids": np.array([[token]], np.int64), "past_key": outs["present_key"],
                 "past_value": outs["present_value"],
                 "attention_mask": np.ones((1, feeds["attention_mask"].shape[1] + 1), np.int64)}
    return tokens


@pytest.mark.parametrize("options", [{"fp16": True}, {"weight_only": "int8"}], ids=["fp16", "weights-int8"])
def test_a_lossy_decoder_is_judged_by_its_next_token_agreement(options):
    model = _decoder()
    first = prompt([4, 7, 1])
    result = optcc.optimize(model, level=2, inputs=[first], allow_float_fallback=True, **options)
    verification = result.report.verification
    judged = verification["next_token"]["CPUExecutionProvider"]
    free_run = verification["free_running"]["CPUExecutionProvider"]
    candidate = optcc.optimize(model, level=2, verify=False, **options).model
    original, written = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
                         for m in (model, candidate))
    want = _greedy(original, first, NEXT_TOKEN_STEPS)
    forced = _greedy(written, first, NEXT_TOKEN_STEPS, fed=want)
    free = _greedy(written, first, NEXT_TOKEN_STEPS)
    agreement = np.mean([a == b for a, b in zip(want, forced)])
    assert judged["steps"] == NEXT_TOKEN_STEPS and judged["tokens"] == NEXT_TOKEN_STEPS
    assert judged["agreement"] == agreement
    assert free_run["agreement"] == np.mean([a == b for a, b in zip(want, free)])
    assert free_run["first_divergence"] == [next((i for i, (a, b) in enumerate(zip(want, free)) if a != b),
                                                 NEXT_TOKEN_STEPS)]
    assert verification["status"] == ("passed" if agreement >= NEXT_TOKEN_AGREEMENT else "failed")
    assert verification["task"] is None  # the tokens decide, not the task judge over the short decode
    assert "next tokens on CPU" in verification["summary"]


def test_a_lossy_decoders_verdict_is_its_tokens_not_its_caches():
    """The caches feed the next step (each model its own), so they are not judged by
    themselves: an int4 candidate whose caches are off is judged by its next tokens."""
    model = _decoder()
    first = prompt([4, 7, 1])
    candidate = optcc.optimize(model, level=2, weight_only="int4", verify=False).model
    verification = optcc.verify(model, candidate, numerics="int8", inputs=[first])
    sessions = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
                for m in (model, candidate)]
    want = _greedy(sessions[0], first, NEXT_TOKEN_STEPS)
    got = _greedy(sessions[1], first, NEXT_TOKEN_STEPS, fed=want)
    agreement = float(np.mean([a == b for a, b in zip(want, got)]))
    # the decode stops at the step where more steps differ than the 1% allowed of all of them
    allowed = int((1 - NEXT_TOKEN_AGREEMENT) * NEXT_TOKEN_STEPS)
    differing = np.cumsum([a != b for a, b in zip(want, got)])
    judged = int(np.argmax(differing > allowed)) + 1 if differing[-1] > allowed else NEXT_TOKEN_STEPS
    assert verification.next_token["CPUExecutionProvider"]["tokens"] == judged
    assert verification.next_token["CPUExecutionProvider"]["agreement"] == \
        float(np.mean([a == b for a, b in zip(want[:judged], got[:judged])]))
    assert verification.passed == (agreement >= NEXT_TOKEN_AGREEMENT), verification.describe()
    assert all(o.passed for o in verification.outputs)  # reported, not judged
    # independently: the int4 candidate's caches are not the float model's on the first step
    want, got = (s.run(["present_key"], first)[0] for s in sessions)
    assert not np.allclose(want, got, rtol=1e-3, atol=1e-3 * float(np.abs(want).max()))


def test_the_int4_search_decodes_the_original_before_any_weight_is_quantized(monkeypatch):
    """The search's checks decode the original on prompts held apart from the verification's:
    that decode runs before the quantized weights exist (never both held at once), and the
    result is judged as onnxruntime's own greedy decodes of the original and the result say."""
    events: list[str] = []
    verify_module = sys.modules["optcc.numerics.verify"]
    greedy, quantize = verify_module.greedy_tokens, weight_only.quantize

    def original_decode(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        events.append("decode")
        return greedy(*args, **kwargs)

    def quantized(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        events.append("quantize")
        return quantize(*args, **kwargs)

    monkeypatch.setattr(verify_module, "greedy_tokens", original_decode)
    monkeypatch.setattr(weight_only, "quantize", quantized)
    model = _decoder()
    first = prompt([4, 7, 1])
    result = optcc.optimize(model, level=2, inputs=[first], weight_only="int4", allow_float_fallback=True)
    assert "quantize" in events and events[0] == "decode"
    record = next(r for r in result.report.passes if r.name == "quantize-weights")
    assert record.stats["mixed"]["checks"]  # the search ran its checks
    if record.status == "changed":  # the verification's verdict on the user's prompt, by onnxruntime's decodes
        sessions = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
                    for m in (model, result.model)]
        want = _greedy(sessions[0], first, NEXT_TOKEN_STEPS)
        got = _greedy(sessions[1], first, NEXT_TOKEN_STEPS, fed=want)
        judged = result.report.verification["next_token"]["CPUExecutionProvider"]
        assert judged["differing"] == sum(a != b for a, b in zip(want, got))


def test_an_int8_weight_only_run_decodes_the_original_before_any_weight_is_quantized(monkeypatch):
    """Without a search, the original's first prompt is decoded before any weight is
    quantized (never beside the quantized weights), and the verification's next-token
    verdict is the one onnxruntime's own greedy decodes of the original and the result give."""
    events: list[str] = []
    verify_module = sys.modules["optcc.numerics.verify"]
    greedy, quantize = verify_module.greedy_tokens, weight_only.quantize
    monkeypatch.setattr(verify_module, "greedy_tokens",
                        lambda *a, **k: events.append("decode") or greedy(*a, **k))
    monkeypatch.setattr(weight_only, "quantize", lambda *a, **k: events.append("quantize") or quantize(*a, **k))
    model = _decoder()
    first = prompt([4, 7, 1])
    result = optcc.optimize(model, level=2, inputs=[first], weight_only="int8", allow_float_fallback=True)
    assert "quantize" in events and events[0] == "decode"
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = _greedy(session, first, NEXT_TOKEN_STEPS)
    if result.report.verification["next_token"]["CPUExecutionProvider"].get("tokens"):
        got = _greedy(ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"]),
                      first, NEXT_TOKEN_STEPS, fed=want)
        judged = result.report.verification["next_token"]["CPUExecutionProvider"]
        assert judged["differing"] == sum(a != b for a, b in zip(want, got))
