"""The automatic INT8 metric on outputs whose shape alone misleads: a sentence encoder's
pooled ``[N, D]`` output is judged as an embedding (cosine and the ranking of pair
similarities), not as class scores, when its name says so, its rows have length 1, or a
``[N, T, D]`` embedding output stands beside it; a classifier's ``[N, C]`` logits stay ``argmax``; a ``[N, C]``
output whose width changes between samples, or that the model declares symbolic, is a
sequence, judged by SQNR. The judged cosine and SQNR are checked against numpy."""

from __future__ import annotations

import numpy as np
import pytest

from optcc.numerics import task as tm


def _encoder_outputs(n: int = 6, t: int = 5, d: int = 16, seed: int = 0) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    tokens = [rng.standard_normal((1, t, d)).astype(np.float32) for _ in range(n)]
    return {"token_embeddings": tokens, "pooled": [x.mean(1) for x in tokens]}


def _judge(reference: dict, metric: object = "auto") -> tm.TaskJudge:
    moved = {k: [v + np.float32(1e-6) for v in vs] for k, vs in reference.items()}
    return tm.TaskJudge(reference, moved, metric=metric)


def test_a_pooled_output_beside_token_embeddings_is_an_embedding() -> None:
    judge = _judge(_encoder_outputs())
    assert judge.metric_names() == {"token_embeddings": "embedding", "pooled": "embedding"}


@pytest.mark.parametrize("name", ["sentence_embedding", "pooler_output", "image_features"])
def test_a_vector_named_as_one_is_an_embedding(name: str) -> None:
    outputs = {name: _encoder_outputs()["pooled"]}
    judge = _judge(outputs)
    assert judge.metric_names() == {name: "embedding"}
    got = {name: [v * 0.9 + 0.05 for v in outputs[name]]}
    verdict = judge(got)
    ref, new = np.concatenate(outputs[name]).astype(np.float64), np.concatenate(got[name]).astype(np.float64)
    cosine = np.sum(ref * new, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(new, axis=1))
    assert verdict["metrics"][f"{name}:cosine"]["deviation"] == pytest.approx(1 - cosine.mean(), rel=1e-5)


def test_logits_stay_a_classifier_and_the_user_metric_wins() -> None:
    rng = np.random.default_rng(1)
    logits = {"logits": [rng.standard_normal((1, 16)).astype(np.float32) * 5 for _ in range(6)]}
    assert _judge(logits).metric_names() == {"logits": "argmax"}
    both = {**_encoder_outputs(), "logits": logits["logits"]}  # as wide as the tokens, but named logits
    assert _judge(both).metric_names() == {"token_embeddings": "embedding", "pooled": "embedding", "logits": "argmax"}
    assert _judge(both, metric={"pooled": "argmax"}).metric_names()["pooled"] == "argmax"


def test_an_l2_normalized_vector_is_an_embedding_whatever_its_name() -> None:
    """A face or image encoder's ``[N, D]`` output ("output", "516"...) with rows of length
    1 is compared by cosine, not by its largest entry; probabilities stay a classifier, even
    one-hot ones (length 1 as well), and so do unnormalized logits and narrow vectors."""
    rng = np.random.default_rng(3)
    raw = [rng.standard_normal((2, 128)) for _ in range(6)]
    unit = {"output": [(v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32) for v in raw]}
    assert _judge(unit).metric_names() == {"output": "embedding"}
    got = {"output": [v + np.float32(0.01) * rng.standard_normal(v.shape).astype(np.float32) for v in unit["output"]]}
    ref, new = np.concatenate(unit["output"]).astype(np.float64), np.concatenate(got["output"]).astype(np.float64)
    cosine = np.sum(ref * new, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(new, axis=1))
    assert _judge(unit)(got)["metrics"]["output:cosine"]["deviation"] == pytest.approx(1 - cosine.mean(), rel=1e-5)
    one_hot = {"output": [np.eye(16, dtype=np.float32)[[i % 16, (i + 3) % 16]] for i in range(6)]}
    logits = {"output": [v[:, :16].astype(np.float32) * 4 for v in raw]}
    narrow = {"output": [np.array([[0.28, 0.96]], np.float32)] * 6}  # unit length, but 2 entries: no embedding
    for case in (one_hot, logits, narrow):
        assert _judge(case).metric_names() == {"output": "argmax"}
    mixed = {"output": [*unit["output"][:5], unit["output"][5] * np.float32(2)]}  # one sample's rows not unit
    assert _judge(mixed).metric_names() == {"output": "sqnr"}  # no embedding; confident nowhere: no classes


def test_a_width_that_changes_between_samples_is_no_set_of_classes() -> None:
    """A recognizer's per-step confidence ``[1, T]`` with T following the line's width is a
    sequence: judged by SQNR (summed over the samples, checked here), not by its argmax."""
    rng = np.random.default_rng(2)
    steps = {"conf": [rng.uniform(0.5, 1.0, (1, t)).astype(np.float32) for t in (9, 12, 9, 15)]}
    judge = _judge(steps)
    assert judge.metric_names() == {"conf": "sqnr"}
    got = {"conf": [v * np.float32(0.99) for v in steps["conf"]]}
    row = judge(got)["metrics"]["conf:sqnr"]
    signal = sum(float(np.sum(v.astype(np.float64) ** 2)) for v in steps["conf"])
    noise = sum(float(np.sum((v.astype(np.float64) - g) ** 2)) for v, g in zip(steps["conf"], got["conf"]))
    assert row["deviation"] == pytest.approx(noise / signal, rel=1e-4)
    fixed = {"logits": [rng.standard_normal((1, 9)).astype(np.float32) for _ in range(4)]}
    assert _judge(fixed).metric_names() == {"logits": "argmax"}


def test_a_width_the_model_declares_symbolic_is_a_sequence() -> None:
    """Fixed-width inputs give every sample the same T: the declared ``[B, T]`` output shape
    (``sequence_outputs``) still says it is per-step values, not classes."""
    import onnx_ir as ir
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceMax", ["x"], ["conf"], axes=[1], keepdims=0),
         helper.make_node("Flatten", ["x"], ["scores"], axis=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 5, "T"])],
        [helper.make_tensor_value_info("conf", TensorProto.FLOAT, ["B", "T"]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["B", 40])])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert tm.sequence_outputs(model) == {"conf"}
    rng = np.random.default_rng(3)
    outputs = {"conf": [rng.uniform(0.5, 1, (1, 8)).astype(np.float32) for _ in range(4)],
               "scores": [rng.standard_normal((1, 40)).astype(np.float32) for _ in range(4)]}
    moved = {k: [v + np.float32(1e-6) for v in vs] for k, vs in outputs.items()}
    judge = tm.TaskJudge(outputs, moved, sequences=tm.sequence_outputs(model))
    assert judge.metric_names() == {"conf": "sqnr", "scores": "argmax"}


def test_a_pooled_vector_the_model_declares_symbolic_is_still_an_embedding() -> None:
    """paraphrase-MiniLM-L3's export declares its pooled ``[N, 384]`` output ``[dim_0,
    dim_1]``: beside a ``[N, T, 384]`` embedding its width is the hidden size, so it is a
    pooled vector (judged by cosine), not a sequence judged by SQNR."""
    outputs = _encoder_outputs()
    moved = {k: [v + np.float32(1e-6) for v in vs] for k, vs in outputs.items()}
    judge = tm.TaskJudge(outputs, moved, sequences={"pooled"})
    assert judge.metric_names() == {"token_embeddings": "embedding", "pooled": "embedding"}
    alone = tm.TaskJudge({"steps": outputs["pooled"]}, {"steps": moved["pooled"]}, sequences={"steps"})
    assert alone.metric_names() == {"steps": "sqnr"}  # no embedding beside it, nor its name: per-step values


@pytest.mark.parametrize("name", ["landmarks", "kps", "bbox_pred", "keypoints_2d", "head_pose"])
def test_a_regressors_coordinates_are_judged_by_sqnr_not_their_largest_entry(name: str) -> None:
    """A face-landmark or box regressor's ``[N, C]`` output holds coordinates: which one is
    largest means nothing, how far they move does (SQNR, summed over the samples)."""
    rng = np.random.default_rng(4)
    points = {name: [rng.uniform(0, 224, (1, 136)).astype(np.float32) for _ in range(6)]}
    judge = _judge(points)
    assert judge.metric_names() == {name: "sqnr"}
    got = {name: [v + np.float32(2.0) for v in points[name]]}  # every coordinate 2 pixels off
    signal = sum(float(np.sum(v.astype(np.float64) ** 2)) for v in points[name])
    row = judge(got)["metrics"][f"{name}:sqnr"]
    assert row["deviation"] == pytest.approx(6 * 136 * 4.0 / signal, rel=1e-4)


@pytest.mark.parametrize("name", ["/head/Transpose_output_0", "dense_3", "output"])
def test_a_word_that_only_contains_a_regressors_word_stays_a_classifier(name: str) -> None:
    rng = np.random.default_rng(5)
    assert _judge({name: [rng.standard_normal((1, 10)).astype(np.float32) * 5 for _ in range(6)]}).metric_names() \
        == {name: "argmax"}


def test_an_output_confident_nowhere_is_no_set_of_classes() -> None:
    """MTCNN's box offsets ``[N, 4]`` and landmarks ``[N, 10]`` (names "dense_5",
    "dense_6"): coordinates in [0, 1] whose softmax is near uniform on every sample hold no
    class scores, and are judged by SQNR; one confident sample makes a classifier."""
    rng = np.random.default_rng(6)
    landmarks = {"dense_6": [rng.uniform(0.2, 0.8, (1, 10)).astype(np.float32) for _ in range(8)]}
    assert _judge(landmarks).metric_names() == {"dense_6": "sqnr"}
    scores = [*landmarks["dense_6"][:7], np.eye(10, dtype=np.float32)[[3]] * 4]
    assert _judge({"dense_6": scores}).metric_names() == {"dense_6": "argmax"}
