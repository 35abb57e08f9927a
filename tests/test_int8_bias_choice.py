"""The INT8 driver keeps bias correction only where it helps the task on the held-out samples.

A depthwise conv whose small taps all round up by 0.45 of a step shifts its result by
``0.45 step * sum(x)``: the shift follows the sign of the input. Bias correction measures it
on the first calibration samples; when those are positive and the held-out ones negative,
the correction doubles the held-out shift instead of removing it, and the driver must ship
the uncorrected model. A corrected model that passes ships without the comparison. Judged independently: onnxruntime outputs against the float model's,
SQNR computed with numpy."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
from onnx import TensorProto as TP

import optcc
from optcc.quant.driver import quantize_int8
from optcc.quant.fallback import Target
from calls import first_arguments
from reference import lossy_metrics

# an SQNR no 8-bit model reaches: judged by the float model's noise floor alone, both variants fail
OPTIONS = dict(require_speedup=False, require_target=False, accuracy_fallback=False, equalize=False,
               target=Target(min_sqnr_db=200.0))


def biased_depthwise() -> onnx.ModelProto:
    step = 1.0 / 127  # the per-channel weight scale (max |w| = 1)
    w = np.full((4, 1, 3, 3), 0.55 * step, np.float32)  # each rounds to 1 step: +0.45 step
    w[:, 0, 1, 1] = 1.0
    inits = [nh.from_array(w, "W"), nh.from_array(np.full(4, 0.1, np.float32), "B")]
    nodes = [oh.make_node("Conv", ["x", "W", "B"], ["y"], pads=[1, 1, 1, 1], group=4, name="dw")]
    graph = oh.make_graph(nodes, "dw", [oh.make_tensor_value_info("x", TP.FLOAT, ["N", 4, 16, 16])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, ["N", 4, 16, 16])], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


def data(held_sign: float) -> list[dict[str, np.ndarray]]:
    """10 samples: 4 positive (bias correction measures on these), 4 over [-1, 1] (the range
    covers both signs), then the 2 held out, of sign ``held_sign``."""
    rng = np.random.default_rng(3)
    shape = (1, 4, 16, 16)
    first = [rng.uniform(0.5, 1.0, shape) for _ in range(4)]
    middle = [rng.uniform(-1.0, 1.0, shape) for _ in range(4)]
    held = [held_sign * rng.uniform(0.5, 1.0, shape) for _ in range(2)]
    return [{"x": a.astype(np.float32)} for a in [*first, *middle, *held]]


def held_out_sqnr(model: onnx.ModelProto, quantized: optcc.ir.Model, held: list) -> float:
    (sqnr_db, _), = lossy_metrics(model, quantized, held)
    return sqnr_db


def test_bias_correction_that_worsens_the_held_out_samples_is_dropped(monkeypatch) -> None:
    from optcc.quant import driver

    model, samples = biased_depthwise(), data(held_sign=-1.0)
    built = first_arguments(monkeypatch, driver, "create_pass")
    shipped, stats = quantize_int8(model, samples, **OPTIONS)
    # the uncorrected model judged and shipped is the one built before its correction, not built again
    assert built.count("quantize-int8") == 1
    monkeypatch.undo()
    forced, forced_stats = quantize_int8(model, samples, metric=None, **OPTIONS)  # no judge: always corrected
    plain, _ = quantize_int8(model, samples, bias_correction=False, **OPTIONS)
    assert forced_stats["pass"]["bias_correction"]["layers"] == 1
    assert stats["bias_correction"]["kept"] is False
    assert "bias_correction" not in stats["pass"]
    assert optcc.ir.serialize(shipped).SerializeToString() == optcc.ir.serialize(plain).SerializeToString()
    held = samples[-2:]
    assert held_out_sqnr(model, shipped, held) > held_out_sqnr(model, forced, held) + 3.0


def test_bias_correction_that_helps_is_kept() -> None:
    model, samples = biased_depthwise(), data(held_sign=1.0)
    shipped, stats = quantize_int8(model, samples, **OPTIONS)
    plain, _ = quantize_int8(model, samples, bias_correction=False, **OPTIONS)
    assert stats["bias_correction"]["kept"] is True
    assert stats["pass"]["bias_correction"]["layers"] == 1
    held = samples[-2:]
    assert held_out_sqnr(model, shipped, held) > held_out_sqnr(model, plain, held) + 3.0


def test_a_corrected_model_that_passes_ships_without_the_comparison() -> None:
    model, samples = biased_depthwise(), data(held_sign=-1.0)
    options = {**OPTIONS, "target": Target(min_sqnr_db=10.0)}  # both variants reach 10 dB
    _, stats = quantize_int8(model, samples, **options)
    assert stats["bias_correction"] == {"kept": True, "shortfall_corrected": 1.0}
    assert stats["pass"]["bias_correction"]["layers"] == 1


def test_only_a_refusal_of_the_measuring_model_skips_bias_correction(monkeypatch) -> None:
    """onnxruntime refusing bias correction's measuring model leaves the biases as they are,
    with the reason in the stats; any other error in bias correction is a bug and raises."""
    import pytest
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    from optcc.quant import driver

    model, samples = biased_depthwise(), data(held_sign=1.0)
    plain, _ = quantize_int8(model, samples, bias_correction=False, metric=None, **OPTIONS)

    def refused(*args, **kwargs):
        raise ort_state.NotImplemented("Could not find an implementation for Conv(17) node with name 'dw'")

    monkeypatch.setattr(driver, "correct_biases", refused)
    shipped, stats = quantize_int8(model, samples, metric=None, **OPTIONS)
    assert stats["pass"]["bias_correction"] == {
        "layers": 0, "error": "Could not find an implementation for Conv(17) node with name 'dw'"}
    assert optcc.ir.serialize(shipped).SerializeToString() == optcc.ir.serialize(plain).SerializeToString()
    assert held_out_sqnr(model, shipped, samples[-2:]) > 20.0  # the uncorrected INT8 model, against float

    def broken(*args, **kwargs):
        raise KeyError("a bug in bias correction")

    monkeypatch.setattr(driver, "correct_biases", broken)
    with pytest.raises(KeyError, match="a bug in bias correction"):
        quantize_int8(model, samples, metric=None, **OPTIONS)
