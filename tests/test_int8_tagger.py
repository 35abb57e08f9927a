"""A tagger's per-token class scores ``[N, T, C]`` (emissions from a classifier head: a
MatMul onto fewer columns, plus a bias) are judged by their tag per token (``argmax`` on the
confident tokens), what the user reads; hidden states ``[N, T, H]`` (ending in a
normalization) stay embeddings, judged pooled."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
import onnx_ir as ir
from onnx import TensorProto as TP

from optcc.numerics.task import TaskJudge, projected_outputs
from optcc.quant.driver import quantize_int8
from reference import expected_outputs_float64

VOCAB, WIDTH, HIDDEN, TAGS, TOKENS = 50, 24, 64, 12, 16


def _encoder(head: str) -> onnx.ModelProto:
    """token ids -> embedding table -> MatMul/Relu -> ``head``: "tags" (MatMul onto TAGS
    columns + bias, behind an Identity: a tagger's emissions), "hidden" (LayerNormalization:
    hidden states), or "wide" (MatMul onto more columns than it reads: no classifier head)."""
    rng = np.random.default_rng(0)
    inits = [nh.from_array(rng.standard_normal((VOCAB, WIDTH)).astype(np.float32), "table"),
             nh.from_array((rng.standard_normal((WIDTH, HIDDEN)) / np.sqrt(WIDTH)).astype(np.float32), "w1")]
    nodes = [oh.make_node("Gather", ["table", "ids"], ["e"]), oh.make_node("MatMul", ["e", "w1"], ["h0"]),
             oh.make_node("Relu", ["h0"], ["h"])]
    if head == "tags":
        # scaled so that most tokens' top tag is clear (a trained tagger's emissions are)
        inits += [nh.from_array((rng.standard_normal((HIDDEN, TAGS)) * 1.5).astype(np.float32), "w2"),
                  nh.from_array(rng.standard_normal(TAGS).astype(np.float32), "b2")]
        nodes += [oh.make_node("MatMul", ["h", "w2"], ["s0"]), oh.make_node("Add", ["s0", "b2"], ["s"]),
                  oh.make_node("Identity", ["s"], ["out"])]
        width = TAGS
    elif head == "hidden":
        inits += [nh.from_array(np.ones(HIDDEN, np.float32), "gamma"), nh.from_array(np.zeros(HIDDEN, np.float32), "beta")]
        nodes += [oh.make_node("LayerNormalization", ["h", "gamma", "beta"], ["out"], axis=-1)]
        width = HIDDEN
    else:
        inits += [nh.from_array((rng.standard_normal((HIDDEN, 2 * HIDDEN)) * 1.5).astype(np.float32), "w2")]
        nodes += [oh.make_node("MatMul", ["h", "w2"], ["out"])]
        width = 2 * HIDDEN
    graph = oh.make_graph(nodes, head, [oh.make_tensor_value_info("ids", TP.INT64, [1, TOKENS])],
                          [oh.make_tensor_value_info("out", TP.FLOAT, [1, TOKENS, width])], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


def _samples(count: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"ids": rng.integers(0, VOCAB, (1, TOKENS))} for _ in range(count)]


def test_a_classifier_head_is_found_and_hidden_states_are_not():
    assert projected_outputs(ir.from_proto(_encoder("tags"))) == {"out"}
    assert projected_outputs(ir.from_proto(_encoder("hidden"))) == set()
    assert projected_outputs(ir.from_proto(_encoder("wide"))) == set()  # onto more columns: no classes


def test_emissions_are_judged_per_token_and_hidden_states_pooled():
    chosen = {}
    for head in ("tags", "hidden", "wide"):
        model = _encoder(head)
        outputs = {"out": [expected_outputs_float64(model, f)[0].astype(np.float32) for f in _samples(4)]}
        judge = TaskJudge(outputs, outputs, heads=projected_outputs(ir.from_proto(model)))
        chosen[head] = judge.metric_names()["out"]
    assert chosen == {"tags": "argmax", "hidden": "embedding", "wide": "embedding"}


def test_a_changed_tag_counts_per_token():
    """One confident token's tag changed: 1 error over the confident tokens, which a pooled
    embedding comparison (the choice before) hardly sees."""
    model = _encoder("tags")
    ref = [expected_outputs_float64(model, f)[0].astype(np.float32) for f in _samples(4)]
    got = [r.copy() for r in ref]
    scores = got[2][0, 5]
    scores[np.argsort(scores)[-2]] = scores.max() + 1.0  # the runner-up tag wins on token 5
    judge = TaskJudge({"out": ref}, {"out": ref}, heads={"out"})
    row = judge({"out": got})["metrics"]["out:argmax"]
    rows = np.concatenate([r[0].astype(np.float64) for r in ref])
    p = np.exp(rows - rows.max(-1, keepdims=True))
    p = np.sort(p / p.sum(-1, keepdims=True), -1)
    confident = int(np.count_nonzero(p[:, -1] - p[:, -2] >= 0.1))
    assert row["items"] == confident and row["deviation"] == 1 / confident
    pooled = TaskJudge({"out": ref}, {"out": ref})({"out": got})["metrics"]["out:cosine"]  # no head known
    assert pooled["passed"] is True  # a pooled comparison accepts the wrong tag


def test_int8_judges_a_tagger_on_its_tags():
    """The INT8 driver finds the head in the graph: its acceptance is by tag per token; token
    ids do not move, so float32's floor is 0."""
    _, stats = quantize_int8(_encoder("tags"), _samples(40), metric="auto", require_speedup=False)
    assert stats["acceptance"]["metrics"] == {"out": "argmax"}
    assert stats["acceptance"]["floor"] == {"out": {"argmax": 0.0}} and stats["acceptance"]["perturbation"] == {}
