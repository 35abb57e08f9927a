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
    without them (module doc)."""
    if activations is None:
        w64 = w.astype(np.float64)
        energy = float(np.sum(w64 * w64))
        return float(np.sum((quantized_weight(w) - w64) ** 2)) / energy if energy > 0 else 0.0
    w64, w_hat = w.astype(np.float64), quantized_weight(w)
    error = energy = 0.0
    for a in activations:  # summed in the runs' order
        run_error, run_energy = _output_error(w64, w_hat, a)
        error, energy = error + run_error, energy + run_energy
    return error / energy if energy > 0 else 0.0


def _output_error(w64: np.ndarray, w_hat: np.ndarray, a: np.ndarray) -> tuple[float, float]:
    """The squared error of dynamic INT8's product of one run's input ``a`` and the weight
    (``w64``: float64; ``w_hat``: ``quantized_weight``), and the squared float64 product:
    what ``dynamic_int8_error`` sums over runs."""
    flat = np.asarray(a).reshape(-1, w64.shape[0])
    y = flat.astype(np.float64) @ w64
    return float(np.sum((quantized_activation(flat) @ w_hat - y) ** 2)), float(np.sum(y * y))


def dynamic_int8_errors(weights: Mapping[str, tuple[str, np.ndarray]],
                        runs: Iterable[Mapping[str, np.ndarray]] | None) -> dict[str, float]:
    """``dynamic_int8_error`` of each layer (name -> (its input's name, its [K, N] weight))
    over ``runs`` (each run's values by name, ``optcc.quant.probe.probed_values``), or of
    the weights alone when ``runs`` is None. The layers' distinct inputs over every run are
    held first (their float32 bytes summed over the runs: a decoder's hidden width times
    every prompt token, per distinct input, e.g. ~0.4 GB for a 7B-class model's four inputs a
    layer over 128 prompts of 8 tokens), then each layer is measured on them alone: its
    weight is widened and quantized once, and only one layer's float64 arrays live at a time."""
    if runs is None:
        return {layer: dynamic_int8_error(w) for layer, (_, w) in weights.items()}
    names = {name for name, _ in weights.values()}
    inputs: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for values in runs:
        for name in names:
            inputs[name].append(np.asarray(values[name]))  # each run's arrays are its own
    return {layer: dynamic_int8_error(w, inputs[name]) for layer, (name, w) in weights.items()}
