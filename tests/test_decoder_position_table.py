"""A GPT-2-class decoder (fixtures/gpt2_decoder.py) whose position table is short is verified
by default over a multi-step decode: the generated first step leaves room in the table for
every later step. The positions fed are checked here by hand, and the decode is rerun on
onnxruntime (optimizations off) with a feed-back loop written here, not optcc's."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import optcc
from fixtures.gpt2_decoder import gpt2_decoder, greedy_decode
from optcc.errors import BadInputError
from optcc.numerics import Verifier
from optcc.numerics.decode import DECODE_STEPS, NEXT_TOKEN_AGREEMENT, NEXT_TOKEN_STEPS, decode_plan, run_decode
from optcc.numerics.inputs import generate_inputs

LAYERS, HEADS, HIDDEN, VOCAB = 2, 2, 32, 96
PASTS = [f"past_{kind}_{i}" for i in range(LAYERS) for kind in ("key", "value")]


def _model(positions: int) -> onnx.ModelProto:
    return gpt2_decoder(layers=LAYERS, heads=HEADS, hidden=HIDDEN, vocab=VOCAB, positions=positions)


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _hand_decode(model: onnx.ModelProto, first: dict[str, np.ndarray], steps: int) -> list[dict[str, np.ndarray]]:
    """The feeds of a greedy decode from ``first``, run on onnxruntime: each next step one
    token, position + 1, mask + one 1, present fed back as past. Raises if any step fails."""
    session = _session(model)
    names = [o.name for o in session.get_outputs()]
    feeds, fed = dict(first), []
    for _ in range(steps):
        fed.append(feeds)
        out = dict(zip(names, session.run(None, feeds)))
        token = np.argmax(out["logits"][:, -1], axis=-1)[:, None].astype(np.int64)
        mask = feeds["attention_mask"]
        feeds = {"input_ids": token, "position_ids": feeds["position_ids"][:, -1:] + 1,
                 "attention_mask": np.concatenate([mask, np.ones((mask.shape[0], 1), mask.dtype)], axis=1),
                 **{p: out[p.replace("past", "present")] for p in PASTS}}
    return fed


def _next_token_agreement(original: onnx.ModelProto, candidate: onnx.ModelProto, prompts: list[np.ndarray],
                          steps: int) -> float:
    """The share of steps at which ``candidate``'s argmax is ``original``'s over a greedy decode
    of ``steps`` steps from each prompt (an empty cache), the candidate fed the original's
    tokens: decoded here on onnxruntime (optimizations off), counted with numpy."""
    def decode(model: onnx.ModelProto, prompt: np.ndarray, fed: np.ndarray | None = None) -> np.ndarray:
        session = _session(model)
        return greedy_decode(lambda f: session.run(None, f), prompt, steps, LAYERS, HEADS, HIDDEN // HEADS, fed)

    same = []
    for prompt in prompts:
        want = decode(original, prompt)
        same.append(decode(candidate, prompt, want) == want)
    return float(np.concatenate(same).mean())


def _check_step(feeds: dict[str, np.ndarray], table: int) -> None:
    past = feeds["past_key_0"].shape[2]
    current = feeds["input_ids"].shape[1]
    assert all(feeds[p].shape[2] == past for p in PASTS)
    assert feeds["position_ids"].shape == feeds["input_ids"].shape
    np.testing.assert_array_equal(feeds["position_ids"], np.broadcast_to(past + np.arange(current),
                                                                         feeds["input_ids"].shape))
    assert 0 <= feeds["position_ids"].min() and feeds["position_ids"].max() < table
    assert 0 <= feeds["input_ids"].min() and feeds["input_ids"].max() < VOCAB
    assert feeds["attention_mask"].shape == (feeds["input_ids"].shape[0], past + current)
    assert (feeds["attention_mask"] == 1).all()


@pytest.mark.parametrize("table", [4, 16, 64])
def test_generated_decoder_inputs_leave_room_for_the_decode(table):
    model = _model(table)
    for first in generate_inputs(optcc.ir.load(model), samples=2, seed=3):
        fed = _hand_decode(model, first, DECODE_STEPS)
        for step in fed:
            _check_step(step, table)
        assert fed[-1]["position_ids"].max() <= table - 1
    # a longer decode asks for its own room
    (first,) = generate_inputs(optcc.ir.load(model), decode_steps=table - 1)
    fed = _hand_decode(model, first, table - 1)
    for step in fed:
        _check_step(step, table)
    assert fed[-1]["position_ids"].max() == table - 1  # the whole table, no further


def test_a_given_past_length_beyond_the_table_is_refused():
    m = optcc.ir.load(_model(16))
    with pytest.raises(BadInputError, match="position table of 16 rows"):
        generate_inputs(m, {**{p: [1, HEADS, 16, HIDDEN // HEADS] for p in PASTS}, "input_ids": [1, 1]})
    (feeds,) = generate_inputs(m, {p: [1, HEADS, 10, HIDDEN // HEADS] for p in PASTS})  # the current length shrinks
    assert feeds["past_key_0"].shape[2] == 10 and feeds["position_ids"].max() + DECODE_STEPS - 1 < 16


def test_the_verifier_decodes_within_the_table():
    """The feeds optcc's own decode gives onnxruntime, recorded: every position in the table."""
    model, table = _model(16), 16
    verifier = Verifier(model)
    try:
        samples = verifier.feeds
    finally:
        verifier.close()
    session = _session(model)
    names = [o.name for o in session.get_outputs()]
    plan = decode_plan(optcc.ir.load(model))
    assert plan is not None and plan.position == "position_ids"
    for first in samples:
        fed: list[dict[str, np.ndarray]] = []
        steps, _ = run_decode(lambda f: fed.append(dict(f)) or session.run(None, dict(f)), names, plan, first)
        assert len(steps) == len(fed) == DECODE_STEPS > 1
        for step in fed:
            _check_step(step, table)


@pytest.mark.parametrize("options", [{"level": 2}, {"level": 3}, {"level": 2, "weight_only": "int8"},
                                     {"level": 2, "int8_dynamic": True}],
                         ids=["O2", "O3", "weights-int8", "int8-dynamic"])
@pytest.mark.parametrize("table", [16, 64])
def test_a_short_position_table_is_verified_by_a_multi_step_decode(table, options):
    model = _model(table)
    lossy = "weight_only" in options or "int8_dynamic" in options
    if lossy:  # judged by a next-token decode as long as the table allows: passed or refused on its tokens
        written = optcc.optimize(model, verify=False, **options).model
        with Verifier(optcc.ir.load(model)) as verifier:
            judged = verifier.check(optcc.ir.load(written), "int8")
            prompts = [feeds["input_ids"] for feeds in verifier.next_token_feeds]
        steps = min(NEXT_TOKEN_STEPS, table)  # as many as the table holds after the prompts (each of them)
        assert judged.next_token["CPUExecutionProvider"]["steps"] == steps, judged.describe()
        agreement = _next_token_agreement(model, written, prompts, steps)
        assert judged.status == ("passed" if agreement >= NEXT_TOKEN_AGREEMENT else "failed"), \
            (agreement, judged.describe())
        verification = judged.to_dict()
    else:
        result = optcc.optimize(model, **options)
        written, verification = result.model, result.report.verification
        assert verification["status"] == "passed", verification
    proved = bool(verification.get("proof")) and all(verification["proof"]["outputs"].values())
    assert (verification["decode_steps"] or 0) > 1 or (options == {"level": 2} and proved), verification
    if options == {"level": 2} and proved:  # the samples a proof spares must decode too
        with Verifier(model) as verifier:
            decoded = verifier.check(optcc.ir.load(written), "fp16")
        assert decoded.status == "passed" and decoded.decode_steps == DECODE_STEPS > 1, decoded
    # independently: the verifier's first sample decodes on both models, within the table
    (first,) = generate_inputs(optcc.ir.load(model), samples=1)
    want = _hand_decode(model, first, DECODE_STEPS)
    for step in want:
        _check_step(step, table)
    candidate = _session(written)
    reference = _session(model)
    for step in want:
        ref = reference.run(["logits"], step)[0]
        got = candidate.run(["logits"], step)[0]
        agree = float((np.argmax(ref[:, -1], -1) == np.argmax(got[:, -1], -1)).mean())
        assert agree == 1.0 or "weight_only" in options or "int8_dynamic" in options
