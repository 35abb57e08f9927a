"""What onnxruntime refuses to build does not stop the INT8 search: a layer whose quantized
form it refuses stays float (the report says why), and a cut of the float model it refuses
is measured on the whole model instead."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
import onnx_ir as ir
import pytest
from onnx import TensorProto as TP

import optcc
from reference import onnxruntime_outputs
from optcc.infra.registry import create_pass
from optcc.quant import driver, fallback
from optcc.quant.calibration import calibrate
from optcc.quant.fallback import Target


def _chain() -> onnx.ModelProto:
    """``y = ((x W1) W2) W3``, three MatMul layers."""
    rng = np.random.default_rng(4)
    weights = [nh.from_array((rng.normal(size=(16, 16)) * 0.3).astype(np.float32), f"W{i}") for i in (1, 2, 3)]
    nodes = [oh.make_node("MatMul", ["x", "W1"], ["h1"], name="mm1"),
             oh.make_node("MatMul", ["h1", "W2"], ["h2"], name="mm2"),
             oh.make_node("MatMul", ["h2", "W3"], ["y"], name="mm3")]
    graph = oh.make_graph(nodes, "chain", [oh.make_tensor_value_info("x", TP.FLOAT, ["N", 16])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, ["N", 16])], weights)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _rows(n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(9)
    return [{"x": rng.normal(size=(4, 16)).astype(np.float32)} for _ in range(n)]


def _int16_result(model: ir.Model, dq_name: str) -> None:
    """Give the Q/DQ pair that makes ``dq_name`` an int16 zero point: opset 17's
    QuantizeLinear and DequantizeLinear take 8-bit integers only, so onnxruntime refuses it."""
    dq = next(node for node in model.graph if node.outputs[0].name == dq_name)
    zero = dq.inputs[2]
    zero.const_value = ir.tensor(np.asarray(zero.const_value.numpy()).astype(np.int16), name=zero.name)
    zero.dtype = ir.DataType.INT16


def test_a_layer_onnxruntime_refuses_stays_float_and_the_search_goes_on() -> None:
    proto, rows = _chain(), _rows(12)
    float_model = optcc.ir.load(proto)
    ranges = calibrate(float_model, rows[:6], "minmax").ranges

    def quantize(exclude: Sequence[str] = (), only: Sequence[str] | None = None) -> tuple[ir.Model, dict[str, Any]]:
        result = create_pass("quantize-int8", ranges=ranges, exclude=list(exclude), only=only,
                             count_fused=False)(float_model.clone())
        stats = dict(result.stats)
        if "mm2" in stats["layers"]:  # its quantized form is one onnxruntime has no kernel for
            _int16_result(result.model, stats["layer_outputs"]["mm2"][1])
        return result.model, stats

    refused_model, _ = quantize()
    with pytest.raises(fallback.RefusedModel):
        fallback.evaluate(float_model, refused_model, rows[6:])

    target = Target(min_sqnr_db=25.0, min_argmax_agreement=0.0)
    model, stats, report = fallback.fallback(float_model, quantize, rows[6:], target, max_float_layers=1)
    assert list(report["refused_layers"]) == ["mm2"]
    assert "DequantizeLinear" in report["refused_layers"]["mm2"] or "QuantizeLinear" in report["refused_layers"]["mm2"]
    assert report["target_met"] is True
    assert "mm2" not in stats["layers"] and "mm2" not in report["kept_float"]  # float before the search
    assert len(stats["layers"]) + len(report["kept_float"]) == 2 and stats["layers"]  # the others searched
    # the model returned runs, within the target of numpy's float64 product
    weights = [nh.to_array(i).astype(np.float64) for i in proto.graph.initializer]
    signal = noise = 0.0
    for feeds in rows[6:]:
        want = feeds["x"].astype(np.float64) @ weights[0] @ weights[1] @ weights[2]
        (got,) = onnxruntime_outputs(optcc.ir.serialize(model), feeds)
        signal += float(np.sum(want**2))
        noise += float(np.sum((want - got) ** 2))
    assert 10 * math.log10(signal / noise) >= target.min_sqnr_db


def test_a_candidate_onnxruntime_refuses_is_a_miss_with_its_reason() -> None:
    """How the search judges a candidate onnxruntime refuses: missed, worst, and why."""
    rows = _rows(12)
    float_model = optcc.ir.load(_chain())
    result = create_pass("quantize-int8", ranges=calibrate(float_model, rows[:6], "minmax").ranges,
                         count_fused=False)(float_model.clone())
    _int16_result(result.model, result.stats["layer_outputs"]["mm2"][1])
    evaluation = fallback.evaluate_candidate(float_model, result.model, rows[6:], Target(), None, None)
    assert evaluation.refused and not evaluation.passed and evaluation.worst_sqnr_db == -math.inf
    assert evaluation.to_dict()["refused"] == evaluation.refused and fallback.shortfall(evaluation) == math.inf


def _fails_to_run(model: ir.Model, dq_name: str) -> None:
    """Route the result of ``dq_name`` through a Reshape to 3 rows: onnxruntime builds the
    session (the row count is dynamic), then cannot run it on 4 rows of 16 (a bug in a
    rewrite, not a model onnxruntime refuses)."""
    dq = next(node for node in model.graph if node.outputs[0].name == dq_name)
    shape = ir.Value(name="optcc_test_bad_shape", const_value=ir.tensor(np.array([3, -1], np.int64)))
    model.graph.register_initializer(shape)
    reshaped = ir.node("Reshape", [dq.outputs[0], shape], name="optcc_test_bad_reshape")
    dq.outputs[0].replace_all_uses_with(reshaped.outputs[0])
    reshaped.replace_input_with(0, dq.outputs[0])
    model.graph.insert_after(dq, reshaped)


@pytest.mark.parametrize("shared", [False, True])
def test_a_candidate_that_fails_to_run_is_not_a_refusal(shared: bool) -> None:
    """Only what onnxruntime refuses to build is a refused candidate: one that builds and
    then fails on the samples raises (the search never reads a crash as a miss), through
    the fallback's own sessions and through the verifier's (``Verifier.outputs``), which
    still report a candidate it refuses to build as refused."""
    proto, rows = _chain(), _rows(12)
    float_model = optcc.ir.load(proto)
    result = create_pass("quantize-int8", ranges=calibrate(float_model, rows[:6], "minmax").ranges,
                         count_fused=False)(float_model.clone())
    outputs = None
    if shared:
        verifier = optcc.numerics.Verifier(proto, inputs=rows[6:])
        outputs = lambda model: verifier.outputs(model, range(len(rows[6:])))  # noqa: E731
    broken = result.model.clone()
    _fails_to_run(broken, result.stats["layer_outputs"]["mm2"][1])
    with pytest.raises(Exception, match="(?i)reshape"):
        fallback.evaluate_candidate(float_model, broken, rows[6:], Target(), None, outputs)
    refused = result.model.clone()
    _int16_result(refused, result.stats["layer_outputs"]["mm2"][1])
    evaluation = fallback.evaluate_candidate(float_model, refused, rows[6:], Target(), None, outputs)
    assert evaluation.refused and not evaluation.passed


def test_a_cut_onnxruntime_refuses_is_measured_on_the_whole_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """``output_sqnr`` starts each layer's runs at a cut of the float model; when onnxruntime
    refuses the cuts (here each made with an op of a domain it does not know), every layer
    is measured from the graph inputs, and the results are those of no cuts at all."""
    proto = _chain()
    rows = _rows(6)
    float_model = optcc.ir.load(proto)
    result = create_pass("quantize-int8", ranges=calibrate(float_model, rows[:3], "minmax").ranges,
                         count_fused=False)(float_model.clone())
    layer_outputs = result.stats["layer_outputs"]
    made: list[int] = []

    def refused_cut(model: onnx.ModelProto, start: int, types: dict[str, int]) -> onnx.ModelProto:
        cut = real_suffix(model, start, types)
        cut.graph.node[0].domain = "optcc.test.unknown"
        made.append(start)
        return cut

    monkeypatch.setattr(fallback, "OUTPUT_SEGMENTS", 1)
    uncut = fallback.output_sqnr(float_model, result.model, layer_outputs, rows[3:])
    monkeypatch.setattr(fallback, "OUTPUT_SEGMENTS", 8)
    real_suffix = fallback.suffix
    monkeypatch.setattr(fallback, "suffix", refused_cut)
    measured = fallback.output_sqnr(float_model, result.model, layer_outputs, rows[3:])
    assert made  # cuts were made, and refused
    assert set(measured) == set(uncut) == {"mm1", "mm2", "mm3"}
    for layer in uncut:
        assert measured[layer] == pytest.approx(uncut[layer], abs=1e-9), layer
    assert all(math.isfinite(v) for v in measured.values())


def _edit_quantized_mm2(monkeypatch: pytest.MonkeyPatch, edit: Any) -> None:
    """Make the INT8 driver's quantize pass apply ``edit(model, name)`` to mm2's quantized
    result (named by its DequantizeLinear output) whenever it quantizes mm2."""

    def editing(name: str, **options: Any) -> Any:
        made = create_pass(name, **options)

        def run(model: ir.Model) -> Any:
            result = made(model)
            if name == "quantize-int8" and "mm2" in result.stats["layers"]:
                edit(result.model, result.stats["layer_outputs"]["mm2"][1])
            return result

        return run

    monkeypatch.setattr(driver, "create_pass", editing)


def _product(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """``_chain``'s output in float64: x W1 W2 W3."""
    w1, w2, w3 = (nh.to_array(i).astype(np.float64) for i in proto.graph.initializer)
    return x.astype(np.float64) @ w1 @ w2 @ w3


def test_quantize_int8_keeps_float_a_layer_onnxruntime_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the driver: the quantize pass's output for mm2 made one onnxruntime refuses
    (as above); INT8 ships with mm2 float, saying why, instead of raising."""
    _edit_quantized_mm2(monkeypatch, _int16_result)
    proto, rows = _chain(), _rows(24)
    q, stats = driver.quantize_int8(proto, rows, "minmax", min_speedup=1e-9, metric=None,
                                    target=Target(min_sqnr_db=20.0, min_argmax_agreement=0.0))
    assert stats["modified"] is True, stats.get("reason")
    assert list(stats["fallback"]["refused_layers"]) == ["mm2"]
    assert "mm2" not in stats["pass"]["layers"]
    for feeds in rows[-4:]:
        want = _product(proto, feeds["x"])
        (got,) = onnxruntime_outputs(optcc.ir.serialize(q), feeds)
        assert 10 * math.log10(np.sum(want**2) / np.sum((want - got) ** 2)) >= 20.0


def test_a_quantized_model_that_fails_to_run_reverts_int8(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through ``optcc.optimize``: the quantize pass's output fails to run (a rewrite's bug,
    not a refusal), so INT8 is reverted with onnxruntime's message, and the float model is
    what is written, equal to the numpy product."""
    _edit_quantized_mm2(monkeypatch, _fails_to_run)
    proto, rows = _chain(), _rows(24)
    result = optcc.optimize(proto, int8_calibration=rows, allow_float_fallback=True,
                            int8_options={"min_speedup": 1e-9, "metric": None})
    (record,) = [r for r in result.report.passes if r.name == "quantize-int8-calibrated"]
    assert record.status == "failed", record.status
    assert "reshape" in (record.reason or "").lower(), record.reason
    ops = {n.op_type for n in result.model.graph.node}
    assert ops == {"MatMul"}
    feeds = rows[-1]
    want = _product(proto, feeds["x"])
    (got,) = onnxruntime_outputs(result.model, feeds)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
