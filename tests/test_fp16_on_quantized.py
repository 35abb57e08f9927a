"""``--fp16`` on a model that is already quantized (Q/DQ around a float MatMul) declines with
a reason naming the quantization ops: exit 5 and nothing written; with
``--allow-float-fallback`` the written model computes what the input does (numpy)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from optcc import cli

W = (np.arange(12, dtype=np.float32).reshape(4, 3) - 6) / 8


def _qdq_model(path: Path) -> Path:
    scale, zero = np.float32(0.05), np.uint8(128)
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("MatMul", ["xd", "W"], ["y"])]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                              [numpy_helper.from_array(W, "W"), numpy_helper.from_array(scale, "s"),
                               numpy_helper.from_array(zero, "z")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _reference(x: np.ndarray) -> np.ndarray:
    q = np.clip(np.rint(x / 0.05) + 128, 0, 255)
    return ((q - 128) * 0.05).astype(np.float32).astype(np.float64) @ W.astype(np.float64)


def test_fp16_on_a_quantized_model_declines_and_says_why(tmp_path: Path, capsys) -> None:
    model, out = _qdq_model(tmp_path / "q.onnx"), tmp_path / "o.onnx"
    assert cli.main([str(model), "--fp16", "-o", str(out)]) == 5
    err = capsys.readouterr().err
    assert not out.exists()
    assert "already quantized (1 DequantizeLinear, 1 QuantizeLinear)" in err
    assert cli.main([str(model), "--fp16", "-o", str(out), "--allow-float-fallback", "-q"]) == 0
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, _reference(x), rtol=1e-5, atol=1e-5)
