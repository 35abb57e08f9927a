"""Block-wise weight-only quantization numerics: RTN, HQQ and GPTQ, with numpy only.

A weight ``W`` is the ``[K, N]`` matrix of ``y = x @ W`` (a Gemm's ``transB`` weight is
given transposed). It is cut into blocks of ``block_size`` consecutive rows along K (the
reduction axis) for every output column n; each block has its own scale and, when
asymmetric, an integer zero point:

    W_hat[k, n] = (q[k, n] - zero[k // B, n]) * scale[k // B, n]

- symmetric: ``q`` signed in ``[-2^(b-1), 2^(b-1) - 1]``, zero 0; the block's value of
  largest magnitude ``v`` maps exactly to ``-2^(b-1)`` (``scale = v / -2^(b-1)``, negative
  when ``v > 0``), so all 2^b levels are used (onnxruntime's convention).
- asymmetric: ``q`` unsigned in ``[0, 2^b - 1]`` over the block's range widened to hold 0,
  ``zero = round(-lo / scale)``.

Algorithms (all return a ``BlockQuantized``):

- ``quantize_rtn``: round to nearest with the block's min/max parameters.
- ``quantize_hqq``: half-quadratic optimization (HQQ, Badri & Shaji 2023) of the block's
  free parameters for the ``l_p`` (p = 0.7) reconstruction error: alternate the rounding,
  a generalized shrinkage of the residual, and the closed-form least-squares update of
  the parameters against the shrunk target (scale and zero point when asymmetric, the
  scale when symmetric); zero points are rounded to integers (the
  formats store them as integers) and each block keeps HQQ's parameters only when its
  squared reconstruction error is not above RTN's, so HQQ never reconstructs W worse.
- ``quantize_gptq``: GPTQ (Frantar et al. 2022) with the Hessian ``X^T X`` of the layer's
  inputs (``HessianAccumulator``: float64, streamed over samples, memory K^2): rows of W
  are quantized in order and each rounding error is spread over the rows not yet
  quantized through the Cholesky factor of the damped inverse Hessian (damping 1% of the
  mean diagonal), in lazy batches of 128 rows; block parameters are taken from the
  updated rows when a block starts: the block's range shrunk by the factor, of ``MSE_GRID``
  steps from 1 down to ``1 - MSE_MAX_SHRINK``, that reconstructs those rows with the
  smallest squared error (clipping a few outliers buys a finer step for the rest; factor 1,
  the min/max range, is in the grid). It minimizes the layer's output error on the data
  ``tr((W - W_hat)^T H (W - W_hat))``, which is what ``output_error`` measures.

Convolution weights (``quantize_channels``) are stored as symmetric int8 with one scale per
slice along one axis (a Conv's output channels), the per-axis ``DequantizeLinear`` of
opset 13; the same RTN rule (the slice's value of largest magnitude maps to -128). The
mean output error that rounding adds is measured by
``optcc.quant.bias_correction.weight_error_shifts`` (re-exported here), for the caller's
bias correction.

Packing helpers emit onnxruntime's ``MatMulNBits`` layout (``pack_matmul_nbits``) and the
arrays of a block-wise ``DequantizeLinear`` (opset 21, ``int4``/``uint4``/``int8``/``uint8``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from optcc.quant.bias_correction import weight_error_shifts
from optcc.quant.probe import probed_values

__all__ = [
    "BlockQuantized",
    "quantize_rtn",
    "quantize_hqq",
    "quantize_gptq",
    "gptq_factor",
    "quantize",
    "HessianAccumulator",
    "output_error",
    "pack_matmul_nbits",
    "ChannelQuantized",
    "quantize_channels",
    "weight_error_shifts",
    "ALGORITHMS",
]

ALGORITHMS = ("rtn", "hqq", "gptq")
MSE_GRID = 20
MSE_MAX_SHRINK = 0.25
GPTQ_DAMPING = 0.01
GPTQ_LAZY_ROWS = 128


@dataclasses.dataclass
class BlockQuantized:
    """A ``[K, N]`` weight quantized in blocks of ``block_size`` rows (see module doc)."""

    q: np.ndarray  # [K, N] levels: int8 (symmetric) or uint8 (asymmetric); ``level_dtype``
    scales: np.ndarray  # [ceil(K / block_size), N] float32, or float16 for a float16 layer
    zero_points: np.ndarray | None  # same shape, integers (uint8 from ``quantize``); None when symmetric
    bits: int
    block_size: int

    @property
    def symmetric(self) -> bool:
        return self.zero_points is None

    def dequantize(self) -> np.ndarray:
        """W_hat in the scales' float type, computed as DequantizeLinear does:
        ``(q - zero) * scale`` (the integer difference is exact; one rounding of the
        product to that type)."""
        k = self.q.shape[0]
        scale = np.repeat(self.scales.astype(np.float64), self.block_size, axis=0)[:k]
        zero = 0 if self.zero_points is None else \
            np.repeat(self.zero_points.astype(np.int64), self.block_size, axis=0)[:k]
        return ((self.q - zero) * scale).astype(self.scales.dtype)  # int64 zero: no uint8 wrap

    def storage(self) -> tuple[np.ndarray, np.ndarray | None]:
        """(q, zero_points) as the narrow integer dtypes a DequantizeLinear reads:
        int4/int8 when symmetric, uint4/uint8 otherwise. The levels are a view of ``q``,
        not a copy: a 4-bit type of ml_dtypes is one byte per element and reads its value
        from the byte's low nibble (sign-extended for int4), which holds the level in
        int8/uint8 too; every 4-bit packing masks the high nibble."""
        assert self.q.dtype == level_dtype(self.symmetric)  # one byte a level: the view reads each
        if self.symmetric:
            dtype = ml_dtypes.int4 if self.bits == 4 else np.int8
            return self.q.view(dtype), None
        dtype = ml_dtypes.uint4 if self.bits == 4 else np.uint8
        assert self.zero_points is not None
        return self.q.view(dtype), self.zero_points.astype(dtype)


@dataclasses.dataclass
class ChannelQuantized:
    """A weight stored as symmetric int8 with one scale per slice along ``axis``:
    ``W_hat = q * scale`` (scale broadcast along ``axis``), the per-axis DequantizeLinear
    of opset 13 without a zero point."""

    q: np.ndarray  # int8, the weight's shape
    scale: np.ndarray  # float32 [q.shape[axis]]
    axis: int

    def dequantize(self) -> np.ndarray:
        """W_hat as float32, computed as DequantizeLinear does: the level (exact in
        float32) times the scale, one float32 rounding."""
        shape = [1] * self.q.ndim
        shape[self.axis] = -1
        return self.q.astype(np.float32) * self.scale.reshape(shape)


def quantize_channels(w: np.ndarray, axis: int = 0) -> ChannelQuantized:
    """Symmetric int8 RTN of ``w`` with one scale per slice along ``axis``: each slice is one
    block of ``quantize_rtn`` (its value of largest magnitude maps exactly to -128; an
    all-zero slice gets scale 1). The error per element is at most half a step."""
    moved = np.moveaxis(np.asarray(w, np.float32), axis, 0)
    rows = moved.reshape(moved.shape[0], -1)
    block = max(16, 1 << (max(rows.shape[1], 1) - 1).bit_length())
    bq = quantize_rtn(rows.T, 8, block, symmetric=True)  # one block per column: the slice
    q = np.moveaxis(bq.q.T.reshape(moved.shape), 0, axis).astype(np.int8)
    return ChannelQuantized(np.ascontiguousarray(q), bq.scales[0].astype(np.float32), axis)


def _levels(bits: int, symmetric: bool) -> tuple[int, int]:
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if symmetric else (0, (1 << bits) - 1)


def level_dtype(symmetric: bool) -> type:
    """The type levels are held in: int8 holds every signed level and uint8 every unsigned
    one of 4 or 8 bits (a quarter of a float32 weight's bytes, where int64 took twice)."""
    return np.int8 if symmetric else np.uint8


def _blocks(w: np.ndarray, block_size: int) -> np.ndarray:
    """``[K, N]`` -> ``[kb, block_size, N]`` float64, zero rows padding the last block."""
    k, n = w.shape
    kb = -(-k // block_size)
    padded = np.zeros((kb * block_size, n), np.float64)
    padded[:k] = w
    return padded.reshape(kb, block_size, n)


def _params(blocks: np.ndarray, bits: int, symmetric: bool, scale_dtype: Any = np.float32
            ) -> tuple[np.ndarray, np.ndarray | None]:
    """RTN scale (rounded once to ``scale_dtype``) and zero point of every block of
    ``[kb, B, N]`` (or ``[B, N]``); a scale that rounds to 0 (an all-zero block, or one
    below float16's smallest step) becomes 1, which rounds the block to 0 levels."""
    lo_q, hi_q = _levels(bits, symmetric)
    lo, hi = blocks.min(axis=-2), blocks.max(axis=-2)
    one = np.array(1, scale_dtype)
    if symmetric:
        v = np.where(np.abs(hi) > np.abs(lo), hi, lo)
        scale = (v / lo_q).astype(scale_dtype)
        return np.where(scale == 0, one, scale), None
    lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
    scale = ((hi - lo) / (hi_q - lo_q)).astype(scale_dtype)
    scale = np.where(scale == 0, one, scale)
    zero = np.clip(np.rint(-lo / scale.astype(np.float64)), lo_q, hi_q).astype(np.int64)
    return scale, zero


def _round(blocks: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, bits: int) -> np.ndarray:
    lo_q, hi_q = _levels(bits, zero is None)
    s = scale.astype(np.float64)[..., None, :]
    z = 0 if zero is None else zero[..., None, :]
    return np.clip(np.rint(blocks / s) + z, lo_q, hi_q).astype(level_dtype(zero is None))


def _params_mse(blocks: np.ndarray, bits: int, symmetric: bool, scale_dtype: Any = np.float32
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """Each block's parameters for the range shrink factor (see module doc, GPTQ) with the
    smallest squared reconstruction error; ``blocks`` ``[kb, B, N]`` or ``[B, N]``."""
    best_scale, best_zero = _params(blocks, bits, symmetric, scale_dtype)
    best_error = _sq_error(blocks, best_scale, best_zero, bits)
    for i in range(1, MSE_GRID + 1):
        shrink = 1.0 - MSE_MAX_SHRINK * i / MSE_GRID
        scale, zero = _params(blocks * shrink, bits, symmetric, scale_dtype)
        error = _sq_error(blocks, scale, zero, bits)
        better = error < best_error
        best_error = np.where(better, error, best_error)
        best_scale = np.where(better, scale, best_scale)
        if zero is not None:
            assert best_zero is not None
            best_zero = np.where(better, zero, best_zero)
    return best_scale, best_zero


def _sq_error(blocks: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, bits: int) -> np.ndarray:
    return _block_sq_error(blocks, _round(blocks, scale, zero, bits), scale, zero)


def _unblock(q_blocks: np.ndarray, k: int) -> np.ndarray:
    return q_blocks.reshape(-1, q_blocks.shape[-1])[:k]


def _check(w: np.ndarray, bits: int, block_size: int) -> None:
    if w.ndim != 2:
        raise ValueError(f"weight must be a matrix, got shape {w.shape}")
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")


def quantize_rtn(w: np.ndarray, bits: int = 4, block_size: int = 32, symmetric: bool = False,
                 scale_dtype: Any = np.float32) -> BlockQuantized:
    """Round to nearest with each block's min/max parameters (scales in ``scale_dtype``)."""
    _check(w, bits, block_size)
    blocks = _blocks(w, block_size)
    scale, zero = _params(blocks, bits, symmetric, scale_dtype)
    q = _round(blocks, scale, zero, bits)
    return BlockQuantized(_unblock(q, w.shape[0]), scale, zero, bits, block_size)


def _block_sq_error(blocks: np.ndarray, q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None) -> np.ndarray:
    z = 0 if zero is None else zero[..., None, :]
    recon = (q - z) * scale.astype(np.float64)[..., None, :]
    return ((blocks - recon) ** 2).sum(axis=-2)


def _shrink(x: np.ndarray, beta: float, p: float) -> np.ndarray:
    """Proximal operator of the l_p (p < 1) norm used by HQQ (generalized soft threshold)."""
    return np.sign(x) * np.maximum(np.abs(x) - (1.0 / beta) * np.power(np.abs(x) + 1e-8, p - 1), 0)


def quantize_hqq(w: np.ndarray, bits: int = 4, block_size: int = 32, symmetric: bool = False, *,
                 iterations: int = 20, lp_norm: float = 0.7, beta: float = 10.0, kappa: float = 1.01,
                 scale_dtype: Any = np.float32) -> BlockQuantized:
    """HQQ: half-quadratic optimization of each block's parameters (see module doc)."""
    _check(w, bits, block_size)
    lo_q, hi_q = _levels(bits, symmetric)
    blocks = _blocks(w, block_size)
    rtn_scale, rtn_zero = _params(blocks, bits, symmetric, scale_dtype)
    rtn_q = _round(blocks, rtn_scale, rtn_zero, bits)
    scale = rtn_scale.astype(np.float64)
    zero = np.zeros_like(scale) if rtn_zero is None else rtn_zero.astype(np.float64)
    for _ in range(iterations):
        q = np.clip(np.rint(blocks / scale[:, None, :] + zero[:, None, :]), lo_q, hi_q)
        residual = _shrink(blocks - (q - zero[:, None, :]) * scale[:, None, :], beta, lp_norm)
        target = blocks - residual  # what the quantized block should reconstruct
        if symmetric:  # the scale is the only free parameter: least squares on the target
            qq = (q * q).sum(axis=1)
            scale = np.where(qq > 0, (target * q).sum(axis=1) / np.where(qq > 0, qq, 1), scale)
            scale = np.where(scale == 0, rtn_scale, scale)
        else:  # closed form: target ~ scale * (q - zero), least squares in (scale, zero)
            qm, tm = q.mean(axis=1), target.mean(axis=1)
            var = ((q - qm[:, None, :]) ** 2).sum(axis=1)
            cov = ((q - qm[:, None, :]) * (target - tm[:, None, :])).sum(axis=1)
            fitted = np.where(var > 0, cov / np.where(var > 0, var, 1), scale)
            scale = np.where(fitted > 0, fitted, scale)
            zero = qm - tm / scale
        beta *= kappa
    hqq_scale = scale.astype(scale_dtype)
    hqq_scale = np.where(hqq_scale == 0, rtn_scale, hqq_scale)  # a fitted scale below float16's step
    hqq_zero = None if symmetric else np.clip(np.rint(zero), lo_q, hi_q).astype(np.int64)
    hqq_q = _round(blocks, hqq_scale, hqq_zero, bits)
    better = _block_sq_error(blocks, hqq_q, hqq_scale, hqq_zero) <= _block_sq_error(blocks, rtn_q, rtn_scale, rtn_zero)
    out_scale = np.where(better, hqq_scale, rtn_scale).astype(scale_dtype)
    out_zero = None if symmetric else np.where(better, hqq_zero, rtn_zero)
    out_q = np.where(better[:, None, :], hqq_q, rtn_q)
    return BlockQuantized(_unblock(out_q, w.shape[0]), out_scale, out_zero, bits, block_size)


class HessianAccumulator:
    """``X^T X`` of a layer's inputs (rows of ``x[..., K]``) in float64, one sample at a
    time: memory K^2 whatever the number of samples."""

    def __init__(self, k: int) -> None:
        self.sum = np.zeros((k, k), np.float64)
        self.rows = 0

    def add(self, x: np.ndarray) -> None:
        rows = np.asarray(x, np.float64).reshape(-1, self.sum.shape[0])
        self.sum += rows.T @ rows
        self.rows += rows.shape[0]

    @property
    def hessian(self) -> np.ndarray:
        """The mean ``X^T X`` over the rows seen (GPTQ's H up to a constant factor)."""
        return self.sum / max(self.rows, 1)


def gptq_factor(hessian: np.ndarray, block_size: int, *, damping: float = GPTQ_DAMPING
                ) -> tuple[np.ndarray, np.ndarray]:
    """(upper Cholesky factor of the damped inverse Hessian, mask of dead rows), padded to
    whole blocks; layers that read the same input (and chunks of one weight) share it."""
    k = hessian.shape[0]
    kp = -(-k // block_size) * block_size
    h = np.zeros((kp, kp), np.float64)
    h[:k, :k] = hessian
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    h[np.diag_indices(kp)] += damping * np.mean(np.diag(h))
    # row i of the factor holds how the rounding error of row i of W propagates
    return np.linalg.cholesky(np.linalg.inv(h)).T, dead


def quantize_gptq(w: np.ndarray, hessian: np.ndarray | None, bits: int = 4, block_size: int = 32,
                  symmetric: bool = False, *, damping: float = GPTQ_DAMPING,
                  factor: tuple[np.ndarray, np.ndarray] | None = None, scale_dtype: Any = np.float32
                  ) -> BlockQuantized:
    """GPTQ with the layer-input Hessian ``hessian`` ([K, K], see module doc); ``factor``
    (from ``gptq_factor``) replaces the Hessian when already computed."""
    _check(w, bits, block_size)
    k, n = w.shape
    kb = -(-k // block_size)
    kp = kb * block_size
    if factor is None:
        if hessian is None:
            raise ValueError("GPTQ needs a Hessian or its factor")
        factor = gptq_factor(hessian, block_size, damping=damping)
    hinv, dead = factor
    weight = np.zeros((kp, n), np.float64)
    weight[:k] = w
    weight[dead] = 0.0
    q = np.zeros((kp, n), level_dtype(symmetric))
    scales = np.zeros((kb, n), scale_dtype)
    zeros = None if symmetric else np.zeros((kb, n), np.int64)
    lazy = max(GPTQ_LAZY_ROWS, block_size)
    for i1 in range(0, kp, lazy):
        i2 = min(i1 + lazy, kp)
        w1 = weight[i1:i2].copy()
        err1 = np.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            row = i1 + i
            if row % block_size == 0:  # parameters from the block's rows as updated so far
                b = row // block_size
                scale, zero = _params_mse(w1[i:i + block_size], bits, symmetric, scale_dtype)
                scales[b] = scale
                if zeros is not None:
                    zeros[b] = zero
            qi = _round(w1[i][None], scales[row // block_size], None if zeros is None else zeros[row // block_size], bits)[0]
            q[row] = qi
            z = 0 if zeros is None else zeros[row // block_size]
            recon = (qi - z) * scales[row // block_size].astype(np.float64)
            err = (w1[i] - recon) / h1[i, i]
            w1[i:] -= np.outer(h1[i, i:], err)
            err1[i] = err
        weight[i2:] -= hinv[i1:i2, i2:].T @ err1
    return BlockQuantized(q[:k], scales, zeros, bits, block_size)


# columns quantized at once: bounds the float64 temporaries (about 8 copies of a chunk)
CHUNK_ELEMENTS = 1 << 21


def quantize(w: np.ndarray, algorithm: str = "rtn", bits: int = 4, block_size: int = 32,
             symmetric: bool = False, hessian: np.ndarray | None = None,
             factor: tuple[np.ndarray, np.ndarray] | None = None, scale_dtype: Any = np.float32
             ) -> BlockQuantized:
    """Dispatch on ``algorithm``, a chunk of output columns at a time (every algorithm
    treats columns independently, so the result is the same as in one piece while the
    temporaries stay bounded); "gptq" without a Hessian or factor raises ValueError.
    ``scale_dtype`` (float32, or float16 for a layer that computes in float16) is the type
    the scales are stored in: each is rounded to it once, and the levels are rounded
    against the stored scale."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown weight-only algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    if algorithm == "gptq" and factor is None:
        if hessian is None:
            raise ValueError("GPTQ needs the Hessian of the layer's inputs (calibration samples)")
        factor = gptq_factor(hessian, block_size)
    _check(w, bits, block_size)
    k, n = w.shape
    kb = -(-k // block_size)
    # the whole weight's levels and parameters, filled a chunk at a time (no list of parts
    # to concatenate: the levels are held once); a zero point is a level: uint8 holds it
    q = np.empty((k, n), level_dtype(symmetric))
    scales = np.empty((kb, n), scale_dtype)
    zeros = None if symmetric else np.empty((kb, n), np.uint8)
    step = max(1, CHUNK_ELEMENTS // max(k, 1))
    for start in range(0, n, step):
        chunk = w[:, start:start + step]
        if algorithm == "rtn":
            part = quantize_rtn(chunk, bits, block_size, symmetric, scale_dtype)
        elif algorithm == "hqq":
            part = quantize_hqq(chunk, bits, block_size, symmetric, scale_dtype=scale_dtype)
        else:
            part = quantize_gptq(chunk, None, bits, block_size, symmetric, factor=factor, scale_dtype=scale_dtype)
        columns = slice(start, start + chunk.shape[1])
        q[:, columns], scales[:, columns] = part.q, part.scales
        if zeros is not None:
            zeros[:, columns] = part.zero_points
    return BlockQuantized(q, scales, zeros, bits, block_size)


def output_error(w: np.ndarray, w_hat: np.ndarray, hessian: np.ndarray) -> float:
    """Mean squared output error ``tr((W - W_hat)^T H (W - W_hat))`` of a layer whose
    inputs have the (mean) Hessian ``hessian``."""
    d = np.asarray(w, np.float64) - np.asarray(w_hat, np.float64)
    return float(np.einsum("kn,kj,jn->", d, hessian, d))


def pack_matmul_nbits(bq: BlockQuantized) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """onnxruntime ``MatMulNBits`` inputs (B, scales, zero_points) for ``bq``:

    - B: uint8 ``[N, k_blocks, block_size * bits / 8]``, column n's K levels as unsigned
      values (symmetric levels shifted by ``2^(bits-1)``, the op's default zero point),
      padded to whole blocks, two 4-bit values per byte low nibble first;
    - scales: ``[N, k_blocks]`` in the scales' type (float32, or float16: MatMulNBits' T1,
      which is also its activation's type);
    - zero_points (asymmetric only): uint8 ``[N, ceil(k_blocks * bits / 8)]``, packed the
      same way.
    """
    k, n = bq.q.shape
    kb = bq.scales.shape[0]
    offset = (1 << (bq.bits - 1)) if bq.symmetric else 0
    levels = np.zeros((n, kb * bq.block_size), np.uint8)
    step = max(1, CHUNK_ELEMENTS // max(k, 1))
    for start in range(0, n, step):  # int16 holds a level plus its offset; a chunk's worth at a time
        levels[start:start + step, :k] = (bq.q[:, start:start + step].astype(np.int16) + offset).T
    if bq.symmetric:
        levels[:, k:] = offset
    b = _pack(levels, bq.bits).reshape(n, kb, bq.block_size * bq.bits // 8)
    scales = np.ascontiguousarray(bq.scales.T)
    zero_points = None
    if bq.zero_points is not None:
        zero_points = _pack(np.ascontiguousarray(bq.zero_points.T.astype(np.uint8)), bq.bits)
    return b, scales, zero_points


def _pack(levels: np.ndarray, bits: int) -> np.ndarray:
    """Rows of unsigned levels packed into bytes (8 bits: as is; 4 bits: low nibble first)."""
    if bits == 8:
        return np.ascontiguousarray(levels, np.uint8)
    if levels.shape[1] % 2:
        levels = np.concatenate([levels, np.zeros((levels.shape[0], 1), np.uint8)], axis=1)
    return np.ascontiguousarray((levels[:, 0::2] & 0xF) | ((levels[:, 1::2] & 0xF) << 4), np.uint8)


def collect_hessians(model: Any, inputs: Mapping[str, int], samples: Iterable[Mapping[str, np.ndarray]],
                     ) -> tuple[dict[str, np.ndarray], int]:
    """Mean ``X^T X`` of the float values ``inputs`` (name -> K) of the main graph of
    ``model`` (an onnx_ir.Model) over ``samples``, run as written on onnxruntime one
    sample at a time (``optcc.quant.probe.probed_values``); returns the Hessians by name
    and the number of samples."""
    accumulators = {name: HessianAccumulator(k) for name, k in inputs.items()}
    count = 0
    for values in probed_values(model, sorted(inputs), samples):
        for name, value in values.items():
            accumulators[name].add(value)
        count += 1
    return {name: acc.hessian for name, acc in accumulators.items()}, count
