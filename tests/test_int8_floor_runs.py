"""The noise floor the INT8 pass shares with the verifier runs the perturbed original only on
the samples a judge holds: a declined INT8 model perturbs the held-out samples alone, a
shipped one every sample once (its confirmation and the final verification judge them
all). Each sample is perturbed as among all the samples (seeded by its position), so the
floor is the one of every sample's judge restricted to the held-out ones; the floor here
is recomputed from onnxruntime's float32 runs of the fixture."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import optcc
from optcc.errors import PrecisionNotAppliedError
from optcc.numerics.task import perturb
from optcc.numerics.verify import Verifier
from optcc.quant.fallback import Target

TINYCNN = Path(__file__).resolve().parent.parent / "fixtures" / "tinycnn.onnx"
CPU = "CPUExecutionProvider"


def _images(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"image": (rng.integers(0, 256, (1, 3, 32, 32)) / 255.0).astype(np.float32)} for _ in range(n)]


def _count_perturbed_runs(monkeypatch: pytest.MonkeyPatch, data: list[dict[str, np.ndarray]]) -> collections.Counter:
    """Runs of any session fed an image that is none of ``data``'s (a perturbed sample), by
    the sample it perturbs (the nearest, by largest difference)."""
    given = {f["image"].tobytes() for f in data}
    runs: collections.Counter = collections.Counter()
    run = ort.InferenceSession.run

    def counting(self, names, feeds, options=None):
        image = feeds.get("image") if isinstance(feeds, dict) else None
        if image is not None and image.tobytes() not in given:
            nearest = min(range(len(data)), key=lambda i: float(np.abs(data[i]["image"] - image).max()))
            runs[nearest] += 1
        return run(self, names, feeds, options)

    monkeypatch.setattr(ort.InferenceSession, "run", counting)
    return runs


def test_a_declined_int8_model_perturbs_only_the_held_out_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _images(20, seed=2)
    runs = _count_perturbed_runs(monkeypatch, data)
    with pytest.raises(PrecisionNotAppliedError) as caught:  # no 8-bit model is within float32's noise
        optcc.optimize(str(TINYCNN), int8_calibration=data,
                       int8_options={"require_speedup": False, "metric": "sqnr", "target": Target(min_sqnr_db=80.0)})
    monkeypatch.undo()
    (int8,) = [p for p in caught.value.result.report.to_dict()["passes"] if "acceptance" in p.get("stats", {})]
    acceptance = int8["stats"]["acceptance"]
    assert int8["stats"]["declined"] == "accuracy" and acceptance["floor_draws"] == 1
    held = list(range(len(data) - acceptance["held_out_samples"], len(data)))
    assert held and dict(runs) == dict.fromkeys(held, 1)
    # the floor: float32 as written (no graph optimization, no pre-packing: the verifier's runs)
    # against itself on the held-out samples, each perturbed with its position's seed
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.add_session_config_entry("session.disable_prepacking", "1")
    session = ort.InferenceSession(str(TINYCNN), options, providers=[CPU])
    ref = np.concatenate([session.run(None, data[i])[0].ravel() for i in held]).astype(np.float64)
    moved = np.concatenate([session.run(None, perturb(data[i], seed=i)[0])[0].ravel() for i in held]).astype(np.float64)
    expected = float(np.sum((ref - moved) ** 2) / np.sum(ref**2))
    assert acceptance["floor"]["logits"]["sqnr"] == pytest.approx(expected, rel=1e-9)


def test_a_shipped_int8_model_perturbs_every_sample_once(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _images(20, seed=2)
    runs = _count_perturbed_runs(monkeypatch, data)
    result = optcc.optimize(str(TINYCNN), int8_calibration=data, int8_options={"require_speedup": False})
    monkeypatch.undo()
    (int8,) = [p for p in result.report.passes if "acceptance" in p.stats]
    assert int8.status == "changed" and int8.stats["fallback"]["confirmation"]["samples"] == len(data)
    assert result.report.verification["status"] == "passed"
    draws = int8.stats["acceptance"]["floor_draws"]
    assert draws > 1 and dict(runs) == dict.fromkeys(range(len(data)), draws)


def test_the_judge_of_some_samples_is_the_judge_of_all_of_them_selected() -> None:
    """With groups and several draws (argmax excuses float32's own errors), a judge made for
    the last samples alone has the rows, floor and verdicts of every sample's judge
    restricted to them, however its group's rows would be chosen from its own samples."""
    data = _images(12, seed=5)
    groups = ["dark" if i % 3 else "light" for i in range(len(data))]
    positions = list(range(7, 12))
    options = dict(inputs=data, task_groups=groups, task_metric="auto")
    with Verifier(str(TINYCNN), **options) as some, Verifier(str(TINYCNN), **options) as every:
        part = some.task_judge(CPU, positions)
        whole = every.task_judge(CPU).select(positions)
    assert part.draw_count == whole.draw_count > 1
    assert part.plan == whole.plan and part.perturbation == whole.perturbation
    assert part.floor == whole.floor and part.floor_items == whole.floor_items
    session = ort.InferenceSession(str(TINYCNN), providers=[CPU])
    rng = np.random.default_rng(0)
    got = {"logits": [session.run(None, data[i])[0] + rng.normal(0, 0.3, (1, 10)).astype(np.float32)
                      for i in positions]}
    assert part(got) == whole(got)


def test_the_pass_measures_its_floor_over_every_draw_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """``quantize_int8`` called alone measures its own floor: with a metric that takes several
    draws (argmax), once, over all of them; the floor is that of float32's outputs on the
    draws as onnxruntime computes them here."""
    from optcc.numerics.task import TaskJudge, perturbation_draws
    from optcc.quant.driver import _task_judge

    data = _images(10, seed=7)
    floors = []
    measure = TaskJudge._floor

    def counted(self):
        floors.append(len(self._envelope))
        return measure(self)

    monkeypatch.setattr(TaskJudge, "_floor", counted)
    judge = _task_judge(optcc.ir.load(str(TINYCNN)), data, "auto", 1.5, None, 25.0, draws=4)
    assert floors == [] and judge.draw_count == 4  # measured when a judgement first needs it
    assert judge.floor == judge.floor
    monkeypatch.undo()
    assert floors == [4] and judge.floor_measured
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.add_session_config_entry("session.disable_prepacking", "1")
    session = ort.InferenceSession(str(TINYCNN), options, providers=[CPU])
    reference = {"logits": [session.run(None, f)[0] for f in data]}
    draws = [{"logits": [session.run(None, f)[0] for f in moved]}
             for moved in perturbation_draws(data, 4)[0]]
    expected = TaskJudge(reference, draws[0], "auto", 1.5, None, 25.0, draws=draws[1:])
    assert judge.plan == expected.plan == {"logits": "argmax"} and judge.floor == expected.floor
