"""FuseConvAffinePass: fold per-channel constant Mul/Add into Conv, merge constant chains.

Rewrites (default-domain ops; ``c`` a constant; either operand order of Mul/Add):

- ``conv-mul``: ``Mul(Conv(x, W, b?), c)`` (Conv or ConvTranspose) becomes
  ``Conv(x, W*v, b*v)`` where ``v`` is ``c`` as one factor per output channel.
- ``conv-add``: ``Add(Conv(x, W, b?), c)`` becomes ``Conv(x, W, b + v)`` (a bias is
  created when absent; ``W`` is reused as is).
- ``mul-mul`` / ``add-add``: ``Mul(Mul(x, a), b)`` becomes ``Mul(x, a*b)`` and
  ``Add(Add(x, a), b)`` becomes ``Add(x, a+b)``.

Preconditions: ``c`` is per output channel: a scalar, or of rank <= the Conv output's
rank whose dims, right-aligned against ``[N, C, spatial...]``, are 1 except the channel
dim (1 or C); the same dtype as the weight; W (and b for Mul) constants read by nothing
else ("shared weight" otherwise: folding would duplicate them). For chains: ``a`` and
``b`` of the same dtype, the static rank of ``x`` known, and the combined constant's
dims each 1 or equal to ``x``'s static dim, so its broadcast does not enlarge ``x``
(the original output shape is kept and the constant cannot grow beyond ``x``). The
driver (``optcc.rewrite.pattern``) refuses matches whose intermediate is read elsewhere or is a
graph output.

Numerics ("fusion"): a convolution is linear in its weights and bias per output
channel, so ``(conv(x, W) + b)*v == conv(x, W*v) + b*v`` and ``+ v`` can join the bias;
``x*a*b`` and ``x*(a*b)`` (or sums) differ by reassociation rounding only. Combined
constants are computed in float64 and cast back: within 1e-4 relative. (Integer chains
are exact: wrapping arithmetic is associative.)
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from optcc.passes.fuse_batchnorm import (
    FLOAT_DTYPES,
    conv_group,
    conv_out_channels,
    per_channel,
    scale_conv_weight,
)
from optcc.rewrite import Builder, Const, Match, Op, RewritePass, Rule, Var

__all__ = ["FuseConvAffinePass", "RULES", "per_channel"]


def _conv_vector(m: Match) -> tuple[np.ndarray | None, str | None]:
    conv, w, c = m["conv"], m.array("w"), m.array("c")
    if w.dtype not in FLOAT_DTYPES:
        return None, "not a float weight"
    if c.dtype != w.dtype:
        return None, "constant dtype differs from the weight's"
    channels = conv_out_channels(conv.op_type, w, conv_group(conv))
    if channels is None:
        return None, "unknown channel count"
    b = m.array("b")
    if b is not None and b.shape != (channels,):
        return None, "bias is not one per channel"
    v = per_channel(c, channels, w.ndim)
    if v is None:
        return None, "constant is not per channel"
    return v, None


def _conv(w_exclusive: bool) -> Op:
    return Op(
        ("Conv", "ConvTranspose"),
        Var("x"),
        Const("w", exclusive=w_exclusive),
        Const("b", optional=True, exclusive=w_exclusive),
        name="conv",
    )


def _check_conv(m: Match) -> str | None:
    return _conv_vector(m)[1]


def _new_conv(m: Match, b: Builder, w_value: ir.Value, bias: np.ndarray) -> ir.Value:
    conv = m["conv"]
    b_value = b.const(bias.astype(m.array("w").dtype), f"{m.output.name}_bias")
    return b.op(conv.op_type, m["x"], w_value, b_value, attributes=conv.attributes)


def _bias64(m: Match, channels: int) -> np.ndarray:
    bias = m.array("b")
    return np.zeros(channels) if bias is None else bias.astype(np.float64)


def _rewrite_conv_mul(m: Match, b: Builder) -> ir.Value:
    v, _ = _conv_vector(m)
    conv, w = m["conv"], m.array("w")
    new_w = scale_conv_weight(conv.op_type, w.astype(np.float64), v, conv_group(conv))
    w_value = b.const(new_w.astype(w.dtype), f"{m['w'].name}_scaled")
    return _new_conv(m, b, w_value, _bias64(m, v.size) * v)


def _rewrite_conv_add(m: Match, b: Builder) -> ir.Value:
    v, _ = _conv_vector(m)
    return _new_conv(m, b, m["w"], _bias64(m, v.size) + v)


# ---------------------------------------------------------------- constant chains


def _check_chain(m: Match) -> str | None:
    a, c, x = m.array("a"), m.array("c"), m["x"]
    if a.dtype != c.dtype:
        return "constants of different dtypes"
    if x.shape is None:
        return "unknown input rank"
    try:
        combined = np.broadcast_shapes(a.shape, c.shape)
    except ValueError:
        return "constants do not broadcast"
    rank = x.shape.rank()
    if len(combined) > rank:
        return "combined constant would enlarge the input's shape"
    dims = list(x.shape)[rank - len(combined):]
    if any(d != 1 and d != dim for d, dim in zip(combined, dims)):
        return "combined constant would enlarge the input's shape"
    return None


def _chain_rewrite(op_type: str):  # noqa: ANN202 - returns a Rewrite
    def rewrite(m: Match, b: Builder) -> ir.Value:
        a, c = m.array("a"), m.array("c")
        if a.dtype in FLOAT_DTYPES:
            a64, c64 = a.astype(np.float64), c.astype(np.float64)
            combined = (a64 * c64 if op_type == "Mul" else a64 + c64).astype(a.dtype)
        else:
            combined = a * c if op_type == "Mul" else a + c
        value = b.const(combined, f"{m.output.name}_{op_type.lower()}_const")
        return b.op(op_type, m["x"], value)

    return rewrite


def _chain(op_type: str) -> Op:
    inner = Op(op_type, Var("x"), Const("a"), commute=True, name="inner")
    return Op(op_type, inner, Const("c"), commute=True, name="outer")


RULES: tuple[Rule, ...] = (
    Rule("conv-mul", Op("Mul", _conv(True), Const("c"), commute=True), _rewrite_conv_mul,
         _check_conv),
    Rule("conv-add", Op("Add", _conv(False), Const("c"), commute=True), _rewrite_conv_add,
         _check_conv),
    Rule("mul-mul", _chain("Mul"), _chain_rewrite("Mul"), _check_chain),
    Rule("add-add", _chain("Add"), _chain_rewrite("Add"), _check_chain),
)


class FuseConvAffinePass(RewritePass):
    """Fold per-channel constant Mul/Add into Conv/ConvTranspose; merge constant chains."""

    name = "fuse-conv-affine"
    numerics = "fusion"
    rules = RULES
