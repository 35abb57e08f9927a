"""INT8: attention scores with an additive padding mask are not rounded to 8 bits.

One 8-bit grid over the masked positions (-10000, or float32's lowest) and the scores (a
few units) rounds every score to one or two levels, and a -inf rounded to the grid's
lowest level unmasks its position: the mask's Add stays float, whether or not the
calibration samples are padded. An Add of a bias that masks nothing is quantized."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper as nh
from onnx import TensorProto as TP
from onnx import helper as oh
import pytest

import optcc
from fixtures.transformers import FLOAT32_MIN, bert_feeds, bert_layer, bert_reference
from optcc.passes.quantize_int8 import QuantizeInt8Pass
from optcc.quant.calibration import calibrate
from reference import onnxruntime_outputs

HIDDEN, HEADS = 32, 2
REASON = "attention mask added to a Softmax input"


def _samples(n: int, seed: int, padded: bool = True) -> list[dict[str, np.ndarray]]:
    samples = []
    for i in range(n):
        feeds = bert_feeds(batch=2, seq=8, hidden=HIDDEN, seed=seed + i)
        feeds["attention_mask"][:] = 1
        if padded:
            feeds["attention_mask"][:, 7 - i % 4:] = 0
        samples.append(feeds)
    return samples


def _layer(fill: float) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The BERT layer with ``fill`` added at masked positions: -inf as torch's SDPA export
    writes it (``Where``), a finite fill as the eager export does (``(1 - mask) * fill``)."""
    if fill == -np.inf:
        return bert_layer("sdpa", hidden=HIDDEN, heads=HEADS)
    proto, weights = bert_layer("eager", hidden=HIDDEN, heads=HEADS)
    (mask_fill,) = [t for t in proto.graph.initializer if t.name == "f32_min"]
    mask_fill.CopyFrom(nh.from_array(np.array(fill, np.float32), "f32_min"))
    return proto, weights


def _quantized(proto: onnx.ModelProto, padded: bool = True) -> optcc.PassResult:
    model = optcc.ir.load(proto)
    ranges = calibrate(model, _samples(8, 10, padded), "minmax").ranges
    return QuantizeInt8Pass(ranges, count_fused=False)(model)


def _softmax_input_producer(model) -> str:  # noqa: ANN001
    (softmax,) = [n for n in model.graph if n.op_type == "Softmax"]
    return softmax.inputs[0].producer().op_type


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("fill", [-10000.0, FLOAT32_MIN, -np.inf])
def test_masked_scores_stay_float_and_attention_survives(fill: float, padded: bool) -> None:
    proto, weights = _layer(fill)
    result = _quantized(proto, padded)
    assert REASON in result.stats["kept_float"], result.stats["kept_float"]
    assert result.stats["quantized"]["MatMul"] == 8  # q, k, v, scores, context, output, both FFN layers
    assert _softmax_input_producer(result.model) == "Add"  # the float mask Add, no DequantizeLinear
    quantized = optcc.ir.serialize(result.model)
    for feeds in _samples(4, 50):  # fresh padded samples, judged against float64 numpy
        want = bert_reference(weights, feeds["hidden_states"], feeds["attention_mask"], heads=HEADS)
        got = onnxruntime_outputs(quantized, feeds)[0].astype(np.float64)
        sqnr = 10 * np.log10(np.sum(want**2) / np.sum((got - want) ** 2))
        assert sqnr >= 20, sqnr  # the mask's Add quantized too: 8-12 dB


def test_a_bias_that_masks_nothing_is_quantized() -> None:
    """-5 at padded positions lowers their weight without removing them: no mask, and
    its Add is quantized like any other."""
    result = _quantized(_layer(-5.0)[0])
    assert REASON not in result.stats["kept_float"]
    assert _softmax_input_producer(result.model) == "DequantizeLinear"


def test_the_walk_up_from_a_mask_stops_at_a_matmul() -> None:
    """A branch that is 0 on every sample (``x @ 0``) added to attention scores is taken
    for a mask, so its Add stays float; the ops above it that compute the activations
    (the residual path's MatMul and Add, q/k/v) stay quantized. The quantized model is
    judged against numpy float64 on fresh samples."""
    rng = np.random.default_rng(0)
    d = 16
    weights = {n: rng.normal(0, 0.3, (d, d)).astype(np.float32) for n in ("W0", "W1", "Wq", "Wk", "Wv", "Wo")}
    weights["Wb"] = np.zeros((d, 8), np.float32)
    nodes = [oh.make_node("MatMul", ["inp", "W0"], ["a0"]), oh.make_node("Relu", ["a0"], ["r0"]),
             oh.make_node("MatMul", ["r0", "W1"], ["a1"]), oh.make_node("Add", ["a1", "inp"], ["x"]),
             oh.make_node("MatMul", ["x", "Wq"], ["q"]), oh.make_node("MatMul", ["x", "Wk"], ["k"]),
             oh.make_node("MatMul", ["x", "Wv"], ["v"]), oh.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
             oh.make_node("MatMul", ["q", "kt"], ["s"]), oh.make_node("MatMul", ["x", "Wb"], ["bias"]),
             oh.make_node("Add", ["s", "bias"], ["sb"]), oh.make_node("Softmax", ["sb"], ["p"], axis=-1),
             oh.make_node("MatMul", ["p", "v"], ["c"]), oh.make_node("MatMul", ["c", "Wo"], ["out"])]
    graph = oh.make_graph(nodes, "zero_branch", [oh.make_tensor_value_info("inp", TP.FLOAT, [1, 8, d])],
                          [oh.make_tensor_value_info("out", TP.FLOAT, [1, 8, d])],
                          [nh.from_array(v, k) for k, v in weights.items()])
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    proto.ir_version = 8
    model = optcc.ir.load(proto)
    samples = [{"inp": rng.normal(0, 1, (1, 8, d)).astype(np.float32)} for _ in range(8)]
    result = QuantizeInt8Pass(calibrate(model, samples, "minmax").ranges, count_fused=False)(model)
    assert result.stats["kept_float"].get(REASON) == 1, result.stats["kept_float"]
    assert result.stats["quantized"]["MatMul"] == 9 and result.stats["quantized"]["Add"] == 1, result.stats
    quantized = optcc.ir.serialize(result.model)
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    for _ in range(4):
        inp = rng.normal(0, 1, (1, 8, d)).astype(np.float32)
        x = np.maximum(inp @ w["W0"], 0) @ w["W1"] + inp
        s = (x @ w["Wq"]) @ (x @ w["Wk"]).transpose(0, 2, 1)
        p = np.exp(s - s.max(-1, keepdims=True))
        want = (p / p.sum(-1, keepdims=True)) @ (x @ w["Wv"]) @ w["Wo"]
        got = onnxruntime_outputs(quantized, {"inp": inp})[0].astype(np.float64)
        assert 10 * np.log10(np.sum(want**2) / np.sum((got - want) ** 2)) >= 12  # the layer's output, 8-bit
