"""The INT8 fallback's result is confirmed on the wider judgement the final verification
applies (every sample, the calibration ones included) before it is accepted: a model
that passes on the held-out samples alone and misses on the rest returns more layers to
float, or INT8 declines with that reason, instead of being reverted whole by the
verifier. The SQNRs are the tests' own: float32 by onnx's reference evaluator, the INT8
model by onnxruntime with its integer kernels."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx.reference import ReferenceEvaluator

import optcc
from optcc.errors import PrecisionNotAppliedError
from optcc.infra.registry import create_pass
from optcc.quant.calibration import calibrate
from optcc.quant.fallback import Confirmation, Target, fallback, model_outputs

TINYCNN = Path(__file__).resolve().parent.parent / "fixtures" / "tinycnn.onnx"
TARGET_DB = 20.0


def _images(n: int, brightness: float, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"image": (rng.integers(0, 256, (1, 3, 32, 32)) / 255.0 * brightness).astype(np.float32)}
            for _ in range(n)]


def _sqnr_db(model: optcc.ir.Model, data: list[dict[str, np.ndarray]]) -> float:
    reference = ReferenceEvaluator(str(TINYCNN))
    session = ort.InferenceSession(optcc.ir.serialize(model).SerializeToString(), providers=["CPUExecutionProvider"])
    ref = np.concatenate([reference.run(None, f)[0] for f in data]).astype(np.float64).ravel()
    got = np.concatenate([session.run(None, f)[0] for f in data]).astype(np.float64).ravel()
    noise = float(np.sum((ref - got) ** 2))
    return float("inf") if noise == 0 else float(10 * np.log10(float(np.sum(ref**2)) / noise))


def _quantizer(calibration: list[dict[str, np.ndarray]]):
    """The float model (BatchNorms folded) and the fallback's ``quantize`` over ranges
    calibrated on ``calibration``."""
    reference = optcc.ir.load(TINYCNN)
    create_pass("fuse-batchnorm")(reference)
    ranges = calibrate(reference, calibration, "minmax").ranges

    def quantize(exclude=(), only=None):
        result = create_pass("quantize-int8", ranges=ranges, exclude=list(exclude), only=only,
                             count_fused=False)(reference.clone())
        return result.model, dict(result.stats)

    return reference, quantize


def test_a_result_the_wider_judgement_rejects_returns_more_layers_to_float() -> None:
    dim = _images(8, 0.25, seed=0)
    bright = _images(4, 1.0, seed=1)  # beyond every range calibrated on the dim images
    held, every = dim[4:], dim[4:] + bright
    reference, quantize = _quantizer(dim[:4])
    target = Target(min_sqnr_db=TARGET_DB)
    alone, _, report = fallback(reference, quantize, held, target)
    assert report["target_met"] and not report["kept_float"]
    assert _sqnr_db(alone, held) >= TARGET_DB
    assert _sqnr_db(alone, every) < TARGET_DB  # what the held-out judgement alone lets through

    confirm = Confirmation(every, target, model_outputs(reference, every))
    confirmed, _, report = fallback(reference, quantize, held, target, confirm=confirm)
    assert report["target_met"] and report["kept_float"]
    assert _sqnr_db(confirmed, every) >= TARGET_DB
    assert report["confirmation"] == {"samples": len(every), "float_layers_found": 0, "passed": False,
                                      "float_layers": len(report["kept_float"])}
    assert all(row["order"] == "confirmation" for row in report["tried"])


def test_a_result_the_wider_judgement_accepts_is_kept_as_found() -> None:
    data = _images(12, 1.0, seed=2)
    reference, quantize = _quantizer(data[:8])
    target = Target(min_sqnr_db=TARGET_DB)
    confirm = Confirmation(data, target, model_outputs(reference, data))
    model, _, report = fallback(reference, quantize, data[8:], target, confirm=confirm)
    assert report["confirmation"] == {"samples": 12, "float_layers_found": 0, "passed": True}
    assert not report["kept_float"] and _sqnr_db(model, data) >= TARGET_DB


def test_the_pipeline_declines_int8_the_verification_would_reject() -> None:
    """A bright patch in one calibration image is clipped by 99th-percentile ranges: the
    held-out images pass, the verification's judgement of every image does not, and no
    budget of float layers mends the clipped input, so INT8 declines, saying where it
    missed, instead of being reverted by the final verification."""
    rng = np.random.default_rng(0)
    data = [{"image": (rng.integers(0, 256, (1, 3, 32, 32)) / 255.0).astype(np.float32)} for _ in range(24)]
    data[0]["image"][:, :, 8:16, 8:16] = 8.0
    with pytest.raises(PrecisionNotAppliedError) as caught:
        optcc.optimize(str(TINYCNN), int8_calibration=data, int8_method="percentile",
                       int8_options={"require_speedup": False, "metric": "sqnr", "percentile": 99.0})
    report = caught.value.result.report.to_dict()
    (int8,) = [p for p in report["passes"] if "fallback" in p.get("stats", {})]
    assert int8["status"] == "unchanged"  # declined by the pass, not reverted by the verifier
    assert "as the verification judges them" in int8["stats"]["reason"]
    confirmation = int8["stats"]["fallback"]["confirmation"]
    assert confirmation["samples"] == 24 and not confirmation["passed"]
    # the test's own measure of the INT8 model the held-out samples alone accept
    reference = optcc.ir.load(TINYCNN)
    create_pass("fuse-batchnorm")(reference)
    ranges = calibrate(reference, data[:19], "percentile", percentile=99.0).ranges
    quantized = create_pass("quantize-int8", ranges=ranges)(reference.clone()).model
    assert _sqnr_db(quantized, data[19:]) > _sqnr_db(quantized, data) + 10.0


def test_the_verification_reuses_the_runs_of_the_model_the_confirmation_judged(monkeypatch) -> None:
    """The INT8 model the pass confirms on every sample is the model the verification then
    judges on the same samples: the verification runs it no more, and the confirmation
    does not run it again on the held-out samples the bias correction's judgement ran it
    on. The INT8 candidate is the only model run with all of onnxruntime's optimizations
    (float models run as written): every sample runs through it once."""
    data = _images(20, 1.0, seed=2)
    runs: collections.Counter[bytes] = collections.Counter()
    run = ort.InferenceSession.run

    def counting(self, names, feeds, options=None):
        if self.get_session_options().graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL:
            runs[feeds["image"].tobytes()] += 1
        return run(self, names, feeds, options)

    monkeypatch.setattr(ort.InferenceSession, "run", counting)
    result = optcc.optimize(str(TINYCNN), int8_calibration=data, int8_options={"require_speedup": False})
    monkeypatch.undo()
    (int8,) = [p for p in result.report.passes if "fallback" in p.stats]
    assert int8.status == "changed" and int8.stats["bias_correction"]["kept"]
    assert int8.stats["fallback"]["confirmation"] == {"samples": 20, "float_layers_found": 0, "passed": True}
    assert result.report.verification["status"] == "passed"
    held = int8.stats["acceptance"]["held_out_samples"]
    assert held and [runs[f["image"].tobytes()] for f in data] == [1] * len(data)
    assert _sqnr_db(optcc.ir.load(result.model), data) >= TARGET_DB  # the test's own measure of what was judged


def test_a_budget_the_wider_judgement_rejects_ends_the_search(monkeypatch) -> None:
    """The budget's model (its float layers the most a candidate may have) meets the target
    on the held-out images and misses on the bright ones beyond every calibrated range: it
    is judged by the wider judgement before any output ranking or candidate below it, and
    the fallback stops there, hopeless, having built two models (the fully quantized one
    and the budget's)."""
    import optcc.quant.fallback as fb

    dim = _images(8, 0.25, seed=0)
    bright = _images(4, 1.0, seed=1)
    held, every = dim[4:], dim[4:] + bright
    reference, build = _quantizer(dim[:4])
    built: list[list[str]] = []

    def quantize(exclude=(), only=None):
        built.append(list(exclude))
        return build(exclude=exclude, only=only)

    ranked: list[int] = []
    output_sqnr = fb.output_sqnr
    monkeypatch.setattr(fb, "output_sqnr", lambda *a, **k: ranked.append(1) or output_sqnr(*a, **k))
    layers = build()[1]["layers"]
    budget = len(layers) - 1
    target = Target(min_sqnr_db=38.0)
    assert _sqnr_db(build()[0], held) < target.min_sqnr_db  # the fully quantized model misses
    confirm = Confirmation(every, target, model_outputs(reference, every))
    model, _, report = fallback(reference, quantize, held, target, max_float_layers=budget, confirm=confirm)
    assert not report["target_met"] and "(the budget) do not meet it on all 8 samples" in report["hopeless"]
    assert report["confirmation"] == {"samples": 8, "float_layers_found": budget, "passed": False,
                                      "float_layers": budget}
    assert [row["float_layers"] for row in report["tried"]] == [budget] and not ranked
    assert [len(exclude) for exclude in built] == [0, budget]
    # the test's own measure of the budget's model: it meets the target held out, and misses on every image
    assert _sqnr_db(model, held) >= target.min_sqnr_db > _sqnr_db(model, every)
    # as does every model with fewer layers float (graph order), which the search would have tried
    assert all(_sqnr_db(build(exclude=layers[:k])[0], every) < target.min_sqnr_db for k in range(budget + 1))


def _ort_sqnr_db(model: optcc.ir.Model, data: list[dict[str, np.ndarray]]) -> float:
    """SQNR of ``model`` against onnxruntime's run of the original file, over ``data``."""
    original = ort.InferenceSession(str(TINYCNN), providers=["CPUExecutionProvider"])
    session = ort.InferenceSession(optcc.ir.serialize(model).SerializeToString(), providers=["CPUExecutionProvider"])
    ref = np.concatenate([original.run(None, f)[0] for f in data]).astype(np.float64).ravel()
    got = np.concatenate([session.run(None, f)[0] for f in data]).astype(np.float64).ravel()
    noise = float(np.sum((ref - got) ** 2))
    return float("inf") if noise == 0 else float(10 * np.log10(float(np.sum(ref**2)) / noise))


def test_a_confirmation_candidate_below_one_that_passed_stops_once_its_samples_decide(monkeypatch) -> None:
    """In the confirmation's bisection a model with more float layers is known to pass, so
    a candidate that misses is never the result: its runs stop at the first bright image
    that decides the miss (SQNR adds up over samples, and the ones not run count as
    perfect). The search then returns the same layers and the same bytes as when every
    candidate runs on every image."""
    from optcc.numerics.task import TaskJudge
    from optcc.quant.driver import _task_judge

    dim = _images(8, 0.25, seed=0)
    bright = _images(4, 1.0, seed=1)
    held, every = dim[4:], dim[4:] + bright
    reference, quantize = _quantizer(dim[:4])

    def search() -> tuple[bytes, dict]:
        judge_held = _task_judge(reference, held, "sqnr", 1.5, None, TARGET_DB)
        judge_every = _task_judge(reference, every, "sqnr", 1.5, None, TARGET_DB)
        confirm = Confirmation(every, Target(min_sqnr_db=TARGET_DB, judge=judge_every), judge_every.reference)
        model, _, report = fallback(reference, quantize, held, Target(min_sqnr_db=TARGET_DB, judge=judge_held),
                                    reference_outputs=judge_held.reference, confirm=confirm)
        return optcc.ir.serialize(model).SerializeToString(), report

    stopped_bytes, stopped = search()
    monkeypatch.setattr(TaskJudge, "misses_already", lambda self, got: False)
    full_bytes, full = search()
    monkeypatch.undo()

    rows = [row for row in stopped["tried"] if row.get("stopped_after")]
    assert rows and all(row["order"] == "confirmation" and not row["passed"] for row in rows)
    assert all(row["stopped_after"] == len(held) + 1 for row in rows)  # the first bright image decides
    assert not any("stopped_after" in row for row in full["tried"])
    assert stopped_bytes == full_bytes
    assert stopped["kept_float"] == full["kept_float"] and stopped["confirmation"] == full["confirmation"]
    assert [(r["float_layers"], r["passed"]) for r in stopped["tried"]] == \
        [(r["float_layers"], r["passed"]) for r in full["tried"]]
    # the test's own measure of the model returned: the target on every image, against onnxruntime on the original
    assert stopped["target_met"] and _ort_sqnr_db(optcc.ir.load(stopped_bytes), every) >= TARGET_DB
