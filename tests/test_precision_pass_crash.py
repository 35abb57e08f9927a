"""A requested precision pass that raises is a defect in optcc, not a decline about the
model: the command exits 3 (internal error) naming the pass and the exception, writes
nothing, and says that --allow-float-fallback writes the model without that precision; the
Python API raises PrecisionPassFailedError with the result attached. With the fallback the
float model is written (exit 0) and the warning still calls it a defect. The float model
written is checked against numpy float64. A model onnxruntime cannot run at all is no
defect: INT8 declines it (exit 5), saying why."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from reference import onnxruntime_outputs

import optcc
from optcc.cli import main
from optcc.errors import PrecisionPassFailedError
from optcc.passes import quantize_weights


def _matmul_chain(rng: np.random.Generator) -> tuple[onnx.ModelProto, list[np.ndarray]]:
    weights = [(rng.standard_normal((64, 64)) * 0.1).astype(np.float32) for _ in range(2)]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w0"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w1"], ["y"])], "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 64])],
        [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), weights


def _raise(self, model):  # noqa: ANN001 - stands in for QuantizeWeightsPass.call
    raise TypeError("unsupported operand")


def test_a_raising_precision_pass_exits_3_and_writes_nothing(tmp_path: Path, capsys, monkeypatch) -> None:
    model, _ = _matmul_chain(np.random.default_rng(0))
    path, out, report = tmp_path / "m.onnx", tmp_path / "q.onnx", tmp_path / "r.json"
    onnx.save(model, path)
    monkeypatch.setattr(quantize_weights.QuantizeWeightsPass, "call", _raise)

    assert main([str(path), "--weights", "int8", "-o", str(out), "--report", str(report)]) == 3
    err = capsys.readouterr().err
    assert "internal error" in err and "pass 'quantize-weights' raised TypeError: unsupported operand" in err
    assert "please report it" in err and "--allow-float-fallback writes it" in err
    assert not out.exists()
    assert json.loads(report.read_text())["outcome"]["exit_code"] == 3

    with pytest.raises(PrecisionPassFailedError) as raised:
        optcc.optimize(str(path), weight_only="int8")
    assert raised.value.exit_code == 3 and raised.value.result.declined_precision["weights"]


def test_the_fallback_writes_the_float_model_and_still_names_the_defect(tmp_path: Path, capsys,
                                                                       monkeypatch) -> None:
    rng = np.random.default_rng(1)
    model, (w0, w1) = _matmul_chain(rng)
    path, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save(model, path)
    monkeypatch.setattr(quantize_weights.QuantizeWeightsPass, "call", _raise)

    assert main([str(path), "--weights", "int8", "--allow-float-fallback", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "a defect in optcc" in err and "quantize-weights" in err
    x = rng.standard_normal((4, 64)).astype(np.float32)
    expected = np.maximum(x.astype(np.float64) @ w0, 0) @ w1
    written = onnx.load(out)
    assert not [n for n in written.graph.node if n.op_type in ("DequantizeLinear", "MatMulNBits")]
    np.testing.assert_allclose(onnxruntime_outputs(written, {"x": x})[0], expected, rtol=1e-5, atol=1e-5)


def test_int8_on_a_model_onnxruntime_cannot_run_is_a_decline_not_a_defect(tmp_path: Path, capsys) -> None:
    """A custom-domain op without its library: onnxruntime refuses the float model itself,
    which is the model's limit (exit 5 and why), as FP16 says for the same model."""
    rng = np.random.default_rng(2)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Frob", ["h"], ["y"], domain="com.acme")],
        "custom", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 64])],
        [numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w")])
    path, data, out = tmp_path / "custom.onnx", tmp_path / "calib.npz", tmp_path / "q.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.acme", 1)]),
              path)
    np.savez(data, x=rng.standard_normal((8, 4, 64)).astype(np.float32))
    assert main([str(path), "--int8", "--calibration", str(data), "--allow-unverified", "-o", str(out)]) == 5
    err = capsys.readouterr().err
    assert "int8 not applied: onnxruntime cannot run the model" in err and "com.acme" in err
    assert "a defect in optcc" not in err and not out.exists()
