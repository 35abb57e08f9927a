"""``optcc.optimize``: load, run a level's pipeline (or given passes), verify, report."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Union

import numpy as np
import onnx
import onnx_ir as ir

from optcc import ir as oir
from optcc.errors import BadInputError, VerificationError
from optcc.infra.pass_base import Numerics
from optcc.infra.manager import PassManager
from optcc.infra.pipelines import build_pipeline
from optcc.infra.registry import create_pass
from optcc.infra.report import ModelSummary, Report, peak_rss_bytes
from optcc.numerics import Tolerance, Verifier

__all__ = ["optimize", "OptimizeResult"]

Feeds = Mapping[str, np.ndarray]
INT8_PASS = "quantize-int8-calibrated"


@dataclasses.dataclass
class OptimizeResult:
    """The optimized model, the report, and the onnx-ir model behind both."""

    ir_model: ir.Model
    report: Report
    given_as_ir: bool = False

    @property
    def model(self) -> Union[onnx.ModelProto, ir.Model]:
        """The optimized model in the form it was given (a path or bytes give a ModelProto)."""
        return self.ir_model if self.given_as_ir else oir.serialize(self.ir_model)

    def save(self, path: str | os.PathLike, *, external_data: bool | None = None) -> None:
        """Write the optimized model atomically (external data when needed)."""
        oir.save(self.ir_model, path, external_data=external_data)


def optimize(
    model: oir.ModelSource,
    passes: Sequence[Union[str, ir.passes.PassBase]] | None = None,
    level: int = 2,
    verify: bool = True,
    inputs: Iterable[Feeds] | Feeds | None = None,
    *,
    disable: Iterable[str] = (),
    verify_each: bool = False,
    providers: Sequence[str] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    tolerances: Mapping[Numerics, Tolerance] | None = None,
    strict: bool = False,
    progress: bool = False,
    fp16: bool = False,
    fp16_block: Iterable[str] = (),
    fp16_keep_io: bool | Sequence[str] = True,
    int8_calibration: Iterable[Feeds] | None = None,
    int8_method: str = "minmax",
    int8_dynamic: bool = False,
    int8_options: Mapping[str, Any] | None = None,
    fold_large: bool = False,
) -> OptimizeResult:
    """Optimize ``model`` (path, bytes, onnx.ModelProto or onnx_ir.Model).

    ``passes`` (names or pass objects) replaces the level's pipeline. With ``verify``, the
    result is compared with the original on onnxruntime (``inputs``: feed dicts, or
    generated); a mismatch raises VerificationError whose ``result`` holds the model and
    report. The input is never modified: an ``onnx_ir.Model`` is cloned first.
    ``fold_large`` lets constant folding materialize tensors that grow the model by more
    than 1 MiB.

    After the level's pipeline: ``fp16`` converts to float16 (``fp16_keep_io``: True keeps
    float32 graph inputs/outputs, False makes them float16, a list keeps those names
    float32; ``int8_calibration``, when
    given, serves as range data); ``int8_calibration`` (feed dicts) quantizes to INT8 with
    ``int8_method`` calibration, verified on the held-out last 20% of the samples;
    ``int8_options`` are passed to ``optcc.quant.driver.quantize_int8`` (e.g.
    ``{"require_speedup": False}``, ``{"target": Target(min_sqnr_db=30)}``); when INT8 is
    declined (not faster, or misses the target) the report says why in a warning.
    ``int8_dynamic`` quantizes MatMuls dynamically. These change what is computed, so the
    final verification uses the FP16/INT8 tolerances.
    """
    samples = None if int8_calibration is None else [dict(f) for f in int8_calibration]
    start = time.perf_counter()
    loaded = oir.load(model)
    working = loaded.clone() if loaded is model else loaded
    original: Any = model if isinstance(model, (str, os.PathLike)) else loaded
    if original is loaded and working is loaded:
        original = loaded.clone()  # the passes modify ``working`` in place
    report = Report(level=None if passes is not None else level)
    report.model_before = ModelSummary.of(working)
    quantizing = samples is not None and not fp16
    if fp16 or quantizing or int8_dynamic:
        disable = [*disable, "fuse-ort-conv-activation"]  # quantizers/fp16 skip contrib ops
    options = {"fold-constants": {"fold_large": True}} if fold_large else None
    pipeline = build_pipeline(level, passes=passes, disable=disable, options=options)
    if fp16:
        pipeline.append(create_pass("convert-float16", keep_io_types=fp16_keep_io, block=fp16_block,
                                    inputs=samples or inputs, input_shapes=input_shapes,
                                    providers=providers))
    elif quantizing:
        if not samples:
            raise BadInputError("INT8 calibration data holds no samples")
        pipeline.append(create_pass(INT8_PASS, samples=samples, method=int8_method, progress=progress,
                                    **dict(int8_options or {})))
        if inputs is None:
            inputs = samples[-max(1, len(samples) // 5):]  # the held-out part
    if int8_dynamic:
        pipeline.append(create_pass("quantize-dynamic"))

    verifier = None
    if verify or verify_each:
        verifier = Verifier(
            original,
            inputs=inputs,
            providers=providers,
            input_shapes=input_shapes,
            tolerances=tolerances,
            progress=progress,
        )
    try:
        manager = PassManager(pipeline, strict=strict, verifier=verifier, verify_each=verify_each)
        outcome = manager.run(working, fresh=_fresh_copies(model, original))
        report.passes = outcome.records
        report.warnings.extend(outcome.warnings)
        report.warnings.extend(
            f"INT8 not applied: {r.stats['reason']}" for r in outcome.records
            if r.name == INT8_PASS and r.status == "unchanged" and r.stats.get("reason")
        )
        if verify and verifier is not None:
            check = verifier.check(outcome.model, outcome.numerics)
            report.verification = {**check.to_dict(), "summary": check.describe()}
            if check.status == "skipped":
                report.warnings.append(f"numerics not verified: {check.reason}")
    finally:
        if verifier is not None:
            verifier.close()
    report.model_after = ModelSummary.of(outcome.model)
    report.total_time_s = round(time.perf_counter() - start, 6)
    report.peak_rss_bytes = peak_rss_bytes()
    result = OptimizeResult(outcome.model, report, given_as_ir=isinstance(model, ir.Model))
    if report.verification is not None and report.verification["status"] == "failed":
        error = VerificationError(f"verification failed: {report.verification['summary']}")
        error.result = result  # type: ignore[attr-defined]
        raise error
    return result


def _fresh_copies(given: oir.ModelSource, original: Any) -> Callable[[], ir.Model]:
    """New copies of the model as given, for the pass manager's reverts: reloaded from a
    path, else cloned from the untouched original."""
    if isinstance(original, ir.Model):
        return original.clone
    return lambda: oir.load(given)
