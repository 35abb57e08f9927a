"""A layer whose result is rescaled (hard-swish as exported: ``x * Clip(x + 3, 0, 6) / 6``,
the ``/ 6`` folded into the consumer's dequantization scale) keeps a measurable error: its
result is the rescale's DequantizeLinear, compared with the rescale's float result."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
from onnx import TensorProto as TP
from onnx.reference import ReferenceEvaluator

import optcc
from optcc.infra.registry import create_pass
from optcc.quant import fallback
from optcc.quant.calibration import calibrate


def _model() -> onnx.ModelProto:
    """Conv -> hard-swish (``Mul`` of the conv and its clipped shift, ``Div`` by 6) -> Conv."""
    rng = np.random.default_rng(5)
    w1 = (rng.normal(size=(8, 3, 3, 3)) * 0.5).astype(np.float32)
    w2 = (rng.normal(size=(4, 8, 1, 1)) * 0.3).astype(np.float32)
    scalars = [nh.from_array(np.array(v, np.float32), n) for v, n in ((3.0, "three"), (0.0, "zero"), (6.0, "six"))]
    nodes = [oh.make_node("Conv", ["x", "W1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             oh.make_node("Add", ["c1", "three"], ["a"], name="add3"),
             oh.make_node("Clip", ["a", "zero", "six"], ["clip"], name="clip"),
             oh.make_node("Mul", ["c1", "clip"], ["m"], name="hswish"),
             oh.make_node("Div", ["m", "six"], ["d"], name="div6"),
             oh.make_node("Conv", ["d", "W2"], ["y"], name="conv2")]
    graph = oh.make_graph(nodes, "hardswish", [oh.make_tensor_value_info("x", TP.FLOAT, [1, 3, 8, 8])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, [1, 4, 8, 8])],
                          [nh.from_array(w1, "W1"), nh.from_array(w2, "W2"), *scalars])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _samples(n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    return [{"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(n)]


def _fake_quantize(x: np.ndarray, scale: float, zero: int, out_scale: float | None = None) -> np.ndarray:
    """uint8 QuantizeLinear (round half to even, saturate) then DequantizeLinear with
    ``out_scale`` (``scale`` when None), in float64."""
    q = np.clip(np.round(x.astype(np.float64) / scale) + zero, 0, 255)
    return (q - zero) * (scale if out_scale is None else out_scale)


def test_a_rescaled_hard_swish_product_has_its_own_error() -> None:
    """The ``Mul``'s 8-bit result is read by conv2's DequantizeLinear at scale / 6 (no DQ of
    its own is left): its local SQNR is that DQ's output with float inputs against the float
    model's ``d``, computed here in numpy from the float model's intermediates (onnx's
    reference evaluator) and the quantized model's scales."""
    proto, samples = _model(), _samples(8)
    float_model = optcc.ir.load(proto)
    result = create_pass("quantize-int8", ranges=calibrate(float_model, samples[:4], "minmax").ranges,
                         count_fused=False)(float_model.clone())
    assert result.stats["rescaled"] == {"Div": 1}
    quantized = result.model
    assert "hswish" in result.stats["layers"]
    float_name, quant_name = result.stats["layer_outputs"]["hswish"]
    assert float_name == "d" and quant_name is not None

    held = samples[4:]
    local = fallback.local_sqnr(float_model, quantized, result.stats["layer_outputs"], held)
    propagated = fallback.propagated_sqnr(float_model, quantized, result.stats["layer_outputs"], held)
    assert math.isfinite(local["hswish"]) and math.isfinite(propagated["hswish"])

    consts = {name: float(np.asarray(v.const_value.numpy()).reshape(()))
              for name, v in quantized.graph.initializers.items() if v.const_value is not None
              and v.const_value.size == 1}
    dq_d = next(n for n in quantized.graph if n.outputs[0].name == quant_name)
    q_m = dq_d.inputs[0].producer()
    q_c1 = next(n for n in quantized.graph if n.op_type == "QuantizeLinear" and n.inputs[0].name == "c1")
    q_a = next(n for n in quantized.graph if n.op_type == "QuantizeLinear" and n.inputs[0].name == "a")

    def params(node: onnx.NodeProto) -> tuple[float, int]:
        return consts[node.inputs[1].name], int(consts[node.inputs[2].name])

    evaluator = ReferenceEvaluator(proto)
    signal = noise = 0.0
    for feeds in held:
        c1, a, d = evaluator.run(["c1", "a", "d"], feeds)
        product = _fake_quantize(c1, *params(q_c1)) * _fake_quantize(a, *params(q_a))
        m_scale, m_zero = params(q_m)
        got = _fake_quantize(product, m_scale, m_zero, out_scale=consts[dq_d.inputs[1].name])
        signal += float(np.sum(d.astype(np.float64) ** 2))
        noise += float(np.sum((got - d) ** 2))
    expected = 10 * math.log10(signal / noise)
    assert abs(local["hswish"] - expected) < 0.05, (local["hswish"], expected)

    # its error as the outputs see it is measured too, so the ranking orders it among the others
    assert math.isfinite(fallback.output_sqnr(float_model, quantized, result.stats["layer_outputs"], held)["hswish"])
