"""The verifier's sessions of a large original read the weights of the parse it holds (no
second copy of them loaded from the file), and compute what onnxruntime computes on the
original file: the same bits, and numpy's float64 result within float32 rounding."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import optcc
from optcc.numerics.verify import Verifier

verify_module = importlib.import_module("optcc.numerics.verify")  # the package's ``verify`` is the function

WIDTH = 512  # two 1 MiB float32 weights


def _mlp_file(folder: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """x -> MatMul W1 -> Tanh -> MatMul W2 -> y, saved in one file (no external data)."""
    rng = np.random.default_rng(0)
    weights = {name: (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
               for name in ("W1", "W2")}
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["m"]), helper.make_node("Tanh", ["m"], ["t"]),
         helper.make_node("MatMul", ["t", "W2"], ["y"])],
        "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", WIDTH])],
        [numpy_helper.from_array(a, n) for n, a in weights.items()])
    path = folder / "mlp.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path, weights


def test_a_large_original_runs_on_the_weights_of_its_parse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, weights = _mlp_file(tmp_path)
    # as if 2 MiB of weights were large: the verifier and make_session hand them over
    monkeypatch.setattr(verify_module, "HANDOVER_MIN_BYTES", 1 << 20)
    monkeypatch.setattr("optcc.runtime.session.HANDOVER_MIN_BYTES", 1 << 20)
    monkeypatch.setattr("optcc.runtime.shared_weights.INLINE_MAX_BYTES", 0)
    sessions = []
    made = verify_module.make_session

    def recorded(source, *args, **kwargs):
        session = made(source, *args, **kwargs)
        sessions.append((source, session))
        return session

    monkeypatch.setattr(verify_module, "make_session", recorded)
    x = np.random.default_rng(1).standard_normal((3, WIDTH)).astype(np.float32)
    with Verifier(path, inputs=[{"x": x}], providers=["cpu"]) as verifier:
        parsed = verifier._model
        result = verifier.check(optcc.ir.clone(parsed), "exact", prove=False)
        assert result.passed, result.reason
        original_source, session = sessions[0]
        assert original_source is parsed  # not the path: the file is not loaded again
        # the arrays the parse holds (a protobuf tensor's decoded once and kept with it)
        held = {name: optcc.ir.decoded(value.const_value, keep_large=True)
                for name, value in parsed.graph.initializers.items()}
        handed = {value.data_ptr() for value in session.optcc_weights[1].values()}
        assert handed == {held["W1"].ctypes.data, held["W2"].ctypes.data}
        reference = verifier._float32_outputs()["CPUExecutionProvider"][0][0]
    as_written = ort.SessionOptions()  # the verifier's sessions: no graph optimizations, no pre-packing
    as_written.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    as_written.add_session_config_entry("session.disable_prepacking", "1")
    from_file = ort.InferenceSession(str(path), as_written, providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(reference, from_file.run(None, {"x": x})[0])
    expected = np.tanh(x.astype(np.float64) @ weights["W1"]) @ weights["W2"].astype(np.float64)
    np.testing.assert_allclose(reference, expected, rtol=1e-4, atol=1e-4)
    assert isinstance(parsed, ir.Model)
