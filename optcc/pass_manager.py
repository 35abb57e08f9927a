"""Runs a pipeline of passes with timing, invariant checks, verification and revert.

For every pass the manager keeps a snapshot (``model.clone()``: graphs are copied, tensors
shared, so it is cheap), runs the pass, and records wall time, node counts by op type and
weight bytes before/after, ``modified`` and the pass's stats. After a pass that modified
the model it checks the structural invariants (``optcc.invariants``) and, given a verifier,
the numerics against the original: after every pass with ``verify_each`` (``--verify-each``),
otherwise after each pass that is not exact (fusions, FP16, INT8), so one inexact rewrite
that misses its tolerance on a model is reverted alone instead of failing the whole run. A pass that raises, breaks an
invariant or breaks numerics is reverted to the snapshot and recorded with its reason;
the run goes on, unless ``strict=True``, which raises instead, naming the passes that ran
before it.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Sequence
from typing import Union

import onnx_ir as ir

from optcc import ir as oir
from optcc.errors import PassFailedError
from optcc.invariants import check_invariants, signature
from optcc.pass_base import Numerics
from optcc.report import PassRecord, op_delta
from optcc.verify import Verifier, loosest

__all__ = ["Fixpoint", "PassManager", "PipelineResult", "pass_name"]

PassLike = ir.passes.PassBase


@dataclasses.dataclass
class Fixpoint:
    """Run ``passes`` in order, repeatedly, until none modifies the model.

    Stops after ``max_iters`` rounds; stopping unconverged is reported as a warning, never
    silently.
    """

    passes: Sequence[PassLike]
    max_iters: int = 8
    name: str = "fixpoint"


PipelineStep = Union[PassLike, Fixpoint]


def pass_name(pass_: PassLike) -> str:
    return getattr(pass_, "name", "") or type(pass_).__name__


@dataclasses.dataclass
class PipelineResult:
    model: ir.Model
    records: list[PassRecord]
    warnings: list[str]
    numerics: Numerics  # the loosest kind among passes whose changes were kept


class PassManager:
    def __init__(
        self,
        pipeline: Sequence[PipelineStep],
        *,
        strict: bool = False,
        verifier: Verifier | None = None,
        verify_each: bool = False,
        check_invariants: bool = True,
    ) -> None:
        self.pipeline = list(pipeline)
        self.strict = strict
        self.verifier = verifier
        self.verify_each = verify_each
        self.check_invariants = check_invariants

    def run(self, model: ir.Model) -> PipelineResult:
        self._signature = signature(model)
        self._records: list[PassRecord] = []
        self._warnings: list[str] = []
        self._kept: list[Numerics] = []
        for step in self.pipeline:
            if isinstance(step, Fixpoint):
                model = self._run_fixpoint(step, model)
            else:
                model, _ = self._run_pass(step, model, iteration=None)
        return PipelineResult(model, self._records, self._warnings, loosest(self._kept))

    def _run_fixpoint(self, fixpoint: Fixpoint, model: ir.Model) -> ir.Model:
        for iteration in range(1, fixpoint.max_iters + 1):
            changed_by = []
            for pass_ in fixpoint.passes:
                model, modified = self._run_pass(pass_, model, iteration=iteration)
                if modified:
                    changed_by.append(pass_name(pass_))
            if not changed_by:
                return model
        message = (
            f"{fixpoint.name} stopped unconverged after {fixpoint.max_iters} iterations "
            f"(last round changed by: {', '.join(changed_by)})"
        )
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        self._warnings.append(message)
        return model

    def _ran_before(self) -> str:
        names = [r.name for r in self._records]
        return ", ".join(names) if names else "none"

    def _run_pass(
        self, pass_: PassLike, model: ir.Model, *, iteration: int | None
    ) -> tuple[ir.Model, bool]:
        name = pass_name(pass_)
        snapshot = model.clone()
        hist_before = oir.op_histogram(model)
        bytes_before = oir.weight_bytes(model)
        start = time.perf_counter()
        status, reason, verification = "unchanged", None, None
        stats: dict = {}
        try:
            result = pass_(model)
        except Exception as error:  # noqa: BLE001 - any failure of a pass is reverted
            if self.strict:
                raise PassFailedError(
                    f"pass '{name}' raised {type(error).__name__}: {error} "
                    f"(passes run before it: {self._ran_before()})"
                ) from error
            result = None
            status, reason = "failed", f"raised {type(error).__name__}: {error}"
        elapsed = time.perf_counter() - start
        if result is not None:
            model = result.model
            stats = dict(getattr(result, "stats", {}) or {})
            if result.modified:
                status = "changed"
                problems = check_invariants(model, self._signature) if self.check_invariants else []
                if problems:
                    status, reason = "reverted", "broke an invariant: " + problems[0]
                elif self.verifier is not None and (
                    self.verify_each or getattr(pass_, "numerics", "exact") != "exact"
                ):
                    numerics = loosest([*self._kept, getattr(pass_, "numerics", "exact")])
                    check = self.verifier.check(model, numerics)
                    verification = {**check.to_dict(), "summary": check.describe()}
                    if check.status == "failed":
                        status, reason = "reverted", "changed the numerics: " + (check.reason or "")
                if status == "reverted" and self.strict:
                    raise PassFailedError(
                        f"pass '{name}' {reason} (passes run before it: {self._ran_before()})"
                    )
        if status in ("failed", "reverted"):
            model = snapshot
        elif status == "changed":
            self._kept.append(getattr(pass_, "numerics", "exact"))
        hist_after = oir.op_histogram(model)
        self._records.append(
            PassRecord(
                name=name,
                iteration=iteration,
                status=status,
                reason=reason,
                time_s=round(elapsed, 6),
                nodes_before=sum(hist_before.values()),
                nodes_after=sum(hist_after.values()),
                op_delta=op_delta(hist_before, hist_after),
                bytes_before=bytes_before,
                bytes_after=oir.weight_bytes(model),
                stats=stats,
                verification=verification,
            )
        )
        return model, status == "changed"
