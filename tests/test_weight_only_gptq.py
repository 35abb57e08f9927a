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


def test_hessian_reads_the_samples_value_of_an_input_with_a_default() -> None:
    """A layer input computed from a graph input that is also an initializer (a default the
    samples replace): the Hessian is numpy's mean ``X^T X`` of the inputs the fed values give."""
    import onnx
    from onnx import TensorProto as TP
    from onnx import helper as oh
    from onnx import numpy_helper as nh

    from optcc import ir as oir

    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    graph = oh.make_graph(
        [oh.make_node("Mul", ["x", "gain"], ["xg"]), oh.make_node("MatMul", ["xg", "W"], ["y"])], "g",
        [oh.make_tensor_value_info("x", TP.FLOAT, ["N", 16]), oh.make_tensor_value_info("gain", TP.FLOAT, [16])],
        [oh.make_tensor_value_info("y", TP.FLOAT, ["N", 8])],
        [nh.from_array(w, "W"), nh.from_array(np.ones(16, np.float32), "gain")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    samples = [{"x": rng.standard_normal((5, 16)).astype(np.float32),
                "gain": rng.uniform(3, 5, size=16).astype(np.float32)} for _ in range(4)]
    hessians, count = weight_only.collect_hessians(oir.load(model), {"xg": 16}, samples)
    rows = np.concatenate([s["x"].astype(np.float64) * s["gain"] for s in samples])
    assert count == 4
    np.testing.assert_allclose(hessians["xg"], rows.T @ rows / len(rows), rtol=1e-5)
