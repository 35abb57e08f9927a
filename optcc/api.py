"""``optcc.optimize``: load, run a level's pipeline (or given passes), verify, report."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Union

import numpy as np
import onnx
import onnx_ir as ir

from optcc import ir as oir
from optcc.errors import VerificationError
from optcc.pass_base import Numerics
from optcc.pass_manager import PassManager
from optcc.pipelines import build_pipeline
from optcc.report import ModelSummary, Report, peak_rss_bytes
from optcc.verify import Tolerance, Verifier

__all__ = ["optimize", "OptimizeResult"]

Feeds = Mapping[str, np.ndarray]


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
) -> OptimizeResult:
    """Optimize ``model`` (path, bytes, onnx.ModelProto or onnx_ir.Model).

    ``passes`` (names or pass objects) replaces the level's pipeline. With ``verify``, the
    result is compared with the original on onnxruntime (``inputs``: feed dicts, or
    generated); a mismatch raises VerificationError whose ``result`` holds the model and
    report. The input is never modified: an ``onnx_ir.Model`` is cloned first.
    """
    start = time.perf_counter()
    loaded = oir.load(model)
    working = loaded.clone() if loaded is model else loaded
    original: Any = model if isinstance(model, (str, os.PathLike)) else loaded
    if original is loaded and working is loaded:
        original = loaded.clone()  # the passes modify ``working`` in place
    report = Report(level=None if passes is not None else level)
    report.model_before = ModelSummary.of(working)
    pipeline = build_pipeline(level, passes=passes, disable=disable)

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
        manager = PassManager(pipeline, strict=strict, verifier=verifier if verify_each else None)
        outcome = manager.run(working)
        report.passes = outcome.records
        report.warnings.extend(outcome.warnings)
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

