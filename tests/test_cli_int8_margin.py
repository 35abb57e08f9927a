"""--int8-metric-margin reaches the quantizer and the verifier as ``metric_margin``."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from optcc import cli
from optcc.errors import BadInputError
from optcc.numerics.task import DEFAULT_MARGIN


@pytest.fixture()
def example(tmp_path: Path) -> Path:
    path = tmp_path / "tinycnn.onnx"
    shutil.copy(Path(__file__).resolve().parent.parent / "fixtures" / "tinycnn.onnx", path)
    return path


@pytest.fixture()
def calibration(tmp_path: Path) -> Path:
    path = tmp_path / "calib.npz"
    np.savez(path, image=np.zeros((4, 1, 3, 32, 32), np.float32))
    return path


def _margins(example: Path, calibration: Path, tmp_path: Path, monkeypatch, *flags: str) -> list[float]:
    seen: list[float] = []

    def recording(*args, **kwargs):
        seen.append(kwargs["int8_options"]["metric_margin"])
        raise BadInputError("stop here")

    monkeypatch.setattr(cli, "optimize", recording)
    code = cli.main([str(example), "--int8", "--calibration", str(calibration), *flags,
                     "-o", str(tmp_path / "out.onnx"), "-q"])
    assert code != 0 and not (tmp_path / "out.onnx").exists()
    return seen


def test_margin_default_and_given(example: Path, calibration: Path, tmp_path: Path, monkeypatch) -> None:
    assert _margins(example, calibration, tmp_path, monkeypatch) == [DEFAULT_MARGIN]
    assert _margins(example, calibration, tmp_path, monkeypatch, "--int8-metric-margin", "1") == [1.0]


def test_margin_needs_int8_and_a_positive_value(example: Path, calibration: Path, tmp_path: Path) -> None:
    assert cli.main([str(example), "--int8-metric-margin", "1", "-o", str(tmp_path / "o.onnx"), "-q"]) == cli.EXIT_BAD_INPUT
    assert cli.main([str(example), "--int8", "--calibration", str(calibration), "--int8-metric-margin", "0",
                     "-o", str(tmp_path / "o.onnx"), "-q"]) == cli.EXIT_BAD_INPUT
    assert not (tmp_path / "o.onnx").exists()
