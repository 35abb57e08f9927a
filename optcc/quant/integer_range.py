"""The range of the int8 weights optcc writes for onnxruntime's integer kernels.

On x86 CPUs without VNNI (AVX2, AVX-512F), onnxruntime multiplies uint8 activations by
int8 weights with ``vpmaddubsw``, which adds each two adjacent products into an int16
that saturates: with weights up to 127, ``a0*w0 + a1*w1`` reaches ``2 * 255 * 127 =
64770`` and is clipped at 32767, so the same model computes other numbers there than on a
VNNI or ARM CPU (int8 activations are shifted to uint8 first: the same bound). Weights
within ``+-WEIGHT_QMAX`` keep every pair within ``2 * 255 * 64 = 32640``: no sum
saturates, every CPU accumulates the same exact int32 values, and the model judged here
is the model every user runs. The price is one bit of weight resolution.
"""

import numpy as np

WEIGHT_QMAX = 64  # the largest |int8 weight| written: no uint8 x int8 pair sum exceeds int16
MIN_WEIGHT_SCALE = 1e-12  # an all-zero weight (or channel) still divides by a positive scale


def symmetric_weight_scale(w: np.ndarray, axis: int | None) -> np.ndarray:
    """The float32 scale that maps ``w``'s largest magnitude to ``WEIGHT_QMAX``: one per
    slice along ``axis`` (the output channel), or one for the whole tensor when ``axis``
    is None; at least ``MIN_WEIGHT_SCALE``."""
    if axis is None:
        scale = np.array(np.abs(w).max() / WEIGHT_QMAX if w.size else 1.0, np.float32)
    else:
        moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
        scale = (np.abs(moved).max(axis=1) / WEIGHT_QMAX).astype(np.float32)
    return np.maximum(scale, MIN_WEIGHT_SCALE).astype(np.float32)


def weight_levels(w64: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``w64`` (float64, overwritten and returned) divided by ``scale`` (float64, e.g.
    ``symmetric_weight_scale``'s widened), rounded half to even and held within
    ``+-WEIGHT_QMAX``: a symmetric weight's int8 levels, still float64. In place, so no
    array beside ``w64`` is made."""
    np.divide(w64, scale, out=w64)
    np.round(w64, out=w64)
    return np.clip(w64, -WEIGHT_QMAX, WEIGHT_QMAX, out=w64)


__all__ = ["WEIGHT_QMAX", "MIN_WEIGHT_SCALE", "symmetric_weight_scale", "weight_levels"]
