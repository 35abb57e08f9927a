"""FuseMatMulAddPass: ``Add(MatMul(a, B), c)`` becomes ``Gemm(a, B, c)``.

Rewrite (``matmul-add``; either operand order of the Add): ``y = Add(MatMul(a, B), c)``
becomes ``y = Gemm(a, B, c)`` (alpha = beta = 1, no transposes).

Preconditions: default-domain ops; ``a`` of static rank 2 (declared, or found by
``optcc.rewrite.static_rank``; a batched or unknown-rank
MatMul is left alone: Gemm is 2-D only); ``B`` 2-D ``[K, N]`` (a constant, or a value whose declared dims are static); ``c``
of known shape that Gemm's C accepts and that does not enlarge ``[M, N]``: rank <= 2,
last dim 1 or N, first dim (rank 2) 1 or equal to a static M; float32/float64 (the
types every onnxruntime Gemm kernel takes); the MatMul result read by nothing else and
not a graph output (enforced by ``optcc.rewrite.pattern``).

Numerics ("fusion"): Gemm computes the same sum of products plus the same bias; only
the kernel's accumulation order and the point where the bias is added differ, a
rounding difference far inside 1e-4 relative.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from optcc.rewrite import Builder, Match, Op, RewritePass, Rule, Var

__all__ = ["FuseMatMulAddPass", "RULES"]

_GEMM_DTYPES = (ir.DataType.FLOAT, ir.DataType.DOUBLE)


def _weight_shape(m: Match) -> tuple[int, int] | None:
    """``B``'s static [K, N]: from the constant, else from the declared shape."""
    array = m.array("w")
    if array is not None:
        return tuple(array.shape) if array.ndim == 2 else None
    shape = m["w"].shape
    if shape is None or shape.rank() != 2 or not all(isinstance(d, int) and d >= 0 for d in shape):
        return None
    return tuple(shape)


def _check(m: Match) -> str | None:
    a, c = m["a"], m["c"]
    w_shape = _weight_shape(m)
    if w_shape is None:
        return "weight is not 2-D" if m.array("w") is not None else "weight dims unknown"
    w_dtype = m.array("w").dtype if m.array("w") is not None else (
        m["w"].dtype.numpy() if m["w"].dtype is not None else None)
    rank = m.rank(a)
    if rank is None:
        return "unknown input rank"
    if rank != 2:
        return "batched MatMul (input rank is not 2)"
    # MatMul's inputs share one dtype: the weight's tells it when ``a``'s is not declared
    known = a.dtype in _GEMM_DTYPES if a.dtype is not None else w_dtype in (np.float32, np.float64)
    if not known:
        return "dtype without a Gemm kernel"
    c_array = m.array("c")
    shape = c_array.shape if c_array is not None else c.shape
    if shape is None or not all(isinstance(d, int) and d >= 0 for d in shape):
        return "bias shape unknown"
    dims, n = tuple(shape), int(w_shape[1])
    rows = a.shape[0] if a.shape is not None else None
    if len(dims) > 2 or (dims and dims[-1] not in (1, n)):
        return "bias does not broadcast to [M, N]"
    if len(dims) == 2 and dims[0] != 1 and dims[0] != rows:
        return "bias does not broadcast to [M, N]"
    return None


def _rewrite(m: Match, b: Builder) -> ir.Value:
    return b.op("Gemm", m["a"], m["w"], m["c"])


RULES: tuple[Rule, ...] = (
    Rule(
        "matmul-add",
        Op("Add", Op("MatMul", Var("a"), Var("w"), name="matmul"), Var("c"), commute=True),
        _rewrite,
        _check,
    ),
)


class FuseMatMulAddPass(RewritePass):
    """Turn a 2-D MatMul with a constant weight followed by a bias Add into Gemm."""

    name = "fuse-matmul-add"
    numerics = "fusion"
    rules = RULES
