"""The verifier: generated inputs, metrics, tolerance kinds, NaN handling, providers."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

import optcc
from optcc.numerics import TOLERANCES, Verifier, compare_outputs, generate_inputs, resolve_providers, verify
from optcc.runtime import make_session, provider_entry


def _model(text: str) -> ir.Model:
    return ir.from_proto(onnx.parser.parse_model(text))


def test_generated_inputs_respect_dtypes_symbols_and_index_bounds():
    model = _model("""
    <ir_version: 8, opset_import: ["" : 17]>
    agraph (int64[B, T] ids, float[B, T, 8] h, bool[B] m) => (float[B, T, 8] y) <float[5, 8] table = {1.0}> {
        e = Gather(table, ids)
        y = Add(e, h)
    }
    """)
    (feeds,) = generate_inputs(model, samples=1, seed=3)
    assert feeds["ids"].dtype == np.int64 and feeds["h"].dtype == np.float32 and feeds["m"].dtype == bool
    assert feeds["ids"].shape[:2] == feeds["h"].shape[:2], "same symbol, same size"
    assert feeds["ids"].min() >= 0 and feeds["ids"].max() < 5, "indices bounded by the table size"
    shaped = generate_inputs(model, {"h": [2, 7, 8]})[0]
    assert shaped["h"].shape == (2, 7, 8) and shaped["ids"].shape == (2, 7)


def test_metrics_match_their_definitions():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4, 10)).astype(np.float32)
    noise = (rng.standard_normal((4, 10)) * 1e-3).astype(np.float32)
    got = ref + noise
    m = compare_outputs("y", "cpu", ref, got, TOLERANCES["int8"])
    err = np.abs(got.astype(np.float64) - ref)
    assert m.max_abs == pytest.approx(err.max())
    assert m.max_rel == pytest.approx(err.max() / np.abs(ref).max())
    assert m.sqnr_db == pytest.approx(10 * math.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum(err**2)))
    assert m.argmax_agreement == pytest.approx(np.mean(ref.argmax(-1) == got.argmax(-1)))
    assert m.passed
    assert not compare_outputs("y", "cpu", ref, got, TOLERANCES["exact"]).passed


def test_nan_pattern_shape_and_integer_mismatches_fail():
    a = np.array([1.0, np.nan], np.float32)
    assert not compare_outputs("y", "cpu", a, np.array([1.0, 2.0], np.float32), TOLERANCES["int8"]).passed
    assert compare_outputs("y", "cpu", a, a.copy(), TOLERANCES["exact"]).passed
    assert not compare_outputs("y", "cpu", a, a[:1], TOLERANCES["int8"]).passed
    ints = np.arange(4)
    assert not compare_outputs("y", "cpu", ints, ints[::-1].copy(), TOLERANCES["int8"]).passed


def test_fusion_tolerance_is_looser_than_exact():
    ref = np.ones((2, 3), np.float32)
    got = ref * (1 + 5e-5)
    assert not compare_outputs("y", "cpu", ref, got, TOLERANCES["exact"]).passed
    assert compare_outputs("y", "cpu", ref, got, TOLERANCES["fusion"]).passed


def test_verifier_detects_a_changed_model_and_skips_what_onnxruntime_cannot_run():
    original = _model("""
    <ir_version: 8, opset_import: ["" : 17]>
    agraph (float[N, 4] x) => (float[N, 4] y) { y = Relu(x) }
    """)
    changed = _model("""
    <ir_version: 8, opset_import: ["" : 17]>
    agraph (float[N, 4] x) => (float[N, 4] y) { y = Abs(x) }
    """)
    with Verifier(original, samples=2) as verifier:
        assert verifier.check(original.clone()).passed
        verdict = verifier.check(changed)
        assert verdict.status == "failed" and verdict.samples == 2
    custom = _model("""
    <ir_version: 8, opset_import: ["" : 17, "acme" : 1]>
    agraph (float[N, 4] x) => (float[N, 4] y) { y = acme.Mystery(x) }
    """)
    verdict = optcc.numerics.verify(custom, custom.clone())
    assert verdict.status == "skipped" and "cannot run the original" in verdict.reason


@pytest.mark.parametrize("dtype", ["float", "float16"])
def test_the_verdict_names_the_originals_own_float_type(dtype: str) -> None:
    # a model computing in float16 is compared with itself as it is, not with a float32 model
    original = _model(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    agraph ({dtype}[N, 4] x) => ({dtype}[N, 4] y) {{ y = Relu(x) }}
    """)
    changed = _model(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    agraph ({dtype}[N, 4] x) => ({dtype}[N, 4] y) {{ y = Abs(x) }}
    """)
    with Verifier(original, samples=2) as verifier:
        same, other = verifier.check(original.clone(), prove=False), verifier.check(changed)
    label = {"float": "float32", "float16": "float16"}[dtype]
    assert same.passed and f"against {label} original" in same.describe(), same.describe()
    assert not other.passed and f"against {label} original" in other.describe(), other.describe()


def test_a_proved_candidate_onnxruntime_cannot_load_fails():
    # the proof equates the two graphs, but onnxruntime refuses the candidate (an IR version
    # it does not know): the load check (which runs after the proof) must turn the proof
    # into a failure
    original = _model("""
    <ir_version: 8, opset_import: ["" : 17]>
    agraph (float[4] x) => (float[4] y) { y = Relu(x) }
    """)
    candidate = original.clone()
    candidate.ir_version = 99
    with pytest.raises(Exception, match="IR version"):
        ort.InferenceSession(ir.serde.serialize_model(candidate).SerializeToString(),
                             providers=["CPUExecutionProvider"])
    with Verifier(original) as verifier:
        verdict = verifier.check(candidate)
    assert verdict.status == "failed" and verdict.reference == "proof"
    assert "onnxruntime cannot load the optimized model" in verdict.reason


def test_a_proved_candidate_of_an_original_onnxruntime_cannot_load_is_not_verified():
    # onnxruntime has no int64 Relu kernel: the model given does not load, so the proved
    # candidate cannot be checked on onnxruntime either; not verified, and the reason names
    # the original, not the passes' result
    original = _model("""
    <ir_version: 8, opset_import: ["" : 17]>
    agraph (int64[4] x) => (int64[4] y) { y = Relu(x) }
    """)
    with pytest.raises(Exception, match="NOT_IMPLEMENTED"):
        ort.InferenceSession(ir.serde.serialize_model(original).SerializeToString(),
                             providers=["CPUExecutionProvider"])
    with Verifier(original) as verifier:
        verdict = verifier.check(original.clone())
    assert verdict.status == "skipped" and verdict.reference == "proof"
    assert "onnxruntime cannot load the original model" in verdict.reason


def test_a_proved_candidate_is_loaded_from_the_bytes_given():
    """``serialized``: the candidate's bytes onnxruntime loads for a proof. Given the bytes of
    a graph onnxruntime cannot load (int64 Relu), the proved candidate fails on them; given
    its own bytes, it passes."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    agraph (float[4] x) => (float[4] y) { y = Relu(x) }
    """
    from optcc.runtime.shared_weights import Serialized

    original = _model(text)
    unloadable = _model(text.replace("float", "int64"))
    with Verifier(original) as verifier:
        own = verifier.check(original.clone(), serialized=Serialized(optcc.ir.serialize(original).SerializeToString()))
    assert own.passed and own.reference == "proof"
    with Verifier(original) as verifier:
        bytes_ = ir.serde.serialize_model(unloadable).SerializeToString()
        verdict = verifier.check(original.clone(), serialized=Serialized(bytes_))
    assert verdict.status == "failed" and verdict.reference == "proof"
    assert "onnxruntime cannot load the optimized model" in verdict.reason


def test_providers_default_to_cpu_and_cuda_only_when_available():
    chosen = resolve_providers(None)
    assert chosen[0] == "CPUExecutionProvider"
    assert ("CUDAExecutionProvider" in chosen) == ("CUDAExecutionProvider" in ort.get_available_providers())


@pytest.mark.gpu
@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(), reason="no CUDA execution provider")
def test_cuda_provider_verifies_the_example():
    result = optcc.optimize("fixtures/tinycnn.onnx", providers=["cpu", "cuda"])
    assert result.report.verification["status"] == "passed"
    assert "CUDAExecutionProvider" in result.report.verification["providers"]


def test_cuda_sessions_compute_in_float32_with_a_fixed_convolution_algorithm():
    """A verification session on CUDA runs without TF32 and with cuDNN's heuristic algorithm
    choice (optcc.runtime.providers); CPU sessions keep onnxruntime's defaults."""
    assert provider_entry("CPUExecutionProvider") == "CPUExecutionProvider"
    name, options = provider_entry("CUDAExecutionProvider")
    assert name == "CUDAExecutionProvider"
    assert options == {"use_tf32": "0", "cudnn_conv_algo_search": "HEURISTIC"}


@pytest.mark.gpu
@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(), reason="no CUDA execution provider")
def test_cuda_session_takes_the_verification_options():
    session = make_session("fixtures/tinycnn.onnx", "CUDAExecutionProvider")
    applied = session.get_provider_options()["CUDAExecutionProvider"]
    assert applied["use_tf32"] == "0" and applied["cudnn_conv_algo_search"] == "HEURISTIC"


def test_per_element_allowance_follows_the_float32_originals_own_error():
    """Against a float64 reference, an element may be off by the tolerance or by 4x the
    float32 original's own error at that element, never by another element's error."""
    ref = np.linspace(-1.0, 1.0, 64)
    original = ref.copy()
    original[0] += 1e-3  # the original is off at element 0 only
    fusion = TOLERANCES["fusion"]
    near = ref.copy()
    near[0] += 3e-3  # within 4x the original's error there
    assert compare_outputs("y", "cpu", ref, near.astype(np.float32), fusion, original.astype(np.float32)).passed
    far = ref.copy()
    far[5] += 3e-4  # elsewhere the original is exact: the tolerance applies
    result = compare_outputs("y", "cpu", ref, far.astype(np.float32), fusion, original.astype(np.float32))
    assert not result.passed and result.elements_over == 1
    assert not compare_outputs("y", "cpu", ref.astype(np.float32), far.astype(np.float32), fusion).passed


def _conv_bn_sigmoid_near_zero() -> onnx.ModelProto:
    """Conv + BatchNorm with large scales into a Sigmoid driven far negative: the outputs
    are tiny, so any float32 reassociation shows as a large relative change."""
    rng = np.random.default_rng(0)
    c = 16
    arrays = {
        "W": rng.standard_normal((c, c, 3, 3)).astype(np.float32),
        "s": (rng.random(c) * 40 + 10).astype(np.float32),
        "b": np.full(c, -60, np.float32),
        "m": rng.standard_normal(c).astype(np.float32),
        "v": (rng.random(c) * 1e-2 + 1e-3).astype(np.float32),
    }
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
            onnx.helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["bn"]),
            onnx.helper.make_node("Sigmoid", ["bn"], ["y"]),
        ],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, c, 32, 32])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, c, 32, 32])],
        [onnx.numpy_helper.from_array(a, n) for n, a in arrays.items()],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_a_fold_on_near_zero_outputs_is_judged_against_float64_per_element():
    """Outputs a Sigmoid drives near zero amplify any float32 reassociation. Judged against
    float64, the fold must stay within 4x of the original's own error at every element;
    here it does not everywhere, so it is reverted (conservatively) and the result verifies."""
    model = _conv_bn_sigmoid_near_zero()
    samples = generate_inputs(optcc.ir.load(model), samples=3)  # given: they always run
    result = optcc.optimize(model, passes=["fuse-batchnorm"], inputs=samples)
    (record,) = result.report.passes
    assert result.report.verification["status"] == "passed"
    assert record.status == "reverted" and "float32 original's own error" in record.reason
    # without samples of its own, the fold is proved: its constants are the exact fold's
    proved = optcc.optimize(model, passes=["fuse-batchnorm"])
    assert proved.report.passes[0].status == "changed" and proved.report.verification["reference"] == "proof"
    # a broken bias is still caught: the same model with a broken bias
    broken = optcc.ir.load(model)
    broken.graph.initializers["b"].const_value = ir.tensor(np.full(16, -59.0, np.float32))
    assert not verify(optcc.ir.load(model), broken, numerics="fusion").passed


def test_a_check_the_samples_barely_exercise_is_said_to_be_weak():
    """A Sigmoid driven far negative on every sample (a detector's blank map) leaves little
    to compare: the report says so and asks for samples that exercise it; a lively output
    says nothing."""
    saturated = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["": 17]>
        g (float[2, 8] x) => (float[2, 8] y) {
            shift = Constant <value = float {-12.0}> ()
            low = Add(x, shift)
            y = Sigmoid(low)
        }""")
    samples = generate_inputs(optcc.ir.load(saturated), samples=3)
    result = optcc.optimize(saturated, passes=["eliminate-dead-nodes"], inputs=samples)
    # the samples were the user's: the report asks for other ones, on which the output varies
    assert any("saturated" in w and "samples on which the outputs vary" in w for w in result.report.warnings)
    lively = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["": 17]>
        g (float[2, 8] x) => (float[2, 8] y) {
            y = Sigmoid(x)
        }""")
    assert not optcc.optimize(lively, passes=["eliminate-dead-nodes"]).report.warnings


def test_a_lossy_check_failed_on_a_saturated_output_says_the_samples_cannot_judge_it():
    """A candidate with a steeper map that stays near 0 fails float16's SQNR there, and
    the reason says the output is saturated and asks for real samples; a failure on a
    lively output says nothing of the kind (checked on the numbers: numpy)."""
    def model(shift: float, gain: str) -> onnx.ModelProto:
        return onnx.parser.parse_model(f"""
            <ir_version: 8, opset_import: ["": 17]>
            g (float[2, 8] x) => (float[2, 8] y) {{
                shift = Constant <value = float {{{shift}}}> ()
                gain = Constant <value = float {{{gain}}}> ()
                low = Add(x, shift)
                steep = Mul(low, gain)
                y = Sigmoid(steep)
            }}""")
    for shift, saturated in ((-12.0, True), (0.0, False)):
        with Verifier(model(shift, "1.0")) as verifier:
            check = verifier.check(optcc.ir.load(model(shift, "1.5")), "fp16")
            x = verifier.feeds[0]["x"].astype(np.float64)
        assert check.status == "failed" and "SQNR" in check.reason
        high = float((1 / (1 + np.exp(-(x + shift)))).max())
        assert (high < 1e-3) == saturated
        assert ("saturated" in check.reason and "--inputs" in check.reason) == saturated


@pytest.mark.gpu
@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(), reason="no CUDA execution provider")
def test_a_model_past_the_hand_over_size_verifies_on_cuda():
    """A model whose weights optcc hands to CPU sessions in memory is loaded from a saved
    file on CUDA, and an exact rewrite of it passes there."""
    rng = np.random.default_rng(5)
    weight = rng.standard_normal((4096, 4096)).astype(np.float32)  # 64 MiB: the hand-over size
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["i"]), onnx.helper.make_node("MatMul", ["i", "W"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4096])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4096])],
        [onnx.numpy_helper.from_array(weight, "W")])
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)
    x = rng.standard_normal((2, 4096)).astype(np.float32)
    result = optcc.optimize(ir.from_proto(proto), providers=["cpu", "cuda"], inputs=[{"x": x}])
    assert result.report.verification["status"] == "passed"
    assert not result.report.reverted()
    got = ort.InferenceSession(optcc.ir.serialize(result.ir_model).SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x.astype(np.float64) @ weight.astype(np.float64), rtol=1e-4, atol=1e-3)
