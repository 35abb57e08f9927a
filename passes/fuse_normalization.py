"""FuseNormalizationPass: decomposed LayerNormalization and Gelu into the standard ops.

Rewrites (default-domain ops; Add/Mul operands in either order):

- ``layernorm`` (opset >= 17)::

      d = Sub(x, ReduceMean(x));  v = ReduceMean(Pow(d, 2) or Mul(d, d))
      y = Add(Mul(Div(d, Sqrt(Add(v, eps))), gamma), beta)      (beta optional)

  becomes ``LayerNormalization(x, gamma, beta, axis=-1, epsilon=eps)``.
- ``rmsnorm`` (opset >= 23)::

      y = Mul(Mul(x, Reciprocal(Sqrt(Add(ReduceMean(Pow(x, 2) or Mul(x, x)), eps)))) or
              Div(x, Sqrt(...)), gamma)

  becomes ``RMSNormalization(x, gamma, axis=-1, epsilon=eps)``. (Below opset 23 there is no
  portable op: onnxruntime's SimplifiedLayerNormalization is registered in the default
  domain, which no checker accepts, so the pattern is left alone.)
- ``gelu-erf`` (opset >= 20): ``x * 0.5 * (1 + Erf(x / sqrt(2))))`` (also ``x * (1/sqrt(2))``
  inside Erf; the 0.5 applied to x, to the bracket or to the product, or as ``/ 2``)
  becomes ``Gelu(x)``.
- ``gelu-tanh`` (opset >= 20): ``x * 0.5 * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))``
  (``x^3`` as ``Pow(x, 3)`` or ``x*x*x``, or the term as ``x*(x*(0.044715*x))``; the 0.5
  placed as above) becomes
  ``Gelu(x, approximate="tanh")``.

Preconditions: float32 tensors (the other types' kernels are not everywhere, and
LayerNormalization of float16 computes in float32, more precisely than the pattern did);
both ReduceMeans over the last axis only (axes as attribute before opset 18, as a
constant input from 18) with keepdims=1; ``x``'s rank known; the exponent exactly 2 (3),
eps a scalar; gamma and beta constants whose dims are 1 except the last (1 or the
normalized size D, which must be known when they are scalars); the constants 0.5, 1, 2,
sqrt(2), 1/sqrt(2), sqrt(2/pi), 0.044715 within 1e-4 relative of their values (exporters
round them). Intermediates read outside the pattern or graph outputs block the fusion
(``optcc.rewrite.pattern`` enforces it).

Numerics ("fusion"): the fused ops compute the same formula (onnxruntime's LayerNorm
uses the same mean/variance definition; Gelu's tanh approximation is the same
polynomial); differences come from rounding and from constants rounded by the exporter,
bounded by about 1e-5 relative, inside the 1e-4 fusion tolerance.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import onnx_ir as ir

from optcc.rewrite import Builder, Const, Match, Op, RewritePass, Rule, Var

__all__ = ["FuseNormalizationPass", "RULES"]

_CONST_RTOL = 1e-4


def _scalar_near(m: Match, name: str, expected: float) -> bool:
    array = m.array(name)
    if array is None or array.size != 1 or array.dtype.kind not in "fiu":
        return False
    return math.isclose(float(array.reshape(())), expected, rel_tol=_CONST_RTOL)


def _float32(value: ir.Value, *arrays: np.ndarray | None) -> bool:
    if value.dtype is not None and value.dtype != ir.DataType.FLOAT:
        return False
    return all(a is None or a.dtype == np.float32 for a in arrays)


# ---------------------------------------------------------------- LayerNormalization


def _layernorm_pattern(square: str, with_beta: bool) -> Op:
    x = Var("x")
    mean = Op("ReduceMean", x, Const("axes1", optional=True), name="mean")
    d = Op("Sub", x, mean, name="d")
    sq = Op("Pow", d, Const("two"), name="sq") if square == "pow" else Op("Mul", d, d, name="sq")
    var = Op("ReduceMean", sq, Const("axes2", optional=True), name="var")
    std = Op("Sqrt", Op("Add", var, Const("eps"), commute=True, name="add_eps"), name="std")
    scaled = Op("Mul", Op("Div", d, std, name="n"), Const("gamma"), commute=True, name="scaled")
    return Op("Add", scaled, Const("beta"), commute=True, name="shifted") if with_beta else scaled


def _reduces_last_axis(m: Match, node: ir.Node, axes_name: str, rank: int) -> bool:
    keepdims = node.attributes.get("keepdims")
    if keepdims is not None and keepdims.as_int() != 1:
        return False
    axes = m.array(axes_name)
    if axes is None:
        attr = node.attributes.get("axes")
        axes = None if attr is None else np.array(attr.as_ints())
    if axes is None or axes.size != 1:
        return False
    return int(axes.reshape(())) in (-1, rank - 1)


def _vector(array: np.ndarray, size: int | None, rank: int) -> np.ndarray | None:
    """``array`` as a [D] vector when it only varies along (or broadcasts to) the last axis."""
    if array.ndim > rank or any(d != 1 for d in array.shape[:-1]):
        return None
    last = array.shape[-1] if array.ndim else 1
    if size is None:
        size = last if last != 1 else None
    if size is None or last not in (1, size):
        return None
    return np.broadcast_to(array.reshape(-1), (size,))


def _check_layernorm(m: Match) -> str | None:
    x = m["x"]
    gamma, beta = m.array("gamma"), m.array("beta")
    if not _float32(x, gamma, beta, m.array("eps")):
        return "not float32"
    if x.shape is None:
        return "unknown input rank"
    rank = x.shape.rank()
    if rank < 1 or not all(_reduces_last_axis(m, m[n], a, rank) for n, a in
                           (("mean", "axes1"), ("var", "axes2"))):
        return "not a mean over the last axis"
    if m.get("two") is not None and not _scalar_near(m, "two", 2.0):
        return "exponent is not 2"
    if m.array("eps").size != 1:
        return "eps is not a scalar"
    last = x.shape[-1]
    size = last if isinstance(last, int) else None
    for name, array in (("gamma", gamma), ("beta", beta)):
        if array is not None and _vector(array, size, rank) is None:
            return f"{name} is not one per element of the last axis"
    return None


def _vector_value(m: Match, b: Builder, name: str, size: int | None, rank: int) -> ir.Value:
    array = m.array(name)
    vec = _vector(array, size, rank)
    if array.shape == vec.shape:
        return m[name]
    return b.const(np.ascontiguousarray(vec), f"{m.output.name}_{name}")


def _rewrite_layernorm(m: Match, b: Builder) -> ir.Value:
    x = m["x"]
    rank = x.shape.rank()
    last = x.shape[-1]
    size = last if isinstance(last, int) else None
    if size is None:
        size = max(_vector(m.array("gamma"), None, rank).size,
                   1 if m.get("beta") is None else _vector(m.array("beta"), None, rank).size)
    gamma = _vector_value(m, b, "gamma", size, rank)
    beta = _vector_value(m, b, "beta", size, rank) if m.get("beta") is not None else None
    eps = float(m.array("eps").reshape(()))
    inputs = (x, gamma) if beta is None else (x, gamma, beta)
    return b.op("LayerNormalization", *inputs, axis=-1, epsilon=eps)


# ---------------------------------------------------------------- Gelu


def _gelu_bracket(kind: str, variant: str, x: Var) -> Op:
    if kind == "erf":
        if variant == "div":
            arg = Op("Div", x, Const("k"), name="scale_x")
        else:
            arg = Op("Mul", x, Const("k"), commute=True, name="scale_x")
        core = Op("Erf", arg, name="core")
    else:
        if variant == "nested":  # x * (x * (0.044715 * x)), as jax2tf writes it
            term = Op("Mul", x, Op("Mul", x, Op("Mul", x, Const("c0"), commute=True, name="linear"),
                                   commute=True, name="square"), commute=True, name="term")
        else:
            if variant == "pow":
                cube = Op("Pow", x, Const("three"), name="cube")
            else:
                cube = Op("Mul", Op("Mul", x, x, name="square"), x, commute=True, name="cube")
            term = Op("Mul", cube, Const("c0"), commute=True, name="term")
        poly = Op("Add", x, term, commute=True, name="poly")
        core = Op("Tanh", Op("Mul", poly, Const("k"), commute=True, name="scale_x"), name="core")
    return Op("Add", core, Const("one"), commute=True, name="bracket")


def _gelu_root(placement: str, x: Var, bracket: Op) -> Op:
    if placement == "half-x":
        return Op("Mul", Op("Mul", x, Const("half"), commute=True), bracket, commute=True)
    if placement == "half-bracket":
        return Op("Mul", x, Op("Mul", bracket, Const("half"), commute=True), commute=True)
    if placement == "half-product":
        return Op("Mul", Op("Mul", x, bracket, commute=True), Const("half"), commute=True)
    return Op("Div", Op("Mul", x, bracket, commute=True), Const("two"))


def _check_gelu(kind: str):  # noqa: ANN202 - returns a Check
    def check(m: Match) -> str | None:
        if not _float32(m["x"], *(m.array(n) for n in ("k", "one"))):
            return "not float32"
        half_ok = _scalar_near(m, "half", 0.5) if m.get("half") is not None else (
            _scalar_near(m, "two", 2.0))
        if not (half_ok and _scalar_near(m, "one", 1.0)):
            return "constants are not Gelu's"
        if kind == "erf":
            div = m["scale_x"].op_type == "Div"
            if not _scalar_near(m, "k", math.sqrt(2.0) if div else 1.0 / math.sqrt(2.0)):
                return "constants are not Gelu's"
        else:
            cube_ok = m.get("three") is None or _scalar_near(m, "three", 3.0)
            if not (cube_ok and _scalar_near(m, "c0", 0.044715)
                    and _scalar_near(m, "k", math.sqrt(2.0 / math.pi))):
                return "constants are not Gelu's"
        return None

    return check


def _rewrite_gelu(kind: str):  # noqa: ANN202 - returns a Rewrite
    def rewrite(m: Match, b: Builder) -> ir.Value:
        if kind == "erf":
            return b.op("Gelu", m["x"])
        return b.op("Gelu", m["x"], approximate="tanh")

    return rewrite


def gelu_rules(rewrite_for, check_for, **rule_options) -> list[Rule]:  # noqa: ANN001
    """A rule per way exporters write Gelu (erf or tanh form, each factor placement), with
    ``rewrite_for(kind)`` and ``check_for(kind)`` for kind "erf" or "tanh"."""
    rules = []
    placements = ("half-x", "half-bracket", "half-product", "div-two")
    for kind, variants in (("erf", ("div", "mul")), ("tanh", ("pow", "mul", "nested"))):
        for variant, placement in itertools.product(variants, placements):
            x = Var("x")
            pattern = _gelu_root(placement, x, _gelu_bracket(kind, variant, x))
            rules.append(Rule(f"gelu-{kind}", pattern, rewrite_for(kind), check_for(kind), **rule_options))
    return rules


def _gelu_rules() -> list[Rule]:
    return gelu_rules(_rewrite_gelu, _check_gelu, min_opset=20)


def _layernorm_rules() -> list[Rule]:
    return [
        Rule("layernorm", _layernorm_pattern(square, beta), _rewrite_layernorm, _check_layernorm,
             min_opset=17)
        for beta in (True, False)
        for square in ("pow", "mul")
    ]


# ---------------------------------------------------------------- RMSNormalization


def rms_pattern(square: str, normalize: str, cast_out: bool = False) -> Op:
    """The decomposed RMSNorm ``gamma * x / sqrt(mean(x^2) + eps)``: ``square`` "pow" or
    "mul"; ``normalize`` "div" (``x / std``), "reciprocal" (``x * Reciprocal(std)``) or
    "div-one" (``x * Div(1, std)``, torch's rsqrt); ``cast_out``: the Cast HF's RMSNorm
    adds after the normalization (``.to(input_dtype)``)."""
    x = Var("x")
    sq = Op("Pow", x, Const("two"), name="sq") if square == "pow" else Op("Mul", x, x, name="sq")
    ms = Op("ReduceMean", sq, Const("axes2", optional=True), name="var")
    std = Op("Sqrt", Op("Add", ms, Const("eps"), commute=True, name="add_eps"), name="std")
    if normalize == "div":
        normed = Op("Div", x, std, name="n")
    else:
        inv = Op("Reciprocal", std, name="inv") if normalize == "reciprocal" else Op(
            "Div", Const("one"), std, name="inv")
        normed = Op("Mul", x, inv, commute=True, name="n")
    if cast_out:
        normed = Op("Cast", normed, name="cast_out")
    return Op("Mul", normed, Const("gamma"), commute=True, name="scaled")


def _check_rms(m: Match) -> str | None:
    x = m["x"]
    if not _float32(x, m.array("gamma"), m.array("eps")):
        return "not float32"
    rank = m.rank(x)
    if rank is None or rank < 1:
        return "unknown input rank"
    if not _reduces_last_axis(m, m["var"], "axes2", rank):
        return "not a mean over the last axis"
    if m.get("two") is not None and not _scalar_near(m, "two", 2.0):
        return "exponent is not 2"
    if m.array("eps").size != 1:
        return "eps is not a scalar"
    last = x.shape[-1] if x.shape is not None else None
    if _vector(m.array("gamma"), last if isinstance(last, int) else None, rank) is None:
        return "gamma is not one per element of the last axis"
    return None


def _rewrite_rms(m: Match, b: Builder) -> ir.Value:
    x = m["x"]
    rank = m.rank(x)
    last = x.shape[-1] if x.shape is not None else None
    size = last if isinstance(last, int) else _vector(m.array("gamma"), None, rank).size
    gamma = _vector_value(m, b, "gamma", size, rank)
    return b.op("RMSNormalization", x, gamma, axis=-1, epsilon=float(m.array("eps").reshape(())))


def _rms_rules() -> list[Rule]:
    return [Rule("rmsnorm", rms_pattern(square, normalize), _rewrite_rms, _check_rms, min_opset=23)
            for square in ("pow", "mul") for normalize in ("reciprocal", "div")]


RULES: tuple[Rule, ...] = (*_layernorm_rules(), *_gelu_rules(), *_rms_rules())


class FuseNormalizationPass(RewritePass):
    """Fuse decomposed LayerNormalization (opset >= 17), Gelu (opset >= 20) and
    RMSNormalization (opset >= 23)."""

    name = "fuse-normalization"
    numerics = "fusion"
    rules = RULES

