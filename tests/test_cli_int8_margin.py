"""--int8-metric-margin reaches the quantizer and the verifier as ``metric_margin``."""

from __future__ import annotations

import json
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
    np.savez(path, image=np.random.default_rng(0).random((4, 1, 3, 32, 32)).astype(np.float32))
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


@pytest.mark.parametrize("mode", [["--int8-dynamic"], ["--weights", "int8"]])
def test_the_margin_judges_dynamic_and_weight_only_int8_too(example: Path, tmp_path: Path, mode: list[str]) -> None:
    """The verifier judges --int8-dynamic's and --weights' results by the task against
    float32's noise floor, as --int8's: the margin given is the multiple of the floor each
    row allows (the floor itself where X is 1)."""
    allowed = {}
    for margin in ("1", "4"):
        report = tmp_path / f"r{margin}.json"
        out = tmp_path / f"out{margin}.onnx"
        code = cli.main([str(example), *mode, "--int8-metric-margin", margin, "-o", str(out),
                         "--report", str(report), "-q"])
        assert code == cli.EXIT_OK and out.exists()
        task = json.loads(report.read_text())["verification"]["task"]
        assert task["margin"] == float(margin)
        allowed[margin] = {row: value["allowed"] for row, value in task["metrics"].items() if "allowed" in value}
    assert allowed["1"] and allowed["1"].keys() == allowed["4"].keys()
    assert all(allowed["4"][row] == pytest.approx(4 * allowed["1"][row]) for row in allowed["1"])
