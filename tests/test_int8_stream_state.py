"""A streaming model's state outputs (fed back as its state inputs on the next chunk, as
FSMN-VAD's out_cache/in_cache) are judged where the user sees them: in the next step's
answers, not by their own SQNR against a floor of ~1e-13. An error in the state alone
leaves the first step's answers as they were and shows in the second step's."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
import onnx_ir as ir
from onnx import TensorProto as TP

from optcc.numerics.decode import SECOND_STEP, stream_plan
from optcc.numerics.inputs import generate_inputs, input_roles
from optcc.numerics.state import state_pairs
from optcc.numerics.task import TaskJudge, perturb, perturbation_roles
from optcc.numerics.verify import Verifier
from optcc.quant.fallback import Target, evaluate, model_outputs

T, F, C = 12, 4, 3


def _weights(state_error: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((F, C)) * 4.0).astype(np.float32)  # peaked: most frames confident
    s = (rng.standard_normal((F, F)) * 0.5).astype(np.float32)
    s += state_error * np.eye(F, dtype=np.float32)  # the candidate's error: on the state path alone
    return {"w": w, "s": s}


def _stream(state_error: float = 0.0) -> onnx.ModelProto:
    """probs = softmax((x + in_state) @ w) per frame; out_state = mean_t(x) @ s."""
    weights = _weights(state_error)
    nodes = [oh.make_node("Add", ["x", "in_state"], ["xs"]), oh.make_node("MatMul", ["xs", "w"], ["logits"]),
             oh.make_node("Softmax", ["logits"], ["probs"], axis=-1),
             oh.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=1),
             oh.make_node("MatMul", ["m", "s"], ["out_state"])]
    graph = oh.make_graph(nodes, "stream", [oh.make_tensor_value_info("x", TP.FLOAT, [1, T, F]),
                                            oh.make_tensor_value_info("in_state", TP.FLOAT, [1, 1, F])],
                          [oh.make_tensor_value_info("probs", TP.FLOAT, [1, T, C]),
                           oh.make_tensor_value_info("out_state", TP.FLOAT, [1, "S", F])],
                          [nh.from_array(weights["w"], "w"), nh.from_array(weights["s"], "s"),
                           nh.from_array(np.array([1], np.int64), "axes")])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)])


def _numpy_steps(x: np.ndarray, state_error: float) -> tuple[np.ndarray, np.ndarray]:
    """Both steps' probabilities in float64, the second fed the first's state and ``x`` again."""
    weights = {k: v.astype(np.float64) for k, v in _weights(state_error).items()}

    def softmax(z: np.ndarray) -> np.ndarray:
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    x = x.astype(np.float64)
    first = softmax(x @ weights["w"])
    state = x.mean(1, keepdims=True) @ weights["s"]
    return first, softmax((x + state) @ weights["w"])


def _numpy_argmax_deviation(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    """1 - top-1 agreement over the frames whose reference top-1 leads the second by 0.1."""
    r, g = np.concatenate([a.reshape(-1, C) for a in ref]), np.concatenate([a.reshape(-1, C) for a in got])
    top = np.sort(r, -1)
    confident = top[:, -1] - top[:, -2] >= 0.1
    return float(np.mean(r.argmax(-1)[confident] != g.argmax(-1)[confident]))


def _samples(n: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    return [{"x": rng.standard_normal((1, T, F)).astype(np.float32), "in_state": np.zeros((1, 1, F), np.float32)}
            for _ in range(n)]


def test_state_pairs_from_names_dtype_and_shape():
    model = ir.from_proto(_stream())
    assert state_pairs(model) == {"in_state": "out_state"}
    assert input_roles(model) == {"x": "plain", "in_state": "state"}
    plan = stream_plan(model)
    assert plan is not None and plan.past_to_present == {"in_state": "out_state"}
    feeds = generate_inputs(model, samples=1)[0]
    assert np.array_equal(feeds["in_state"], np.zeros((1, 1, F), np.float32))  # a stream starts from zeros
    # a state moves by one ulp (a value computed in float), never as an 8-bit picture
    state = np.full((1, 1, F), 0.3, np.float32)
    moved, how = perturb({"in_state": state}, seed=1, **perturbation_roles(input_roles(model)))
    assert np.array_equal(np.abs(moved["in_state"] - state), np.spacing(state)) and how["in_state"] == "+-1 ulp"


def _io_model(inputs: list[tuple[str, int, list]], outputs: list[tuple[str, int, list]]) -> ir.Model:
    """A model with these inputs and outputs, each output an Identity of the first input."""
    nodes = [oh.make_node("Identity", [inputs[0][0]], [name]) for name, _, _ in outputs]
    graph = oh.make_graph(nodes, "io", [oh.make_tensor_value_info(*i) for i in inputs],
                          [oh.make_tensor_value_info(*o) for o in outputs])
    return ir.from_proto(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)]))


def test_names_without_a_state_word_or_shapes_that_differ_are_no_pair():
    image = [1, 3, 32, 32]
    assert state_pairs(_io_model([("input_image", TP.FLOAT, image)], [("output_image", TP.FLOAT, image)])) == {}
    assert state_pairs(_io_model([("in_cache", TP.FLOAT, [1, 8])], [("out_cache", TP.FLOAT, [1, 9])])) == {}
    assert state_pairs(_io_model([("state_in", TP.INT64, [1, 8])], [("state_out", TP.INT64, [1, 8])])) == {}
    assert state_pairs(_io_model([("h", TP.FLOAT, [1, 8])], [("next_h", TP.FLOAT, [1, "n"])])) == {"h": "next_h"}
    # camelCase words: Silero VAD's ``state`` comes back as ``stateN`` (N: new)
    silero = [2, "batch", 128]
    assert state_pairs(_io_model([("state", TP.FLOAT, silero)], [("stateN", TP.FLOAT, silero)])) == {"state": "stateN"}
    assert state_pairs(_io_model([("hiddenIn", TP.FLOAT, [1, 8])], [("hiddenOut", TP.FLOAT, [1, 8])])) == \
        {"hiddenIn": "hiddenOut"}
    # an LSTM's one-letter states with the side glued on: Silero v6's ``h``/``hn``, ``c``/``cn``
    lstm = [1, 1, 8]
    assert state_pairs(_io_model([("h", TP.FLOAT, lstm), ("c", TP.FLOAT, lstm)],
                                 [("hn", TP.FLOAT, lstm), ("cn", TP.FLOAT, lstm)])) == {"h": "hn", "c": "cn"}
    assert state_pairs(_io_model([("x", TP.FLOAT, lstm)], [("xn", TP.FLOAT, lstm)])) == {}  # x: no state word
    # a conv block's channel names: only a one-letter side word is glued on
    assert state_pairs(_io_model([("cin", TP.FLOAT, lstm), ("hin", TP.FLOAT, lstm)],
                                 [("cout", TP.FLOAT, lstm), ("hout", TP.FLOAT, lstm)])) == {}
    # the capital only separates words: ``staten`` is one word, no state's
    assert state_pairs(_io_model([("state", TP.FLOAT, silero)], [("staten", TP.FLOAT, silero)])) == {}
    assert state_pairs(_io_model([("imageIn", TP.FLOAT, [1, 8])], [("imageN", TP.FLOAT, [1, 8])])) == {}
    # two outputs could take the state back: neither is chosen
    assert state_pairs(_io_model([("cache", TP.FLOAT, [1, 8])],
                                 [("new_cache", TP.FLOAT, [1, 8]), ("cache_out", TP.FLOAT, [1, 8])])) == {}


def _verdict_rows(original: onnx.ModelProto, candidate: onnx.ModelProto, samples) -> dict:
    with Verifier(ir.from_proto(original), inputs=samples, task_metric="argmax") as verifier:
        verification = verifier.check(ir.from_proto(candidate), "int8")
    return verification.task["metrics"]


def test_an_error_in_the_state_alone_shows_in_the_second_step():
    samples = _samples()
    ref = [_numpy_steps(s["x"], 0.0) for s in samples]
    got = [_numpy_steps(s["x"], 1.5) for s in samples]
    expected = _numpy_argmax_deviation([r[1] for r in ref], [g[1] for g in got])
    assert expected > 0.05  # the state's error flips frames on the next chunk
    assert _numpy_argmax_deviation([r[0] for r in ref], [g[0] for g in got]) == 0.0
    rows = _verdict_rows(_stream(), _stream(1.5), samples)
    second = SECOND_STEP.format("probs")
    assert set(rows) == {"probs:argmax", f"{second}:argmax"}  # the state itself is not judged
    assert rows["probs:argmax"]["deviation"] == 0.0
    assert abs(rows[f"{second}:argmax"]["deviation"] - expected) < 1e-6
    assert rows[f"{second}:argmax"]["passed"] is False
    # the same model with the state's error far below any frame's margin passes both steps
    quiet = _verdict_rows(_stream(), _stream(1e-6), samples)
    assert all(row["passed"] for row in quiet.values()) and quiet[f"{second}:argmax"]["deviation"] == 0.0


def test_the_int8_pass_judges_the_second_step_too():
    samples = _samples()
    reference, candidate = ir.from_proto(_stream()), ir.from_proto(_stream(1.5))
    outputs = model_outputs(reference, samples)
    second = SECOND_STEP.format("probs")
    assert set(outputs) == {"probs", "out_state", second}
    for i, s in enumerate(samples):  # the float model's second step, against numpy's
        np.testing.assert_allclose(outputs[second][i], _numpy_steps(s["x"], 0.0)[1], rtol=1e-5, atol=1e-6)
    plan = stream_plan(reference)
    judge = TaskJudge(outputs, outputs, "argmax", state=set(plan.past_to_present.values()))
    verdict = evaluate(reference, candidate, samples, Target(judge=judge), optimized=False).task
    expected = _numpy_argmax_deviation([_numpy_steps(s["x"], 0.0)[1] for s in samples],
                                       [_numpy_steps(s["x"], 1.5)[1] for s in samples])
    assert set(verdict["metrics"]) == {"probs:argmax", f"{second}:argmax"}
    assert verdict["metrics"]["probs:argmax"]["deviation"] == 0.0
    assert abs(verdict["metrics"][f"{second}:argmax"]["deviation"] - expected) < 1e-6
    assert verdict["passed"] is False
