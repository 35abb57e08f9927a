"""Calibration samples that hold one value throughout (all-zero images) are refused: INT8
ranges fitted on them, and its accuracy judged on them, say nothing about real inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import optcc
from optcc import cli
from optcc.errors import BadInputError
from optcc.numerics import check_samples_vary

TINYCNN = Path(__file__).resolve().parent.parent / "fixtures" / "tinycnn.onnx"


def _zeros(n: int) -> list[dict[str, np.ndarray]]:
    return [{"image": np.zeros((1, 3, 32, 32), np.float32)} for _ in range(n)]


def test_all_zero_images_are_refused_before_any_work() -> None:
    with pytest.raises(BadInputError, match="'image' holds one value throughout"):
        optcc.optimize(str(TINYCNN), int8_calibration=_zeros(10))


def test_the_command_line_exits_2_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "calib.npz"
    np.savez(data, image=np.zeros((4, 1, 3, 32, 32), np.float32))
    out = tmp_path / "out.onnx"
    assert cli.main([str(TINYCNN), "--int8", "--calibration", str(data), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds one value throughout" in err[0] and str(TINYCNN) in err[0]
    assert not out.exists()


def test_one_varying_sample_or_inputs_without_float_data_pass() -> None:
    rng = np.random.default_rng(0)
    samples = _zeros(3) + [{"image": rng.random((1, 3, 32, 32)).astype(np.float32)}]
    check_samples_vary(samples)  # one real image among blank ones: ranges see it
    check_samples_vary([{"ids": np.zeros((1, 8), np.int64)}])  # token ids are not ranges' business
    check_samples_vary([{"scale": np.float32(2.0)}])  # a one-element float input says nothing either way
