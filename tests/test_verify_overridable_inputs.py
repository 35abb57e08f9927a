"""The verifier feeds graph inputs that hold a default a caller may replace (an initializer
listed as a graph input, IR >= 4): its last generated sample gives each float one a value
off the default, so a candidate that reads the default where the input is fed (a pass
that baked it into a constant) fails, and a candidate that reads the input passes. What
each candidate computes on those values is taken from onnx's reference evaluator, not
from the verifier."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
import onnx_ir as ir
import pytest
from onnx import TensorProto as TP
from onnx.reference import ReferenceEvaluator

import optcc
from optcc.numerics.float64 import Float64Reference
from optcc.numerics.inputs import DEFAULT_VARIATION, varied_defaults
from optcc.numerics.verify import Verifier

RNG = np.random.default_rng(7)
WEIGHT = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
WEIGHT[0, 0, 0, 0] = 0.0  # a zero element moves too


def _conv(weight_read: str = "W", ir_version: int = 8) -> onnx.ModelProto:
    """``y = Relu(Conv(x, W) + B)``: ``W`` and ``B`` graph inputs with defaults; the node
    reads ``weight_read``: ``W``, ``W_baked`` (an initializer holding W's default: what a
    pass that baked the default in leaves) or ``W_neg2`` (``Neg(Neg(W))``: W itself, in a
    form the equivalence prover does not follow, so the samples decide)."""
    nodes = [oh.make_node("Conv", ["x", weight_read], ["c"], pads=[1, 1, 1, 1]),
             oh.make_node("Add", ["c", "B"], ["s"]), oh.make_node("Relu", ["s"], ["y"])]
    inits = [nh.from_array(WEIGHT, "W"), nh.from_array(np.linspace(-0.5, 0.5, 4, dtype=np.float32)
                                                       .reshape(1, 4, 1, 1), "B")]
    if weight_read == "W_baked":
        inits.append(nh.from_array(WEIGHT, "W_baked"))
    if weight_read == "W_neg2":
        nodes[:0] = [oh.make_node("Neg", ["W"], ["W_neg"]), oh.make_node("Neg", ["W_neg"], ["W_neg2"])]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TP.FLOAT, [1, 3, 8, 8]),
                                       oh.make_tensor_value_info("W", TP.FLOAT, [4, 3, 3, 3]),
                                       oh.make_tensor_value_info("B", TP.FLOAT, [1, 4, 1, 1])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, [1, 4, 8, 8])], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 13)], ir_version=ir_version)


def _evaluated(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return ReferenceEvaluator(model).run(None, feeds)[0]


def test_varied_defaults_move_float_defaults_within_their_range() -> None:
    model = ir.from_proto(_conv())
    varied = varied_defaults(model, seed=0)
    assert list(varied) == ["W", "B"]
    w = varied["W"]
    assert w.dtype == np.float32 and w.shape == WEIGHT.shape
    nonzero = WEIGHT != 0
    assert np.all(np.sign(w[nonzero]) == np.sign(WEIGHT[nonzero]))
    change = np.abs(w[nonzero] - WEIGHT[nonzero]) / np.abs(WEIGHT[nonzero])
    assert change.max() <= DEFAULT_VARIATION + 1e-6 and np.median(change) > DEFAULT_VARIATION / 10
    assert w[0, 0, 0, 0] != 0.0  # the zero element moved, by at most 10% of the root mean square
    assert abs(w[0, 0, 0, 0]) <= DEFAULT_VARIATION * np.sqrt(np.mean(WEIGHT.astype(np.float64) ** 2))
    assert WEIGHT.min() <= w.min() and w.max() <= WEIGHT.max()
    ones = ir.from_proto(_conv())
    ones.graph.initializers["B"].const_value = ir.tensor(np.ones((1, 4, 1, 1), np.float32))
    b = varied_defaults(ones)["B"]  # one value throughout: moved towards 0
    assert np.all(b <= 1.0) and np.all(b >= 1.0 - DEFAULT_VARIATION) and np.any(b < 1.0)
    np.testing.assert_array_equal(varied_defaults(model, seed=0)["W"], w)  # deterministic
    assert not np.array_equal(varied_defaults(model, seed=1)["W"], w)
    assert varied_defaults(ir.from_proto(_conv(ir_version=3))) == {}  # below IR 4: constants, not inputs


def test_integer_defaults_and_float_sizes_keep_their_default() -> None:
    # y = Reshape(Resize(x, scales=S), shape=T) + A: S (float, a size), T (int64) and A (float data) defaults
    graph = oh.make_graph(
        [oh.make_node("Resize", ["x", "", "S"], ["r"], mode="nearest"), oh.make_node("Reshape", ["r", "T"], ["f"]),
         oh.make_node("Add", ["f", "A"], ["y"])], "g",
        [oh.make_tensor_value_info("x", TP.FLOAT, [1, 1, 2, 2]), oh.make_tensor_value_info("S", TP.FLOAT, [4]),
         oh.make_tensor_value_info("T", TP.INT64, [2]), oh.make_tensor_value_info("A", TP.FLOAT, [16])],
        [oh.make_tensor_value_info("y", TP.FLOAT, None)],
        [nh.from_array(np.array([1, 1, 2, 2], np.float32), "S"), nh.from_array(np.array([1, 16], np.int64), "T"),
         nh.from_array(np.zeros(16, np.float32), "A")])
    model = ir.from_proto(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 13)], ir_version=8))
    varied = varied_defaults(model)
    assert list(varied) == ["A"]
    assert np.any(varied["A"] != 0) and np.abs(varied["A"]).max() <= DEFAULT_VARIATION  # all zeros: moved by up to 0.1


@pytest.mark.parametrize("numerics", ["exact", "fusion", "fp16"])
def test_a_candidate_that_bakes_the_default_fails(numerics: str) -> None:
    original, baked = _conv(), _conv("W_baked")
    with Verifier(ir.from_proto(original)) as verifier:
        fed = verifier.feeds[-1]
        assert set(fed) == {"x", "W", "B"} and not np.array_equal(fed["W"], WEIGHT)
        assert all(set(f) == {"x"} for f in verifier.feeds[:-1])
        # on the fed sample the two differ by far more than any tolerance; on the defaults, not at all
        want, got = _evaluated(original, fed), _evaluated(baked, fed)
        assert np.abs(got - want).max() > 0.01 * np.abs(want).max()
        np.testing.assert_array_equal(_evaluated(baked, verifier.feeds[0]), _evaluated(original, verifier.feeds[0]))
        result = verifier.check(ir.from_proto(baked), numerics)
    assert result.status == "failed", result.describe()
    if numerics != "fp16":  # judged per element: the fed sample alone is off (fp16: SQNR over all samples)
        assert result.samples_over() == [len(verifier.feeds) - 1]


@pytest.mark.parametrize("numerics", ["exact", "fusion"])
def test_a_candidate_that_reads_the_fed_input_passes(numerics: str) -> None:
    original, candidate = _conv(), _conv("W_neg2")
    with Verifier(ir.from_proto(original)) as verifier:
        for feeds in verifier.feeds:
            np.testing.assert_array_equal(_evaluated(candidate, feeds), _evaluated(original, feeds))
        result = verifier.check(ir.from_proto(candidate), numerics)
    assert result.passed and result.reference != "proof", result.describe()
    assert result.samples == 3 and not result.notes


class BakeDefaultsPass(optcc.Pass):
    """Wrong on purpose: every node reads a constant copy of a graph input's default
    instead of the input (what a pass that took such an input for a constant does)."""

    name, numerics = "test-bake-defaults", "exact"

    def call(self, model: ir.Model) -> optcc.PassResult:
        graph = model.graph
        for value in [v for v in graph.inputs if v.is_initializer()]:
            copy = ir.Value(name=value.name + "_baked", shape=value.shape, type=value.type,
                            const_value=value.const_value)
            graph.register_initializer(copy)
            value.replace_all_uses_with(copy)
        return optcc.PassResult(model, True)


def test_a_pass_that_bakes_a_default_is_reverted() -> None:
    result = optcc.optimize(_conv(), passes=[BakeDefaultsPass(), "eliminate-identities"])
    (record,) = [r for r in result.report.passes if r.name == "test-bake-defaults"]
    assert record.status == "reverted" and "max rel" in record.reason
    assert result.report.verification["status"] == "passed"
    x = RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)
    feeds = {"x": x, "W": (WEIGHT * 0.5).astype(np.float32), "B": np.full((1, 4, 1, 1), 0.25, np.float32)}
    written = ir.to_proto(result.ir_model)
    np.testing.assert_allclose(_evaluated(written, feeds), _evaluated(_conv(), feeds), rtol=1e-6, atol=1e-6)


def test_defaults_the_original_cannot_run_varied_are_fed_as_they_are() -> None:
    # y = Reshape(Neg(x), Cast(S + 0)): a float S of [2, 2], cast to a shape after an Add (a
    # route to a size the generator does not follow); varied with seed 3 (both elements
    # lowered), [1, 1] cannot hold x's 4 elements, so the original fails on it
    def model(neg2: bool) -> onnx.ModelProto:
        nodes = [oh.make_node("Constant", [], ["zero"], value=nh.from_array(np.zeros(2, np.float32))),
                 oh.make_node("Add", ["S", "zero"], ["s0"]),
                 oh.make_node("Cast", ["s0"], ["t"], to=TP.INT64), oh.make_node("Reshape", ["n", "t"], ["y"])]
        nodes[:0] = [oh.make_node("Neg", ["x"], ["m"]), oh.make_node("Neg", ["m"], ["m2"]),
                     oh.make_node("Neg", ["m2"], ["n"])] if neg2 else [oh.make_node("Neg", ["x"], ["n"])]
        graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TP.FLOAT, [4]),
                                           oh.make_tensor_value_info("S", TP.FLOAT, [2])],
                              [oh.make_tensor_value_info("y", TP.FLOAT, None)],
                              [nh.from_array(np.array([2.0, 2.0], np.float32), "S")])
        return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 13)], ir_version=8)

    original = model(False)
    varied = varied_defaults(ir.from_proto(original), seed=3)
    assert np.all(varied["S"] < 2.0)
    with pytest.raises(Exception):
        _evaluated(original, {"x": np.ones(4, np.float32), "S": varied["S"]})
    with Verifier(ir.from_proto(original), seed=3) as verifier:
        result = verifier.check(ir.from_proto(model(True)), "exact")
        assert all(set(f) == {"x"} for f in verifier.feeds)
    assert result.passed and result.reference != "proof", result.describe()
    assert any("cannot run the original with the defaults of its graph input(s) 'S' varied" in n
               for n in result.notes)


def test_user_samples_that_feed_no_default_are_noted() -> None:
    original, candidate = _conv(), _conv("W_neg2")
    x = RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)
    with Verifier(ir.from_proto(original), inputs=[{"x": x}]) as verifier:
        result = verifier.check(ir.from_proto(candidate), "exact")
    assert result.passed
    assert any("no sample feeds the graph input(s) with a default 'W', 'B'" in n for n in result.notes)
    fed = {"x": x, "W": (WEIGHT * 0.9).astype(np.float32)}
    with Verifier(ir.from_proto(original), inputs=[fed]) as verifier:
        baked = verifier.check(ir.from_proto(_conv("W_baked")), "exact")
        result = verifier.check(ir.from_proto(candidate), "exact")
    assert not baked.passed
    assert result.passed and any("default 'B'" in n for n in result.notes)
    assert not any("'W'" in n for n in result.notes)


def test_float64_reference_reads_a_fed_default() -> None:
    # Conv has no float64 kernel in onnxruntime: the reference evaluator runs it, after a check of
    # every node against onnxruntime's float32 run, which reads the fed weight too
    feeds = {"x": RNG.standard_normal((1, 3, 8, 8)).astype(np.float32), "W": (WEIGHT * 1.5).astype(np.float32),
             "B": np.zeros((1, 4, 1, 1), np.float32)}
    reference = Float64Reference.build(_conv(), [feeds])
    assert reference.outputs is not None, reference.reason
    x, w = feeds["x"].astype(np.float64), feeds["W"].astype(np.float64)
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))  # (1, 3, 8, 8, 3, 3)
    want = np.maximum(np.einsum("nchwij,ocij->nohw", windows, w), 0.0)
    np.testing.assert_allclose(reference.outputs[0]["y"], want, rtol=1e-12, atol=1e-12)


def test_float_defaults_that_size_a_tensor_keep_their_default() -> None:
    """A Resize's scales (input 1 at opset 10) and a float default cast to an integer (a
    Reshape target here) decide a shape: varied, they would change what is computed, so
    ``varied_defaults`` leaves them; the float gain beside them is varied."""
    nodes = [oh.make_node("Resize", ["x", "scales"], ["up"], mode="nearest"),
             oh.make_node("Cast", ["shape_f"], ["shape_i"], to=TP.INT64),
             oh.make_node("Reshape", ["up", "shape_i"], ["flat"]),
             oh.make_node("Mul", ["flat", "gain"], ["y"])]
    inits = [nh.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
             nh.from_array(np.array([1, -1], np.float32), "shape_f"),
             nh.from_array(np.linspace(0.5, 2.0, 16, dtype=np.float32).reshape(1, 16), "gain")]
    inputs = [oh.make_tensor_value_info("x", TP.FLOAT, [1, 1, 2, 2])] + [
        oh.make_tensor_value_info(t.name, TP.FLOAT, list(t.dims)) for t in inits]
    graph = oh.make_graph(nodes, "g", inputs, [oh.make_tensor_value_info("y", TP.FLOAT, [1, 16])], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 10)], ir_version=5)
    varied = varied_defaults(ir.from_proto(model))
    assert list(varied) == ["gain"] and not np.array_equal(varied["gain"], nh.to_array(inits[2]))
    x = np.arange(4, dtype=np.float32).reshape(1, 1, 2, 2)
    expected = np.repeat(np.repeat(x, 2, axis=2), 2, axis=3).reshape(1, 16) * varied["gain"]
    import onnxruntime as ort  # onnx's evaluator has no Resize-10

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x, **varied})[0], expected, rtol=1e-6)
