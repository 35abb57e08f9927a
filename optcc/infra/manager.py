"""Runs a pipeline of passes with timing, invariant checks, verification and revert.

For every pass the manager records wall time, node counts by op type and weight bytes
before/after, ``modified`` and the pass's stats. After a pass that modified the model it
checks the structural invariants (``optcc.infra.invariants``: order, names, interface) and, given
a verifier, the numerics against the original: after every pass with ``verify_each``
(``--verify-each``), otherwise after each pass that is not exact (fusions, FP16, INT8), so
one inexact rewrite that misses its tolerance on a model is reverted alone instead of
failing the whole run. onnx's checker runs on the final result (and after verified
passes); if it objects, the pipeline reruns with the checker after every pass.

A pass that raises, breaks an invariant or breaks numerics is reverted and recorded with
its reason; the run goes on, unless ``strict=True``, which raises instead, naming the
passes that ran before it. Reverting does not need a copy per pass (copying cost more
than the passes themselves): the manager keeps a checkpoint, a way to get a fresh copy of
the model at some point, plus the passes run since, and replays those on the copy.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Union

import onnx_ir as ir

from optcc import ir as oir
from optcc.errors import PassFailedError
from optcc.infra.invariants import check_invariants, checker_problems, signature
from optcc.infra.pass_base import Numerics
from optcc.infra.report import PassRecord, op_delta
from optcc.numerics import Verifier, loosest

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

    def run(self, model: ir.Model, *, fresh: Callable[[], ir.Model] | None = None) -> PipelineResult:
        """Run the pipeline on ``model`` (modified in place). ``fresh`` returns a new copy of
        the model as given, for reverts (default: a copy taken now).

        onnx's checker (it needs a serialized copy, the costliest invariant) runs once on
        the result instead of after every pass; should it object, the pipeline is run again
        from a fresh copy with the checker after every pass, so the pass responsible is
        reverted like any other. Passes that are verified are checked right away."""
        if fresh is None:
            fresh = model.clone().clone
        outcome = self._run_steps(model, fresh, check_each=False)
        if self.check_invariants:
            problems = checker_problems(outcome.model)
            if problems:
                first_run = self._records
                outcome = self._run_steps(fresh(), fresh, check_each=True)
                message = (f"onnx checker rejected the pipeline's result ({problems[0]}); "
                           f"ran it again checking after every pass ({len(first_run)} pass runs discarded)")
                warnings.warn(message, RuntimeWarning, stacklevel=2)
                outcome.warnings.insert(0, message)
        return outcome

    def _run_steps(self, model: ir.Model, fresh: Callable[[], ir.Model], *, check_each: bool) -> PipelineResult:
        self._signature = signature(model)
        self._records: list[PassRecord] = []
        self._warnings: list[str] = []
        self._kept: list[Numerics] = []
        self._check_each = check_each
        self._summary = (oir.op_histogram(model), oir.weight_bytes(model))
        self._checkpoint = fresh
        self._since_checkpoint: list[PassLike] = []
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

    def _verifies(self, pass_: PassLike) -> bool:
        return self.verifier is not None and (
            self.verify_each or getattr(pass_, "numerics", "exact") != "exact"
        )

    def _invariant_problems(self, model: ir.Model, *, checker: bool, float16_io: bool = False) -> list[str]:
        if not self.check_invariants:
            return []
        return check_invariants(model, self._signature, run_checker=checker or self._check_each,
                                float16_io=float16_io)

    def _set_checkpoint(self, model: ir.Model) -> None:
        self._checkpoint = model.clone().clone  # each call returns a new copy
        self._since_checkpoint = []

    def _restore(self) -> ir.Model:
        """The model as it was before the pass being reverted: a copy of the checkpoint
        with the passes run since replayed on it (passes are deterministic). Should a
        replay raise or come out unsound, the checkpoint itself, and the replayed passes'
        changes are dropped with a warning."""
        model = self._checkpoint()
        if self._since_checkpoint:
            try:
                for pass_ in self._since_checkpoint:
                    model = pass_(model).model
                problems = self._invariant_problems(model, checker=False)
            except Exception as error:  # noqa: BLE001
                problems = [f"{type(error).__name__}: {error}"]
            if problems:
                names = ", ".join(dict.fromkeys(pass_name(p) for p in self._since_checkpoint))
                message = f"replaying {names} after a revert failed ({problems[0]}); their changes were dropped"
                warnings.warn(message, RuntimeWarning, stacklevel=3)
                self._warnings.append(message)
                model = self._checkpoint()
                self._since_checkpoint = []
        self._summary = (oir.op_histogram(model), oir.weight_bytes(model))
        return model

    def _run_pass(
        self, pass_: PassLike, model: ir.Model, *, iteration: int | None
    ) -> tuple[ir.Model, bool]:
        """Run one pass. Passes that are verified get a new checkpoint before (they are the
        ones most likely reverted) and after (they may be costly to replay); verification
        dwarfs the copies."""
        name = pass_name(pass_)
        if self._verifies(pass_) and self._since_checkpoint:
            self._set_checkpoint(model)
        hist_before, bytes_before = self._summary
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
                float16_io = bool(getattr(pass_, "float16_interface", False))
                problems = self._invariant_problems(model, checker=self._verifies(pass_), float16_io=float16_io)
                if problems:
                    status, reason = "reverted", "broke an invariant: " + problems[0]
                elif self._verifies(pass_):
                    assert self.verifier is not None
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
            model = self._restore()
        elif status == "changed" and self._verifies(pass_):
            self._set_checkpoint(model)  # a revert later never replays a verified pass
        else:
            self._since_checkpoint.append(pass_)
        if status == "changed":
            self._kept.append(getattr(pass_, "numerics", "exact"))
            if getattr(pass_, "float16_interface", False):
                self._signature = signature(model)  # later passes keep the new interface
            self._summary = (oir.op_histogram(model), oir.weight_bytes(model))
        hist_after, bytes_after = self._summary
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
                bytes_after=bytes_after,
                stats=stats,
                verification=verification,
            )
        )
        return model, status == "changed"
