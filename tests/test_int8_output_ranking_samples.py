"""The output ranking (each layer's own error taken to the outputs, one float run per layer
and sample) skips a sample where the fully quantized model barely deviates from the float
one: a layer's error there adds next to nothing to the squared error summed over the
samples, so the order cannot change, and its runs are saved (a text detector's blank map
on a text-free photo)."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import optcc
from reference import lossy_metrics, onnxruntime_outputs
from test_int8_output_ranking import TARGET, _model, _rows
from optcc.infra.registry import create_pass
from optcc.passes import quantize_int8 as quantize_int8_pass
from optcc.quant import fallback
from optcc.quant.calibration import calibrate
from optcc.quant.driver import quantize_int8


def _optimized_outputs(model: optcc.ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The model's outputs on onnxruntime CPU with every graph optimization (as a quantized
    candidate is judged: its integer kernels)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(optcc.ir.serialize(model).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def test_an_evaluation_keeps_each_samples_squared_error() -> None:
    """``Evaluation.noise``: per output, each sample's squared error of the candidate (run
    with onnxruntime's optimizations) against the float model (run without), as numpy
    computes it from onnxruntime's runs; the blank sample's is 0."""
    proto, samples = _model(), [*_rows(3), {"x": np.zeros((4, 16), np.float32)}]
    float_model = optcc.ir.load(proto)
    ranges = calibrate(float_model, _rows(8), "minmax").ranges
    quantized = create_pass("quantize-int8", ranges=ranges, count_fused=False)(float_model.clone()).model
    evaluation = fallback.evaluate(float_model, quantized, samples, TARGET)
    for feeds, at in zip(samples, range(len(samples))):
        refs = dict(zip(("d", "y"), onnxruntime_outputs(proto, feeds)))
        gots = dict(zip(("d", "y"), _optimized_outputs(quantized, feeds)))
        for name in ("d", "y"):
            expected = float(np.sum((refs[name].astype(np.float64) - gots[name].astype(np.float64)) ** 2))
            assert evaluation.noise[name][at] == pytest.approx(expected, rel=1e-6, abs=1e-12), (name, at)
    assert evaluation.noise["d"][3] == evaluation.noise["y"][3] == 0.0
    assert all(evaluation.noise[name][0] > 0 for name in ("d", "y"))


def test_deviating_positions_keep_a_sample_any_output_deviates_on() -> None:
    """The positions kept are those where some output's squared error reaches
    ``NEGLIGIBLE_DEVIATION`` of that output's largest among the positions asked about, in
    order (a layer ranks by its worst output, which need not be the model's worst); an
    evaluation without errors per sample, or one with none anywhere, keeps them all."""
    worst = [4.0, 0.0, 1.0, 0.9 * fallback.NEGLIGIBLE_DEVIATION * 4.0, 1.1 / fallback.NEGLIGIBLE_DEVIATION * 4.0]
    other = [0.0, 0.0, 0.0, 9.0, 0.0]
    evaluation = fallback.Evaluation({"worst": 10.0, "other": 30.0}, {}, TARGET,
                                     noise={"worst": worst, "other": other})
    assert fallback.deviating_positions(evaluation, [0, 1, 2]) == [0, 2]
    assert fallback.deviating_positions(evaluation, [0, 1, 2, 3]) == [0, 2, 3]  # 'other' deviates on 3
    assert fallback.deviating_positions(evaluation, [0, 4]) == [4]
    assert fallback.deviating_positions(evaluation, [1]) == [1]  # none deviates: kept
    assert fallback.deviating_positions(fallback.Evaluation({}, {}, TARGET), [0, 3]) == [0, 3]
    two = fallback.Evaluation({"a": 10.0, "b": 30.0}, {}, TARGET, noise={"a": [1.0, 0.001], "b": [0.0, 50.0]})
    assert fallback.deviating_positions(two, [0, 1]) == [0, 1]


def test_the_output_ranking_skips_a_sample_where_the_model_does_not_deviate(monkeypatch) -> None:
    """The last held-out sample is blank (``x = 0``: every output is 0, float and INT8):
    the output ranking runs on the first one alone, its SQNRs those of both together, and
    the fallback returns the cancelled pair to float and meets the target against
    onnxruntime's float run. (The planning rule for cancellations is off here.)"""
    monkeypatch.setattr(quantize_int8_pass, "CANCELLATION_RATIO", float("inf"))
    blank = {"x": np.zeros((4, 16), np.float32)}
    model, data = _model(), [*_rows(19), blank]
    assert all(not np.any(out) for out in onnxruntime_outputs(model, blank))
    asked: list[list[dict[str, np.ndarray]]] = []
    measure = fallback.output_sqnr

    def spy(reference, quantized, layer_outputs, samples, deltas=None):  # noqa: ANN001, ANN202
        asked.append(list(samples))
        measured = measure(reference, quantized, layer_outputs, samples, deltas=deltas)
        with_blank = measure(reference, quantized, layer_outputs, [*samples, blank])
        assert measured.keys() == with_blank.keys()
        assert all(math.isclose(measured[k], with_blank[k], rel_tol=1e-9) for k in measured)
        return measured

    monkeypatch.setattr(fallback, "output_sqnr", spy)
    q, stats = quantize_int8(model, data, "minmax", min_speedup=1e-9, target=TARGET, metric=None,
                             max_float_layers=4)
    report = stats["fallback"]
    assert len(asked) == 1 and len(asked[0]) == 1 and asked[0][0] is data[16]  # held out: 16..19
    assert set(report["kept_float"]) == {"mm_a", "mm_b"} and report["target_met"] is True
    for sqnr, _ in lossy_metrics(model, q, data[-4:]):
        assert sqnr >= TARGET.min_sqnr_db, sqnr


def test_the_ranking_run_keeps_the_errors_the_output_ranking_needs(monkeypatch) -> None:
    """``local_sqnr`` with ``deltas`` keeps each layer's local error on the samples asked
    for (run last) and measures the same SQNRs as without; those errors are the ones
    ``output_sqnr`` measures itself (equal arrays), and give it the same result. The local
    error of ``mm_a`` is checked against numpy: its quantized result (the fully quantized
    model's ``a``, whose inputs are the graph input's Q/DQ and the dequantized weight, as
    in the float model) minus the float ``x Wa``. (The planning rule for cancellations is
    off here: it would keep ``mm_a`` float.)"""
    monkeypatch.setattr(quantize_int8_pass, "CANCELLATION_RATIO", float("inf"))
    proto, samples = _model(), _rows(6)
    float_model = optcc.ir.load(proto)
    ranges = calibrate(float_model, samples[:3], "minmax").ranges
    result = create_pass("quantize-int8", ranges=ranges, count_fused=False)(float_model.clone())
    quantized, layer_outputs = result.model, result.stats["layer_outputs"]
    held = samples[3:]
    plain = fallback.local_sqnr(float_model, quantized, layer_outputs, held)
    deltas: dict[str, list[np.ndarray]] = {}
    kept = fallback.local_sqnr(float_model, quantized, layer_outputs, held, deltas=deltas, delta_samples={0})
    assert kept == plain and {"mm_a", "mm_b", "mm1"} <= deltas.keys()
    assert all(len(v) == 1 for v in deltas.values())
    for layer, values in deltas.items():
        probe = onnx.ModelProto()
        probe.CopyFrom(optcc.ir.serialize(quantized))
        probe.graph.output.append(onnx.ValueInfoProto(name=layer_outputs[layer][1]))
        got = onnxruntime_outputs(probe, held[0])[-1]
        if layer == "mm_a":  # its input is the graph input: the quantized model's own result
            expected = got.astype(np.float64) - held[0]["x"].astype(np.float64) @ \
                onnx.numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == "Wa"))
            assert np.allclose(values[0], expected, rtol=1e-5, atol=1e-5)
    measured = fallback.output_sqnr(float_model, quantized, layer_outputs, held[:1])
    assert fallback.output_sqnr(float_model, quantized, layer_outputs, held[:1], deltas=deltas) == measured


def test_the_output_ranking_measures_samples_the_ranking_run_did_not(monkeypatch) -> None:
    """With one ranking sample, the output ranking's last sample is not among those the
    ranking run measured: ``output_sqnr`` measures it itself, and the order is that of
    the errors measured apart (``local_sqnr`` then ``output_sqnr`` without kept errors)."""
    monkeypatch.setattr(quantize_int8_pass, "CANCELLATION_RATIO", float("inf"))
    proto, samples = _model(), _rows(6)
    float_model = optcc.ir.load(proto)
    ranges = calibrate(float_model, samples[:3], "minmax").ranges
    result = create_pass("quantize-int8", ranges=ranges, count_fused=False)(float_model.clone())
    held = samples[3:]
    evaluation = fallback.evaluate(float_model, result.model, held, TARGET)
    report: dict = {}
    order = fallback._estimated_order(float_model, result.model, result.stats, held, evaluation, 1, report)
    layer_outputs = result.stats["layer_outputs"]
    local = fallback.local_sqnr(float_model, result.model, layer_outputs, held[:1])
    seen = fallback.output_sqnr(float_model, result.model, layer_outputs, [held[0], held[-1]])
    assert order == fallback._ranked(result.stats, local, seen, {})
    assert {row["layer"] for row in report["sensitivity"]} == set(result.stats["layers"])
