"""INT8 calibrates on some samples and judges the result on others held out. One sample,
or copies of one, leaves nothing to hold out: the judgement would rest on the data that
calibrated. Such data are refused (exit 2, nothing written), ungrouped and per group."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import optcc
from optcc import cli
from optcc.errors import BadInputError
from optcc.quant.driver import check_distinct

TINYCNN = Path(__file__).resolve().parent.parent / "fixtures" / "tinycnn.onnx"


def _images(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"image": rng.random((1, 3, 32, 32)).astype(np.float32)} for _ in range(n)]


def test_copies_of_one_sample_are_refused_before_any_work() -> None:
    with pytest.raises(BadInputError, match=r"at least 2 distinct calibration samples.*hold 1 \(3 samples, all the same\)"):
        optcc.optimize(str(TINYCNN), int8_calibration=_images(1, 0) * 3)


def test_a_group_of_copies_is_refused_by_name() -> None:
    samples = _images(2, 1) + _images(1, 2) * 2
    with pytest.raises(BadInputError, match=r"group 'photo' holds 1 \(2 samples, all the same\)"):
        optcc.optimize(str(TINYCNN), int8_calibration=samples,
                       int8_options={"groups": ["page", "page", "photo", "photo"]})


def test_group_labels_that_miss_samples_are_bad_input() -> None:
    with pytest.raises(BadInputError, match="3 group labels for 4 samples"):
        optcc.optimize(str(TINYCNN), int8_calibration=_images(4, 5), int8_options={"groups": ["a", "a", "b"]})


def test_distinct_samples_pass_whatever_repeats_among_them() -> None:
    first, second = _images(2, 3)
    check_distinct([first, second])
    check_distinct([first, first, second], groups=None)
    same_values_other_name = {"other": first["image"]}  # a sample is its names, shapes and bytes
    check_distinct([first, same_values_other_name])


def test_the_command_line_names_the_files_and_writes_nothing(tmp_path: Path, capsys) -> None:
    data, out = tmp_path / "calib.npz", tmp_path / "out.onnx"
    np.savez(data, image=np.stack([_images(1, 4)[0]["image"]] * 16))
    assert cli.main([str(TINYCNN), "--int8", "--calibration", str(data), "-o", str(out)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"optcc: error: {TINYCNN}: INT8 needs at least 2 distinct calibration samples")
    assert "(16 samples, all the same)" in line and f"(--calibration {data})" in line
    assert not out.exists()
