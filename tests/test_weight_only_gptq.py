"""GPTQ's block parameters: each block's range is shrunk by the grid factor that
reconstructs it best. With an identity Hessian GPTQ spreads no error (the inverse is
diagonal), so it must equal an independent numpy brute force over the same grid."""

from __future__ import annotations

import numpy as np
import pytest

from optcc.quant import weight_only


def _brute_force(w: np.ndarray, bits: int, block: int) -> np.ndarray:
    """Asymmetric block-wise RTN reconstruction with each (block, column) range shrunk by the
    factor of the grid that minimizes its squared error."""
    top = 2 ** bits - 1
    grid = [1.0 - weight_only.MSE_MAX_SHRINK * i / weight_only.MSE_GRID for i in range(weight_only.MSE_GRID + 1)]
    out = np.zeros_like(w, np.float64)
    for b in range(0, w.shape[0], block):
        for n in range(w.shape[1]):
            x = w[b:b + block, n].astype(np.float64)
            best = None
            for shrink in grid:
                lo, hi = min(x.min() * shrink, 0.0), max(x.max() * shrink, 0.0)
                scale = np.float64(np.float32((hi - lo) / top)) or 1.0
                zero = np.clip(np.rint(-lo / scale), 0, top)
                recon = (np.clip(np.rint(x / scale) + zero, 0, top) - zero) * scale
                error = ((x - recon) ** 2).sum()
                if best is None or error < best[0]:
                    best = (error, recon)
            out[b:b + block, n] = best[1]
    return out


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_with_an_identity_hessian_is_the_best_shrunk_rtn(bits: int) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 24)).astype(np.float32)
    w[rng.integers(0, 64, 6), rng.integers(0, 24, 6)] *= 8  # outliers: shrinking pays off
    got = weight_only.quantize(w, "gptq", bits, 32, hessian=np.eye(64)).dequantize().astype(np.float64)
    want = _brute_force(w, bits, 32)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    rtn = weight_only.quantize_rtn(w, bits, 32).dequantize().astype(np.float64)
    got_error, rtn_error = ((w - got) ** 2).sum(), ((w - rtn) ** 2).sum()
    assert got_error < rtn_error if bits == 4 else got_error <= rtn_error  # at 4 bits the outlier blocks clip
