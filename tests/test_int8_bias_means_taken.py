"""Bias correction's float channel means taken by calibration's runs of the same samples
(``ChannelMeans``) instead of running them again (``FloatMeans``): the same means bit for
bit, so the same corrected models; the means checked against numpy on the float model."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import optcc
from optcc.quant import bias_correction, driver
from optcc.quant.bias_correction import FloatMeans, correct_biases, float_result_ranks
from optcc.quant.calibration import ChannelMeans, calibrate
from optcc.passes.quantize_int8 import QuantizeInt8Pass
from tests.test_bias_correction import CONVS, biased_chain, biased_mlp, channel_means, samples


def with_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """``model`` declaring ``opset`` (ReduceMean takes its axes as an input from 18 on)."""
    copy = onnx.ModelProto.FromString(model.SerializeToString())
    del copy.opset_import[:]
    copy.opset_import.append(onnx.helper.make_opsetid("", opset))
    return copy


def mlp_samples(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.uniform(0, 1, size=(2, 16)).astype(np.float32)} for _ in range(n)]


def no_float_session(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Records every model ``FloatMeans`` builds to measure the float means itself."""
    built: list[bool] = []
    original = bias_correction._with_means

    def recorded(model, layers, prefix, *, reference=False):
        built.append(reference)
        return original(model, layers, prefix, reference=reference)

    monkeypatch.setattr(bias_correction, "_with_means", recorded)
    return built


@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize("kind", ["conv", "gemm"])
def test_means_taken_while_calibrating_correct_as_measured_ones(kind: str, opset: int,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    model = with_opset(biased_chain() if kind == "conv" else biased_mlp(), opset)
    calib = samples(8, 0) if kind == "conv" else mlp_samples(8, 0)
    reference = optcc.ir.load(model)
    positions = [1, 3, 4, 6]
    taken = ChannelMeans(float_result_ranks(reference), positions)
    ranges = calibrate(reference, calib, "minmax", means=taken).ranges
    assert sorted(taken.taken) == positions
    measured_on = [calib[i] for i in positions]
    candidates = [QuantizeInt8Pass(ranges, count_fused=False)(optcc.ir.load(model)).model for _ in range(2)]
    correct_biases(reference, candidates[0], measured_on)  # measured by a session of its own
    built = no_float_session(monkeypatch)
    means = FloatMeans(reference, measured_on, taken=[taken.taken[i] for i in positions])
    stats = correct_biases(reference, candidates[1], measured_on, means=means)
    assert stats["layers"] >= 2 and True not in built  # no float run of the samples again
    assert optcc.ir.serialize(candidates[0]).SerializeToString() == \
        optcc.ir.serialize(candidates[1]).SerializeToString()
    names = sorted(means.means)
    assert names == (CONVS if kind == "conv" else ["g1", "g2"])
    for name, expected in zip(names, channel_means(model, names, measured_on)):
        np.testing.assert_allclose(means.means[name], expected, rtol=1e-5, atol=1e-7)


def test_driver_ships_the_same_model_with_means_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    model, data = biased_chain(), samples(10, 0)
    options = dict(require_speedup=False, require_target=False, accuracy_fallback=False, equalize=False)
    built = no_float_session(monkeypatch)
    shared, stats = driver.quantize_int8(model, data, **options)
    assert stats["pass"]["bias_correction"]["layers"] == 3 and True not in built
    monkeypatch.setattr(driver, "float_result_ranks", lambda model: {})  # nothing taken: measured
    measured, _ = driver.quantize_int8(model, data, **options)
    assert True in built
    assert optcc.ir.serialize(shared).SerializeToString() == optcc.ir.serialize(measured).SerializeToString()
    calib = data[:8]
    for name, expected in zip(CONVS, channel_means(model, CONVS, calib)):
        got = channel_means(shared, [name], calib)[0]
        assert np.abs(got - expected).max() < 0.05 * np.abs(expected).max() + 1e-3
