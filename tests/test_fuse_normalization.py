"""FuseNormalizationPass: decomposed LayerNormalization (opset 17 attribute axes, opset 18
input axes, Pow or Mul squares, with/without beta) and Gelu (erf and tanh forms, every
placement of the 0.5 and operand order) become the standard ops; other axes, old opsets,
wrong constants and shared intermediates are left alone."""

from __future__ import annotations

import math
import re

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper

import optcc
from optcc.infra.invariants import check_invariants, signature
from optcc.passes.fuse_normalization import FuseNormalizationPass
from reference import FUSION_RTOL, assert_close, expected_outputs_float64, onnxruntime_outputs, random_feeds

F32 = np.float32


def _model(body: str, inits: dict[str, np.ndarray], opset: int) -> ir.Model:
    proto = onnx.parser.parse_model(f'<ir_version: 10, opset_import: ["" : {opset}]>\n' + body)
    for name, array in inits.items():
        proto.graph.initializer.append(numpy_helper.from_array(np.asarray(array), name))
    proto = onnx.shape_inference.infer_shapes(proto)
    return ir.from_proto(proto)


def _fuse(model: ir.Model, **shapes: list[int]) -> optcc.PassResult:
    original = model.clone()
    result = FuseNormalizationPass()(model)
    assert check_invariants(result.model, signature(original)) == []
    onnx.checker.check_model(ir.to_proto(result.model), full_check=True)
    # The fused model on onnxruntime against the original in float64 (onnx's evaluator).
    feeds = random_feeds(original, shapes)
    assert_close(onnxruntime_outputs(result.model, feeds), expected_outputs_float64(original, feeds),
                 FUSION_RTOL, what="fused vs original in float64")
    assert not FuseNormalizationPass()(result.model).modified, "second run must be a no-op"
    return result


def _ops(model: ir.Model) -> dict[str, int]:
    return optcc.ir.op_histogram(model)


# ---------------------------------------------------------------- LayerNormalization


def _layernorm_body(opset: int, square: str = "pow", beta: bool = True, axis: int = -1,
                    extra_output: str = "") -> str:
    if opset >= 18:
        mean1, mean2 = "m = ReduceMean(x, axes)", "v = ReduceMean(sq, axes)"
    else:
        mean1 = f"m = ReduceMean <axes = [{axis}]> (x)"
        mean2 = f"v = ReduceMean <axes = [{axis}]> (sq)"
    sq = "sq = Pow(d, two)" if square == "pow" else "sq = Mul(d, d)"
    tail = "s = Mul(gamma, n) y = Add(s, beta)" if beta else "y = Mul(n, gamma)"
    outputs = "float[N, 4, 8] y" + (f", float[N, 4, 8] {extra_output}" if extra_output else "")
    return f"""g (float[N, 4, 8] x) => ({outputs}) {{
        {mean1} d = Sub(x, m) {sq} {mean2} ve = Add(eps, v) sd = Sqrt(ve) n = Div(d, sd) {tail}
    }}"""


def _layernorm_inits(axis: int = -1, gamma_shape: tuple[int, ...] = (8,)) -> dict:
    rng = np.random.default_rng(0)
    return {
        "axes": np.array([axis], np.int64),
        "two": F32(2.0),
        "eps": F32(1e-5),
        "gamma": rng.normal(size=gamma_shape).astype(F32),
        "beta": rng.normal(size=(8,)).astype(F32),
    }


def _drop_unused(inits: dict, body: str) -> dict:
    """The initializers the body reads as operands (not ``axes = [...]`` attributes)."""
    return {k: v for k, v in inits.items() if re.search(rf"\b{k}\b(?!\s*=)", body)}


@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize("square", ["pow", "mul"])
@pytest.mark.parametrize("beta", [True, False])
def test_layernorm_is_fused(opset: int, square: str, beta: bool) -> None:
    body = _layernorm_body(opset, square, beta, axis=2 if opset == 18 else -1)
    model = _model(body, _drop_unused(_layernorm_inits(axis=2 if opset == 18 else -1), body), opset)
    result = _fuse(model, x=[2, 4, 8])
    assert _ops(result.model) == {"LayerNormalization": 1}
    assert result.stats == {"applied": {"layernorm": 1}}
    node = result.model.graph.outputs[0].producer()
    assert math.isclose(node.attributes["epsilon"].as_float(), 1e-5, rel_tol=1e-6)
    assert len(node.inputs) == (3 if beta else 2)
    assert not result.model.graph.initializers.keys() - {"gamma", "beta"}


def test_layernorm_gamma_of_rank_3_is_reshaped() -> None:
    body = _layernorm_body(18)
    model = _model(body, _drop_unused(_layernorm_inits(gamma_shape=(1, 1, 8)), body), 18)
    result = _fuse(model, x=[2, 4, 8])
    assert _ops(result.model) == {"LayerNormalization": 1}
    gamma = result.model.graph.outputs[0].producer().inputs[1]
    assert optcc.ir.as_numpy(gamma).shape == (8,)


def test_layernorm_needs_opset_17() -> None:
    body = _layernorm_body(16)
    result = _fuse(_model(body, _drop_unused(_layernorm_inits(), body), 16), x=[2, 4, 8])
    assert not result.modified and "LayerNormalization" not in _ops(result.model)


def test_layernorm_over_another_axis_is_left_alone() -> None:
    body = _layernorm_body(18, axis=1)
    model = _model(body, _drop_unused(_layernorm_inits(axis=1, gamma_shape=(4, 1)), body), 18)
    result = _fuse(model, x=[2, 4, 8])
    assert not result.modified and "LayerNormalization" not in _ops(result.model)
    # Refused at the Add (with beta) and at the Mul (the gamma-only form) alike.
    assert set(result.stats["rejected"]["layernorm"]) == {"not a mean over the last axis"}


def test_layernorm_with_exposed_intermediate_is_left_alone() -> None:
    body = _layernorm_body(18, extra_output="d")
    result = _fuse(_model(body, _drop_unused(_layernorm_inits(), body), 18), x=[2, 4, 8])
    assert not result.modified and "LayerNormalization" not in _ops(result.model)
    assert set(result.stats["rejected"]["layernorm"]) == {"intermediate 'd' is a graph output"}


# ---------------------------------------------------------------- Gelu

_PLACEMENTS = {
    "half-x": "h = Mul(half, x) y = Mul(br, h)",
    "half-bracket": "hb = Mul(br, half) y = Mul(x, hb)",
    "half-product": "p = Mul(x, br) y = Mul(p, half)",
    "div-two": "p = Mul(br, x) y = Div(p, two)",
}

_GELU_INITS = {
    "half": F32(0.5), "two": F32(2.0), "one": F32(1.0), "three": F32(3.0),
    "sqrt2": F32(math.sqrt(2.0)), "inv_sqrt2": F32(1 / math.sqrt(2.0)),
    "k": F32(math.sqrt(2 / math.pi)), "c0": F32(0.044715),
}


def _gelu_body(kind: str, variant: str, placement: str, outputs: str = "float[N, 16] y",
               extra: str = "") -> str:
    if kind == "erf":
        scale = "s = Div(x, sqrt2)" if variant == "div" else "s = Mul(inv_sqrt2, x)"
        core = f"{scale} e = Erf(s) br = Add(one, e)"
    else:
        if variant == "nested":  # jax2tf (Magika): x * (x * (0.044715 * x))
            term = "m1 = Mul(c0, x) m2 = Mul(x, m1) tm = Mul(x, m2)"
        else:
            cube = "c = Pow(x, three)" if variant == "pow" else "sq = Mul(x, x) c = Mul(x, sq)"
            term = f"{cube} tm = Mul(c0, c)"
        core = f"{term} poly = Add(x, tm) sc = Mul(poly, k) th = Tanh(sc) br = Add(th, one)"
    return f"g (float[N, 16] x) => ({outputs}) {{ {core} {_PLACEMENTS[placement]} {extra} }}"


def _gelu_model(body: str, opset: int = 20, **overrides: np.ndarray) -> ir.Model:
    inits = {**_GELU_INITS, **overrides}
    return _model(body, _drop_unused(inits, body), opset)


@pytest.mark.parametrize("placement", sorted(_PLACEMENTS))
@pytest.mark.parametrize("kind,variant", [("erf", "div"), ("erf", "mul"), ("tanh", "pow"),
                                          ("tanh", "mul"), ("tanh", "nested")])
def test_gelu_is_fused(kind: str, variant: str, placement: str) -> None:
    result = _fuse(_gelu_model(_gelu_body(kind, variant, placement)), x=[3, 16])
    assert _ops(result.model) == {"Gelu": 1}
    assert result.stats == {"applied": {f"gelu-{kind}": 1}}
    gelu = result.model.graph.outputs[0].producer()
    approximate = gelu.attributes.get("approximate")
    assert (approximate.as_string() if approximate else "none") == ("tanh" if kind == "tanh" else "none")


def test_gelu_needs_opset_20() -> None:
    result = _fuse(_gelu_model(_gelu_body("erf", "div", "half-x"), opset=19), x=[3, 16])
    assert not result.modified and "Gelu" not in _ops(result.model)


def test_gelu_with_wrong_constant_is_left_alone() -> None:
    model = _gelu_model(_gelu_body("erf", "div", "half-x"), half=F32(0.6))
    result = _fuse(model, x=[3, 16])
    assert not result.modified and "Gelu" not in _ops(result.model)
    assert result.stats["rejected"]["gelu-erf"] == {"constants are not Gelu's": 1}


def test_gelu_with_shared_intermediate_is_left_alone() -> None:
    body = _gelu_body("tanh", "pow", "half-product", outputs="float[N, 16] y, float[N, 16] z",
                      extra="z = Relu(th)")
    result = _fuse(_gelu_model(body), x=[3, 16])
    assert not result.modified and "Gelu" not in _ops(result.model)
    assert result.stats["rejected"]["gelu-tanh"] == {"intermediate 'th' has readers outside the match": 1}


# ---------------------------------------------------------------- RMSNormalization


@pytest.mark.parametrize("square,normalize", [("pow", "reciprocal"), ("mul", "div")])
def test_rmsnorm_fuses_at_opset_23(square: str, normalize: str) -> None:
    sq = "sq = Pow(x, two)" if square == "pow" else "sq = Mul(x, x)"
    norm = "r = Reciprocal(sd) n = Mul(x, r)" if normalize == "reciprocal" else "n = Div(x, sd)"
    body = f"""g (float[N, 4, 8] x) => (float[N, 4, 8] y) {{
        {sq} v = ReduceMean(sq, axes) ve = Add(v, eps) sd = Sqrt(ve) {norm} y = Mul(gamma, n)
    }}"""
    rng = np.random.default_rng(5)
    gamma = rng.normal(size=(8,)).astype(F32)
    inits = {"axes": np.array([-1], np.int64), "two": F32(2.0), "eps": F32(1e-6), "gamma": gamma}
    model = _model(body, _drop_unused(inits, body), 23)
    result = FuseNormalizationPass()(model)
    assert result.stats["applied"] == {"rmsnorm": 1}
    assert _ops(result.model) == {"RMSNormalization": 1}
    x = rng.normal(size=(2, 4, 8)).astype(F32)
    import onnxruntime as ort
    session = ort.InferenceSession(ir.to_proto(result.model).SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x})[0]
    x64 = x.astype(np.float64)
    ref = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-6) * gamma
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert not FuseNormalizationPass()(result.model).modified


def test_rmsnorm_left_alone_below_opset_23() -> None:
    body = """g (float[N, 4, 8] x) => (float[N, 4, 8] y) {
        sq = Pow(x, two) v = ReduceMean(sq, axes) ve = Add(v, eps) sd = Sqrt(ve) n = Div(x, sd) y = Mul(n, gamma)
    }"""
    inits = {"axes": np.array([-1], np.int64), "two": F32(2.0), "eps": F32(1e-6), "gamma": np.ones(8, F32)}
    result = FuseNormalizationPass()(_model(body, inits, 22))
    assert not result.modified and "RMSNormalization" not in _ops(result.model)
