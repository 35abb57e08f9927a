"""Before an INT8 step, the float passes' result is proved equal to the original instead of
running the user's samples on it: those run on what is written, the INT8 model, or the
float model itself when INT8 declines and the caller takes it (``allow_float_fallback``;
without it the decline is raised, nothing is written, and the proof is its verification).
A float pass the proof cannot vouch for is checked on the samples and reverted before
INT8 starts. Every result is compared with the
original by onnx's reference evaluator (float32 as written), never by optcc's verifier."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx.reference import ReferenceEvaluator

import optcc
from optcc.numerics import Verifier
from tests.test_pass_manager import WrongNumericsPass

TINYCNN = Path(__file__).resolve().parent.parent / "fixtures" / "tinycnn.onnx"


def _images(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"image": (rng.integers(0, 256, (1, 3, 32, 32)) / 255.0).astype(np.float32)} for _ in range(n)]


def _against_original(result: optcc.OptimizeResult, data: list[dict[str, np.ndarray]]) -> tuple[float, float]:
    """(max relative difference, SQNR in dB) of the written model against the original."""
    reference = ReferenceEvaluator(str(TINYCNN))
    session = ort.InferenceSession(optcc.ir.serialize(optcc.ir.load(result.model)).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    ref = np.concatenate([reference.run(None, f)[0] for f in data]).astype(np.float64).ravel()
    got = np.concatenate([session.run(None, f)[0] for f in data]).astype(np.float64).ravel()
    noise = float(np.sum((ref - got) ** 2))
    sqnr = float("inf") if noise == 0 else float(10 * np.log10(float(np.sum(ref**2)) / noise))
    return float(np.abs(ref - got).max() / np.abs(ref).max()), sqnr


def _spy(monkeypatch) -> dict[str, list[str]]:
    """The numerics of each ``Verifier.check`` and ``Verifier.prove`` call, and each proof's status."""
    calls: dict[str, list[str]] = {"check": [], "prove": []}
    check, prove = Verifier.check, Verifier.prove

    def checking(self, model, numerics="exact", *args, **kwargs):
        calls["check"].append(numerics)
        return check(self, model, numerics, *args, **kwargs)

    def proving(self, model, numerics="exact", **kwargs):
        outcome = prove(self, model, numerics, **kwargs)
        calls["prove"].append(f"{numerics}:{'none' if outcome is None else outcome.status}")
        return outcome

    monkeypatch.setattr(Verifier, "check", checking)
    monkeypatch.setattr(Verifier, "prove", proving)
    return calls


def test_the_float_passes_before_int8_are_proved_and_the_samples_run_on_the_int8_model(monkeypatch) -> None:
    data = _images(20)
    calls = _spy(monkeypatch)
    result = optcc.optimize(str(TINYCNN), int8_calibration=data, int8_options={"require_speedup": False})
    assert result.applied_precision == ["int8"]
    assert calls["prove"] == ["fusion:passed"]  # the float passes fused the BatchNorms
    assert calls["check"] == ["int8"]  # the user's samples ran on the INT8 model only
    verification = result.report.verification
    assert verification["status"] == "passed" and verification["samples"] == len(data)
    assert _against_original(result, data)[1] >= 20.0


def test_a_declined_int8_runs_the_samples_on_the_float_model_it_writes(monkeypatch) -> None:
    data = _images(20)
    calls = _spy(monkeypatch)
    result = optcc.optimize(str(TINYCNN), int8_calibration=data, allow_float_fallback=True,
                            int8_options={"min_speedup": 1000.0})
    assert "int8" in result.declined_precision
    assert calls["prove"] == ["fusion:passed"] and calls["check"] == ["fusion"]
    verification = result.report.verification
    assert verification["status"] == "passed" and verification["samples"] == len(data)
    assert verification["reference"] != "proof"
    assert _against_original(result, data)[0] <= 1e-4


def test_a_declined_int8_not_taken_runs_no_sample_on_the_float_model(monkeypatch) -> None:
    data = _images(20)
    calls = _spy(monkeypatch)
    with pytest.raises(optcc.PrecisionNotAppliedError) as raised:
        optcc.optimize(str(TINYCNN), int8_calibration=data, int8_options={"min_speedup": 1000.0})
    result = raised.value.result
    assert "int8" in result.declined_precision
    assert calls["prove"] == ["fusion:passed"] and calls["check"] == []  # no sample ran on the float model
    verification = result.report.verification
    assert verification["status"] == "passed" and verification["reference"] == "proof"
    assert _against_original(result, data)[0] <= 1e-4  # what the proof vouched for


def test_a_float_pass_the_proof_cannot_vouch_for_is_reverted_before_int8() -> None:
    data = _images(20)
    result = optcc.optimize(str(TINYCNN), passes=[WrongNumericsPass(), "fuse-batchnorm"], int8_calibration=data,
                            int8_options={"require_speedup": False})
    statuses = [(r.name, r.status) for r in result.report.passes]
    assert statuses[:2] == [("test-wrong-numerics", "reverted"), ("fuse-batchnorm", "changed")]
    assert result.applied_precision == ["int8"]
    assert _against_original(result, data)[1] >= 20.0
