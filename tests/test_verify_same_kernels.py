"""The verifier runs a model and its rewrite with the same kernels: a weight a fold made
constant is not pre-packed (onnxruntime's LSTM takes another code path for a pre-packed
weight, whose rounding a model can amplify past the exact tolerance), and a one-element
output that varies across samples is not reported as a weak check."""

from __future__ import annotations

import numpy as np
import pytest
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import optcc
from optcc.numerics import Verifier, generate_inputs

HIDDEN, FEATURES, STEPS = 32, 16, 6


def _lstm(weights_computed: bool) -> onnx.ModelProto:
    """An LSTM whose weights are initializers, or computed at run time (``W0 + 0``) as an
    exporter's weight-preparation subgraph computes them."""
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((1, 4 * HIDDEN, FEATURES)) * 0.3).astype(np.float32)
    r = (rng.standard_normal((1, 4 * HIDDEN, HIDDEN)) * 0.3).astype(np.float32)
    nodes, inits = [], []
    if weights_computed:
        inits += [numpy_helper.from_array(w, "W0"), numpy_helper.from_array(r, "R0"),
                  numpy_helper.from_array(np.zeros((1,), np.float32), "zero")]
        nodes += [helper.make_node("Add", ["W0", "zero"], ["W"]), helper.make_node("Add", ["R0", "zero"], ["R"])]
    else:
        inits += [numpy_helper.from_array(w, "W"), numpy_helper.from_array(r, "R")]
    nodes.append(helper.make_node("LSTM", ["x", "W", "R"], ["Y", "h"], hidden_size=HIDDEN))
    graph = helper.make_graph(nodes, "lstm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [STEPS, 1, FEATURES])],
                              [helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 1, HIDDEN])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray, prepack: bool) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_folding_an_lstm_weight_leaves_its_results_bit_identical_without_prepacking():
    """The claim the verifier relies on, checked on onnxruntime directly: with pre-packing off
    the folded model computes the original's bits; with it on, the LSTM rounds differently
    (which is why the verifier turns it off)."""
    x = np.random.default_rng(0).standard_normal((STEPS, 1, FEATURES)).astype(np.float32)
    computed, folded = _lstm(True), _lstm(False)
    assert np.array_equal(_run(computed, x, prepack=False), _run(folded, x, prepack=False))
    assert not np.array_equal(_run(computed, x, prepack=True), _run(folded, x, prepack=True))


def test_the_verifier_sees_a_folded_lstm_weight_compute_the_original_bits():
    original = _lstm(True)
    samples = generate_inputs(optcc.ir.load(original), samples=3)
    with Verifier(original, inputs=samples) as verifier:
        check = verifier.check(optcc.ir.load(_lstm(False)), "exact")
    assert check.status == "passed"
    assert [m.max_abs for m in check.outputs] == [0.0]


def test_fold_constants_on_an_lstm_is_kept_and_exact():
    original = _lstm(True)
    samples = generate_inputs(optcc.ir.load(original), samples=3)
    result = optcc.optimize(original, passes=["fold-constants"], inputs=samples)
    assert [r.status for r in result.report.passes] == ["changed"]
    for feeds in samples:
        assert np.array_equal(_run(result.model, feeds["x"], prepack=False), _run(original, feeds["x"], prepack=False))


def _score(scalar_output: bool) -> onnx.ModelProto:
    """y = sum(x) as a one-element output, or broadcast over 8 elements."""
    shape = "[1, 1]" if scalar_output else "[1, 8]"
    tail = "y = Identity(total)" if scalar_output else "ones = Constant <value = float[1, 8] {1,1,1,1,1,1,1,1}> ()\n y = Mul(total, ones)"
    return onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["": 17]>
        g (float[1, 4] x) => (float{shape} y) {{
            total = ReduceSum <keepdims = 1> (x)
            {tail}
        }}""")


def test_a_one_element_output_that_varies_across_samples_is_not_a_weak_check():
    model = _score(scalar_output=True)
    samples = generate_inputs(optcc.ir.load(model), samples=3)
    assert len({float(np.sum(s["x"])) for s in samples}) == 3  # the output differs per sample
    result = optcc.optimize(model, passes=["eliminate-identities"], inputs=samples)
    assert not any("same value" in w or "one value" in w for w in result.report.warnings)


def test_an_output_with_one_value_per_sample_on_all_its_elements_is_reported():
    model = _score(scalar_output=False)
    samples = generate_inputs(optcc.ir.load(model), samples=3)
    result = optcc.optimize(model, passes=["eliminate-identities"], inputs=samples)
    assert any("one value on all its elements" in w for w in result.report.warnings)


def _reflect_padded(pad: int, square: str = "Mul(padded, padded)") -> onnx.ModelProto:
    """A framed signal as audio front ends pad it: reflect padding needs more samples
    than it pads."""
    return onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["": 17]>
        g (float[1, n] signal) => (float[1, m] y) {{
            pads = Constant <value = int64[4] {{0, {pad}, 0, {pad}}}> ()
            padded = Pad <mode = "reflect"> (signal, pads)
            two = Constant <value = float {{2.0}}> ()
            y = {square}
        }}""")


def _check(pad: int):
    """The squares as Pow instead of Mul (no proof of that: the samples decide)."""
    candidate = optcc.ir.load(_reflect_padded(pad, "Pow(padded, two)"))
    with Verifier(_reflect_padded(pad)) as verifier:
        return verifier.check(candidate, "fusion"), verifier.notes()


def test_generated_samples_too_short_for_the_original_are_made_longer():
    check, notes = _check(100)  # the default dynamic size, 64, is too short to reflect 100
    assert check.status == "passed" and check.samples == 3
    assert any("made again with free dynamic dims 512 long" in note for note in notes)
    x = np.random.default_rng(0).standard_normal((1, 512)).astype(np.float32)
    padded = np.pad(x, ((0, 0), (100, 100)), mode="reflect")
    session = ort.InferenceSession(_reflect_padded(100).SerializeToString(), providers=["CPUExecutionProvider"])
    assert np.allclose(session.run(None, {"signal": x})[0], padded * padded, rtol=1e-6)


def test_samples_that_never_fit_say_how_to_give_ones_that_do():
    check, _ = _check(600)
    assert check.status == "skipped"
    assert "on generated inputs (give samples that fit with --inputs, or sizes with --input-shape)" in check.reason


def test_a_model_onnxruntime_cannot_load_is_not_blamed_on_the_inputs():
    custom = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["": 17, "com.example": 1]>
        g (float[1, n] x) => (float[1, n] y) {
            y = com.example.Frobnicate(x)
        }""")
    with Verifier(custom) as verifier:
        check = verifier.check(optcc.ir.load(custom), "fusion")
    assert check.status == "skipped" and "generated inputs" not in check.reason


def test_float16_observes_ranges_on_generated_samples_made_longer():
    """The float16 conversion generates its own samples to observe value ranges: those the
    model cannot run are made longer as the verifier's are, and the model converts."""
    model = _reflect_padded(100, "Mul(padded, two)")
    result = optcc.optimize(model, fp16=True)
    assert result.precision["fp16"] is None  # applied
    x = np.random.default_rng(1).standard_normal((1, 512)).astype(np.float32)
    padded = np.pad(x.astype(np.float64), ((0, 0), (100, 100)), mode="reflect")
    session = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"signal": x})[0].astype(np.float64)
    assert np.max(np.abs(got - 2.0 * padded)) <= 2e-3 * np.max(np.abs(2.0 * padded))


def _framed_with_state(state: str = "Identity(state)") -> onnx.ModelProto:
    """A recurrent step as voice-activity models take it: a signal [batch, samples] and a
    state [2, batch, 4] whose batch axis has a name of its own (or none), so nothing ties
    it to the signal's; the first samples of the signal are stacked onto the state."""
    return onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["": 17]>
        g (float[b, n] signal, float[2, s, 4] state) => (float[3, s, 4] y) {{
            starts = Constant <value = int64[1] {{0}}> ()
            ends = Constant <value = int64[1] {{4}}> ()
            axes = Constant <value = int64[1] {{1}}> ()
            zero = Constant <value = int64[1] {{0}}> ()
            one = Constant <value = float {{1.0}}> ()
            two = Constant <value = float {{2.0}}> ()
            head = Slice(signal, starts, ends, axes)
            frame = Unsqueeze(head, zero)
            kept = {state}
            y = Concat <axis = 0> (frame, kept)
        }}""")


def _stacked(signal: np.ndarray, state: np.ndarray) -> np.ndarray:
    return np.concatenate([signal[None, :, :4], state], axis=0)


def test_generated_state_batch_axis_is_made_one_when_longer_samples_do_not_fit():
    """Neither the default nor longer sizes give the state the signal's batch (1): the
    second retry sizes the axes between the first and the last 1, and the samples decide
    (Pow by one is not proved equal)."""
    candidate = optcc.ir.load(_framed_with_state(state="Pow(state, one)"))
    with Verifier(_framed_with_state()) as verifier:
        check = verifier.check(candidate, "fusion")
        notes = verifier.notes()
    assert check.status == "passed" and check.samples == 3
    assert any("1 on the axes between the first and the last" in note for note in notes)
    rng = np.random.default_rng(2)
    signal = rng.standard_normal((1, 512)).astype(np.float32)
    state = rng.standard_normal((2, 1, 4)).astype(np.float32)
    session = ort.InferenceSession(_framed_with_state().SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, {"signal": signal, "state": state})[0], _stacked(signal, state))


def test_float16_observes_ranges_on_samples_with_the_state_batch_made_one():
    result = optcc.optimize(_framed_with_state(state="Mul(state, two)"), fp16=True)
    assert result.precision["fp16"] is None  # applied
    rng = np.random.default_rng(3)
    signal = rng.standard_normal((1, 512)).astype(np.float32)
    state = rng.standard_normal((2, 1, 4)).astype(np.float32)
    session = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"signal": signal, "state": state})[0].astype(np.float64)
    want = _stacked(signal.astype(np.float64), 2.0 * state.astype(np.float64))
    assert np.max(np.abs(got - want)) <= 2e-3 * np.max(np.abs(want))
