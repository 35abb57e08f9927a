"""``dynamic_int8_errors`` against a direct numpy float64 evaluation of its definition: for
each layer, sum over runs of |round(a) @ round(W) - a @ W|^2 over sum |a @ W|^2, with ``a``
rounded as DynamicQuantizeLinear does (uint8 over its range widened to hold 0) and ``W``
symmetric per column within +-64; each layer measured on its own input's runs."""

from __future__ import annotations

import numpy as np

from optcc.quant import dynamic_int8_errors


def _reference(w: np.ndarray, runs: list[np.ndarray]) -> float:
    w = w.astype(np.float64)
    scale = np.maximum(np.abs(w).max(axis=0) / 64, 1e-30)
    w_hat = np.clip(np.round(w / scale), -64, 64) * scale
    error = energy = 0.0
    for a in runs:
        a = a.reshape(-1, w.shape[0]).astype(np.float64)
        low, high = min(a.min(), 0.0), max(a.max(), 0.0)
        step = (high - low) / 255
        zero = np.round(-low / step)
        a_hat = (np.clip(np.round(a / step) + zero, 0, 255) - zero) * step
        error += float(np.sum((a_hat @ w_hat - a @ w) ** 2))
        energy += float(np.sum((a @ w) ** 2))
    return error / energy


def test_errors_match_a_float64_evaluation_of_the_definition() -> None:
    rng = np.random.default_rng(0)
    weights = {"y1": ("x", rng.normal(size=(16, 24)).astype(np.float32)),
               "y2": ("h", (rng.normal(size=(24, 40)) * rng.uniform(0.01, 3, 40)).astype(np.float32)),
               "y3": ("x", rng.normal(size=(16, 8)).astype(np.float32))}  # reads the same input as y1
    runs = [{"x": rng.normal(size=(1, 5, 16)).astype(np.float32) * (i + 1),
             "h": np.abs(rng.normal(size=(2, 3, 24))).astype(np.float32)} for i in range(4)]
    errors = dynamic_int8_errors(weights, iter(runs))  # read once, as a probe's runs are
    assert list(errors) == ["y1", "y2", "y3"]
    for layer, (name, w) in weights.items():
        expected = _reference(w, [run[name] for run in runs])
        assert expected > 0 and np.isclose(errors[layer], expected, rtol=1e-6), layer
