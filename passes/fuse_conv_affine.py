"""FuseConvAffinePass: fold per-channel constant Mul/Add into Conv, merge constant chains.

Rewrites (default-domain ops; ``c`` a constant; either operand order of Mul/Add):

- ``conv-mul``: ``Mul(Conv(x, W, b?), c)`` (Conv or ConvTranspose) becomes
  ``Conv(x, W*v, b*v)`` where ``v`` is ``c`` as one factor per output channel.
- ``conv-add``: ``Add(Conv(x, W, b?), c)`` becomes ``Conv(x, W, b + v)`` (a bias is
  created when absent; ``W`` is reused as is).
- ``mul-conv``: ``Conv(Mul(x, c), W, b?)`` (Conv or ConvTranspose) becomes
  ``Conv(x, W*u, b?)`` where ``u`` is ``c`` as one factor per input channel, applied to
  the weight entries that read that channel.
- ``mul-mul`` / ``add-add``: ``Mul(Mul(x, a), b)`` becomes ``Mul(x, a*b)`` and
  ``Add(Add(x, a), b)`` becomes ``Add(x, a+b)``.

Preconditions: ``c`` is per output channel: a scalar, or of rank <= the Conv output's
rank whose dims, right-aligned against ``[N, C, spatial...]``, are 1 except the channel
dim (1 or C); the same dtype as the weight; W constant, for Mul read by nothing else ("shared
weight" otherwise: folding would duplicate it); b constant, possibly shared (identical
biases deduplicated into one): the rewrite writes a new bias of one element per
channel and leaves the old one to its other readers. For ``mul-conv``, ``c``
is per input channel the same way, and ``Mul(x, c)`` has ``x``'s shape: ``c`` is one
element of rank <= 1, or ``x``'s static rank is known and each of ``c``'s dims is 1 or
``x``'s static dim (the Conv then reads a tensor of the shape it read). For chains:
``a`` and ``b`` of the same dtype, and the combined constant's dims likewise each 1 or
``x``'s static dim, so its broadcast does not enlarge ``x`` (the original output shape
is kept and the constant cannot grow beyond ``x``). The driver
(``optcc.rewrite.pattern``) refuses matches whose intermediate is read elsewhere or is a
graph output.

Numerics ("fusion"): a convolution is linear in its weights and bias per output
channel, so ``(conv(x, W) + b)*v == conv(x, W*v) + b*v`` and ``+ v`` can join the bias;
it is linear in its input per input channel, and its zero padding stays zero when
scaled, so ``conv(x*u, W) == conv(x, W*u)`` (bit for bit when ``u`` holds powers of two,
as GELU's ``* 0.5``, and no product leaves float's normal range);
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
        Const("b", optional=True),  # never changed in place: a new bias is written
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


# ---------------------------------------------------------------- a scale before a conv


def _in_channels(op_type: str, w: np.ndarray, group: int) -> int | None:
    """Input channels of a Conv/ConvTranspose from its weight, None when malformed."""
    if w.ndim < 3 or group < 1 or w.shape[0] % group:
        return None
    return int(w.shape[1]) * group if op_type == "Conv" else int(w.shape[0])


def _input_vector(m: Match) -> tuple[np.ndarray | None, str | None]:
    w, c = m.array("w"), m.array("c")
    if w.dtype not in FLOAT_DTYPES:
        return None, "not a float weight"
    if c.dtype != w.dtype:
        return None, "constant dtype differs from the weight's"
    channels = _in_channels(m["conv"].op_type, w, conv_group(m["conv"]))
    if channels is None:
        return None, "unknown channel count"
    u = per_channel(c, channels, w.ndim)
    if u is None:
        return None, "constant is not per channel"
    if not (c.ndim <= 1 and c.size == 1) and _enlarges(m["x"], c.shape):
        return None, "the Mul's broadcast could enlarge its input"
    return u, None


def _check_mul_conv(m: Match) -> str | None:
    return _input_vector(m)[1]


def _rewrite_mul_conv(m: Match, b: Builder) -> ir.Value:
    u, _ = _input_vector(m)
    conv, w = m["conv"], m.array("w")
    w64, group = w.astype(np.float64), conv_group(conv)
    tail = (1,) * (w.ndim - 2)
    if conv.op_type == "Conv":  # [Cout, Cin/group, k...]: output group g reads channels g*Cin/group...
        cout, cin_g = w.shape[0], w.shape[1]
        grouped = w64.reshape((group, cout // group, cin_g) + w.shape[2:])
        scaled = (grouped * u.reshape((group, 1, cin_g) + tail)).reshape(w.shape)
    else:  # ConvTranspose [Cin, Cout/group, k...]
        scaled = w64 * u.reshape((-1, 1) + tail)
    w_value = b.const(scaled.astype(w.dtype), f"{m['w'].name}_input_scaled")
    inputs = [m["x"], w_value] + ([m["b"]] if m.get("b") is not None else [])
    return b.op(conv.op_type, *inputs, attributes=conv.attributes)


# ---------------------------------------------------------------- constant chains


def _enlarges(x: ir.Value, shape: tuple[int, ...]) -> bool:
    """Whether broadcasting a constant of ``shape`` against ``x`` may give a shape other
    than ``x``'s: unless ``x``'s static rank is known and each dim of ``shape`` is 1 or
    ``x``'s static dim there."""
    if x.shape is None or len(shape) > x.shape.rank():
        return True
    dims = list(x.shape)[x.shape.rank() - len(shape):]
    return any(d != 1 and d != dim for d, dim in zip(shape, dims))


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
    if _enlarges(x, combined):
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
    Rule("mul-conv",
         Op(("Conv", "ConvTranspose"), Op("Mul", Var("x"), Const("c"), commute=True, name="scale"),
            Const("w", exclusive=True), Const("b", optional=True), name="conv"),
         _rewrite_mul_conv, _check_mul_conv),
    Rule("mul-mul", _chain("Mul"), _chain_rewrite("Mul"), _check_chain),
    Rule("add-add", _chain("Add"), _chain_rewrite("Add"), _check_chain),
)


class FuseConvAffinePass(RewritePass):
    """Fold per-channel constant Mul/Add into Conv/ConvTranspose (a Mul before it too);
    merge constant chains."""

    name = "fuse-conv-affine"
    numerics = "fusion"
    rules = RULES
