"""A fallback candidate below the budget stops running once the samples it ran make it
miss whatever it gives on the others (``TaskJudge.misses_already``): the verdict is the
one judging every sample gives, so the search, and the model it returns, are the same."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest

import optcc
from optcc.numerics import task
from optcc.numerics.task import TaskJudge
from optcc.passes import quantize_int8 as quantize_int8_pass
from optcc.quant.driver import quantize_int8
from optcc.quant.fallback import Target
from reference import onnxruntime_outputs
from test_int8_output_ranking import _model, _rows

SAMPLES = 6


def _outputs(rng: np.random.Generator, shape: tuple[int, ...], scales: list[float],
             base: list[np.ndarray]) -> list[np.ndarray]:
    """``base`` with Gaussian noise of each sample's scale added (0: the sample itself)."""
    return [b + (rng.normal(size=shape) * s).astype(np.float32) for b, s in zip(base, scales)]


def _verdicts(judge: TaskJudge, got: list[np.ndarray], name: str) -> tuple[bool, list[bool]]:
    """The judgement of every sample, and ``misses_already`` after each first part."""
    return judge({name: got})["passed"], [judge.misses_already({name: got[:m]}) for m in range(1, len(got) + 1)]


@pytest.mark.parametrize("metric, draws", [("sqnr", 1), ("argmax", 1), ("argmax", 4)])
def test_a_miss_on_the_first_samples_is_the_miss_of_every_sample(metric: str, draws: int) -> None:
    """For SQNR (noise summed over a fixed signal) and argmax (flipped confident rows over
    a fixed count, float32's own flips under its draws excused), with or without groups:
    whenever the first samples make a candidate miss, judging every sample misses too;
    a candidate that passes is never stopped, and some that miss are stopped early."""
    rng = np.random.default_rng(7)
    shape = (4, 5)
    stopped_early = passed_any = 0
    for case in range(60):
        reference = [rng.normal(size=shape).astype(np.float32) * 3 for _ in range(SAMPLES)]
        floor = [_outputs(rng, shape, [1e-3] * SAMPLES, reference) for _ in range(draws)]
        groups = ["a", "b"] * (SAMPLES // 2) if case % 2 else None
        judge = TaskJudge({"y": reference}, {"y": floor[0]}, metric=metric, draws=[{"y": d} for d in floor[1:]],
                          groups=groups, min_sqnr_db=20.0)
        scales = [float(s) for s in rng.choice([0.0, 0.01, 0.1, 0.5, 2.0], size=SAMPLES)]
        got = _outputs(rng, shape, scales, reference)
        passed, misses = _verdicts(judge, got, "y")
        assert not misses[-1]  # every sample: the judgement itself decides
        if passed:
            passed_any += 1
            assert not any(misses), (case, scales)
        elif any(misses):
            stopped_early += 1
            first = misses.index(True)
            assert all(misses[first:-1]), (case, misses)  # a miss stays a miss as samples are added
    assert stopped_early >= 5 and passed_any >= 5, (stopped_early, passed_any)


def test_a_metric_that_is_no_sum_or_count_never_stops() -> None:
    """A callable metric (any function of every sample's outputs) decides nothing early."""
    rng = np.random.default_rng(1)
    reference = [rng.normal(size=(2, 3)).astype(np.float32) for _ in range(4)]
    got = [r + 10 for r in reference]

    def score(ref, out):  # higher is better
        return -float(np.mean([np.abs(a - b).max() for a, b in zip(ref["y"], out["y"])]))

    judge = TaskJudge({"y": reference}, {"y": reference}, metric=score)
    assert not judge({"y": got})["passed"]
    assert not any(judge.misses_already({"y": got[:m]}) for m in range(1, 4))


def _judged_every_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(task.TaskJudge, "misses_already", lambda self, got: False)


def test_the_fallback_search_stops_a_missing_candidate_and_returns_the_same_model(monkeypatch) -> None:
    """The cancelling pair of ``test_int8_output_ranking`` (``d = a - b``): the search's
    one-layer candidate misses after its first held-out sample and runs no other; the
    model returned (bytes), its float layers and every verdict are those of judging every
    sample, and its outputs meet the target against onnxruntime's float run."""
    monkeypatch.setattr(quantize_int8_pass, "CANCELLATION_RATIO", float("inf"))
    target = Target(min_sqnr_db=20.0, min_argmax_agreement=0.0)
    data = _rows(20)

    def run() -> tuple[bytes, dict]:
        q, stats = quantize_int8(_model(), data, "minmax", min_speedup=1e-9, target=target, metric="sqnr",
                                 max_float_layers=4)
        return optcc.ir.serialize(q).SerializeToString(), stats

    stopping, stopped = run()
    with monkeypatch.context() as patched:
        _judged_every_sample(patched)
        every, judged = run()
    assert stopping == every
    tried = stopped["fallback"]["tried"]
    assert [(t["float_layers"], t["passed"]) for t in tried] == \
        [(t["float_layers"], t["passed"]) for t in judged["fallback"]["tried"]] == [(4, True), (1, False), (2, True)]
    assert tried[1]["stopped_after"] == 1 and "stopped_after" not in judged["fallback"]["tried"][1]
    assert stopped["fallback"]["kept_float"] == judged["fallback"]["kept_float"] == ["mm_a", "mm_b"]
    written = onnx.load_from_string(stopping)
    for feeds in data[-4:]:
        for want, got in zip(onnxruntime_outputs(_model(), feeds), onnxruntime_outputs(written, feeds)):
            noise = float(np.sum((want.astype(np.float64) - got) ** 2))
            assert 10 * math.log10(float(np.sum(want.astype(np.float64) ** 2)) / noise) >= 20.0


def test_through_the_pipeline_the_verifier_runs_a_missing_candidate_on_its_first_samples(tmp_path,
                                                                                        monkeypatch) -> None:
    """Through ``optcc.optimize`` the candidates run on the verifier's samples
    (``Verifier.outputs``) stop the same way: the same model written, the same verdicts,
    and the verification passes it."""
    monkeypatch.setattr(quantize_int8_pass, "CANCELLATION_RATIO", float("inf"))
    path = tmp_path / "cancel.onnx"
    onnx.save(_model(), path)

    def run() -> tuple[bytes, dict, str]:
        result = optcc.optimize(str(path), int8_calibration=_rows(20),
                                int8_options={"min_speedup": 1e-9, "metric": "sqnr", "max_float_layers": 4,
                                              "target": Target(min_sqnr_db=20.0, min_argmax_agreement=0.0)})
        (int8,) = [p for p in result.report.passes if "fallback" in p.stats]
        model = result.model
        return (model if isinstance(model, onnx.ModelProto) else optcc.ir.serialize(model)).SerializeToString(), \
            int8.stats, \
            result.report.verification["status"]

    stopping, stopped, status = run()
    with monkeypatch.context() as patched:
        _judged_every_sample(patched)
        every, judged, _ = run()
    assert stopping == every and status == "passed"
    rows = [(t["float_layers"], t["passed"]) for t in stopped["fallback"]["tried"]]
    assert rows == [(t["float_layers"], t["passed"]) for t in judged["fallback"]["tried"]]
    assert any(t.get("stopped_after", SAMPLES) < stopped["acceptance"]["judged_samples"]
               for t in stopped["fallback"]["tried"]), stopped["fallback"]["tried"]
