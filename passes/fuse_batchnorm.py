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
- ``batchnorm-mul`` / ``batchnorm-add``: ``Mul(BatchNormalization(t, ...), c)`` becomes
  ``BatchNormalization(t, scale*v, beta*v, mean, var)`` and ``Add(BatchNormalization(...), c)``
  becomes ``BatchNormalization(t, scale, beta + v, mean, var)``, ``v`` being ``c`` as one
  value per channel (DenseNet / Inception exports write the BN's own affine this way);
  the result then folds into a producing Conv by ``conv-batchnorm``.
- ``batchnorm-to-mul-add`` (only with ``split_standalone=True``; not at -O2, where one
  BatchNormalization is fewer nodes than Mul+Add): a BatchNormalization with no foldable
  producer becomes ``Add(Mul(t, f), shift)`` with constants shaped ``[C, 1, ...]``.

Preconditions: default-domain ops; inference BatchNormalization (``training_mode`` absent
or 0, opset >= 7, ``spatial`` not 0; only output 0 used); every parameter a constant
1-D vector of the output channel count; float16/32/64. Weights are constants read by
nothing else, with two exceptions: a convolution's bias may be read elsewhere too (the
fused node gets its own bias, one value per channel, and the shared one stays for its
other readers); and a Conv/ConvTranspose weight read by several convolutions
(DenseNet's identical weights deduplicated) is folded when every reader is a convolution
whose only reader is a foldable BatchNormalization (so the shared tensor dies) and the
copies add at most 1 MiB, or are all equal (every reader's factor is the same, and
initializer deduplication merges them again); else "shared weight". For ``batchnorm-mul``/
``-add``: ``c`` has the parameters' dtype and, right-aligned against ``t``'s static rank
(``optcc.rewrite.static_rank``), dims 1 except the channel axis (1 or C), so the
broadcast neither enlarges nor reorders the output. The driver (``optcc.rewrite.pattern``) refuses
matches whose intermediate is a graph output or read elsewhere.

Numerics ("fusion"): BatchNormalization computes ``(t - mean)*f + beta``; the fused form
computes the same affine map with the multiplication distributed over the producer's
sum of products, so results differ only by rounding (a few ulp of the accumulation),
well inside 1e-4 relative. ``(BN(t)*v) + u`` is the affine map of BN with
``scale*v``/``beta*v + u``: the same function, reassociated (parameters combined in float64).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from optcc.rewrite import Builder, Const, Match, Op, RewritePass, Rule, Var

__all__ = [
    "FuseBatchNormPass",
    "RULES",
    "FLOAT_DTYPES",
    "conv_group",
    "conv_out_channels",
    "scale_conv_weight",
    "per_channel",
]

# folding a shared convolution weight copies it: at most this many extra bytes
MAX_SHARED_COPY_BYTES = 1 << 20

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


_PARAMS = ("scale", "beta", "mean", "var")


def per_channel(c: np.ndarray, channels: int, rank: int) -> np.ndarray | None:
    """``c`` as a vector of ``channels`` factors when it broadcasts against an
    ``[N, C, spatial...]`` tensor of ``rank`` along C only (None otherwise)."""
    if c.ndim > rank or rank < 2:
        return None
    dims = (1,) * (rank - c.ndim) + tuple(c.shape)
    if dims[0] != 1 or dims[1] not in (1, channels) or any(d != 1 for d in dims[2:]):
        return None
    return np.broadcast_to(c.reshape(-1), (channels,)).astype(np.float64)


def _eps(bn: ir.Node) -> float:
    eps_attr = bn.attributes.get("epsilon")
    return 1e-5 if eps_attr is None else float(eps_attr.as_float())


def _factors(bn: ir.Node, params: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    scale, beta, mean, var = (p.astype(np.float64) for p in params)
    f = scale / np.sqrt(var + _eps(bn))
    return f, beta - mean * f


def _bn_factors(m: Match) -> tuple[np.ndarray, np.ndarray]:
    return _factors(m["bn"], [m.array(k) for k in _PARAMS])


def _node_problem(bn: ir.Node, opset: int, params: list[np.ndarray | None],
                  channels: int | None) -> str | None:
    if opset < 7:
        return "BatchNormalization before opset 7"
    for attr, bad in (("training_mode", 1), ("spatial", 0)):
        a = bn.attributes.get(attr)
        if a is not None and a.type == ir.AttributeType.INT and a.as_int() == bad:
            return "training mode" if attr == "training_mode" else "spatial=0"
    if any(p is None for p in params):
        return "parameters are not constants"
    if any(p.dtype not in FLOAT_DTYPES for p in params):
        return "not a float BatchNormalization"
    if channels is None:
        return "unknown channel count"
    if any(p.shape != (channels,) for p in params):
        return "parameters are not one per channel"
    return None


def _bn_problem(m: Match, channels: int | None) -> str | None:
    return _node_problem(m["bn"], m.opset, [m.array(k) for k in _PARAMS], channels)


def _cast(array: np.ndarray, like: np.ndarray) -> np.ndarray:
    return array.astype(like.dtype)


# ---------------------------------------------------------------- Conv / ConvTranspose

_CONV = Op(
    ("Conv", "ConvTranspose"),
    Var("x"),
    Const("w"),  # shared weights: see _shared_weight_problem
    Const("b", optional=True),  # a shared bias stays for its other readers: one vector copied
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
    return _bn_problem(m, channels) or _shared_weight_problem(m, w)


def _foldable_reader_factor(m: Match, conv: ir.Node, w: np.ndarray) -> np.ndarray | None:
    """The BN factor of a reader ``conv`` of the shared weight, or None when that reader
    would not fold (then folding this one would leave the weight alive: a copy)."""
    if conv.op_type not in ("Conv", "ConvTranspose") or conv.domain not in ("", "ai.onnx"):
        return None
    channels = conv_out_channels(conv.op_type, w, conv_group(conv))
    if len(conv.inputs) > 3 or len(conv.outputs) != 1:
        return None
    if len(conv.inputs) == 3 and conv.inputs[2] is not None:
        bias_value = conv.inputs[2]
        bias = m.value_array(bias_value)
        if bias is None or bias.shape != (channels,):
            return None
    out = conv.outputs[0]
    uses = list(out.uses())
    if out.is_graph_output() or len(uses) != 1:
        return None
    bn, index = uses[0].node, uses[0].idx
    if index != 0 or bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx"):
        return None
    if bn.graph is not conv.graph or any(v.uses() or v.is_graph_output() for v in bn.outputs[1:]):
        return None
    if len(bn.inputs) != 5 or any(v is None for v in bn.inputs):
        return None
    return _reader_factor(bn, m.opset, [m.value_array(v) for v in bn.inputs[1:]], channels)


_READER_FACTOR_KEY = "optcc.fuse_batchnorm.reader_factor"


def _reader_factor(bn: ir.Node, opset: int, params: list[np.ndarray | None],
                   channels: int | None) -> np.ndarray | None:
    """``f`` of ``bn`` when it has no ``_node_problem``, else None: a function of its
    attribute objects, the opset, the parameter arrays and the channel count only. Each
    reader of a shared weight is asked once per convolution that reads it, so the answer
    is kept in ``bn.meta`` with those inputs, held by reference (arrays are never
    written, attributes never reassigned in place) and compared by identity."""
    objects = (*params, *bn.attributes.values())
    kept = bn.meta.get(_READER_FACTOR_KEY)
    if (kept is not None and kept[0] == (opset, channels) and len(kept[1]) == len(objects)
            and all(a is b for a, b in zip(kept[1], objects))):
        return kept[2]
    factor = None if _node_problem(bn, opset, params, channels) is not None else _factors(bn, params)[0]
    bn.meta[_READER_FACTOR_KEY] = ((opset, channels), objects, factor)
    return factor


def _shared_weight_problem(m: Match, w: np.ndarray) -> str | None:
    """None when the weight is read by this convolution only, or when every reader folds
    and the copies stay small or equal (see the module docstring)."""
    weight, conv = m["w"], m["conv"]
    if weight.is_graph_output():
        return "shared weight 'w'"
    readers = {use.node for use in weight.uses()}
    if readers == {conv}:
        return None
    if any(use.idx != 1 for use in weight.uses()) or len(weight.uses()) != len(readers):
        return "shared weight 'w'"
    factors = [_foldable_reader_factor(m, reader, w) for reader in readers]
    if any(f is None for f in factors):
        return "shared weight 'w'"
    if (len(readers) - 1) * w.nbytes > MAX_SHARED_COPY_BYTES \
            and not all(np.array_equal(f, factors[0]) for f in factors[1:]):  # equal copies merge again
        return "shared weight 'w' (copies would exceed 1 MiB)"
    return None


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
    rank = m.rank(a)
    if rank is None:
        return "unknown input rank"
    if rank != 2:
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
    rank = m.rank(t)
    if rank is None:
        return "unknown input rank"
    if rank < 2:
        return "input rank below 2"
    dim = t.shape[1] if t.shape is not None else None
    if isinstance(dim, int) and dim != scale.shape[0]:
        return "parameters are not one per channel"
    return None


def _rewrite_alone(m: Match, b: Builder) -> ir.Value:
    f, shift = _bn_factors(m)
    like = m.array("scale")
    shape = (-1,) + (1,) * (m.rank(m["t"]) - 2)
    f_value = b.const(_cast(f.reshape(shape), like), f"{m.output.name}_scale")
    s_value = b.const(_cast(shift.reshape(shape), like), f"{m.output.name}_shift")
    return b.op("Add", b.op("Mul", m["t"], f_value), s_value)


# ---------------------------------------------------------------- Mul / Add after BatchNormalization


def _bn_affine(op_type: str) -> Op:
    return Op(op_type, _bn_of(Var("t")), Const("c"), commute=True, name="affine")


def _affine_vector(m: Match) -> tuple[np.ndarray | None, str | None]:
    scale, c = m.array("scale"), m.array("c")
    channels = int(scale.shape[0]) if scale.ndim == 1 else None
    problem = _bn_problem(m, channels)
    if problem is not None:
        return None, problem
    if c.dtype != scale.dtype or any(m.array(k).dtype != scale.dtype for k in _PARAMS):
        return None, "constant dtype differs from the parameters'"
    rank = m.rank(m["t"])
    if rank is None:
        return None, "unknown input rank"
    v = per_channel(c, channels, rank)
    if v is None:
        return None, "constant is not per channel"
    return v, None


def _check_affine(m: Match) -> str | None:
    return _affine_vector(m)[1]


def _rewrite_affine(m: Match, b: Builder) -> ir.Value:
    v, _ = _affine_vector(m)
    scale, beta = (m.array(k).astype(np.float64) for k in ("scale", "beta"))
    if m["affine"].op_type == "Mul":
        scale, beta = scale * v, beta * v
    else:
        beta = beta + v
    like = m.array("scale")
    scale_value = b.const(_cast(scale, like), f"{m.output.name}_scale")
    beta_value = b.const(_cast(beta, like), f"{m.output.name}_beta")
    return b.op("BatchNormalization", m["t"], scale_value, beta_value, m["mean"], m["var"],
                attributes=m["bn"].attributes)


RULES: tuple[Rule, ...] = (
    Rule("conv-batchnorm", _bn_of(_CONV), _rewrite_conv, _check_conv),
    Rule("gemm-batchnorm", _bn_of(_GEMM), _rewrite_gemm, _check_gemm),
    Rule("matmul-batchnorm", _bn_of(_MATMUL), _rewrite_matmul, _check_matmul),
    Rule("batchnorm-mul", _bn_affine("Mul"), _rewrite_affine, _check_affine),
    Rule("batchnorm-add", _bn_affine("Add"), _rewrite_affine, _check_affine),
)
SPLIT_RULE = Rule("batchnorm-to-mul-add", _ALONE, _rewrite_alone, _check_alone)


class FuseBatchNormPass(RewritePass):
    """Fold inference BatchNormalization into Conv/ConvTranspose/Gemm/MatMul and the
    constant Mul/Add after it into it; with ``split_standalone`` the rest become Mul+Add."""

    name = "fuse-batchnorm"
    numerics = "fusion"
    rules = RULES

    def __init__(self, max_iters: int = 32, split_standalone: bool = False) -> None:
        super().__init__(max_iters)
        self.split_standalone = split_standalone

    def active_rules(self) -> tuple[Rule, ...]:
        return (*RULES, SPLIT_RULE) if self.split_standalone else RULES
