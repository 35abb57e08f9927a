"""A lossy result of a KV-cache decoder is judged by its next-token agreement over
``NEXT_TOKEN_STEPS`` steps per prompt, each step fed the original's greedy token: a
candidate whose argmax differs from the original's at more than 1% of the steps (a
decisive flip after the short decode's steps, found with a numpy float64 decode of both)
is refused, one that differs within 1% is accepted, whatever its free-running decode
(reported, not judged) does after the flip."""

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
from fixtures.attention_decoder import attention_nodes, numpy_attention
from optcc import ir as oir
from optcc.numerics.decode import (DECODE_STEPS, NEXT_TOKEN_AGREEMENT, NEXT_TOKEN_SEARCH_AGREEMENT, NEXT_TOKEN_STEPS,
                                   decode_plan)

VOCAB, WIDTH, PROMPT, ROWS = 24, 16, 4, 8
DECISIVE = 1e-2  # a top-1 margin (logits) far above float32's rounding of these logits


def _weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    return {"E": rng.normal(size=(VOCAB, WIDTH)), "Wq": rng.normal(size=(WIDTH, WIDTH)) * 0.5,
            "Wk": rng.normal(size=(WIDTH, WIDTH)) * 0.5, "Wv": rng.normal(size=(WIDTH, WIDTH)),
            "U": rng.normal(size=(WIDTH, VOCAB)) * 2}


def _decoder(weights: dict[str, np.ndarray], last_only: bool = False) -> onnx.ModelProto:
    """One attention layer over a KV cache: x = E[ids]; K, V = past ++ x Wk, x Wv;
    h = x + softmax(x Wq K^T / 4) V; logits = tanh(h) U ([B, S, VOCAB]; ``last_only``:
    the last position's alone, [B, VOCAB], as an export that returns only the next token's)."""
    nodes = [
        *attention_nodes(),
        oh.make_node("Tanh", ["h"], ["t"]),
    ]
    if last_only:
        nodes += [oh.make_node("Gather", ["t", "last"], ["t_last"], axis=1),
                  oh.make_node("MatMul", ["t_last", "U"], ["logits"])]
    else:
        nodes.append(oh.make_node("MatMul", ["t", "U"], ["logits"]))
    past = [oh.make_tensor_value_info(n, TP.FLOAT, ["B", "T", WIDTH]) for n in ("past_key", "past_value")]
    present = [oh.make_tensor_value_info(n, TP.FLOAT, ["B", "T2", WIDTH]) for n in ("present_key", "present_value")]
    graph = oh.make_graph(
        nodes, "decoder", [oh.make_tensor_value_info("input_ids", TP.INT64, ["B", "S"]), *past],
        [oh.make_tensor_value_info("logits", TP.FLOAT, ["B", VOCAB] if last_only else ["B", "S", VOCAB]),
         *present],
        [nh.from_array(w.astype(np.float32), name) for name, w in weights.items()]
        + [nh.from_array(np.array(0.25, np.float32), "scale"), nh.from_array(np.array(-1, np.int64), "last")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _numpy_decode(weights: dict[str, np.ndarray], prompt: np.ndarray, steps: int,
                  fed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The argmax of ``_decoder(weights)`` at each step, in float64 numpy (from its float32
    weights), and its top-1 margin: [rows, steps] each; each next step is fed the argmax
    (free-running) or, given ``fed`` ([rows, steps]), column ``i`` after step ``i``."""
    w = {name: v.astype(np.float32).astype(np.float64) for name, v in weights.items()}
    ids = prompt
    keys = values = np.zeros((prompt.shape[0], 0, WIDTH))
    tokens, margins = [], []
    for step in range(steps):
        h, keys, values = numpy_attention(w, ids, keys, values)
        logits = (np.tanh(h) @ w["U"])[:, -1]
        top2 = np.sort(logits, axis=-1)[:, -2:]
        tokens.append(logits.argmax(-1))
        margins.append(top2[:, 1] - top2[:, 0])
        ids = (tokens[-1] if fed is None else fed[:, step])[:, None]
    return np.stack(tokens, axis=1), np.stack(margins, axis=1)


def _prompt() -> dict[str, np.ndarray]:
    ids = np.random.default_rng(2).integers(0, VOCAB, (ROWS, PROMPT))
    empty = np.zeros((ROWS, 0, WIDTH), np.float32)
    return {"input_ids": ids.astype(np.int64), "past_key": empty, "past_value": empty}


def _moved(weights: dict[str, np.ndarray], scale: float, seed: int) -> dict[str, np.ndarray]:
    """The weights with ``U`` moved by ``scale`` times a random normal matrix (a lossy rewrite)."""
    rng = np.random.default_rng(seed)
    return {**weights, "U": weights["U"] + scale * rng.normal(size=weights["U"].shape)}


def _flipping(weights: dict[str, np.ndarray], want: np.ndarray, flips: range) -> tuple[dict, np.ndarray, np.ndarray]:
    """A move of ``U`` whose float64 decode fed the original's tokens ``want`` differs from
    them at a number of steps in ``flips``, none before the short decode's last step, every
    step of it and of its free-running decode decisive (top-1 margin above ``DECISIVE``):
    the move, its forced argmax and its free-running tokens."""
    prompt = _prompt()["input_ids"]
    for seed in range(400):
        for scale in (0.005, 0.01, 0.02, 0.05):
            moved = _moved(weights, scale, seed)
            forced, margins = _numpy_decode(moved, prompt, NEXT_TOKEN_STEPS, fed=want)
            differs = forced != want
            if int(differs.sum()) not in flips or differs[:, :DECODE_STEPS].any() or margins.min() < DECISIVE:
                continue
            free, free_margins = _numpy_decode(moved, prompt, NEXT_TOKEN_STEPS)
            if free_margins.min() >= DECISIVE:
                return moved, forced, free
    raise AssertionError(f"no move of U flips {flips} decisive steps")


@pytest.fixture(scope="module")
def reference() -> tuple[dict[str, np.ndarray], np.ndarray]:
    weights = _weights()
    want, margins = _numpy_decode(weights, _prompt()["input_ids"], NEXT_TOKEN_STEPS)
    assert margins.min() >= DECISIVE  # the original's own tokens are no near-ties
    return weights, want


def _allowed() -> int:
    """The most differing steps the check accepts over ``_prompt``'s rows."""
    return int((1 - NEXT_TOKEN_AGREEMENT) * ROWS * NEXT_TOKEN_STEPS + 1e-9)


@pytest.mark.parametrize("last_only", [False, True], ids=["logits-per-position", "last-logits"])
@pytest.mark.parametrize("numerics", ["int8", "fp16"])
def test_flips_beyond_one_percent_of_the_steps_are_refused(reference, numerics: str, last_only: bool) -> None:
    weights, want = reference
    moved, forced, _ = _flipping(weights, want, range(_allowed() + 1, _allowed() + 4))
    verification = optcc.verify(_decoder(weights, last_only), _decoder(moved, last_only), numerics=numerics,
                                inputs=[_prompt()])
    assert verification.status == "failed", verification.describe()
    judged = verification.next_token["CPUExecutionProvider"]
    # the decode stops at the step where more steps than allowed differ: the later ones cannot undo it
    cumulative = (forced != want).sum(axis=0).cumsum()
    last = int(np.argmax(cumulative > _allowed())) + 1
    assert judged["steps"] == NEXT_TOKEN_STEPS and judged["tokens"] == ROWS * last
    assert judged["differing"] == int(cumulative[last - 1]) == int((forced[:, :last] != want[:, :last]).sum())
    assert judged["agreement"] == pytest.approx(float((forced[:, :last] == want[:, :last]).mean()))
    assert last == NEXT_TOKEN_STEPS or judged["stopped"].startswith(f"after step {last} of {NEXT_TOKEN_STEPS}")
    assert "next tokens on CPUExecutionProvider" in verification.reason
    assert all(o.passed for o in verification.outputs)  # the short decode sees no flip: the tokens decide


@pytest.mark.parametrize("last_only", [False, True], ids=["logits-per-position", "last-logits"])
@pytest.mark.parametrize("numerics", ["int8", "fp16"])
def test_flips_within_one_percent_are_accepted_whatever_the_free_running_decode(reference, numerics: str,
                                                                                 last_only: bool) -> None:
    weights, want = reference
    moved, forced, free = _flipping(weights, want, range(1, _allowed() + 1))
    verification = optcc.verify(_decoder(weights, last_only), _decoder(moved, last_only), numerics=numerics,
                                inputs=[_prompt()])
    assert verification.status == "passed", verification.describe()
    judged = verification.next_token["CPUExecutionProvider"]
    assert judged["differing"] == int((forced != want).sum()) > 0
    free_run = verification.free_running["CPUExecutionProvider"]  # reported, not judged
    assert free_run["agreement"] == pytest.approx(float((free == want).mean()))
    assert free_run["first_divergence"] == [int(np.argmax(row)) if row.any() else NEXT_TOKEN_STEPS
                                            for row in free != want]
    assert free_run["agreement"] < judged["agreement"]  # a flip changes the rest of its row


def test_generated_prompts_leave_room_for_the_next_token_decode(reference) -> None:
    weights, _ = reference
    verification = optcc.verify(_decoder(weights), _decoder(_moved(weights, 1e-4, 0)), numerics="int8")
    judged = verification.next_token["CPUExecutionProvider"]
    assert verification.status == "passed" and judged["steps"] == NEXT_TOKEN_STEPS
    assert judged["agreement"] == 1.0 and verification.free_running["CPUExecutionProvider"]["agreement"] == 1.0


def test_the_decode_stops_once_the_candidate_cannot_pass(reference) -> None:
    """Prompts one row each, those with the most flips first: once more steps differ than
    1% of all the prompts' steps, the prompts left are not decoded."""
    weights, want = reference
    moved, forced, _ = _flipping(weights, want, range(_allowed() + 1, _allowed() + 4))
    flips = (forced != want).sum(axis=1)
    order = [int(row) for row in np.argsort(-flips, kind="stable")]
    judged_rows = int(np.argmax(np.cumsum(flips[order]) > _allowed())) + 1
    prompt = _prompt()
    samples = [{k: v[row:row + 1] for k, v in prompt.items()} for row in order]
    verification = optcc.verify(_decoder(weights), _decoder(moved), numerics="int8", inputs=samples)
    judged = verification.next_token["CPUExecutionProvider"]
    assert verification.status == "failed"
    # the last prompt judged stops at the step where more steps than allowed differ
    before = int(flips[order[:judged_rows - 1]].sum())
    last_row = (forced[order[judged_rows - 1]] != want[order[judged_rows - 1]]).cumsum()
    last = int(np.argmax(before + last_row > _allowed())) + 1
    assert judged["tokens"] == (judged_rows - 1) * NEXT_TOKEN_STEPS + last < ROWS * NEXT_TOKEN_STEPS
    assert judged["rows"] == judged_rows
    at = f"step {last} of {NEXT_TOKEN_STEPS} of prompt {judged_rows}" if last < NEXT_TOKEN_STEPS else judged_rows
    assert judged["stopped"].startswith(f"after {at} of {ROWS} prompts")
    assert judged["differing"] == before + int(last_row[last - 1]) == _allowed() + 1
    assert verification.free_running is None  # a check that stopped runs no free-running decode
    # its agreement is said to be over the steps compared before it stopped, not over all of them
    total = ROWS * NEXT_TOKEN_STEPS
    for text in (verification.describe(), verification.reason):  # said once, in the reason's words
        assert (f"next tokens on CPUExecutionProvider: stopped after {at} of {ROWS} prompts: {_allowed() + 1} "
                f"of all {total} steps differ, more than the {_allowed()} allowed") in text, text
        assert f"{judged['agreement']:.1%} as the original's over the {judged['tokens']} steps compared " \
            "before it stopped" in text, text
        assert f"of {judged['tokens']} steps as the original's" not in text, text
        assert text.count("next tokens on") == 1, text


def test_a_candidate_failing_on_the_first_prompt_leaves_the_other_prompts_undecoded(reference, monkeypatch) -> None:
    """The original's own decode runs on the first prompt alone until a candidate reaches
    the second: a candidate refused within the first costs no decode of the others, by
    either model."""
    weights, want = reference
    moved = {**weights, "U": -weights["U"]}  # the least likely token first: nearly every step differs
    forced, _ = _numpy_decode(moved, _prompt()["input_ids"], NEXT_TOKEN_STEPS, fed=want)
    prompt = _prompt()
    samples = [{k: v[row:row + 1] for k, v in prompt.items()} for row in range(ROWS)]
    verify_module = sys.modules["optcc.numerics.verify"]
    greedy, forced_decode = verify_module.greedy_tokens, verify_module.forced_tokens
    decoded: list[tuple[str, int]] = []  # per decode: whose, and its prompt's first token id

    def original_decode(run, names, plan, first, steps):  # noqa: ANN001, ANN202
        decoded.append(("original", int(first["input_ids"][0, 0])))
        return greedy(run, names, plan, first, steps)

    def candidate_decode(run, names, plan, first, tokens, allowed=None):  # noqa: ANN001, ANN202
        decoded.append(("candidate", int(first["input_ids"][0, 0])))
        return forced_decode(run, names, plan, first, tokens, allowed)

    monkeypatch.setattr(verify_module, "greedy_tokens", original_decode)
    monkeypatch.setattr(verify_module, "forced_tokens", candidate_decode)
    verification = optcc.verify(_decoder(weights), _decoder(moved), numerics="int8", inputs=samples)
    judged = verification.next_token["CPUExecutionProvider"]
    first_id = int(prompt["input_ids"][0, 0])
    assert verification.status == "failed" and decoded == [("original", first_id), ("candidate", first_id)]
    # the numpy decode of the first row: the check stops at the step past the 1% allowed of all 8 rows
    last = int(np.argmax(np.cumsum(forced[0] != want[0]) > _allowed())) + 1
    assert judged["tokens"] == last < NEXT_TOKEN_STEPS and judged["differing"] == _allowed() + 1
    assert judged["stopped"].startswith(f"after step {last} of {NEXT_TOKEN_STEPS} of prompt 1 of {ROWS} prompts")


def _with_hidden(weights: dict[str, np.ndarray], factor: float) -> onnx.ModelProto:
    """``_decoder`` with one more output, ``hidden = h * factor`` (after the logits)."""
    model = _decoder(weights)
    model.graph.node.append(oh.make_node("Mul", ["h", "factor"], ["hidden"]))
    model.graph.initializer.append(nh.from_array(np.array(factor, np.float32), "factor"))
    model.graph.output.append(oh.make_tensor_value_info("hidden", TP.FLOAT, ["B", "S", WIDTH]))
    return model


@pytest.mark.parametrize("numerics", ["int8", "fp16"])
def test_an_output_that_is_not_the_logits_or_the_cache_keeps_its_tolerance(reference, numerics: str) -> None:
    weights, _ = reference
    # the hidden output doubled, the logits and cache the original's: only its tolerance can refuse it
    verification = optcc.verify(_with_hidden(weights, 1.0), _with_hidden(weights, 2.0), numerics=numerics,
                                inputs=[_prompt()])
    assert verification.status == "failed", verification.describe()
    assert "'hidden'" in verification.reason and "next tokens" not in verification.reason
    unchanged = optcc.verify(_with_hidden(weights, 1.0), _with_hidden(weights, 1.0), numerics=numerics,
                             inputs=[_prompt()])
    assert unchanged.status == "passed", unchanged.describe()
    assert unchanged.next_token["CPUExecutionProvider"]["agreement"] == 1.0


def test_a_metric_of_the_users_judges_a_decoder_instead_of_the_tokens(reference) -> None:
    weights, want = reference
    moved, forced, _ = _flipping(weights, want, range(1, _allowed() + 1))  # the tokens would accept it

    def exact(ref, got) -> float:  # accepts only the original's logits
        return -max(float(np.abs(np.asarray(r, np.float64) - np.asarray(g, np.float64)).max())
                    for r, g in zip(ref["logits"], got["logits"]))

    verification = optcc.verify(_decoder(weights), _decoder(moved), numerics="int8", inputs=[_prompt()],
                                task_metric=exact, task_margin=1.0)
    assert verification.status == "failed", verification.describe()
    assert verification.next_token is None and verification.task is not None
    assert int((forced != want).sum()) >= 1


def _length_limited(weights: dict[str, np.ndarray], rows: int) -> onnx.ModelProto:
    """``_decoder`` that reads a row of a zero table at the cache's length less one (the same
    logits): onnxruntime refuses a step whose cache is longer than ``rows``."""
    model = _decoder(weights)
    limit = [
        oh.make_node("Shape", ["present_key"], ["key_shape"]),
        oh.make_node("Gather", ["key_shape", "length_axis"], ["length"], axis=0),
        oh.make_node("Sub", ["length", "one"], ["last_row"]),
        oh.make_node("Gather", ["rows", "last_row"], ["row"], axis=0),
        oh.make_node("Add", ["h", "row"], ["h_read"]),
    ]
    tanh = next(i for i, n in enumerate(model.graph.node) if n.op_type == "Tanh")
    model.graph.node[tanh].input[0] = "h_read"
    for offset, node in enumerate(limit):
        model.graph.node.insert(tanh + offset, node)
    model.graph.initializer.extend([nh.from_array(np.array(1, np.int64), "length_axis"),
                                    nh.from_array(np.array(1, np.int64), "one"),
                                    nh.from_array(np.zeros((rows, WIDTH), np.float32), "rows")])
    onnx.checker.check_model(model)
    return model


def test_an_original_whose_next_token_decode_cannot_run_leaves_the_result_unverified(reference) -> None:
    weights, want = reference
    rows = PROMPT + DECODE_STEPS + 2  # room for the short decode's steps, not for the next-token decode's
    original = _length_limited(weights, rows)
    moved, _, _ = _flipping(weights, want, range(1, _allowed() + 1))  # a candidate the tokens would accept
    verification = optcc.verify(original, _decoder(moved), numerics="int8", inputs=[_prompt()])
    assert verification.status == "skipped", verification.describe()
    assert "original's next-token decode" in verification.reason and verification.next_token is None
    assert "out of" in verification.reason, verification.reason  # onnxruntime's own words, as below
    # the original itself, as written here: it runs the short decode and refuses a longer one
    session = ort.InferenceSession(original.SerializeToString(), providers=["CPUExecutionProvider"])
    fed = _prompt()
    for step in range(NEXT_TOKEN_STEPS):
        if PROMPT + step > rows:
            with pytest.raises(Exception, match="out of"):
                session.run(None, fed)
            break
        logits, key, value = session.run(None, fed)
        np.testing.assert_array_equal(logits[:, -1].argmax(-1), want[:, step])
        fed = {"input_ids": want[:, step:step + 1].astype(np.int64), "past_key": key, "past_value": value}
    assert PROMPT + step > rows > PROMPT + DECODE_STEPS
    # the other way round: the candidate's decode that cannot run fails it
    failed = optcc.verify(_decoder(weights), _length_limited(weights, rows), numerics="int8", inputs=[_prompt()])
    assert failed.status == "failed" and "optimized model's next-token decode" in failed.reason, failed.describe()


def test_a_search_is_held_to_fewer_differing_steps_than_the_result(reference) -> None:
    """``Verifier.held_apart`` (the mixed search's check) refuses a candidate whose flips, on
    its own prompts, lie between its share and 1% of the steps; fed those very prompts, the
    verification's rule (``NEXT_TOKEN_AGREEMENT``) accepts it. Flips counted with numpy float64."""
    weights, _ = reference
    with optcc.Verifier(optcc.ir.load(_decoder(weights))) as verifier:
        apart = verifier.held_apart()
        prompts = [feeds["input_ids"] for feeds in apart.next_token_feeds]
        steps = sum(p.shape[0] for p in prompts) * NEXT_TOKEN_STEPS
        allowed = {share: int((1 - share) * steps + 1e-9) for share in (NEXT_TOKEN_SEARCH_AGREEMENT,
                                                                       NEXT_TOKEN_AGREEMENT)}
        assert allowed[NEXT_TOKEN_SEARCH_AGREEMENT] < allowed[NEXT_TOKEN_AGREEMENT]
        wants = [_numpy_decode(weights, p, NEXT_TOKEN_STEPS) for p in prompts]
        clear = DECISIVE / 10  # a top-1 margin still far above float32's rounding of these logits
        assert min(m.min() for _, m in wants) >= clear
        moved = None
        for seed in range(400):
            for scale in (0.005, 0.01, 0.02):
                candidate = _moved(weights, scale, seed)
                decoded = [_numpy_decode(candidate, p, NEXT_TOKEN_STEPS, fed=w) for p, (w, _) in zip(prompts, wants)]
                flips = sum(int((f != w).sum()) for (f, _), (w, _) in zip(decoded, wants))
                if allowed[NEXT_TOKEN_SEARCH_AGREEMENT] < flips <= allowed[NEXT_TOKEN_AGREEMENT] \
                        and min(m.min() for _, m in decoded) >= clear:
                    moved = candidate
                    break
            if moved is not None:
                break
        assert moved is not None, "no move of U flips between the two shares' allowances"
        refused = apart.check(optcc.ir.load(_decoder(moved)), "int8")
    assert refused.status == "failed", refused.describe()
    # (the check stops once more steps differ than its share allows)
    assert allowed[NEXT_TOKEN_SEARCH_AGREEMENT] < refused.next_token["CPUExecutionProvider"]["differing"] <= flips
    assert f"at least {NEXT_TOKEN_SEARCH_AGREEMENT:.1%} needed" in refused.reason
    samples = [{**feeds} for feeds in apart.next_token_feeds]
    accepted = optcc.verify(_decoder(weights), _decoder(moved), numerics="int8", inputs=samples)
    assert accepted.status == "passed", accepted.describe()
    assert accepted.next_token["CPUExecutionProvider"]["differing"] == flips


def test_the_search_never_judges_the_users_prompts(reference) -> None:
    """With the user's prompts, ``held_apart`` decodes generated ones: the verification's
    check of the user's prompts judges prompts the search did not choose on."""
    weights, _ = reference
    user = _prompt()
    with optcc.Verifier(optcc.ir.load(_decoder(weights)), inputs=[user]) as verifier:
        assert [f["input_ids"].tolist() for f in verifier.next_token_feeds] == [user["input_ids"].tolist()]
        apart = verifier.held_apart()
        assert apart is not verifier and not apart.user_samples
        searched = {tuple(row) for feeds in apart.next_token_feeds for row in feeds["input_ids"].tolist()}
    assert len(searched) > ROWS and not searched & {tuple(row) for row in user["input_ids"].tolist()}


def test_a_pooled_output_before_the_logits_is_not_taken_for_them(reference) -> None:
    """Of a decoder's float outputs, the logits over every position decide the next token
    where the model has them; a [B, WIDTH] output before them is another output."""
    weights, _ = reference
    model = _decoder(weights)
    model.graph.node.append(oh.make_node("ReduceMean", ["h"], ["pooled"], axes=[1], keepdims=0))
    model.graph.output.insert(0, oh.make_tensor_value_info("pooled", TP.FLOAT, ["B", WIDTH]))
    plan = decode_plan(oir.load(model))
    assert plan is not None and plan.logits == "logits"
    assert decode_plan(oir.load(_decoder(weights, last_only=True))).logits == "logits"
    # [batch, vocab] logits beside a pooled [batch, hidden] output: which is which is not known
    last_only = _decoder(weights, last_only=True)
    last_only.graph.node.append(oh.make_node("ReduceMean", ["h"], ["pooled"], axes=[1], keepdims=0))
    last_only.graph.output.insert(0, oh.make_tensor_value_info("pooled", TP.FLOAT, ["B", WIDTH]))
    assert decode_plan(oir.load(last_only)) is None
