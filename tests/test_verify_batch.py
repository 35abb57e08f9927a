"""Generated verification samples run a model whose batch is dynamic on batch 2 as well
as 1 (the last sample), unless the original cannot run batch 2. Premises come from numpy
and onnx's reference evaluator, never from optcc."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import optcc
from optcc.numerics import generate_inputs
from optcc.numerics.inputs import BATCH_SAMPLE
from optcc.numerics.verify import Verifier


def _model(nodes: list, inputs: list, outputs: list, inits: list = ()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _batch_model(specialized: bool) -> onnx.ModelProto:
    """y = x reshaped to [N, 8] (N read from x), or, specialized, to [1, -1]."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", "K"])
    if specialized:
        inits = [numpy_helper.from_array(np.array([1, -1], np.int64), "target")]
        return _model([helper.make_node("Reshape", ["x", "target"], ["y"])], [x], [y], inits)
    inits = [numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([1], np.int64), "one"),
             numpy_helper.from_array(np.array([-1], np.int64), "rest")]
    nodes = [helper.make_node("Shape", ["x"], ["shape"]), helper.make_node("Slice", ["shape", "zero", "one"], ["n"]),
             helper.make_node("Concat", ["n", "rest"], ["target"], axis=0),
             helper.make_node("Reshape", ["x", "target"], ["y"])]
    return _model(nodes, [x], [y], inits)


def test_a_candidate_specialized_to_batch_one_is_not_passed() -> None:
    original, candidate = _batch_model(False), _batch_model(True)
    two = {"x": np.arange(16, dtype=np.float32).reshape(2, 2, 4)}
    assert ReferenceEvaluator(original).run(None, two)[0].shape == (2, 8)
    assert ReferenceEvaluator(candidate).run(None, two)[0].shape == (1, 16)
    one = {"x": two["x"][:1]}
    np.testing.assert_array_equal(ReferenceEvaluator(original).run(None, one)[0],
                                  ReferenceEvaluator(candidate).run(None, one)[0])  # equal on batch 1
    assert not optcc.verify(original, candidate).passed


def _batch_one_only(scale: float) -> onnx.ModelProto:
    """y = x * scale reshaped to [1, 8]: the graph assumes batch 1 behind its symbol N."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])
    inits = [numpy_helper.from_array(np.array([1, 8], np.int64), "target"),
             numpy_helper.from_array(np.array(scale, np.float32), "scale")]
    nodes = [helper.make_node("Reshape", ["x", "target"], ["r"]), helper.make_node("Mul", ["r", "scale"], ["y"])]
    return _model(nodes, [x], [y], inits)


def test_a_model_that_cannot_run_batch_two_is_verified_on_batch_one_with_a_note() -> None:
    original = _batch_one_only(2.0)
    with pytest.raises(Exception):
        ReferenceEvaluator(original).run(None, {"x": np.zeros((2, 8), np.float32)})
    ones = {"x": np.ones((1, 8), np.float32)}
    assert ReferenceEvaluator(_batch_one_only(3.0)).run(None, ones)[0][0, 0] == 3.0  # 2.0 in the original
    with Verifier(original) as verifier:
        wrong = verifier.check(optcc.ir.load(_batch_one_only(3.0)), "fusion")
        assert wrong.status == "failed" and wrong.samples == 3
        assert [f["x"].shape for f in verifier.feeds] == [(1, 8)] * 3
        note = "made again with batch 1 in every sample"
        assert any(note in n for n in wrong.notes) and any(note in n for n in verifier.notes())


def _shared(batch: object = "N") -> onnx.ModelProto:
    """a [N, S] + b [N, S], c [?, S] summed, and a rank-1 d [?] (no batch axis)."""
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [batch, "S"])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [batch, "S"])
    c = helper.make_tensor_value_info("c", TensorProto.FLOAT, [None if batch == "N" else batch, "S"])
    d = helper.make_tensor_value_info("d", TensorProto.FLOAT, [None])
    s = helper.make_tensor_value_info("s", TensorProto.FLOAT, [batch, "S"])
    t = helper.make_tensor_value_info("t", TensorProto.FLOAT, [None])
    nodes = [helper.make_node("Add", ["a", "b"], ["ab"]), helper.make_node("Add", ["ab", "c"], ["s"]),
             helper.make_node("Neg", ["d"], ["t"])]
    return _model(nodes, [a, b, c, d], [s, t])


def test_the_last_generated_sample_has_batch_two_on_every_batch_axis() -> None:
    model = optcc.ir.load(_shared())
    samples = generate_inputs(model, samples=3, seed=5, last_batch=BATCH_SAMPLE)
    shapes = [{name: value.shape for name, value in feeds.items()} for feeds in samples]
    assert shapes[:2] == [{"a": (1, 64), "b": (1, 64), "c": (1, 64), "d": (1,)}] * 2
    # as many elements as the others: the other free dims half as long
    assert shapes[2] == {"a": (2, 32), "b": (2, 32), "c": (2, 32), "d": (1,)}
    plain = generate_inputs(model, samples=3, seed=5)  # the samples before the last are today's
    for got, expected in zip(samples[:2], plain[:2]):
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name])
    again = generate_inputs(model, samples=3, seed=5, last_batch=BATCH_SAMPLE)
    for got, expected in zip(again, samples):
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name])


def test_a_given_batch_is_kept_in_every_sample() -> None:
    model = optcc.ir.load(_shared())
    samples = generate_inputs(model, {"a": (3, 8)}, samples=2, last_batch=BATCH_SAMPLE)
    assert [feeds["b"].shape for feeds in samples] == [(3, 8), (3, 8)]
    assert [feeds["c"].shape for feeds in samples] == [(1, 8), (2, 8)]


def test_a_static_batch_leaves_every_sample_as_long() -> None:
    model = optcc.ir.load(_shared(batch=1))
    samples = generate_inputs(model, samples=3, last_batch=BATCH_SAMPLE)
    assert [feeds["a"].shape for feeds in samples] == [(1, 64)] * 3


def _pooled(specialized: bool) -> onnx.ModelProto:
    """y = a 40x40 max pool of x [N, 1, H, W] (no padding: H and W below 40 cannot run), or,
    specialized to batch 1, that pool reshaped to [1, 1, -1, W']."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, "H", "W"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    pool = helper.make_node("MaxPool", ["x"], ["p" if specialized else "y"], kernel_shape=[40, 40])
    if not specialized:
        return _model([pool], [x], [y])
    inits = [numpy_helper.from_array(np.array([1, 1, -1, 25], np.int64), "target")]
    return _model([pool, helper.make_node("Reshape", ["p", "target"], ["y"])], [x], [y], inits)


def test_a_batch_sample_too_small_to_run_is_made_again_as_long_as_the_others() -> None:
    original = _pooled(False)
    with pytest.raises(Exception):  # batch 2 with the other free dims halved: too small for the pool
        ReferenceEvaluator(original).run(None, {"x": np.zeros((2, 1, 32, 32), np.float32)})
    two = {"x": np.random.default_rng(0).standard_normal((2, 1, 64, 64)).astype(np.float32)}
    assert ReferenceEvaluator(original).run(None, two)[0].shape == (2, 1, 25, 25)
    assert ReferenceEvaluator(_pooled(True)).run(None, two)[0].shape == (1, 1, 50, 25)
    one = {"x": two["x"][:1]}
    np.testing.assert_array_equal(ReferenceEvaluator(original).run(None, one)[0],
                                  ReferenceEvaluator(_pooled(True)).run(None, one)[0])  # equal on batch 1
    with Verifier(original) as verifier:
        wrong = verifier.check(optcc.ir.load(_pooled(True)), "fusion")
        assert wrong.status == "failed"
        assert [f["x"].shape for f in verifier.feeds] == [(1, 1, 64, 64)] * 2 + [(2, 1, 64, 64)]
        assert not any("made again" in n for n in [*verifier.notes(), *wrong.notes])  # batch 2 ran: no loss


def test_a_batch_sample_that_fails_at_either_length_is_blamed_for_the_longer_ones_error() -> None:
    """A 40x40 pool reshaped to [1, 625]: batch 2 fails in the pool at 32x32 and in the
    Reshape at 64x64; the note gives the Reshape's error, what batch 1 was chosen over."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, "H", "W"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    inits = [numpy_helper.from_array(np.array([1, 625], np.int64), "target")]
    nodes = [helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[40, 40], name="pool"),
             helper.make_node("Reshape", ["p", "target"], ["y"], name="flatten")]
    original = _model(nodes, [x], [y], inits)
    for shape in ((2, 1, 32, 32), (2, 1, 64, 64)):
        with pytest.raises(Exception):
            ReferenceEvaluator(original).run(None, {"x": np.zeros(shape, np.float32)})
    assert ReferenceEvaluator(original).run(None, {"x": np.zeros((1, 1, 64, 64), np.float32)})[0].shape == (1, 625)
    with Verifier(original) as verifier:
        check = verifier.check(optcc.ir.load(original), "fp16")  # no proof: the samples run
        assert check.status == "passed" and check.samples == 3
        assert [f["x"].shape for f in verifier.feeds] == [(1, 1, 64, 64)] * 3
        retried = [n for n in verifier.notes() if "made again with batch 1 in every sample" in n]
        assert len(retried) == 1 and "flatten" in retried[0] and "pool" not in retried[0], verifier.notes()
