"""INT8's speed is modelled for onnxruntime's CPU provider: a run that verifies on CUDA
(where QDQ layers run through float kernels) says so in a warning; a CPU-only run does not.
Without a GPU here, CUDA's presence is simulated where optimize reads the provider list."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx.reference import ReferenceEvaluator

import optcc
from optcc import api

EXAMPLE = Path(__file__).resolve().parents[1] / "fixtures" / "tinycnn.onnx"


@pytest.mark.parametrize("cuda", [False, True])
def test_int8_written_for_cuda_says_it_is_modelled_for_cpu(monkeypatch, cuda: bool) -> None:
    chosen = ["CPUExecutionProvider", *(["CUDAExecutionProvider"] if cuda else [])]
    monkeypatch.setattr(api, "resolve_providers", lambda names: list(chosen))
    rng = np.random.default_rng(0)
    calibration = [{"image": rng.standard_normal((1, 3, 32, 32)).astype(np.float32)} for _ in range(16)]
    result = optcc.optimize(str(EXAMPLE), int8_calibration=calibration)
    assert result.precision == {"int8": None}  # applied
    assert (api.CUDA_INT8_WARNING in result.report.warnings) is cuda
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    session = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": x})[0]
    want = ReferenceEvaluator(str(EXAMPLE)).run(None, {"image": x})[0]
    assert np.argmax(got, axis=1).tolist() == np.argmax(want, axis=1).tolist()
