"""equalize-cross-layer (cross-layer equalization with bias absorption, before INT8):
results judged against the original evaluated in float64 by onnx's reference evaluator,
the equalized ranges computed here with numpy, and the INT8 gain measured by onnxruntime
on the float32 original (tests/reference.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
import pytest
from onnx import TensorProto as TP

import optcc
from optcc.passes.equalize_cross_layer import EqualizeCrossLayerPass
from optcc.quant.driver import quantize_int8
from reference import assert_close, expected_outputs_float64, lossy_metrics


def stem(between: str | None = None, *, pads2: int = 1, group2: int | None = 8, shared: bool = False,
         bias2: bool = True) -> onnx.ModelProto:
    """Conv(3 -> 8, 3x3) [-> between] -> Conv2 (depthwise 3x3 by default, else 1x1 full),
    with a 30x range imbalance between the channels of the tensor between them (PP-OCRv4
    rec's stem, in small)."""
    rng = np.random.default_rng(0)
    gains = np.geomspace(0.1, 3.0, 8)
    w1 = (rng.normal(size=(8, 3, 3, 3)) * gains[:, None, None, None]).astype(np.float32)
    b1 = (rng.normal(size=8) * gains).astype(np.float32)
    k = 3 if group2 == 8 else 1
    w2 = rng.normal(size=(8, 1 if group2 == 8 else 8, k, k))
    w2 = (w2 / gains[:, None, None, None] if group2 == 8 else w2).astype(np.float32)
    inits = [nh.from_array(w1, "W1"), nh.from_array(b1, "B1"), nh.from_array(w2, "W2")]
    conv2_inputs = ["h", "W2"]
    if bias2:
        inits.append(nh.from_array(rng.normal(size=8).astype(np.float32), "B2"))
        conv2_inputs.append("B2")
    nodes = [oh.make_node("Conv", ["x", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1], name="conv1")]
    if between:
        nodes.append(oh.make_node(between, ["c1"], ["h"], name="act"))
    else:
        nodes[0].output[0] = "h"
    attrs = {"group": group2} if group2 == 8 else {}
    nodes.append(oh.make_node("Conv", conv2_inputs, ["y"], pads=[pads2] * 4 if k == 3 else [0] * 4,
                              name="conv2", **attrs))
    outputs = [oh.make_tensor_value_info("y", TP.FLOAT, None)]
    if shared:
        nodes.append(oh.make_node("Identity", ["h"], ["h_out"], name="also"))
        outputs.append(oh.make_tensor_value_info("h_out", TP.FLOAT, None))
    graph = oh.make_graph(nodes, "stem", [oh.make_tensor_value_info("x", TP.FLOAT, ["N", 3, 12, 12])],
                          outputs, inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


def feeds(seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).uniform(-1, 1, size=(2, 3, 12, 12)).astype(np.float32)}


def equalized(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    result = EqualizeCrossLayerPass()(optcc.ir.load(model))
    return optcc.ir.serialize(result.model), dict(result.stats, modified=result.modified)


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    inits = {t.name: nh.to_array(t) for t in model.graph.initializer}
    return {name: inits[n.input[i]] for n in model.graph.node if n.op_type == "Conv"
            for name, i in ((f"{n.name}.w", 1), (f"{n.name}.b", 2)) if len(n.input) > i and n.input[i]}


@pytest.mark.parametrize("between,group2,pads2", [(None, 8, 1), ("Relu", 8, 1), ("LeakyRelu", 8, 1),
                                                  ("Relu", None, 0), (None, None, 0)])
def test_equalized_pair_computes_the_original_and_equal_ranges(between, group2, pads2) -> None:
    model = stem(between, group2=group2, pads2=pads2)
    out, stats = equalized(model)
    assert stats["modified"] and stats["pairs"] == 1
    onnx.checker.check_model(out, full_check=True)
    produced = {o for n in out.graph.node for o in n.output}
    assert "h" not in produced and "c1" not in produced and "y" in produced  # rescaled tensors renamed
    x = feeds()
    assert_close(expected_outputs_float64(out, x), expected_outputs_float64(model, x), rtol=1e-5)
    w = weights(out)
    r1 = np.abs(w["conv1.w"]).reshape(8, -1).max(axis=1)
    w2 = w["conv2.w"]
    r2 = np.abs(w2).reshape(8, -1).max(axis=1) if group2 == 8 else np.abs(w2).max(axis=(0, 2, 3))
    np.testing.assert_allclose(r1, r2, rtol=1e-5)  # both sqrt(r1 r2) per channel
    before = np.abs(weights(model)["conv1.w"]).reshape(8, -1).max(axis=1)
    assert r1.max() / r1.min() < 0.5 * before.max() / before.min()


def test_bias_is_absorbed_only_without_activation_into_an_unpadded_conv() -> None:
    for between, pads2, group2, absorbed in ((None, 0, None, 1), (None, 1, 8, 0), ("Relu", 0, None, 0)):
        model = stem(between, pads2=pads2, group2=group2, bias2=False)
        out, stats = equalized(model)
        assert stats["biases_absorbed"] == absorbed
        if absorbed:
            assert not np.any(weights(out)["conv1.b"]) and "conv2.b" in weights(out)
        x = feeds(2)
        assert_close(expected_outputs_float64(out, x), expected_outputs_float64(model, x), rtol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(between="Sigmoid"), dict(between="HardSwish"), dict(shared=True)])
def test_pairs_outside_the_preconditions_are_left_alone(kwargs) -> None:
    model = stem(**kwargs)
    out, stats = equalized(model)
    assert not stats["modified"]
    for name, array in weights(model).items():
        np.testing.assert_array_equal(weights(out)[name], array)


def test_equalization_before_int8_lowers_the_quantization_error() -> None:
    """The per-tensor uint8 scale of the tensor between the convs leaves the weak channels
    a few levels; equalized, the INT8 model is closer to the float32 original."""
    model = stem()
    rng = np.random.default_rng(5)
    data = [{"x": rng.uniform(-1, 1, size=(1, 3, 12, 12)).astype(np.float32)} for _ in range(12)]
    held = [{"x": rng.uniform(-1, 1, size=(1, 3, 12, 12)).astype(np.float32)} for _ in range(6)]
    options = dict(require_speedup=False, require_target=False, accuracy_fallback=False, metric=None,
                   bias_correction=False)
    plain, _ = quantize_int8(model, data, equalize=False, **options)
    equal, stats = quantize_int8(model, data, equalize=True, **options)
    assert stats["equalize"]["pairs"] == 1
    (plain_sqnr, _), = lossy_metrics(model, optcc.ir.serialize(plain), held)
    (equal_sqnr, _), = lossy_metrics(model, optcc.ir.serialize(equal), held)
    assert equal_sqnr > plain_sqnr + 3.0, (plain_sqnr, equal_sqnr)


def test_a_weight_that_is_also_a_graph_input_is_left_alone() -> None:
    """An initializer listed as a graph input may be fed by the caller: rescaling it would
    change what the model computes with the fed value."""
    model = stem("Relu")
    model.graph.input.append(oh.make_tensor_value_info("W1", TP.FLOAT, [8, 3, 3, 3]))
    out, stats = equalized(model)
    assert not stats["modified"]
    for name, array in weights(model).items():
        np.testing.assert_array_equal(weights(out)[name], array)
