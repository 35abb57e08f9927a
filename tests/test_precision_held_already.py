"""A precision asked of a model that holds it already (INT8, dynamic INT8 or weight-only
of a QDQ model, FP16 of a float16 one), and the ranges-less ``quantize-int8`` pass named
alone: the output computes what the input does, and the report (and the command line)
says why nothing was converted. A float model with nothing to convert is still declined."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
from onnx import TensorProto as TP

import pytest

import optcc
from optcc import cli
from reference import EXACT_RTOL, assert_close, expected_outputs


def _qdq_conv() -> onnx.ModelProto:
    """x -> Q -> DQ -> Conv(W from int8 through DQ) -> Relu: an INT8 model in QDQ form."""
    rng = np.random.default_rng(3)
    w_q = rng.integers(-127, 128, size=(4, 3, 3, 3)).astype(np.int8)
    inits = [nh.from_array(w_q, "w_q"), nh.from_array(np.array(0.01, np.float32), "w_s"),
             nh.from_array(np.array(1 / 255, np.float32), "x_s"), nh.from_array(np.array(0, np.uint8), "x_z")]
    nodes = [
        oh.make_node("QuantizeLinear", ["x", "x_s", "x_z"], ["x_q"]),
        oh.make_node("DequantizeLinear", ["x_q", "x_s", "x_z"], ["x_dq"]),
        oh.make_node("DequantizeLinear", ["w_q", "w_s"], ["w"]),
        oh.make_node("Conv", ["x_dq", "w"], ["c"], pads=[1, 1, 1, 1]),
        oh.make_node("Relu", ["c"], ["y"]),
    ]
    graph = oh.make_graph(nodes, "qdq", [oh.make_tensor_value_info("x", TP.FLOAT, [1, 3, 8, 8])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, [1, 4, 8, 8])], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 19)])
    onnx.checker.check_model(model)
    return model


def _samples(n: int = 5) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"x": rng.random((1, 3, 8, 8), dtype=np.float32)} for _ in range(n)]


def test_int8_on_a_qdq_model_keeps_it_and_says_it_is_quantized_already():
    model = _qdq_conv()
    result = optcc.optimize(model, level=2, int8_calibration=_samples())
    assert result.precision["int8"] is None  # the result holds INT8 as asked: not a decline
    record = next(r for r in result.report.passes if r.name == "quantize-int8-calibrated")
    assert record.status == "unchanged"
    assert any(w.startswith("INT8: nothing left to convert: the model is already quantized (")
               and "1 QuantizeLinear" in w for w in result.report.warnings)
    for feeds in _samples(2):
        assert_close(expected_outputs(result.model, feeds), expected_outputs(model, feeds), EXACT_RTOL)


def test_cli_int8_on_a_qdq_model_exits_0_with_the_reason(tmp_path, capsys):
    source, calibration, out = tmp_path / "q.onnx", tmp_path / "cal.npz", tmp_path / "out.onnx"
    onnx.save(_qdq_conv(), source)
    np.savez(calibration, x=np.stack([s["x"] for s in _samples()]))
    assert cli.main([str(source), "-o", str(out), "--int8", "--calibration", str(calibration)]) == 0
    assert "already quantized" in capsys.readouterr().err
    feeds = _samples(1)[0]
    assert_close(expected_outputs(onnx.load(out), feeds), expected_outputs(_qdq_conv(), feeds), EXACT_RTOL)


def test_quantize_int8_named_alone_says_it_has_no_ranges():
    model = _qdq_conv()
    result = optcc.optimize(model, passes=["quantize-int8"])
    assert any(w.startswith("pass 'quantize-int8' changed nothing: no calibrated ranges given")
               for w in result.report.warnings)
    feeds = _samples(1)[0]
    assert_close(expected_outputs(result.model, feeds), expected_outputs(model, feeds), EXACT_RTOL)


@pytest.mark.parametrize("mode", [{"int8_dynamic": True}, {"weight_only": "int8"}])
def test_other_integer_modes_on_a_qdq_model_say_it_is_quantized_already(mode):
    model = _qdq_conv()
    result = optcc.optimize(model, level=2, **mode)
    kind = "int8-dynamic" if "int8_dynamic" in mode else "weights"
    assert result.precision[kind] is None
    assert f"{kind.upper()}: nothing left to convert: the model is quantized already" in result.report.warnings
    feeds = _samples(1)[0]
    assert_close(expected_outputs(result.model, feeds), expected_outputs(model, feeds), EXACT_RTOL)


def test_fp16_of_a_float16_model_says_so():
    w = np.random.default_rng(2).normal(size=(8, 8)).astype(np.float16)
    graph = oh.make_graph([oh.make_node("MatMul", ["x", "w"], ["y"])], "half",
                          [oh.make_tensor_value_info("x", TP.FLOAT16, [2, 8])],
                          [oh.make_tensor_value_info("y", TP.FLOAT16, [2, 8])], [nh.from_array(w, "w")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    result = optcc.optimize(model, level=2, fp16=True)
    assert result.precision["fp16"] is None
    assert "FP16: nothing left to convert: every float weight is float16 already" in result.report.warnings
    # nothing was converted, so no float16 range was judged on the generated inputs
    assert not any("FP16 ranges were judged" in w for w in result.report.warnings), result.report.warnings
    feeds = {"x": np.random.default_rng(3).normal(size=(2, 8)).astype(np.float16)}
    assert_close(expected_outputs(result.model, feeds), [feeds["x"].astype(np.float32) @ w.astype(np.float32)], 1e-2)


def test_a_float_model_with_an_8_bit_tensor_and_nothing_to_quantize_is_still_declined():
    """A uint8 Cast is not quantization: weight-only INT8 with no MatMul/Gemm/Conv to
    quantize declines (exit 5 on the command line), it does not pass as held already."""
    graph = oh.make_graph([oh.make_node("Cast", ["x"], ["b"], to=TP.UINT8), oh.make_node("Cast", ["b"], ["y"], to=TP.FLOAT)],
                          "casts", [oh.make_tensor_value_info("x", TP.FLOAT, [4])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, [4])])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    result = optcc.optimize(model, level=2, weight_only="int8", allow_float_fallback=True)
    assert result.precision["weights"] is not None
    feeds = {"x": np.array([0.2, 1.7, 3.0, 250.4], np.float32)}
    assert_close(expected_outputs(result.model, feeds), [np.floor(feeds["x"])], EXACT_RTOL)


def test_int8_on_a_weight_only_quantized_model_does_not_unpack_its_weights():
    """INT8's preparation folds generated weights whatever their size, but a
    DequantizeLinear of a stored int8 weight is the weight's quantized form, kept: the
    model is quantized already, keeps its int8 weight (no float32 copy four times its
    size), and the report says so."""
    rng = np.random.default_rng(4)
    w_q = rng.integers(-127, 128, size=(512, 1024)).astype(np.int8)  # 2 MiB as float32: past the 1 MiB policy
    graph = oh.make_graph(
        [oh.make_node("DequantizeLinear", ["w_q", "w_s"], ["w"]), oh.make_node("MatMul", ["x", "w"], ["h"]),
         oh.make_node("Relu", ["h"], ["y"])], "weight_only",
        [oh.make_tensor_value_info("x", TP.FLOAT, [4, 512])], [oh.make_tensor_value_info("y", TP.FLOAT, [4, 1024])],
        [nh.from_array(w_q, "w_q"), nh.from_array(np.array(0.004, np.float32), "w_s")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 19)])
    samples = [{"x": rng.standard_normal((4, 512)).astype(np.float32)} for _ in range(10)]
    result = optcc.optimize(model, level=2, int8_calibration=samples)
    assert result.precision["int8"] is None
    assert any(w.startswith("INT8: nothing left to convert: the model is already quantized (")
               for w in result.report.warnings)
    weights = {t.name: nh.to_array(t) for t in result.model.graph.initializer}
    assert any(a.dtype == np.int8 and np.array_equal(a, w_q) for a in weights.values())
    assert not any(a.dtype == np.float32 and a.size == w_q.size for a in weights.values())
    for feeds in samples[:2]:
        assert_close(expected_outputs(result.model, feeds), expected_outputs(model, feeds), EXACT_RTOL)
