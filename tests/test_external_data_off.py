"""--external-data off on a model whose weights live in an external file writes the weights
into the model. Before, every tensor still read from the input's data file was written as a
reference to that file (its name, offset and length), which does not exist beside the
output: exit 0, "verify: PASS", and a model that neither onnx.checker nor onnxruntime could
load (held-out sweep: khmersm 1.4.2 and malvizv1 0.1.0, both shipped with external data)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import _get_all_tensors, convert_model_to_external_data
from onnx.reference import ReferenceEvaluator

from optcc import cli

RNG = np.random.default_rng(3)
N = 640  # W: 640x640 float32 = 1.6 MB, over the streaming size; the rest are small


def _model() -> onnx.ModelProto:
    w = (RNG.standard_normal((N, N)) / N).astype(np.float32)
    b = RNG.standard_normal(N).astype(np.float32)
    c = RNG.standard_normal(N).astype(np.float32)
    t = RNG.standard_normal(N).astype(np.float32)
    then_branch = helper.make_graph(  # a branch with an initializer of its own
        [helper.make_node("Add", ["z", "T"], ["then_out"])], "then", [],
        [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, [2, N])], [numpy_helper.from_array(t, "T")])
    else_branch = helper.make_graph(
        [helper.make_node("Neg", ["z"], ["else_out"])], "else", [],
        [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, [2, N])])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["m", "B"], ["a"]),
         helper.make_node("Constant", [], ["C"], value=numpy_helper.from_array(c, "C")),
         helper.make_node("Mul", ["a", "C"], ["z"]),
         helper.make_node("If", ["flag"], ["y"], then_branch=then_branch, else_branch=else_branch)],
        "ext", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, N]),
                helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, N])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("level", ["-O0", "-O2"])
def test_external_data_off_writes_every_weight_into_the_model(tmp_path: Path, level: str, capsys) -> None:
    proto = _model()
    src = tmp_path / "in"
    src.mkdir()
    stored = onnx.ModelProto()
    stored.CopyFrom(proto)
    convert_model_to_external_data(stored, location="m.onnx.data", size_threshold=0)  # onnx's default: not C
    onnx.save_model(stored, str(src / "m.onnx"))
    assert sorted(t.name for t in _get_all_tensors(onnx.load(str(src / "m.onnx"), load_external_data=False))
                  if t.data_location == TensorProto.EXTERNAL) == ["B", "T", "W"]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "o.onnx"
    code = cli.main([str(src / "m.onnx"), level, "--external-data", "off", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in out_dir.iterdir()) == ["o.onnx"]
    written = onnx.load(str(out), load_external_data=False)
    assert not [t.name for t in _get_all_tensors(written) if t.data_location == TensorProto.EXTERNAL]
    # the written model stands alone: moved away from the input's folder, it still loads and runs
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(out, alone / "o.onnx")
    onnx.checker.check_model(str(alone / "o.onnx"), full_check=True)
    session = ort.InferenceSession(str(alone / "o.onnx"), providers=["CPUExecutionProvider"])
    reference = ReferenceEvaluator(proto)
    for flag in (True, False):
        feed = {"x": RNG.standard_normal((2, N)).astype(np.float32), "flag": np.array(flag)}
        np.testing.assert_allclose(session.run(None, feed)[0], reference.run(None, feed)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("level", ["-O0", "-O2"])
@pytest.mark.parametrize("external", ["auto", "off"])
def test_a_constant_whose_value_is_in_the_data_file(tmp_path: Path, level: str, external: str, capsys) -> None:
    """onnx's convert_attribute=True also moves a Constant's value to the data file, which
    onnxruntime loads; optcc -O0 failed its verification (exit 1: the scratch copy of the
    model referred to a data file that was not beside it) and printed a raw RuntimeWarning."""
    proto = _model()
    stored = onnx.ModelProto()
    stored.CopyFrom(proto)
    convert_model_to_external_data(stored, location="m.onnx.data", size_threshold=0, convert_attribute=True)
    onnx.save_model(stored, str(tmp_path / "m.onnx"))
    assert "C" in [t.name for t in _get_all_tensors(onnx.load(str(tmp_path / "m.onnx"), load_external_data=False))
                   if t.data_location == TensorProto.EXTERNAL]
    ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])  # a valid model
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "o.onnx"
    code = cli.main([str(tmp_path / "m.onnx"), level, "--external-data", external, "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "RuntimeWarning" not in err
    onnx.checker.check_model(str(out), full_check=True)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    reference = ReferenceEvaluator(proto)
    for flag in (True, False):
        feed = {"x": RNG.standard_normal((2, N)).astype(np.float32), "flag": np.array(flag)}
        np.testing.assert_allclose(session.run(None, feed)[0], reference.run(None, feed)[0], rtol=1e-4, atol=1e-5)
