"""The fallback search keeps only the candidates it can still return: every candidate
holds its own INT8 weights, so one kept per attempt grows the process by a quantized
model per attempt (BERT-base: ~85 MB each). The returned model is checked against
onnx's reference evaluator."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx.reference import ReferenceEvaluator

import optcc
from optcc.infra.registry import create_pass
from optcc.quant.calibration import calibrate
from optcc.quant.fallback import Target, fallback

TINYCNN = Path(__file__).resolve().parent.parent / "fixtures" / "tinycnn.onnx"


def _images(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"image": (rng.integers(0, 256, (1, 3, 32, 32)) / 255.0).astype(np.float32)} for _ in range(n)]


def _sqnr_db(model: "optcc.ir.Model", data: list[dict[str, np.ndarray]]) -> float:
    """The model's output SQNR against float32 by onnx's reference evaluator (onnxruntime
    runs the model, as a user would)."""
    reference = ReferenceEvaluator(str(TINYCNN))
    session = ort.InferenceSession(optcc.ir.serialize(model).SerializeToString(), providers=["CPUExecutionProvider"])
    ref = np.concatenate([reference.run(None, f)[0] for f in data]).astype(np.float64).ravel()
    got = np.concatenate([session.run(None, f)[0] for f in data]).astype(np.float64).ravel()
    noise = float(np.sum((ref - got) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(float(np.sum(ref**2)) / noise)


def test_the_search_drops_the_candidates_it_cannot_return() -> None:
    data = _images(8)
    reference = optcc.ir.load(TINYCNN)
    create_pass("fuse-batchnorm")(reference)
    ranges = calibrate(reference, data, "minmax").ranges
    candidates: list[weakref.ref] = []
    alive_at_call: list[int] = []

    def quantize(exclude=(), only=None):
        gc.collect()
        alive_at_call.append(sum(ref() is not None for ref in candidates))
        model = reference.clone()
        result = create_pass("quantize-int8", ranges=ranges, exclude=list(exclude), only=only,
                             count_fused=False)(model)
        candidates.append(weakref.ref(result.model))
        return result.model, dict(result.stats)

    full, _ = quantize()
    full_sqnr = _sqnr_db(full, data)
    del full
    # between fully quantized and float: some layers must return to float
    target = Target(min_sqnr_db=full_sqnr + 6.0, min_argmax_agreement=0.0)
    model, _, report = fallback(reference, quantize, data, target, ranking="estimate")

    assert len(report["tried"]) >= 3, report["tried"]  # the budget, then doubling and bisection
    assert report["target_met"] and report["kept_float"]
    # at each new attempt: at most the fully quantized model and the best one so far
    assert max(alive_at_call) <= 2, alive_at_call
    assert _sqnr_db(model, data) >= target.min_sqnr_db
