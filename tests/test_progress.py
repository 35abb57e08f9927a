"""optcc.progress: the terminal line only on a terminal, callbacks and logging for the Python API."""

from __future__ import annotations

import io
import logging
import sys

import numpy as np
from onnx import TensorProto, helper, numpy_helper

import optcc
from optcc.progress import Progress, reporting


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_callback_sees_every_step_and_nothing_is_drawn(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    seen = []
    with Progress("calibrating", 3, enabled=lambda *a: seen.append(a)) as bar:
        for _ in range(4):  # one past total: clamped
            bar.advance()
        bar.set_phase("bias correction", total=2)
        bar.advance(2)
    assert seen == [("calibrating", 0, 3), ("calibrating", 1, 3), ("calibrating", 2, 3), ("calibrating", 3, 3),
                    ("calibrating", 3, 3), ("bias correction", 0, 2), ("bias correction", 2, 2)]
    assert terminal.getvalue() == ""  # a callable replaces the terminal line


def test_terminal_line_has_the_phase_and_an_eta(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with Progress("verifying", 4, enabled=True) as bar:
        bar.advance()
        bar.set_phase("verifying on CUDA")
        bar.advance(3)
    text = terminal.getvalue()
    assert "verifying:" in text and "verifying on CUDA:" in text and "/4 [" in text
    assert "00:00<" in text  # tqdm's "elapsed<remaining"
    assert text.endswith("\r")  # the line is cleared at the end of the phase


def test_silent_when_stderr_is_not_a_terminal(capsys):
    with Progress("calibrating", 5, enabled=True) as bar:
        bar.advance(5)
    assert capsys.readouterr().err == ""


def test_long_phases_print_a_log_line_now_and_then_when_stderr_is_not_a_terminal(capsys, monkeypatch):
    import optcc.progress as progress

    clock = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(progress, "TICK_SECONDS", 3600.0)  # lines at the steps alone: the watcher never looks
    with Progress("calibrating", 6, enabled=True) as bar:
        for seconds in (2, 5, 6, 10, 40, 45):  # steps at 2, 7, 13, 23, 63, 108 s
            clock[0] += seconds
            bar.advance()
    lines = capsys.readouterr().err.splitlines()
    # quiet for the first 10 s; then at most one line every 30 s
    assert lines == ["optcc: calibrating 3/6 (13 s)", "optcc: calibrating 5/6 (63 s)", "optcc: calibrating 6/6 (108 s)"]
    with Progress("calibrating", 2, enabled=False) as bar:  # -q
        clock[0] += 100
        bar.advance()
    assert capsys.readouterr().err == ""


def test_logging_records(caplog):
    with caplog.at_level(logging.DEBUG, logger="optcc.progress"):
        with Progress("calibrating", 2, enabled=False) as bar:
            bar.advance()
    assert [r.getMessage() for r in caplog.records if r.name == "optcc.progress"] == [
        "calibrating 0/2", "calibrating 1/2"]


def test_reporting_reaches_the_phases_of_optimize():
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["y"], name="relu")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    samples = [{"x": rng.random((1, 3, 8, 8), dtype=np.float32)} for _ in range(5)]
    seen: list[tuple[str, int, int]] = []
    with reporting(lambda *a: seen.append(a)):
        try:
            optcc.optimize(model, int8_calibration=samples, int8_options={"require_speedup": False})
        except optcc.errors.OptccError:  # INT8 declined: calibration and verification still ran
            pass
    phases = {phase for phase, _, _ in seen}
    assert {"calibrating", "verifying"} <= phases
    for phase in phases:  # each run of a phase (verification runs before INT8 and after) counts up from 0 to its total
        steps = [(done, total) for p, done, total in seen if p == phase]
        runs: list[list[tuple[int, int]]] = []
        for step in steps:
            if step[0] == 0:
                runs.append([])
            assert runs, f"{phase} did not start at 0"
            runs[-1].append(step)
        for run in runs:
            assert run[-1][0] == run[-1][1] > 0
            assert [d for d, _ in run] == sorted(d for d, _ in run)
    calibrating = [total for p, _, total in seen if p == "calibrating"]
    assert 0 < calibrating[0] <= len(samples)


def test_verification_advances_once_per_sample():
    """The verifying phase counts samples as they run, not all at once after the last."""
    from optcc.numerics import Verifier

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    model = optcc.ir.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    rng = np.random.default_rng(0)
    samples = [{"x": rng.standard_normal((2, 3)).astype(np.float32)} for _ in range(3)]
    seen = []
    with Verifier(model, inputs=samples, progress=lambda *a: seen.append(a)) as verifier:
        verdict = verifier.check(model.clone())
    assert verdict.passed and verdict.samples == 3
    assert [done for phase, done, total in seen if phase == "verifying"] == [0, 1, 2, 3]


def test_the_reference_runs_are_phases_of_their_own():
    """The original's float32 run and a float64 reference count their samples under their
    own names, before the candidate's "verifying"; the float64 outputs are numpy's."""
    from optcc.numerics import Verifier
    from optcc.numerics.verify import FLOAT64_PHASE, REFERENCE_PHASE

    w = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Relu", ["m"], ["y"])],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                              [numpy_helper.from_array(w, "w")])
    model = optcc.ir.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    rng = np.random.default_rng(0)
    samples = [{"x": rng.standard_normal((2, 3)).astype(np.float32)} for _ in range(3)]
    seen = []
    with Verifier(model, inputs=samples, progress=lambda *a: seen.append(a)) as verifier:
        assert verifier.check(model.clone()).passed
        reference = verifier.float64_reference([0, 2])
    phases = [phase for phase, _, _ in seen]
    assert phases.index(REFERENCE_PHASE) < phases.index("verifying")
    assert [(done, total) for phase, done, total in seen if phase == REFERENCE_PHASE] == [(0, 3), (1, 3), (2, 3),
                                                                                          (3, 3)]
    assert [(done, total) for phase, done, total in seen if phase == FLOAT64_PHASE] == [(0, 2), (1, 2), (2, 2)]
    for got, feeds in zip(reference.outputs, [samples[0], samples[2]]):
        expected = np.maximum(feeds["x"].astype(np.float64) @ w.astype(np.float64), 0)
        np.testing.assert_allclose(got["y"], expected, rtol=1e-12, atol=1e-12)


def test_the_int8_fallback_shows_its_ranking_search_and_confirmation():
    """The fallback's ranking by the layers' own errors, its search, the confirmation on
    every sample (first of the budget's model, before the search below it) and the ranking
    at the outputs are phases of their own, first seen in that order, and the ranking and
    confirmation have wall times of their own in the driver's ``seconds``; the search
    still ends with the layers made sensitive float."""
    from test_int8_decline import _chain, _rows

    from optcc.quant.fallback import CONFIRMATION_PHASE, OUTPUT_RANKING_PHASE, RANKING_PHASE

    sensitive = ("mm2", "mm4", "mm6")
    seen: list[tuple[str, int, int]] = []
    with reporting(lambda *a: seen.append(a)):
        result = optcc.optimize(_chain(sensitive, 16), int8_calibration=_rows(40),
                                int8_options={"require_speedup": False})
    phases = list(dict.fromkeys(phase for phase, _, _ in seen))
    search = "fallback: layers back to float"
    assert [p for p in phases if p.startswith("fallback")] == [RANKING_PHASE, search, CONFIRMATION_PHASE,
                                                               OUTPUT_RANKING_PHASE]
    assert phases.index(CONFIRMATION_PHASE) < phases.index("verifying")
    stats = next(p.stats for p in result.report.passes if "seconds" in p.stats)
    assert set(stats["fallback"]["kept_float"]) == set(sensitive) and stats["fallback"]["confirmation"]["passed"]
    assert {"fallback", "fallback_ranking", "fallback_confirmation"} <= set(stats["seconds"])
    assert "seconds" not in stats["fallback"]


def test_a_phase_of_one_long_step_is_named_while_it_runs(capsys, monkeypatch):
    """The watcher names the innermost open phase once stderr has been silent long enough,
    without waiting for a step; the phase around it (a pass) gives way; -q prints nothing."""
    import time

    import optcc.progress as progress

    monkeypatch.setattr(progress, "QUIET_SECONDS", 0.05)
    monkeypatch.setattr(progress, "TICK_SECONDS", 0.01)
    with Progress("pass convert-float16", 1, enabled=True):
        with Progress("fp16: judging the float16 model", 1) as inner:  # enabled=None: as the pass
            deadline = time.monotonic() + 30
            while "judging" not in capsys.readouterr().err and time.monotonic() < deadline:
                time.sleep(0.01)
            assert time.monotonic() < deadline, "no line while the one step ran"
            inner.advance()
    err = capsys.readouterr().err
    assert "pass convert-float16" not in err.split("judging")[0]
    with Progress("pass convert-float16", 1, enabled=False):  # -q
        with Progress("fp16: judging the float16 model", 1):
            time.sleep(0.3)
    assert capsys.readouterr().err == ""


def test_silence_is_counted_over_the_run_not_per_phase(capsys, monkeypatch):
    """Phases each shorter than QUIET_SECONDS inside one run still get a line once the run
    has been silent that long: the first phase to step then is named, with its count."""
    import optcc.progress as progress

    clock = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(progress, "TICK_SECONDS", 3600.0)
    with Progress("optimizing", 1, enabled=True):
        for phase in ("reference: the original", "calibrating", "bias correction"):
            with Progress(phase, 4) as bar:
                for _ in range(4):
                    clock[0] += 1.5  # 6 s a phase
                    bar.advance()
    assert capsys.readouterr().err.splitlines() == ["optcc: calibrating 3/4 (4 s)"]


def test_a_pass_s_own_phases_reach_the_callback_given_to_optimize():
    """``optimize(..., progress=callback)``: the float16 conversion's phases, which take
    their ``enabled`` from the phase around them, reach it inside the run's and the pass's."""
    from optcc.passes.convert_float16 import CANDIDATE_PHASE, RANGES_PHASE

    w = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    seen: list[tuple[str, int, int]] = []
    result = optcc.optimize(model, fp16=True, progress=lambda *a: seen.append(a))
    phases = list(dict.fromkeys(phase for phase, _, _ in seen))
    assert phases[0] == "optimizing"
    assert phases.index("pass convert-float16") < phases.index(RANGES_PHASE) < phases.index(CANDIDATE_PHASE)
    assert result.precision["fp16"] is None


def test_a_phase_that_holds_others_draws_no_terminal_line_of_its_own(monkeypatch):
    """The run and each pass (``bar=False``) leave the terminal to the phases inside them."""
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with Progress("pass convert-float16", 1, enabled=True, bar=False):
        pass
    assert terminal.getvalue() == ""
    with Progress("pass convert-float16", 1, enabled=True, bar=False):
        with Progress("fp16: judging the float16 model", 2) as inner:
            inner.advance(2)
    text = terminal.getvalue()
    assert "fp16: judging the float16 model:" in text and "pass convert-float16" not in text
