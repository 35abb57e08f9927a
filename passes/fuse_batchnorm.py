"""FuseBatchNormPass: fold inference BatchNormalization into its producer, or into Mul+Add.

Rewrites (``y = BatchNormalization(t, scale, beta, mean, var)``, ``f = scale/sqrt(var+eps)``,
``shift = beta - mean*f``; all computed in float64 and cast back to the weight dtype):

- ``conv-batchnorm``: ``t = Conv(x, W, b?)`` or ``ConvTranspose(x, W, b?)`` becomes one
  node with ``W' = W * f`` per output channel and ``b' = b*f + shift`` (``b`` = 0 when
  absent). Conv weights are ``[Cout, Cin/group, k...]``: output channel ``o`` is row ``o``.
  ConvTranspose weights are ``[Cin, Cout/group, k...]``: output channel ``g*Cout/group + j``
  is column ``j`` of the rows of group ``g``.
- ``gemm-batchnorm``: ``t = Gemm(a, B, C?)`` becomes ``Gemm(a, B', C', beta=1)`` with ``B``
  scaled along N (rows when transB, else columns) and ``C' = (beta*C - mean)*f + beta_bn``.
- ``matmul-batchnorm``: ``t = MatMul(a, W)`` with ``a`` of static rank 2 and ``W`` a constant
  2-D weight becomes ``Gemm(a, W*f, shift)``. (For rank > 2 BatchNormalization normalizes
  axis 1, which is not MatMul's output axis, so nothing can be folded.)
- ``batchnorm-to-mul-add``: a BatchNormalization with no foldable producer becomes
  ``Add(Mul(t, f), shift)`` with constants shaped ``[C, 1, ...]`` (needs t's rank).

Preconditions: default-domain ops; inference BatchNormalization (``training_mode`` absent
or 0, opset >= 7, ``spatial`` not 0; only output 0 used); every parameter a constant
1-D vector of the output channel count; weights constants read by nothing else (else
"shared weight": folding would duplicate them); float16/32/64. The driver
(``optcc.pattern``) refuses matches whose intermediate is a graph output or read elsewhere.

Numerics ("fusion"): BatchNormalization computes ``(t - mean)*f + beta``; the fused form
computes the same affine map with the multiplication distributed over the producer's
sum of products, so results differ only by rounding (a few ulp of the accumulation),
well inside 1e-4 relative.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from optcc.pattern import Builder, Const, Match, Op, RewritePass, Rule, Var

__all__ = [
    "FuseBatchNormPass",
    "RULES",
    "FLOAT_DTYPES",
    "conv_group",
    "conv_out_channels",
    "scale_conv_weight",
]

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def conv_group(node: ir.Node) -> int:
    attr = node.attributes.get("group")
    return 1 if attr is None else int(attr.as_int())


def conv_out_channels(op_type: str, w: np.ndarray, group: int) -> int | None:
    """Output channels of a Conv/ConvTranspose from its weight, None when malformed."""
    if w.ndim < 3 or group < 1:
        return None
    if op_type == "Conv":
        return int(w.shape[0]) if w.shape[0] % group == 0 else None
    return int(w.shape[1]) * group if w.shape[0] % group == 0 else None


def scale_conv_weight(op_type: str, w: np.ndarray, v: np.ndarray, group: int) -> np.ndarray:
    """``w`` (float64) times ``v`` per output channel, in the weight layout of op_type."""
    tail = (1,) * (w.ndim - 2)
    if op_type == "Conv":
        return w * v.reshape((-1, 1) + tail)
    cin, cout_g = w.shape[0], w.shape[1]
    grouped = w.reshape((group, cin // group, cout_g) + w.shape[2:])
    scaled = grouped * v.reshape((group, 1, cout_g) + tail)
    return scaled.reshape(w.shape)


def _bn_factors(m: Match) -> tuple[np.ndarray, np.ndarray]:
    bn = m["bn"]
    eps_attr = bn.attributes.get("epsilon")
    eps = 1e-5 if eps_attr is None else float(eps_attr.as_float())
    scale, beta, mean, var = (m.array(k).astype(np.float64) for k in ("scale", "beta", "mean", "var"))
    f = scale / np.sqrt(var + eps)
    return f, beta - mean * f


def _bn_problem(m: Match, channels: int | None) -> str | None:
    bn = m["bn"]
    if m.opset < 7:
        return "BatchNormalization before opset 7"
    for attr, bad in (("training_mode", 1), ("spatial", 0)):
        a = bn.attributes.get(attr)
        if a is not None and a.type == ir.AttributeType.INT and a.as_int() == bad:
            return "training mode" if attr == "training_mode" else "spatial=0"
    params = [m.array(k) for k in ("scale", "beta", "mean", "var")]
    if any(p.dtype not in FLOAT_DTYPES for p in params):
        return "not a float BatchNormalization"
    if channels is None:
        return "unknown channel count"
    if any(p.shape != (channels,) for p in params):
        return "parameters are not one per channel"
    return None


def _cast(array: np.ndarray, like: np.ndarray) -> np.ndarray:
    return array.astype(like.dtype)


# ---------------------------------------------------------------- Conv / ConvTranspose

_CONV = Op(
    ("Conv", "ConvTranspose"),
    Var("x"),
    Const("w", exclusive=True),
    Const("b", optional=True, exclusive=True),
    name="conv",
)


def _bn_of(producer: Op) -> Op:
    return Op(
        "BatchNormalization", producer, Const("scale"), Const("beta"), Const("mean"), Const("var"),
        name="bn",
    )


def _check_conv(m: Match) -> str | None:
    conv, w = m["conv"], m.array("w")
    if w.dtype not in FLOAT_DTYPES:
        return "not a float weight"
    channels = conv_out_channels(conv.op_type, w, conv_group(conv))
    b = m.array("b")
    if b is not None and channels is not None and b.shape != (channels,):
        return "bias is not one per channel"
    return _bn_problem(m, channels)


def _rewrite_conv(m: Match, b: Builder) -> ir.Value:
    conv, w = m["conv"], m.array("w")
    f, shift = _bn_factors(m)
    bias = m.array("b")
    bias64 = np.zeros_like(f) if bias is None else bias.astype(np.float64)
    new_w = scale_conv_weight(conv.op_type, w.astype(np.float64), f, conv_group(conv))
    w_value = b.const(_cast(new_w, w), f"{m['w'].name}_bn")
    b_value = b.const(_cast(bias64 * f + shift, w), f"{m.output.name}_bias")
    return b.op(conv.op_type, m["x"], w_value, b_value, attributes=conv.attributes)


# ---------------------------------------------------------------- Gemm

_GEMM = Op("Gemm", Var("a"), Const("w", exclusive=True), Const("c", optional=True, exclusive=True),
           name="gemm")


def _gemm_attr(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return default if attr is None else float(attr.value)


def _check_gemm(m: Match) -> str | None:
    w, c = m.array("w"), m.array("c")
    if w.ndim != 2 or w.dtype not in FLOAT_DTYPES:
        return "not a float 2-D weight"
    n = w.shape[0] if _gemm_attr(m["gemm"], "transB", 0) else w.shape[1]
    if c is not None and (c.ndim > 2 or (c.ndim >= 1 and c.shape[-1] not in (1, n))):
        return "bias does not broadcast to [M, N]"
    return _bn_problem(m, int(n))


def _rewrite_gemm(m: Match, b: Builder) -> ir.Value:
    gemm, w = m["gemm"], m.array("w")
    f, shift = _bn_factors(m)
    trans_b = bool(_gemm_attr(gemm, "transB", 0))
    new_w = w.astype(np.float64) * (f[:, None] if trans_b else f[None, :])
    c = m.array("c")
    beta = _gemm_attr(gemm, "beta", 1.0)
    c64 = np.zeros(1) if c is None else beta * c.astype(np.float64)
    new_c = c64 * f + shift
    w_value = b.const(_cast(new_w, w), f"{m['w'].name}_bn")
    c_value = b.const(_cast(new_c, w), f"{m.output.name}_bias")
    return b.op("Gemm", m["a"], w_value, c_value, attributes=gemm.attributes, beta=1.0)


# ---------------------------------------------------------------- MatMul

_MATMUL = Op("MatMul", Var("a"), Const("w", exclusive=True), name="matmul")


def _check_matmul(m: Match) -> str | None:
    w, a = m.array("w"), m["a"]
    if w.ndim != 2 or w.dtype not in FLOAT_DTYPES:
        return "not a float 2-D weight"
    if a.shape is None:
        return "unknown input rank"
    if a.shape.rank() != 2:
        return "channel axis is not MatMul's output axis"
    return _bn_problem(m, int(w.shape[1]))


def _rewrite_matmul(m: Match, b: Builder) -> ir.Value:
    w = m.array("w")
    f, shift = _bn_factors(m)
    w_value = b.const(_cast(w.astype(np.float64) * f[None, :], w), f"{m['w'].name}_bn")
    c_value = b.const(_cast(shift, w), f"{m.output.name}_bias")
    return b.op("Gemm", m["a"], w_value, c_value)


# ---------------------------------------------------------------- BatchNormalization alone

_ALONE = _bn_of(Var("t"))


def _check_alone(m: Match) -> str | None:
    t, scale = m["t"], m.array("scale")
    problem = _bn_problem(m, int(scale.shape[0]) if scale.ndim == 1 else None)
    if problem is not None:
        return problem
    if t.shape is None:
        return "unknown input rank"
    if t.shape.rank() < 2:
        return "input rank below 2"
    dim = t.shape[1]
    if isinstance(dim, int) and dim != scale.shape[0]:
        return "parameters are not one per channel"
    return None


def _rewrite_alone(m: Match, b: Builder) -> ir.Value:
    f, shift = _bn_factors(m)
    like = m.array("scale")
    shape = (-1,) + (1,) * (m["t"].shape.rank() - 2)
    f_value = b.const(_cast(f.reshape(shape), like), f"{m.output.name}_scale")
    s_value = b.const(_cast(shift.reshape(shape), like), f"{m.output.name}_shift")
    return b.op("Add", b.op("Mul", m["t"], f_value), s_value)


RULES: tuple[Rule, ...] = (
    Rule("conv-batchnorm", _bn_of(_CONV), _rewrite_conv, _check_conv),
    Rule("gemm-batchnorm", _bn_of(_GEMM), _rewrite_gemm, _check_gemm),
    Rule("matmul-batchnorm", _bn_of(_MATMUL), _rewrite_matmul, _check_matmul),
    Rule("batchnorm-to-mul-add", _ALONE, _rewrite_alone, _check_alone),
)


class FuseBatchNormPass(RewritePass):
    """Fold inference BatchNormalization into Conv/ConvTranspose/Gemm/MatMul, else Mul+Add."""

    name = "fuse-batchnorm"
    level = 2
    numerics = "fusion"
    rules = RULES
