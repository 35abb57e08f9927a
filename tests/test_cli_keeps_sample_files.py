"""No file optcc writes (the output, the report) may be one the samples are read from:
``-o data.npz --inputs data.npz`` or ``--report calib.npz --calibration calib.npz`` used
to replace the user's samples with the model or the JSON report (exit 0). Found while
sweeping held-out models (a report path typed over the samples' name). Now exit 2, one
line naming the file, and the samples are left as they were."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
import pytest
from onnx import TensorProto as TP

from optcc import cli


def _model(path: Path) -> None:
    w = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    graph = oh.make_graph([oh.make_node("MatMul", ["x", "W"], ["h"]), oh.make_node("Relu", ["h"], ["y"])], "g",
                          [oh.make_tensor_value_info("x", TP.FLOAT, ["n", 8])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, ["n", 4])], [nh.from_array(w, "W")])
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]), path)


@pytest.mark.parametrize("args", [
    ["-o", "{data}", "--inputs", "{data}"],
    ["-o", "{out}", "--inputs", "{data}", "--report", "{data}"],
    ["-o", "{data}", "--int8", "--calibration", "{data}"],
    ["-o", "{out}", "--int8", "--calibration", "{folder}", "--report", "{data}"],
], ids=["output-is-inputs", "report-is-inputs", "output-is-calibration", "report-in-calibration-folder"])
def test_a_file_the_samples_are_read_from_is_never_written(tmp_path: Path, capsys, args: list[str]) -> None:
    model, out, data = tmp_path / "m.onnx", tmp_path / "m.opt.onnx", tmp_path / "samples.npz"
    _model(model)
    np.savez(data, x=np.random.default_rng(1).normal(size=(6, 2, 8)).astype(np.float32))
    before = data.read_bytes()
    argv = [a.format(data=data, out=out, folder=tmp_path) for a in args]
    assert cli.main([str(model), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"optcc: error: {data}: ") and "refusing to overwrite" in err[0], err
    what = "report path" if "--report" in args and args[args.index("--report") + 1] == "{data}" else "output path"
    assert err[0].startswith(f"optcc: error: {data}: {what} is a file of the "), err  # names which file it is
    assert data.read_bytes() == before
    assert not out.exists()
