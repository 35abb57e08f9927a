"""FuseConvAffinePass: per-channel constant Mul/Add folded into Conv/ConvTranspose weights
and bias, constant Mul/Add chains merged; shared weights, non-per-channel constants,
graph outputs inside the pattern and shape-enlarging chains left alone."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper

import optcc
from optcc.infra.invariants import check_invariants, signature
from optcc.passes.fuse_conv_affine import FuseConvAffinePass
from reference import FUSION_RTOL, assert_close, expected_outputs_float64, onnxruntime_outputs, random_feeds


def _model(body: str, inits: dict[str, np.ndarray], opset: int = 17) -> ir.Model:
    proto = onnx.parser.parse_model(f'<ir_version: 9, opset_import: ["" : {opset}]>\n' + body)
    for name, array in inits.items():
        proto.graph.initializer.append(numpy_helper.from_array(array, name))
    for output in proto.graph.output:  # "float y" in the text: shape left unspecified
        if not output.type.tensor_type.shape.dim:
            output.type.tensor_type.ClearField("shape")
    proto = onnx.shape_inference.infer_shapes(proto)
    return ir.from_proto(proto)


def _rand(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _fuse(model: ir.Model, reference: str = "float64", **shapes: list[int]) -> optcc.PassResult:
    """Run the pass; check invariants, the checker, numerics and idempotence. Numerics: the
    fused model on onnxruntime against the original in float64 by onnx's evaluator
    (``reference="onnxruntime"``: the float32 original on onnxruntime, for what the
    evaluator computes wrongly)."""
    original = model.clone()
    result = FuseConvAffinePass()(model)
    assert check_invariants(result.model, signature(original)) == []
    onnx.checker.check_model(ir.to_proto(result.model), full_check=True)
    feeds = random_feeds(original, shapes)
    want = (expected_outputs_float64(original, feeds) if reference == "float64"
            else onnxruntime_outputs(original, feeds))
    assert_close(onnxruntime_outputs(result.model, feeds), want, FUSION_RTOL, what=f"fused vs original ({reference})")
    assert not FuseConvAffinePass()(result.model).modified, "second run must be a no-op"
    return result


def _ops(model: ir.Model) -> dict[str, int]:
    return optcc.ir.op_histogram(model)


@pytest.mark.parametrize("c_shape", [(4, 1, 1), (1, 4, 1, 1), (), (1,), (1, 1, 1)])
def test_per_channel_mul_folds_into_conv(c_shape: tuple[int, ...]) -> None:
    body = "g (float[N, 3, 6, 6] x) => (float[N, 4, 6, 6] y) { t = Conv <pads = [1, 1, 1, 1]> (x, w, b) y = Mul(s, t) }"
    model = _model(body, {"w": _rand(1, 4, 3, 3, 3), "b": _rand(2, 4),
                          "s": _rand(3, *c_shape)})
    result = _fuse(model, x=[2, 3, 6, 6])
    assert _ops(result.model) == {"Conv": 1}
    assert result.stats == {"applied": {"conv-mul": 1}}
    assert result.model.graph.outputs[0].name == "y"


@pytest.mark.parametrize("with_bias", [True, False])
def test_per_channel_add_folds_into_bias(with_bias: bool) -> None:
    conv = "Conv(x, w, b)" if with_bias else "Conv(x, w)"
    body = f"g (float[N, 3, 5, 5] x) => (float[N, 4, 5, 5] y) {{ t = {conv} y = Add(t, s) }}"
    inits = {"w": _rand(1, 4, 3, 1, 1), "s": _rand(3, 4, 1, 1)}
    if with_bias:
        inits["b"] = _rand(2, 4)
    result = _fuse(_model(body, inits), x=[1, 3, 5, 5])
    assert _ops(result.model) == {"Conv": 1}
    conv_node = result.model.graph.outputs[0].producer()
    assert conv_node.inputs[1].name == "w"  # the weight is reused as is
    assert optcc.ir.as_numpy(conv_node.inputs[2]).shape == (4,)


def test_conv_mul_add_chain_collapses_into_one_conv() -> None:
    body = """g (float[N, 3, 5, 5] x) => (float[N, 4, 5, 5] y) {
        t = Conv <pads = [1, 1, 1, 1]> (x, w) u = Mul(t, s) v = Add(u, a) y = Mul(v, s2) }"""
    inits = {"w": _rand(1, 4, 3, 3, 3), "s": _rand(2, 4, 1, 1), "a": _rand(3, 4, 1, 1),
             "s2": _rand(4, 1, 4, 1, 1)}
    result = _fuse(_model(body, inits), x=[1, 3, 5, 5])
    assert _ops(result.model) == {"Conv": 1}
    assert result.stats["applied"] == {"conv-add": 1, "conv-mul": 2}


@pytest.mark.parametrize("op", ["Conv", "ConvTranspose"])
def test_grouped_and_transposed_conv(op: str) -> None:
    w_shape = (4, 2, 3, 3) if op == "Conv" else (4, 3, 3, 3)  # Cout 4 / ConvTranspose Cout 6
    cout = 4 if op == "Conv" else 6
    body = f"""g (float[1, 4, 5, 5] x) => (float y) {{
        t = {op} <group = 2> (x, w) u = Mul(t, s) y = Add(u, a) }}"""
    inits = {"w": _rand(1, *w_shape), "s": _rand(2, cout, 1, 1), "a": _rand(3, cout, 1, 1)}
    # onnx's evaluator mis-reshapes grouped ConvTranspose weights: onnxruntime on the original judges.
    result = _fuse(_model(body, inits), reference="float64" if op == "Conv" else "onnxruntime")
    assert _ops(result.model) == {op: 1}


def test_depthwise_conv() -> None:
    body = """g (float[1, 4, 5, 5] x) => (float[1, 4, 5, 5] y) {
        t = Conv <group = 4, pads = [1, 1, 1, 1]> (x, w, b) y = Mul(t, s) }"""
    inits = {"w": _rand(1, 4, 1, 3, 3), "b": _rand(2, 4), "s": _rand(3, 4, 1, 1)}
    result = _fuse(_model(body, inits))
    assert _ops(result.model) == {"Conv": 1}


@pytest.mark.parametrize("c_shape", [(1, 1, 1, 5), (4, 5, 5), (2, 4, 1, 1)])
def test_constant_that_is_not_per_channel_is_left_alone(c_shape: tuple[int, ...]) -> None:
    body = "g (float[2, 3, 5, 5] x) => (float y) { t = Conv(x, w) y = Mul(t, s) }"
    model = _model(body, {"w": _rand(1, 4, 3, 1, 1), "s": _rand(2, *c_shape)})
    result = _fuse(model)
    assert not result.modified and _ops(result.model) == {"Conv": 1, "Mul": 1}
    assert result.stats["rejected"]["conv-mul"] == {"constant is not per channel": 1}


def test_shared_weight_blocks_mul_but_not_add() -> None:
    body = """g (float[1, 3, 5, 5] x) => (float y, float z) {
        t1 = Conv(x, w) y = Mul(t1, s) t2 = Conv(x, w) z = Add(t2, a) }"""
    inits = {"w": _rand(1, 4, 3, 1, 1), "s": _rand(2, 4, 1, 1), "a": _rand(3, 4, 1, 1)}
    result = _fuse(_model(body, inits))
    assert _ops(result.model) == {"Conv": 2, "Mul": 1}
    assert result.stats["rejected"]["conv-mul"] == {"shared weight 'w'": 1}
    assert result.stats["applied"] == {"conv-add": 1}


def test_shared_bias_does_not_block_mul() -> None:
    """Identical biases deduplicated into one initializer: each Mul writes a bias of its own."""
    body = """g (float[1, 3, 5, 5] x) => (float y, float z) {
        t1 = Conv(x, w1, b) y = Mul(t1, s1) t2 = Conv(x, w2, b) z = Mul(t2, s2) }"""
    inits = {"w1": _rand(1, 4, 3, 1, 1), "w2": _rand(2, 4, 3, 1, 1), "b": _rand(3, 4),
             "s1": _rand(4, 4, 1, 1), "s2": _rand(5, 4, 1, 1)}
    result = _fuse(_model(body, inits))
    assert _ops(result.model) == {"Conv": 2}
    assert result.stats["applied"] == {"conv-mul": 2}


def test_conv_output_that_is_a_graph_output_is_kept() -> None:
    body = "g (float[1, 3, 5, 5] x) => (float y, float t) { t = Conv(x, w) y = Mul(t, s) }"
    result = _fuse(_model(body, {"w": _rand(1, 4, 3, 1, 1), "s": _rand(2, 4, 1, 1)}))
    assert not result.modified and _ops(result.model) == {"Conv": 1, "Mul": 1}


def test_non_constant_weight_is_not_matched() -> None:
    body = """g (float[1, 3, 5, 5] x, float[4, 3, 1, 1] w) => (float y) {
        t = Conv(x, w) y = Mul(t, s) }"""
    result = _fuse(_model(body, {"s": _rand(2, 4, 1, 1)}))
    assert not result.modified and "rejected" not in result.stats


@pytest.mark.parametrize("op", ["Mul", "Add"])
def test_constant_chains_merge(op: str) -> None:
    body = f"""g (float[N, 3, 4] x) => (float[N, 3, 4] y) {{
        t = {op}(x, a) u = {op}(b, t) y = {op}(u, c) }}"""
    inits = {"a": _rand(1, 4), "b": _rand(2, 3, 1), "c": _rand(3, 1, 3, 4)[0]}
    result = _fuse(_model(body, inits), x=[2, 3, 4])
    assert _ops(result.model) == {op: 1}
    assert result.stats["applied"] == {f"{op.lower()}-{op.lower()}": 2}


def test_integer_add_chain_is_merged() -> None:
    body = "g (int64[N, 3] x) => (int64[N, 3] y) { t = Add(x, a) y = Add(t, b) }"
    inits = {"a": np.array([1, 2, 3], np.int64), "b": np.array([[5], [6], [7]], np.int64)[0]}
    result = _fuse(_model(body, inits), x=[2, 3])
    assert _ops(result.model) == {"Add": 1}


def test_chain_whose_constant_would_enlarge_the_input_is_left_alone() -> None:
    body = "g (float[N, 1] x) => (float[N, 3] y) { t = Mul(x, a) y = Mul(t, b) }"
    result = _fuse(_model(body, {"a": _rand(1, 3), "b": _rand(2, 3)}), x=[2, 1])
    assert not result.modified and _ops(result.model) == {"Mul": 2}
    assert result.stats["rejected"]["mul-mul"] == {
        "combined constant would enlarge the input's shape": 1
    }


def test_chain_with_shared_intermediate_is_left_alone() -> None:
    body = "g (float[N, 3] x) => (float[N, 3] y, float[N, 3] z) { t = Add(x, a) y = Add(t, b) z = Relu(t) }"
    result = _fuse(_model(body, {"a": _rand(1, 3), "b": _rand(2, 3)}), x=[2, 3])
    assert not result.modified and _ops(result.model) == {"Add": 2, "Relu": 1}


# ---------------------------------------------------------------- a scale before a conv


@pytest.mark.parametrize("c_shape", [(), (1,), (3, 1, 1), (1, 3, 1, 1)])
def test_per_input_channel_mul_folds_into_the_conv_after_it(c_shape: tuple[int, ...]) -> None:
    body = "g (float[N, 3, 6, 6] x) => (float[N, 4, 6, 6] y) { t = Mul(s, x) y = Conv <pads = [1, 1, 1, 1]> (t, w, b) }"
    result = _fuse(_model(body, {"w": _rand(1, 4, 3, 3, 3), "b": _rand(2, 4), "s": _rand(3, *c_shape)}),
                   x=[2, 3, 6, 6])
    assert _ops(result.model) == {"Conv": 1}
    assert result.stats == {"applied": {"mul-conv": 1}}
    conv = result.model.graph.outputs[0].producer()
    assert conv.inputs[0].name == "x" and conv.inputs[2].name == "b"  # the bias is reused as is


def test_gelu_half_before_a_conv_folds_bit_for_bit() -> None:
    """PP-OCRv5/v6's GELU ends in ``* 0.5`` read by the next pointwise Conv: a power of
    two, so the folded weight gives the original's bits (float64 reference: numpy)."""
    body = """g (float[1, 4, 5, 5] x) => (float[1, 6, 5, 5] y) {
        r = Constant <value = float {1.41421356}> ()
        one = Constant <value = float {1.0}> ()
        half = Constant <value = float {0.5}> ()
        d = Div(x, r) e = Erf(d) p = Add(e, one) g = Mul(x, p) h = Mul(g, half) y = Conv(h, w, b) }"""
    w, bias = _rand(1, 6, 4, 1, 1), _rand(2, 6)
    model = _model(body, {"w": w, "b": bias})
    original = model.clone()
    result = _fuse(model, x=[1, 4, 5, 5])
    assert result.stats["applied"] == {"mul-conv": 1} and _ops(result.model).get("Mul") == 1
    x = {"x": _rand(4, 1, 4, 5, 5)}
    np.testing.assert_array_equal(onnxruntime_outputs(result.model, x)[0], onnxruntime_outputs(original, x)[0])
    x64 = x["x"].astype(np.float64)
    gelu = 0.5 * x64 * (1 + np.vectorize(math.erf)(x64 / 1.41421356))
    want = np.einsum("oc,nchw->nohw", w[:, :, 0, 0].astype(np.float64), gelu) + bias[None, :, None, None]
    assert_close(onnxruntime_outputs(result.model, x), [want], FUSION_RTOL, what="folded GELU * 0.5 vs numpy")


@pytest.mark.parametrize("op", ["Conv", "ConvTranspose"])
def test_per_input_channel_mul_before_grouped_and_transposed_conv(op: str) -> None:
    w_shape = (4, 2, 3, 3) if op == "Conv" else (4, 3, 3, 3)  # 4 input channels, 2 groups
    body = f"""g (float[1, 4, 5, 5] x) => (float y) {{ t = Mul(x, s) y = {op} <group = 2> (t, w) }}"""
    inits = {"w": _rand(1, *w_shape), "s": _rand(2, 4, 1, 1)}
    # onnx's evaluator mis-reshapes grouped ConvTranspose weights: onnxruntime on the original judges.
    result = _fuse(_model(body, inits), reference="float64" if op == "Conv" else "onnxruntime")
    assert _ops(result.model) == {op: 1} and result.stats["applied"] == {"mul-conv": 1}


def test_per_input_channel_mul_before_a_depthwise_conv() -> None:
    body = """g (float[1, 4, 5, 5] x) => (float[1, 8, 5, 5] y) {
        t = Mul(x, s) y = Conv <group = 4, pads = [1, 1, 1, 1]> (t, w) }"""
    result = _fuse(_model(body, {"w": _rand(1, 8, 1, 3, 3), "s": _rand(2, 4, 1, 1)}))
    assert _ops(result.model) == {"Conv": 1} and result.stats["applied"] == {"mul-conv": 1}


def test_mul_that_broadcasts_its_input_up_to_the_conv_channels_is_left_alone() -> None:
    """x has one channel; the Mul makes three of it: the Conv cannot read x instead."""
    body = "g (float[1, 1, 5, 5] x) => (float y) { t = Mul(x, s) y = Conv(t, w) }"
    result = _fuse(_model(body, {"w": _rand(1, 4, 3, 1, 1), "s": _rand(2, 3, 1, 1)}))
    assert not result.modified and _ops(result.model) == {"Mul": 1, "Conv": 1}
    assert result.stats["rejected"]["mul-conv"] == {"the Mul's broadcast could enlarge its input": 1}


@pytest.mark.parametrize("c_shape", [(1, 1, 1, 5), (3, 5, 5)])
def test_mul_that_is_not_per_input_channel_is_left_alone(c_shape: tuple[int, ...]) -> None:
    body = "g (float[1, 3, 5, 5] x) => (float y) { t = Mul(x, s) y = Conv(t, w) }"
    result = _fuse(_model(body, {"w": _rand(1, 4, 3, 1, 1), "s": _rand(2, *c_shape)}))
    assert not result.modified and result.stats["rejected"]["mul-conv"] == {"constant is not per channel": 1}


def test_mul_read_elsewhere_or_a_shared_weight_is_left_alone() -> None:
    body = """g (float[1, 3, 5, 5] x) => (float y, float z) {
        t = Mul(x, s) y = Conv(t, w) z = Relu(t) }"""
    result = _fuse(_model(body, {"w": _rand(1, 4, 3, 1, 1), "s": _rand(2, 3, 1, 1)}))
    assert not result.modified and _ops(result.model) == {"Mul": 1, "Conv": 1, "Relu": 1}
    body = """g (float[1, 3, 5, 5] x, float[1, 3, 5, 5] x2) => (float y, float z) {
        t = Mul(x, s) y = Conv(t, w) z = Conv(x2, w) }"""
    result = _fuse(_model(body, {"w": _rand(1, 4, 3, 1, 1), "s": _rand(2, 3, 1, 1)}))
    assert not result.modified and _ops(result.model) == {"Mul": 1, "Conv": 2}
