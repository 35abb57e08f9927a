"""A judge whose every row is SQNR reads no noise floor for a candidate that meets the SQNR
target (no floor can fail it), and still measures it, and refuses, for one that misses.
The SQNR and floor each verdict should have are recomputed here in float64 from numpy
arrays and from onnx's reference evaluator, not taken from optcc."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper as nh
import onnxruntime as ort
import pytest
from onnx.reference import ReferenceEvaluator

import optcc
from optcc.numerics.task import DeferredOutputs, TaskJudge
from optcc.numerics.verify import Verifier
from tests.test_int8_floor_runs import _count_perturbed_runs, _images

TINYCNN = Path(__file__).resolve().parent.parent / "fixtures" / "tinycnn.onnx"


def _sqnr_db(refs: list[np.ndarray], gots: list[np.ndarray]) -> float:
    ref = np.concatenate([r.ravel() for r in refs]).astype(np.float64)
    got = np.concatenate([g.ravel() for g in gots]).astype(np.float64)
    return float(10 * np.log10(np.sum(ref**2) / np.sum((ref - got) ** 2)))


def _noisy(refs: list[np.ndarray], db: float, rng: np.random.Generator) -> list[np.ndarray]:
    """``refs`` with sign noise at ``db`` below each array's RMS."""
    return [(r + 10 ** (-db / 20) * np.sqrt(np.mean(r.astype(np.float64) ** 2)) * rng.choice([-1, 1], r.shape))
            .astype(np.float32) for r in refs]


def test_the_floor_is_read_only_by_a_candidate_that_misses_the_sqnr_target() -> None:
    rng = np.random.default_rng(0)
    reference = {"y": [rng.standard_normal((1, 16)).astype(np.float32) for _ in range(6)]}
    moved = [v * np.float32(1 + 1e-3) for v in reference["y"]]
    runs = []

    def perturbed() -> dict[str, list[np.ndarray]]:
        runs.append(1)
        return {"y": moved}

    judge = TaskJudge(reference, DeferredOutputs(perturbed), metric="sqnr", min_sqnr_db=25.0)
    assert judge.thin() == [] and judge.undecided() == [] and runs == []  # SQNR counts no items

    close = _noisy(reference["y"], 40.0, rng)
    verdict = judge({"y": close})
    row = verdict["metrics"]["y:sqnr"]
    assert verdict["passed"] and runs == [] and not judge.floor_measured
    assert row["floor"] is None and "not measured" in row["why"]
    assert row["sqnr_db"] == pytest.approx(_sqnr_db(reference["y"], close), abs=1e-3) and row["sqnr_db"] > 25

    wrong = _noisy(reference["y"], 15.0, rng)
    assert _sqnr_db(reference["y"], wrong) < 25
    verdict = judge({"y": wrong})
    row = verdict["metrics"]["y:sqnr"]
    expected_floor = 10 ** (-_sqnr_db(reference["y"], moved) / 10)  # the perturbed copy's noise ratio
    assert verdict["passed"] is False and runs == [1] and judge.floor_measured
    assert row["floor"] == pytest.approx(expected_floor, rel=1e-3) and row["passed"] is False

    # once measured, every later judgement shows the floor next to the deviation
    row = judge({"y": close})["metrics"]["y:sqnr"]
    assert runs == [1] and row["floor"] == pytest.approx(expected_floor, rel=1e-3) and row["passed"]


def _scaled_weight(factor: float) -> onnx.ModelProto:
    """TINYCNN with its first Conv's weight scaled: the function of another model."""
    model = onnx.load(str(TINYCNN))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    weight = next(t for t in model.graph.initializer if t.name == conv.input[1])
    weight.CopyFrom(nh.from_array((nh.to_array(weight) * np.float32(factor)).astype(np.float32), weight.name))
    return model


def test_the_verifier_measures_no_floor_for_an_int8_model_within_the_sqnr_target(
        monkeypatch: pytest.MonkeyPatch) -> None:
    data = _images(12, seed=3)
    runs = _count_perturbed_runs(monkeypatch, data)
    result = optcc.optimize(str(TINYCNN), int8_calibration=data,
                            int8_options={"require_speedup": False, "metric": "sqnr"})
    monkeypatch.undo()
    (int8,) = [p for p in result.report.passes if "acceptance" in p.stats]
    acceptance = int8.stats["acceptance"]
    evaluator = ReferenceEvaluator(str(TINYCNN))
    shipped = ort.InferenceSession(result.model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    refs = [evaluator.run(None, f)[0] for f in data]
    gots = [shipped.run(None, f)[0] for f in data]
    assert int8.status == "changed" and _sqnr_db(refs, gots) > 25.0
    assert sum(runs.values()) == 0 and acceptance["floor"] is None
    assert "no floor can fail" in acceptance["floor_not_measured"]
    verification = result.report.verification
    assert verification["status"] == "passed" and "the floor is not measured" in verification["reference"]
    assert verification["task"]["metrics"]["logits:sqnr"]["floor"] is None


def test_a_candidate_below_the_sqnr_target_is_refused_against_the_measured_floor(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    data = _images(12, seed=3)
    wrong = _scaled_weight(0.7)
    onnx.save(wrong, tmp_path / "wrong.onnx")
    evaluator, other = ReferenceEvaluator(str(TINYCNN)), ReferenceEvaluator(wrong)
    assert _sqnr_db([evaluator.run(None, f)[0] for f in data], [other.run(None, f)[0] for f in data]) < 25.0
    runs = _count_perturbed_runs(monkeypatch, data)
    with Verifier(str(TINYCNN), inputs=data, task_metric="sqnr") as verifier:
        verification = verifier.check(optcc.ir.load(str(tmp_path / "wrong.onnx")), "int8")
    monkeypatch.undo()
    row = verification.task["metrics"]["logits:sqnr"]
    assert verification.status == "failed" and row["passed"] is False
    assert sum(runs.values()) == len(data) and isinstance(row["floor"], float) and row["deviation"] > row["allowed"]
