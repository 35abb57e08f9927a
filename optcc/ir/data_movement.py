"""The array an Unsqueeze, Squeeze or Reshape gives by the operator's definition: the
input's elements in order, in the output shape the spec gives; None wherever the spec
calls the node invalid. They move no element and round nothing, so NumPy's result is the
runtime's bit for bit (constant folding and the equivalence proof both rely on it)."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["unsqueezed", "squeezed", "reshaped"]


def unsqueezed(data: np.ndarray, axes: list[int]) -> np.ndarray | None:
    """Unsqueeze: a 1 inserted at each of ``axes`` of the output (negative: from its end);
    None for an axis out of range or repeated."""
    rank = data.ndim + len(axes)
    positions = [a + rank if a < 0 else a for a in axes]
    if any(not 0 <= p < rank for p in positions) or len(set(positions)) != len(positions):
        return None
    dims = iter(data.shape)
    return data.reshape([1 if i in positions else next(dims) for i in range(rank)])


def squeezed(data: np.ndarray, axes: list[int] | None) -> np.ndarray | None:
    """Squeeze: ``axes`` (negative: from the end) removed, each of size 1; every axis of
    size 1 without them. None for an axis out of range, repeated or not of size 1."""
    if axes is None:
        return data.reshape([d for d in data.shape if d != 1])
    positions = [a + data.ndim if a < 0 else a for a in axes]
    if any(not 0 <= p < data.ndim or data.shape[p] != 1 for p in positions) or len(set(positions)) != len(positions):
        return None
    return data.reshape([d for i, d in enumerate(data.shape) if i not in positions])


def reshaped(data: np.ndarray, shape: list[int], allowzero: bool) -> np.ndarray | None:
    """Reshape: ``0`` copies the input's dim at that index (a 0 itself with ``allowzero``),
    one ``-1`` takes the rest; None where the spec calls the target invalid."""
    if shape.count(-1) > 1 or any(d < -1 for d in shape) or (allowzero and 0 in shape and -1 in shape):
        return None
    target = []
    for i, d in enumerate(shape):
        if d == 0 and not allowzero:
            if i >= data.ndim:
                return None
            d = data.shape[i]
        target.append(d)
    if -1 in target:
        known = math.prod(d for d in target if d != -1)
        if known == 0 or data.size % known:
            return None
        target[target.index(-1)] = data.size // known
    if math.prod(target) != data.size:
        return None
    return data.reshape(target)
