"""INT8's result is verified on every calibration sample and, when the user gives
``inputs`` (``--inputs``) too, on those after them: not on the user's inputs alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx.reference import ReferenceEvaluator

import optcc

TINYCNN = Path(__file__).resolve().parents[1] / "fixtures" / "tinycnn.onnx"


def _images(rng: np.random.Generator, count: int) -> list[dict[str, np.ndarray]]:
    return [{"image": rng.random((1, 3, 32, 32), dtype=np.float32)} for _ in range(count)]


def test_int8_with_inputs_is_verified_on_the_calibration_samples_and_the_inputs() -> None:
    rng = np.random.default_rng(3)
    calibration, inputs = _images(rng, 12), _images(rng, 3)
    result = optcc.optimize(str(TINYCNN), int8_calibration=calibration, inputs=inputs,
                            int8_options={"require_speedup": False})
    verification = result.report.verification
    assert verification["status"] == "passed"
    assert verification["samples"] == len(calibration) + len(inputs)
    assert any(node.op_type == "QuantizeLinear" for node in result.model.graph.node)
    # what the verification accepted, judged independently: the INT8 model's class on every
    # sample it judged against the float model evaluated by onnx's reference evaluator
    session = ort.InferenceSession(result.model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    reference = ReferenceEvaluator(str(TINYCNN))
    agree = [int(np.argmax(session.run(None, feeds)[0]) == np.argmax(reference.run(None, feeds)[0]))
             for feeds in calibration + inputs]
    assert np.mean(agree) >= 0.9
