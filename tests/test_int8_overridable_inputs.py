"""INT8 on a graph input that has an initializer default (IR >= 4: the caller may feed
another value). It is an activation, not a weight: calibrated, quantized with an
activation Q/DQ (or its node kept float), never baked in from the default. Below IR 4 an
initializer listed as an input is a constant (onnxruntime does not let a caller feed it)
and is quantized as a weight, as before."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
import onnx_ir as ir
import pytest
from onnx import TensorProto as TP

import optcc
from optcc.passes.quantize_int8 import QuantizeInt8Pass
from optcc.quant.calibration import calibration_tensors, collect_statistics
from optcc.quant.fallback import Target
from reference import expected_outputs_float64, onnxruntime_outputs

# what the driver must reach on the held-out samples (16- and 32-wide random MatMuls lose
# ~8 dB each in INT8); the test checks it on every sample
MIN_SQNR_DB = 15.0
OPTIONS = {"require_speedup": False, "metric": "sqnr", "target": Target(min_sqnr_db=MIN_SQNR_DB)}


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], out_dim: int,
           inits: list[onnx.TensorProto], ir_version: int = 8) -> onnx.ModelProto:
    graph = oh.make_graph(nodes, "g", inputs, [oh.make_tensor_value_info("y", TP.FLOAT, ["N", out_dim])], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=ir_version)
    onnx.checker.check_model(model)
    return model


def _gain_model(ir_version: int = 8) -> onnx.ModelProto:
    """``y = (Relu(x @ W1) * gain) @ W2`` with ``gain`` a graph input defaulting to 1."""
    rng = np.random.default_rng(0)
    inits = [nh.from_array((rng.normal(size=(16, 32)) * 0.3).astype(np.float32), "W1"),
             nh.from_array((rng.normal(size=(32, 8)) * 0.3).astype(np.float32), "W2"),
             nh.from_array(np.array(1.0, np.float32), "gain")]
    nodes = [oh.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
             oh.make_node("Relu", ["h"], ["r"], name="relu"),
             oh.make_node("Mul", ["r", "gain"], ["g"], name="scale"),
             oh.make_node("MatMul", ["g", "W2"], ["y"], name="mm2")]
    inputs = [oh.make_tensor_value_info("x", TP.FLOAT, ["N", 16]), oh.make_tensor_value_info("gain", TP.FLOAT, [])]
    if ir_version < 4:  # every initializer must be listed as an input
        inputs += [oh.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits if t.name != "gain"]
    return _model(nodes, inputs, 8, inits, ir_version)


def _fed_weight_model() -> onnx.ModelProto:
    """``y = Relu(x @ W1) @ B`` with ``B`` a graph input whose default is tiny."""
    rng = np.random.default_rng(1)
    inits = [nh.from_array((rng.normal(size=(16, 32)) * 0.3).astype(np.float32), "W1"),
             nh.from_array(np.full((32, 8), 1e-3, np.float32), "B")]
    nodes = [oh.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
             oh.make_node("Relu", ["h"], ["r"], name="relu"),
             oh.make_node("MatMul", ["r", "B"], ["y"], name="mm2")]
    inputs = [oh.make_tensor_value_info("x", TP.FLOAT, ["N", 16]), oh.make_tensor_value_info("B", TP.FLOAT, [32, 8])]
    return _model(nodes, inputs, 8, inits)


def _gain_samples(count: int = 20) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(2)
    return [{"x": rng.normal(size=(4, 16)).astype(np.float32),
             "gain": np.array(rng.uniform(20.0, 40.0), np.float32)} for _ in range(count)]


def _weight_samples(count: int = 20) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    return [{"x": rng.normal(size=(4, 16)).astype(np.float32),
             "B": (rng.normal(size=(32, 8)) * 2.0).astype(np.float32)} for _ in range(count)]


def _sqnr_db(model: onnx.ModelProto, quantized: onnx.ModelProto, samples: list[dict[str, np.ndarray]]) -> float:
    """SQNR of the quantized model's output on onnxruntime against the float model's
    float64 evaluation (onnx's reference evaluator), over all samples together."""
    want = np.concatenate([expected_outputs_float64(model, s)[0].ravel() for s in samples])
    got = np.concatenate([onnxruntime_outputs(quantized, s)[0].astype(np.float64).ravel() for s in samples])
    return float(10 * np.log10(np.sum(want ** 2) / np.sum((got - want) ** 2)))


def _inputs_quantized(model: onnx.ModelProto) -> set[str]:
    return {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}


def _integer_ops(model: onnx.ModelProto) -> list[str]:
    """Op types of the nodes whose every input is dequantized (onnxruntime runs them on
    8-bit data)."""
    dequantized = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return sorted(n.op_type for n in model.graph.node
                  if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and set(n.input) <= dequantized)


def test_fed_gain_is_calibrated_and_quantized_as_an_activation() -> None:
    model, samples = _gain_model(), _gain_samples()
    result = optcc.optimize(model, int8_calibration=samples, int8_options=OPTIONS)
    assert result.precision["int8"] is None
    quantized = result.model
    assert [i.name for i in quantized.graph.input] == ["x", "gain"]  # still fed
    assert "gain" in _inputs_quantized(quantized)  # an activation Q/DQ on the fed value
    assert _integer_ops(quantized) == ["MatMul", "MatMul", "Mul"]
    assert _sqnr_db(model, quantized, samples) >= MIN_SQNR_DB


def test_fed_matmul_weight_is_an_activation_not_a_baked_weight() -> None:
    model, samples = _fed_weight_model(), _weight_samples()
    result = optcc.optimize(model, int8_calibration=samples, int8_options=OPTIONS)
    assert result.precision["int8"] is None
    quantized = result.model
    assert [i.name for i in quantized.graph.input] == ["x", "B"]
    assert "B" in _inputs_quantized(quantized)
    assert _integer_ops(quantized) == ["MatMul", "MatMul"]
    assert _sqnr_db(model, quantized, samples) >= MIN_SQNR_DB


def test_below_ir4_an_initializer_listed_as_input_is_a_constant() -> None:
    """IR 3: every initializer is an input and none can be fed; the gain is a constant
    rescale folded into the next layer's dequantization, as for any constant."""
    model = _gain_model(ir_version=3)
    rng = np.random.default_rng(4)
    samples = [{"x": rng.normal(size=(4, 16)).astype(np.float32)} for _ in range(20)]
    result = optcc.optimize(model, int8_calibration=samples, int8_options=OPTIONS)
    assert result.precision["int8"] is None
    quantized = result.model
    assert [i.name for i in quantized.graph.input] == ["x"]
    assert "Mul" not in {n.op_type for n in quantized.graph.node}  # folded as a rescale
    assert _integer_ops(quantized) == ["MatMul", "MatMul"]
    assert _sqnr_db(model, quantized, samples) >= MIN_SQNR_DB


def test_calibration_measures_a_fed_input_only_from_ir4() -> None:
    assert "gain" in calibration_tensors(ir.from_proto(_gain_model()))
    assert "gain" not in calibration_tensors(ir.from_proto(_gain_model(ir_version=3)))


@pytest.mark.parametrize("bins", [0, 64])  # min/max inside the graph; tensors fetched whole
def test_calibration_reads_the_default_where_a_sample_feeds_none(bins: int) -> None:
    rng = np.random.default_rng(6)
    x = [rng.normal(size=(4, 16)).astype(np.float32) for _ in range(3)]
    samples = [{"x": x[0], "gain": np.array(30.0, np.float32)}, {"x": x[1]}, {"x": x[2], "gain": np.array(4.0, np.float32)}]
    stats = collect_statistics(_gain_model(), samples, bins=bins)
    assert stats.ranges()["gain"] == (1.0, 30.0)


def test_pass_keeps_a_conv_with_a_fed_bias_float() -> None:
    """The pass quantizes a Conv's bias as a constant: a fed bias keeps the Conv float,
    so a fed value computes exactly what the float model computes."""
    rng = np.random.default_rng(5)
    inits = [nh.from_array((rng.normal(size=(4, 3, 3, 3)) * 0.3).astype(np.float32), "W"),
             nh.from_array(np.zeros(4, np.float32), "b")]
    graph = oh.make_graph([oh.make_node("Conv", ["x", "W", "b"], ["y"], name="conv")], "g",
                          [oh.make_tensor_value_info("x", TP.FLOAT, [1, 3, 8, 8]),
                           oh.make_tensor_value_info("b", TP.FLOAT, [4])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, [1, 4, 6, 6])], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)
    result = QuantizeInt8Pass({"x": (-3.0, 3.0), "y": (-60.0, 60.0)}, count_fused=False)(ir.from_proto(model))
    assert not result.modified
    assert result.stats["kept_float"] == {"bias not a constant vector": 1}
    feeds = {"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32), "b": np.full(4, 50.0, np.float32)}
    want = expected_outputs_float64(model, feeds)[0]
    np.testing.assert_allclose(onnxruntime_outputs(ir.to_proto(result.model), feeds)[0], want, rtol=1e-5, atol=1e-4)


def test_a_decline_says_which_layers_read_fed_weights_and_what_to_do() -> None:
    """A Conv whose weight is a graph input with a default stays float; the decline names
    how many layers read such weights and how a user whose weights are fixed gets them
    quantized, and the model is returned unchanged (it computes the float model's values)."""
    rng = np.random.default_rng(7)
    weight = (rng.normal(size=(4, 3, 3, 3)) * 0.3).astype(np.float32)
    graph = oh.make_graph([oh.make_node("Conv", ["x", "W"], ["y"], name="conv")], "g",
                          [oh.make_tensor_value_info("x", TP.FLOAT, ["N", 3, 8, 8]),
                           oh.make_tensor_value_info("W", TP.FLOAT, [4, 3, 3, 3])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, ["N", 4, 6, 6])], [nh.from_array(weight, "W")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)
    samples = [{"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(12)]
    result = optcc.optimize(model, int8_calibration=samples, int8_options=OPTIONS, allow_float_fallback=True)
    reason = result.precision["int8"]
    assert reason is not None and "1 Conv/Gemm/MatMul layer(s) read their weight from a graph input" in reason
    assert "remove them from the model's graph inputs" in reason
    feeds = {"x": samples[0]["x"], "W": -weight}
    want = expected_outputs_float64(model, feeds)[0]
    np.testing.assert_allclose(onnxruntime_outputs(result.model, feeds)[0], want, rtol=1e-5, atol=1e-4)


def test_a_default_no_sample_feeds_is_named_in_a_warning() -> None:
    """Calibrated on samples that never feed ``gain``, INT8 sees its default only: the report
    names the input (values fed later beyond it saturate); samples that feed it raise no
    such warning. Either model computes the float64 result on what it was calibrated on."""
    model = _gain_model()
    unfed = [{"x": s["x"]} for s in _gain_samples()]
    result = optcc.optimize(model, int8_calibration=unfed, int8_options=OPTIONS)
    assert result.precision["int8"] is None
    assert any("'gain'" in w and "default value only" in w for w in result.report.warnings)
    assert _sqnr_db(model, result.model, unfed) >= MIN_SQNR_DB
    fed = optcc.optimize(model, int8_calibration=_gain_samples(), int8_options=OPTIONS)
    assert not any("default value only" in w for w in fed.report.warnings)
