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


def _wide_layer(rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
    """A [256, 4096] weight whose columns' scales differ (4 MiB float32) and three runs of its input."""
    w = (rng.normal(size=(256, 4096)) * rng.uniform(0.01, 3, 4096)).astype(np.float32)
    return w, [rng.normal(size=(1, 3, 256)).astype(np.float32) * (i + 1) for i in range(3)]


def test_a_weight_measured_in_column_blocks_gives_the_definition(monkeypatch) -> None:
    from optcc.quant import dynamic_error
    monkeypatch.setattr(dynamic_error, "COLUMN_CHUNK_BYTES", 256 * 8 * 300)  # 300 columns a block: 14 blocks
    w, runs = _wide_layer(np.random.default_rng(1))
    for weight in (w, np.ascontiguousarray(w.T).T):  # as stored, and read transposed
        errors = dynamic_int8_errors({"y": ("x", weight)}, [{"x": a} for a in runs])
        assert np.isclose(errors["y"], _reference(w, runs), rtol=1e-9)
    alone = dynamic_int8_errors({"y": ("x", w)}, None)["y"]
    w64 = w.astype(np.float64)
    scale = np.maximum(np.abs(w64).max(axis=0) / 64, 1e-30)
    w_hat = np.clip(np.round(w64 / scale), -64, 64) * scale
    assert np.isclose(alone, np.sum((w_hat - w64) ** 2) / np.sum(w64 ** 2), rtol=1e-9)


def test_the_ranking_never_holds_a_float64_copy_of_a_whole_weight(monkeypatch) -> None:
    """Numpy's allocations are traced: with blocks of 256 KiB of float64, the most the
    measurement of a 4 MiB float32 weight allocates at once stays below half its float32
    size (a float64 copy of it would be 8 MiB), with runs or without."""
    from calls import traced_peak
    from optcc.quant import dynamic_error
    monkeypatch.setattr(dynamic_error, "COLUMN_CHUNK_BYTES", 1 << 18)
    w, runs = _wide_layer(np.random.default_rng(2))
    for measured in ([{"x": a} for a in runs], None):
        errors, peak = traced_peak(lambda: dynamic_int8_errors({"y": ("x", w)}, measured))
        assert errors["y"] > 0 and peak < w.nbytes // 2, peak
