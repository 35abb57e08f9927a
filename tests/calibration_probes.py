"""What calibration builds, recorded for tests: the sessions that fetch tensors whole."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from optcc.quant import calibration


@contextlib.contextmanager
def whole_tensor_collectors(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[list[str]]]:
    """Within the block, the tensor names of every session built to fetch tensors whole
    (``calibration._Collector``), in order; the real collector is back after it."""
    built: list[list[str]] = []
    original = calibration._Collector

    def counting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        built.append(args[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(calibration, "_Collector", counting)
    try:
        yield built
    finally:
        monkeypatch.setattr(calibration, "_Collector", original)
