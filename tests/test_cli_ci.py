"""The command line as a step of a CI job: it says what runs while it runs long, its
--report is there for every way the run ends, a path naming a folder is refused, and a
decline or a refused file says what to do about it."""

from __future__ import annotations

import json
import os
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

import optcc.progress as progress
from optcc import cli


def _matmul_model(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """y = relu(x @ w + b), x [n, 16]; returns w and b."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 8)).astype(np.float32)
    b = rng.normal(size=8).astype(np.float32)
    graph = oh.make_graph([oh.make_node("MatMul", ["x", "w"], ["h"]), oh.make_node("Add", ["h", "b"], ["a"]),
                           oh.make_node("Relu", ["a"], ["y"])], "g",
                          [oh.make_tensor_value_info("x", TP.FLOAT, ["n", 16])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, ["n", 8])],
                          [nh.from_array(w, "w"), nh.from_array(b, "b")])
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]), path)
    return w, b


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# ----------------------------------------------------------------------------- progress lines


def test_fp16_names_each_step_of_its_search_and_q_silences_it(tmp_path: Path, capsys, monkeypatch):
    """In a CI log (stderr no terminal), the float16 conversion's own steps are phases that
    say what runs (here with no quiet time, so each says so as it starts); -q prints none
    of them; the lines change no byte of the output, which computes x @ w + b within
    float16's rounding of the float64 reference."""
    source = tmp_path / "m.onnx"
    w, b = _matmul_model(source)
    inputs = tmp_path / "x.npz"
    x = np.random.default_rng(1).normal(size=(4, 3, 16)).astype(np.float32)
    np.savez(inputs, x=x)
    monkeypatch.setattr(progress, "QUIET_SECONDS", 0.0)
    loud, quiet = tmp_path / "loud.onnx", tmp_path / "quiet.onnx"
    capsys.readouterr()
    assert cli.main([str(source), "--fp16", "--inputs", str(inputs), "-o", str(loud)]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("optcc: ")]
    named = [line.split(" (")[0] for line in lines]
    assert named[:2] == ["optcc: reading the model and samples", "optcc: optimizing"]
    assert "optcc: pass convert-float16" in named
    fp16_steps = [line for line in named if line.startswith("optcc: fp16: ")]
    assert fp16_steps[:2] == ["optcc: fp16: measuring ranges", "optcc: fp16: judging the float16 model"]
    assert named.index("optcc: pass convert-float16") < named.index("optcc: fp16: measuring ranges")
    assert cli.main([str(source), "--fp16", "--inputs", str(inputs), "-o", str(quiet), "-q"]) == 0
    assert capsys.readouterr().err == ""
    assert loud.read_bytes() == quiet.read_bytes()
    session = ort.InferenceSession(str(loud), providers=["CPUExecutionProvider"])
    for sample in x:
        expected = np.maximum(sample.astype(np.float64) @ w.astype(np.float64) + b, 0)
        got = session.run(None, {"x": sample})[0]
        np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-2 * float(np.abs(expected).max()))


# ----------------------------------------------------------------------------- --report on every exit


def _outcome(report: Path) -> dict:
    return json.loads(report.read_text())["outcome"]


def test_a_bad_model_still_gets_its_report(tmp_path: Path, capsys):
    model, report, out = tmp_path / "text.onnx", tmp_path / "r.json", tmp_path / "out.onnx"
    model.write_text("not a model\n")
    assert cli.main([str(model), "-o", str(out), "--report", str(report)]) == 2
    said = capsys.readouterr().err.strip()
    outcome = _outcome(report)
    assert outcome == {"exit_code": 2, "output": None, "declined": {}, "error": said.removeprefix("optcc: ")}
    assert "not a valid ONNX protobuf" in outcome["error"]
    assert _files(tmp_path) == {"text.onnx", "r.json"}  # the report alone: no output, no temporary file


def test_a_missing_calibration_file_and_a_usage_error_still_get_their_report(tmp_path: Path, capsys):
    source, report, html = tmp_path / "m.onnx", tmp_path / "r.json", tmp_path / "r.html"
    _matmul_model(source)
    assert cli.main([str(source), "--int8", "--calibration", str(tmp_path / "wrongname.npz"),
                     "--report", str(report)]) == 2
    assert _outcome(report)["exit_code"] == 2 and "wrongname.npz: no such file" in _outcome(report)["error"]
    assert cli.main([str(source), "--int8", "--report", str(html)]) == 2  # --int8 without --calibration
    assert "--int8 needs --calibration" in html.read_text()
    assert _files(tmp_path) == {"m.onnx", "r.json", "r.html"}


def test_no_report_where_the_report_path_itself_is_refused(tmp_path: Path, capsys):
    """The report follows the outputs' rules: never over the input model or the samples,
    never at a folder's name; the run's own error is said as before."""
    source, samples = tmp_path / "m.onnx", tmp_path / "calib.npz"
    _matmul_model(source)
    np.savez(samples, x=np.random.default_rng(1).normal(size=(4, 2, 16)).astype(np.float32))
    model_bytes, sample_bytes = source.read_bytes(), samples.read_bytes()
    assert cli.main([str(source), "--report", str(source)]) == 2
    assert cli.main([str(source), "--int8", "--calibration", str(samples), "--int8-metric", "nope",
                     "--report", str(samples)]) == 2
    assert cli.main([str(source), "-o", str(tmp_path / "out.onnx"), "--report", str(tmp_path / "reports") + "/"]) == 2
    assert "ends in a path separator" in capsys.readouterr().err
    assert source.read_bytes() == model_bytes and samples.read_bytes() == sample_bytes
    assert _files(tmp_path) == {"m.onnx", "calib.npz"}


@pytest.mark.parametrize("flags", [["--external-data", "on"], ["--external-data", "auto"],
                                   ["--external-data", "on", "--external-data-location", "w.bin"]])
def test_the_report_never_takes_the_place_of_the_outputs_weights(tmp_path: Path, capsys, flags: list[str]):
    """The external-data file the output may write is no report path, before the run or
    after it failed (a report there would be read as the model's weights)."""
    source, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    _matmul_model(source)
    data = tmp_path / (flags[-1] if "--external-data-location" in flags else "out.onnx.data")
    assert cli.main([str(source), *flags, "-o", str(out), "--report", str(data)]) == 2
    assert "--report is the output's external-data file" in capsys.readouterr().err
    assert cli.main([str(tmp_path / "missing.onnx"), *flags, "-o", str(out), "--report", str(data)]) == 2
    assert _files(tmp_path) == {"m.onnx"}


def test_an_internal_error_gets_its_report(tmp_path: Path, monkeypatch, capsys):
    source, report = tmp_path / "m.onnx", tmp_path / "r.json"
    _matmul_model(source)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "optimize", broken)
    monkeypatch.delenv("OPTCC_DEBUG", raising=False)
    assert cli.main([str(source), "--report", str(report)]) == 3
    outcome = _outcome(report)
    assert outcome["exit_code"] == 3 and outcome["output"] is None
    assert outcome["error"].startswith("internal error: RuntimeError: boom at ")


def test_sigterm_writes_the_report_as_the_run_unwinds(tmp_path: Path) -> None:
    from test_cli_sigterm import _TERMINATED_MIDWAY, _model

    source, out, report = tmp_path / "m.onnx", tmp_path / "out" / "m.opt.onnx", tmp_path / "r.json"
    samples = tmp_path / "x.npz"
    _model(source)
    np.savez(samples, x=np.random.default_rng(1).normal(size=(3, 2, 16)).astype(np.float32))
    out.parent.mkdir()
    proc = subprocess.run([sys.executable, "-c", _TERMINATED_MIDWAY, str(source), "-O3", "-o", str(out),
                           "--inputs", str(samples), "--report", str(report)],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode == 143, (proc.returncode, proc.stderr)
    assert _outcome(report) == {"exit_code": 143, "output": None, "declined": {},
                                "error": "terminated; nothing written"}
    assert list(out.parent.iterdir()) == []


def test_a_finished_run_says_its_error_line_in_the_report_too(tmp_path: Path, capsys):
    """Exit 5 (a decline) writes the full report; its outcome holds the line said on stderr."""
    source, samples, report = tmp_path / "m.onnx", tmp_path / "calib.npz", tmp_path / "r.json"
    _matmul_model(source)
    np.savez(samples, x=np.random.default_rng(1).normal(size=(8, 2, 16)).astype(np.float32))
    code = cli.main([str(source), "--int8", "--calibration", str(samples), "--int8-target-sqnr", "200",
                     "-o", str(tmp_path / "q.onnx"), "--report", str(report)])
    assert code == 5
    first = capsys.readouterr().err.splitlines()[0]
    data = json.loads(report.read_text())
    assert data["outcome"]["error"] == first.removeprefix("optcc: ") and data["passes"]
    assert not (tmp_path / "q.onnx").exists()


# ----------------------------------------------------------------------------- paths and files


@pytest.mark.parametrize("flag", ["-o", "--report"])
def test_a_path_ending_in_a_separator_is_refused(tmp_path: Path, capsys, flag: str):
    source = tmp_path / "m.onnx"
    _matmul_model(source)
    other = ["--report", str(tmp_path / "r.json")] if flag == "-o" else ["-o", str(tmp_path / "out.onnx")]
    assert cli.main([str(source), flag, str(tmp_path / "newdir") + os.sep, *other]) == 2
    err = capsys.readouterr().err
    assert "ends in a path separator" in err and "newdir" in err
    assert not (tmp_path / "newdir").exists() and not (tmp_path / "out.onnx").exists()


def test_a_npy_file_is_refused_with_how_to_make_an_npz(tmp_path: Path, capsys):
    source, plain = tmp_path / "m.onnx", tmp_path / "plain.npy"
    _matmul_model(source)
    np.save(plain, np.zeros((4, 2, 16), np.float32))
    assert cli.main([str(source), "--int8", "--calibration", str(plain), "-o", str(tmp_path / "q.onnx")]) == 2
    err = capsys.readouterr().err
    assert "is a .npy file" in err and "np.savez('plain.npz', x=np.load('plain.npy'))" in err
    assert not (tmp_path / "q.onnx").exists()


# ----------------------------------------------------------------------------- what INT8 could not quantize


def _conv_in_if_and_lstm(path: Path) -> None:
    """A Conv in each branch of an If on a fed condition (as silero VAD's), and an LSTM."""
    rng = np.random.default_rng(0)

    def branch(name: str, seed: int) -> onnx.GraphProto:
        w = np.random.default_rng(seed).normal(size=(4, 2, 3, 3)).astype(np.float32)
        return oh.make_graph([oh.make_node("Conv", ["x", f"{name}_w"], [f"{name}_y"], pads=[1, 1, 1, 1])], name,
                             [], [oh.make_tensor_value_info(f"{name}_y", TP.FLOAT, [1, 4, 6, 6])],
                             [nh.from_array(w, f"{name}_w")])

    hidden = 3
    nodes = [oh.make_node("If", ["c"], ["y"], then_branch=branch("a", 1), else_branch=branch("b", 2)),
             oh.make_node("LSTM", ["s", "W", "R"], ["h"], hidden_size=hidden)]
    graph = oh.make_graph(nodes, "g",
                          [oh.make_tensor_value_info("x", TP.FLOAT, [1, 2, 6, 6]),
                           oh.make_tensor_value_info("c", TP.BOOL, []),
                           oh.make_tensor_value_info("s", TP.FLOAT, [5, 1, 4])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, [1, 4, 6, 6]),
                           oh.make_tensor_value_info("h", TP.FLOAT, [5, 1, 1, hidden])],
                          [nh.from_array(rng.normal(size=(1, 4 * hidden, 4)).astype(np.float32), "W"),
                           nh.from_array(rng.normal(size=(1, 4 * hidden, hidden)).astype(np.float32), "R")])
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]), path)


def test_nothing_quantizable_says_which_preconditions_failed(tmp_path: Path, capsys):
    source, samples, report = tmp_path / "vad.onnx", tmp_path / "calib.npz", tmp_path / "r.json"
    _conv_in_if_and_lstm(source)
    rng = np.random.default_rng(3)
    n = 8
    np.savez(samples, x=rng.normal(size=(n, 1, 2, 6, 6)).astype(np.float32), c=np.arange(n) % 2 == 0,
             s=rng.normal(size=(n, 5, 1, 4)).astype(np.float32))
    assert cli.main([str(source), "--int8", "--calibration", str(samples), "-o", str(tmp_path / "q.onnx"),
                     "--report", str(report)]) == 5
    first = capsys.readouterr().err.splitlines()[0]
    assert "nothing quantizable (no layer met the preconditions: 2 Conv inside an If branch, " \
           "1 LSTM (not quantized by INT8); calibration records the main graph's values only" in first
    assert "2 Conv inside an If branch" in _outcome(report)["declined"]["int8"]
    assert not (tmp_path / "q.onnx").exists()
