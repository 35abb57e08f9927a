"""Class scores with one step per input token (a masked language model's, a tagger's) are
judged per token by their top class, never by a CTC decode: a CTC decode merges repeated
tokens and drops those of the class it takes for the blank, so a flipped token can leave
the decoded line unchanged. The same judge decides weight-only, dynamic and static INT8,
and the verdict says which metric judged each output and why it was chosen. A CTC
recognizer reading a signal (an image) stays judged by its CTC decode."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import optcc
from optcc.numerics import task as tm
from optcc.numerics.task import DeferredOutputs, TaskJudge
from optcc.numerics.verify import task_rows_text

VOCAB, HIDDEN, STEPS = 12, 32, 24
# spikes of tokens between a filler token (0): on values alone, a CTC recognizer's posteriors
PATH = [0, 3, 0, 0, 7, 0, 5, 5, 0, 0, 9, 0, 0, 2, 0, 0, 4, 0, 0, 0, 11, 0, 6, 0]


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _posteriors(path: list[int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=0.3, size=(len(path), VOCAB))
    logits[np.arange(len(path)), path] += 6.0
    return _softmax(logits)[None].astype(np.float32)


def _confident_flips(ref: np.ndarray, got: np.ndarray) -> tuple[int, int]:
    """(confident positions whose top class changed, confident positions), counted in numpy."""
    ref2, got2 = ref.reshape(-1, ref.shape[-1]).astype(np.float64), got.reshape(-1, got.shape[-1])
    top = np.sort(_softmax(np.log(np.maximum(ref2, 1e-30))), -1)
    confident = top[:, -1] - top[:, -2] >= 0.1
    return int(((ref2.argmax(-1) != got2.argmax(-1)) & confident).sum()), int(confident.sum())


def test_per_token_scores_are_judged_per_token_where_a_ctc_decode_sees_nothing():
    ref = _posteriors(PATH)
    assert tm.choose_metric([ref], "mlm") == "ctc"  # the values alone read as CTC
    flipped = list(PATH)
    flipped[7] = 0  # "5 5" -> "5 0": the same CTC line (repeats merge), one token changed
    got = _posteriors(flipped, seed=1)
    assert tm.ctc_greedy(ref) == tm.ctc_greedy(got)
    by_values = TaskJudge({"mlm": [ref]}, {"mlm": [ref]})
    assert by_values.plan == {"mlm": "ctc"} and by_values({"mlm": [got]})["metrics"]["mlm:ctc_exact"]["deviation"] == 0
    judge = TaskJudge({"mlm": [ref]}, {"mlm": [ref]}, tokens={"mlm": "input_ids"})
    verdict = judge({"mlm": [got]})
    assert judge.plan == {"mlm": "argmax"}
    assert "one step per token of input 'input_ids'" in verdict["chosen"]["mlm"]["why"]
    flips, confident = _confident_flips(ref, got)
    row = verdict["metrics"]["mlm:argmax"]
    assert flips == 1 and row["items"] == confident
    assert row["deviation"] == pytest.approx(flips / confident) and row["passed"] is False


def _token_model(vocab: int = VOCAB, softmax: bool = True, seed: int = 0) -> onnx.ModelProto:
    """ids [N, T] -> Gather(table) -> MatMul(head [H, C]) + bias (-> Softmax): one row of
    class scores per token, each peaked at a class the token's embedding picks."""
    rng = np.random.default_rng(seed)
    table = rng.normal(size=(VOCAB, HIDDEN)).astype(np.float32)
    head = (np.linalg.pinv(table) @ (6.0 * np.eye(VOCAB)[:, :vocab] + rng.normal(scale=0.2, size=(VOCAB, vocab))))
    nodes = [helper.make_node("Gather", ["table", "ids"], ["h"]),
             helper.make_node("MatMul", ["h", "head"], ["hw"]),
             helper.make_node("Add", ["hw", "bias"], ["scores" if not softmax else "logits"])]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], ["scores"], axis=-1))
    graph = helper.make_graph(
        nodes, "tokens",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", "T"])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", "T", vocab])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(head.astype(np.float32), "head"),
         numpy_helper.from_array(np.zeros(vocab, np.float32), "bias")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _image_recognizer() -> onnx.ModelProto:
    """An image [N, 1, 8, STEPS] -> per column class scores [N, STEPS, C] through a Softmax:
    a recognizer's frames, read from a signal, not from tokens."""
    rng = np.random.default_rng(0)
    head = rng.normal(size=(8, VOCAB)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Squeeze", ["x", "one"], ["s"]),
         helper.make_node("Transpose", ["s"], ["t"], perm=[0, 2, 1]),
         helper.make_node("MatMul", ["t", "head"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["scores"], axis=-1)], "rec",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, STEPS])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", STEPS, VOCAB])],
        [numpy_helper.from_array(head, "head"), numpy_helper.from_array(np.array([1], np.int64), "one")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _feeds(count: int) -> list[dict[str, np.ndarray]]:
    return [{"ids": np.array([PATH[i:] + PATH[:i]], np.int64)} for i in range(count)]


def test_token_outputs_are_those_with_one_step_per_token_of_a_token_id_input():
    tokens, image = _token_model(), _image_recognizer()
    feeds = _feeds(3)
    outputs = {"scores": [_run(tokens, f) for f in feeds]}
    assert tm.token_outputs(ir.from_proto(tokens), feeds, outputs) == {"scores": "ids"}
    # exported time-major ([T, 1, C], an LSTM tagger's layout): the same steps, the same answer
    time_major = {"scores": [a.transpose(1, 0, 2) for a in outputs["scores"]]}
    assert tm.token_outputs(ir.from_proto(tokens), feeds, time_major) == {"scores": "ids"}
    pictures = [{"x": np.random.default_rng(i).random((1, 1, 8, STEPS), np.float32)} for i in range(3)]
    assert tm.token_outputs(ir.from_proto(image), pictures, {"scores": [_run(image, f) for f in pictures]}) == {}
    # a hidden state with one step per token is no class score: still an embedding
    hidden = {"scores": [np.random.default_rng(i).normal(size=(1, STEPS, HIDDEN)).astype(np.float32)
                         for i in range(3)]}
    assert tm.row_metrics(hidden, tokens={"scores": "ids"}) == {"scores": "embedding"}


@pytest.mark.parametrize("mode", ["weights", "dynamic", "static"])
def test_weight_only_dynamic_and_static_int8_judge_a_token_model_per_token(mode: str):
    model = _token_model()
    feeds = _feeds(10)
    options: dict = {"inputs": feeds}
    if mode == "weights":
        options["weight_only"] = "int4"
    elif mode == "dynamic":
        options["int8_dynamic"] = True
    else:
        options = {"int8_calibration": feeds, "int8_options": {"require_speedup": False}}
    result = optcc.optimize(model, allow_float_fallback=True, **options)
    task = result.report.verification["task"]
    assert task is not None and task["chosen"]["scores"]["metric"] == "argmax"
    assert "one step per token of input 'ids'" in task["chosen"]["scores"]["why"]
    assert "'scores' by argmax (" in result.report.verification["reference"]
    row = task["metrics"]["scores:argmax"]
    ref = np.concatenate([_run(model, f) for f in feeds])
    got = np.concatenate([_run(result.model, f) for f in feeds])
    flips, confident = _confident_flips(ref, got)
    assert row["items"] == confident and row["deviation"] == pytest.approx(flips / confident)


def test_two_class_tagger_emissions_are_judged_per_token():
    """A boundary tagger's two logits per token (a MatMul head): too narrow for an embedding,
    judged by the top class per token, not by SQNR alone."""
    model = _token_model(vocab=2, softmax=False)
    feeds = _feeds(4)
    outputs = {"scores": [_run(model, f) for f in feeds]}
    tokens = tm.token_outputs(ir.from_proto(model), feeds, outputs)
    heads = tm.projected_outputs(ir.from_proto(model))
    assert tm.choose_metric(outputs["scores"], "scores") == "sqnr"
    plan, why = tm.row_choices(outputs, heads=heads, tokens=tokens)
    assert plan == {"scores": "argmax"} and "classifier head" in why["scores"] and "'ids'" in why["scores"]
    assert tm.row_metrics(outputs, heads=heads) == {"scores": "sqnr"}  # no token evidence: values


def test_an_image_recognizer_stays_judged_by_its_ctc_decode():
    model = _image_recognizer()
    rng = np.random.default_rng(0)
    pictures = [{"x": rng.random((1, 1, 8, STEPS), np.float32)} for _ in range(3)]
    outputs = {"scores": [_run(model, f) for f in pictures]}
    tokens = tm.token_outputs(ir.from_proto(model), pictures, outputs)
    spikes = {"scores": [_posteriors(PATH, seed=s) for s in range(3)]}  # what a trained recognizer emits
    assert tokens == {} and tm.row_metrics(spikes, tokens=tokens) == {"scores": "ctc"}


def _sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    return float(10 * np.log10((ref ** 2).sum() / ((ref - got) ** 2).sum()))


def test_each_printed_task_row_is_the_rule_that_decided_it():
    rng = np.random.default_rng(0)
    ref = [rng.normal(size=(4, 5)).astype(np.float32) for _ in range(3)]
    noise = [r + rng.normal(scale=1e-6, size=r.shape).astype(np.float32) for r in ref]
    got = [r + rng.normal(scale=0.02, size=r.shape).astype(np.float32) for r in ref]
    db = _sqnr_db(np.concatenate(ref), np.concatenate(got))
    assert 25 < db < 60
    # the floor's margin rejects, the 25 dB target accepts: the text says the target decided
    verdict = TaskJudge({"y": ref}, {"y": noise}, metric="sqnr")({"y": got})
    row = verdict["metrics"]["y:sqnr"]
    assert row["passed"] and row["deviation"] > row["allowed"]
    text = task_rows_text(verdict, "y")
    assert text.startswith(f"sqnr {db:.3g} dB >= 25 dB target (") and " <= " not in text
    # the floor not measured (no judgement needs it): the target alone, no "None"
    deferred = DeferredOutputs(lambda: {"y": noise})
    verdict = TaskJudge({"y": ref}, deferred, metric="sqnr")({"y": got})
    text = task_rows_text(verdict, "y")
    assert not deferred.computed and "None" not in text and text.startswith(f"sqnr {db:.3g} dB >= 25 dB target")
    # within the floor's margin: the inequality printed holds
    verdict = TaskJudge({"y": ref}, {"y": got}, metric="sqnr")({"y": noise})
    row = verdict["metrics"]["y:sqnr"]
    assert row["deviation"] <= row["allowed"]
    want = f"sqnr {row['sqnr_db']:.3g} dB >= {-10 * np.log10(row['allowed']):.3g} dB allowed " \
        f"(floor {row['floor_sqnr_db']:.3g} dB)"
    assert task_rows_text(verdict, "y") == want


def test_an_sqnr_row_over_a_zero_floor_says_in_decibels_that_only_the_target_could_pass_it():
    """float32's outputs unmoved by input noise: a floor of 0 allows no noise, so a row
    below the target fails and says so in decibels, never as noise ratios against 0."""
    rng = np.random.default_rng(1)
    ref = [rng.normal(size=(4, 5)).astype(np.float32) for _ in range(3)]
    far = [r + rng.normal(scale=0.5, size=r.shape).astype(np.float32) for r in ref]
    near = [r + rng.normal(scale=0.01, size=r.shape).astype(np.float32) for r in ref]
    failed = TaskJudge({"y": ref}, {"y": ref}, metric="sqnr")({"y": far})["metrics"]["y:sqnr"]
    assert failed["floor"] == 0 and failed["passed"] is False
    db = _sqnr_db(np.concatenate(ref), np.concatenate(far))
    assert task_rows_text({"metrics": {"y:sqnr": failed}}, "y") == \
        f"sqnr {db:.3g} dB < 25 dB target (the floor allows no noise: float32's outputs did not move under input noise)"
    passed = TaskJudge({"y": ref}, {"y": ref}, metric="sqnr")({"y": near})["metrics"]["y:sqnr"]
    assert passed["floor"] == 0 and passed["passed"] is True
    assert task_rows_text({"metrics": {"y:sqnr": passed}}, "y").startswith(
        f"sqnr {_sqnr_db(np.concatenate(ref), np.concatenate(near)):.3g} dB >= 25 dB target (the floor allows no")


def test_a_rejected_token_model_says_which_metric_judged_it_and_why():
    model = _token_model()
    candidate = onnx.ModelProto()
    candidate.CopyFrom(model)
    head = next(t for t in candidate.graph.initializer if t.name == "head")
    weights = numpy_helper.to_array(head).copy()
    weights[:, [5, 6]] = weights[:, [6, 5]]  # every token 5 now reads as class 6, and 6 as 5
    head.CopyFrom(numpy_helper.from_array(weights, "head"))
    feeds = _feeds(10)
    with optcc.Verifier(model, inputs=feeds) as verifier:
        verification = verifier.check(ir.from_proto(candidate), "int8")
    ref = np.concatenate([_run(model, f) for f in feeds])
    flips, confident = _confident_flips(ref, np.concatenate([_run(candidate, f) for f in feeds]))
    row = verification.task["metrics"]["scores:argmax"]
    assert verification.status == "failed" and flips > 0 and row["deviation"] == pytest.approx(flips / confident)
    assert "judged 'scores' by argmax (one step per token of input 'ids'" in verification.reason


def test_a_recognizer_whose_blank_is_its_last_class_is_decoded_with_that_blank():
    """A CRNN that puts its blank last (the class filling most steps) and reads a '0' (class
    0) that the candidate loses: the line a user decodes, blank dropped, lost a character."""
    blank = VOCAB - 1
    path = [blank, 0, blank, blank, 4, blank, 7, 7, blank, blank, 2, blank] * 2
    lost = [blank if c == 0 else c for c in path]
    ref, got = _posteriors(path), _posteriors(lost, seed=1)
    assert tm.choose_metric([ref], "softmax") == "ctc"
    row = TaskJudge({"y": [ref]}, {"y": [ref]})({"y": [got]})["metrics"]
    want = [c for i, c in enumerate(path) if c != blank and (i == 0 or c != path[i - 1])]
    have = [c for i, c in enumerate(lost) if c != blank and (i == 0 or c != lost[i - 1])]
    assert want != have and len(want) - len(have) == 2
    assert row["y:ctc_exact"]["deviation"] == 1.0 and row["y:cer"]["deviation"] == pytest.approx(2 / len(want))
