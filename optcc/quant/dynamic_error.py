"""A cheap estimate of how much dynamic INT8 changes one layer: its relative output error.

For ``y = a @ W`` quantized as ``QuantizeDynamicPass`` writes it (``a`` rounded by
DynamicQuantizeLinear to 256 levels over its own range widened to hold 0, on every run;
``W`` symmetric per output column within ``+-WEIGHT_QMAX``), the error is
``sum |a_hat @ W_hat - a @ W|^2 / sum |a @ W|^2`` over samples of ``a``, in float64.
Without samples of ``a`` it is the weight's own relative squared error. It ranks layers
for a search that judges whole models; it judges nothing itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from optcc.quant.integer_range import symmetric_weight_scale, weight_levels

__all__ = ["dynamic_int8_error", "dynamic_int8_errors", "quantized_activation", "quantized_weight"]

COLUMN_CHUNK_BYTES = 16 << 20  # float64 bytes of one weight's columns widened at a time


def quantized_weight(w: np.ndarray) -> np.ndarray:
    """``w`` ([K, N]) as its int8 levels dequantized, float64: symmetric per column within
    ``+-WEIGHT_QMAX`` (``weight_levels``). One float64 array of ``w``'s shape is made (the
    steps work in place)."""
    scale = symmetric_weight_scale(w, 1).astype(np.float64)
    levels = weight_levels(w.astype(np.float64), scale)
    return np.multiply(levels, scale, out=levels)


def quantized_activation(a: np.ndarray) -> np.ndarray:
    """``a`` rounded as DynamicQuantizeLinear rounds it (uint8 over ``[min(a, 0), max(a, 0)]``,
    the zero point rounded half to even), dequantized, float64."""
    x = np.asarray(a, np.float32)
    low, high = min(float(x.min(initial=0.0)), 0.0), max(float(x.max(initial=0.0)), 0.0)
    scale = np.float32((high - low) / 255) if high > low else np.float32(1.0)
    zero = np.clip(np.round(np.float32(-low) / scale), 0, 255)
    levels = np.clip(np.round(x / scale) + zero, 0, 255)
    return (levels - zero).astype(np.float64) * float(scale)


def dynamic_int8_error(w: np.ndarray, activations: Iterable[np.ndarray] | None = None) -> float:
    """The relative output error of dynamic INT8 for the weight ``w`` ([K, N]) over the
    layer's ``activations`` (each one run's input, ``[..., K]``), or of ``w`` alone
    without them (module doc). The weight is widened ``COLUMN_CHUNK_BYTES`` of float64 at
    a time (its scales are per column, so each block of columns is quantized as in the
    whole): no float64 copy of the whole weight is made. Every run's rows, each rounded
    over its own run's range, are multiplied together: one product a block."""
    rows = None if activations is None else _rows(w.shape[0], list(activations))
    error = energy = 0.0
    for columns in _column_blocks(w):
        block = w[:, columns]
        w64, w_hat = block.astype(np.float64), quantized_weight(block)  # scales from the float32 columns
        if rows is None:
            error += float(np.sum((w_hat - w64) ** 2))
            energy += float(np.sum(w64 * w64))
            continue
        a64, a_hat = rows
        y = a64 @ w64
        error += float(np.sum((a_hat @ w_hat - y) ** 2))
        energy += float(np.sum(y * y))
    return error / energy if energy > 0 else 0.0


def _rows(width: int, runs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Every run's input as rows of ``width``, stacked in the runs' order: in float64, and
    rounded as DynamicQuantizeLinear rounds each run (``quantized_activation``)."""
    flats = [np.asarray(a).reshape(-1, width) for a in runs]
    empty = np.zeros((0, width))
    a64 = np.concatenate([f.astype(np.float64) for f in flats]) if flats else empty
    a_hat = np.concatenate([quantized_activation(f) for f in flats]) if flats else empty
    return a64, a_hat


def _column_blocks(w: np.ndarray) -> list[slice]:
    """``w``'s ([K, N]) columns in consecutive blocks of at most ``COLUMN_CHUNK_BYTES`` of
    float64 each (at least one column a block)."""
    step = max(1, COLUMN_CHUNK_BYTES // (8 * max(w.shape[0], 1)))
    return [slice(start, start + step) for start in range(0, w.shape[1], step)] or [slice(0, 0)]


def dynamic_int8_errors(weights: Mapping[str, tuple[str, np.ndarray]],
                        runs: Iterable[Mapping[str, np.ndarray]] | None) -> dict[str, float]:
    """``dynamic_int8_error`` of each layer (name -> (its input's name, its [K, N] weight))
    over ``runs`` (each run's values by name, ``optcc.quant.probe.probed_values``), or of
    the weights alone when ``runs`` is None. The layers' distinct inputs over every run are
    held first (their float32 bytes summed over the runs: a decoder's hidden width times
    every prompt token, per distinct input, e.g. ~0.4 GB for a 7B-class model's four inputs a
    layer over 128 prompts of 8 tokens), then each layer is measured on them alone: its
    input's rows widened and rounded in float64 (four times that input's float32 bytes),
    its weight widened and quantized once, a block of columns at a time; only one layer's
    float64 arrays live at a time."""
    if runs is None:
        return {layer: dynamic_int8_error(w) for layer, (_, w) in weights.items()}
    names = {name for name, _ in weights.values()}
    inputs: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for values in runs:
        for name in names:
            inputs[name].append(np.asarray(values[name]))  # each run's arrays are its own
    return {layer: dynamic_int8_error(w, inputs[name]) for layer, (name, w) in weights.items()}
