"""NaN in the user's verification samples: a model that reads NaN as a missing value (as
tree ensembles do) is optimized and verified on them, and its written outputs match an
independent numpy evaluation; calibration data with NaN is refused with one line naming
the file, and nothing is written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from optcc import cli

W = np.arange(12, dtype=np.float32).reshape(4, 3) / 10


def _missing_as_zero(path: Path) -> Path:
    """y = (x with NaN read as 0) @ W, written with a redundant Identity to optimize away."""
    nodes = [helper.make_node("IsNaN", ["x"], ["missing"]),
             helper.make_node("Where", ["missing", "zero", "x"], ["filled"]),
             helper.make_node("Identity", ["filled"], ["same"]),
             helper.make_node("MatMul", ["same", "W"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                              [numpy_helper.from_array(W, "W"), numpy_helper.from_array(np.float32(0), "zero")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _data(n: int = 6) -> np.ndarray:
    x = np.random.default_rng(0).standard_normal((n, 2, 4)).astype(np.float32)
    x[::2, 0, 1] = np.nan  # a missing value in every other sample
    return x


def test_nan_samples_verify_and_the_output_matches_numpy(tmp_path: Path, capsys) -> None:
    model = _missing_as_zero(tmp_path / "m.onnx")
    x = _data()
    np.savez(tmp_path / "in.npz", x=x)
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    code = cli.main([str(model), "-O2", "--inputs", str(tmp_path / "in.npz"), "-o", str(out),
                     "--report", str(report)])
    assert code == 0, capsys.readouterr()
    verification = json.loads(report.read_text())["verification"]
    assert verification["status"] == "passed" and verification["samples"] == len(x)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for sample in x:
        expected = np.where(np.isnan(sample), 0.0, sample).astype(np.float64) @ W.astype(np.float64)
        np.testing.assert_allclose(session.run(None, {"x": sample})[0], expected, rtol=1e-6, atol=1e-6)


def test_nan_in_calibration_data_is_refused(tmp_path: Path, capsys) -> None:
    model = _missing_as_zero(tmp_path / "m.onnx")
    np.savez(tmp_path / "cal.npz", x=_data())
    out = tmp_path / "o.onnx"
    code = cli.main([str(model), "--int8", "--calibration", str(tmp_path / "cal.npz"), "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists()
    assert len(err) == 1 and "cal.npz" in err[0] and "NaN or infinity" in err[0]
