"""Runs a pipeline of passes, with instruments that check each change, and finds and reverts
the pass responsible when a check fails.

For every pass the manager records wall time, node counts by op type and weight bytes
before/after, ``modified`` and the pass's stats (``optcc.infra.report.PassRecord``). After a
pass that modified the model its instruments run: the structural invariants
(``optcc.infra.invariants``: order, names, interface; onnx's checker when asked) and, with
``verify_each``, the numerics against the original. A pass that raises or fails an
instrument is reverted and recorded with its reason; the run goes on, unless
``strict=True``, which raises instead, naming the passes that ran before it.

Costly checks run once, on the result, and are bisected on failure:

- onnx's checker: should it reject the result, the pipeline runs again from a fresh copy
  with the checker after every pass, so the pass responsible is reverted like any other;
- the numerics (without ``verify_each``): should the result fail verification, the passes
  whose changes were kept are replayed on a fresh copy to find, by bisection, the first
  whose result fails; the pipeline then runs again with that pass reverted from that run
  on, and the result is verified again.

A pipeline with steps that change the numbers on purpose (float16, INT8) is verified also
just before the first of them: the float passes are judged at their own tolerance (a
float miscompile smaller than INT8's error is still caught), and a float pass at fault is
found without replaying the lossy steps.

Reverting does not need a copy per pass: the manager keeps a checkpoint, a way to get a
fresh copy of the model at some point, plus the passes run since, and replays those on the
copy (passes are deterministic). Per-run state lives in a ``_Run``.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Union

import onnx_ir as ir

from optcc import ir as oir
from optcc.errors import BadInputError, PassFailedError, PipelineWarning
from optcc.infra.invariants import Signature, check_invariants, checked, signature
from optcc.infra.report import PassRecord, op_delta
from optcc.numerics.kinds import NUMERICS_ORDER, Numerics, loosest
from optcc.numerics.verify import Verification, Verifier
from optcc.progress import Progress, ProgressCallback
from optcc.runtime.shared_weights import Serialized

__all__ = ["Fixpoint", "Prepared", "PassManager", "PipelineResult", "pass_name", "step_passes", "MAX_BISECTIONS"]

PassLike = ir.passes.PassBase
MAX_BISECTIONS = 8  # numerics failures traced back to a pass per run; then the result fails


@dataclasses.dataclass
class Fixpoint:
    """Run ``passes`` in order, repeatedly, until none modifies the model.

    Stops after ``max_iters`` rounds; stopping unconverged is reported as a warning, never
    silently.
    """

    passes: Sequence[PassLike]
    max_iters: int = 8
    name: str = "fixpoint"


@dataclasses.dataclass
class Prepared:
    """Run ``preparation``, then ``main``, as one step: the preparation's changes are kept
    only with ``main``'s. When ``main`` leaves the model unchanged (it declines, fails or is
    reverted), the model is the one the step was given, and the preparation's records say
    they were undone. For rewrites made only for ``main`` (INT8's folded weights and fused
    BatchNorm layers), which the model would not get without it."""

    preparation: Sequence[PassLike]
    main: PassLike


PipelineStep = Union[PassLike, Fixpoint, Prepared]


def pass_name(pass_: PassLike) -> str:
    return getattr(pass_, "name", "") or type(pass_).__name__


def step_passes(step: PipelineStep) -> list[PassLike]:
    """The passes a pipeline step runs: a fixpoint's, a prepared step's, else the step itself."""
    if isinstance(step, Fixpoint):
        return list(step.passes)
    if isinstance(step, Prepared):
        return [*step.preparation, step.main]
    return [step]


def _failure_words(check: Verification) -> str:
    """Why a failed check reverts a pass: its result cannot be loaded, or its numbers moved."""
    what = "made a model onnxruntime cannot load" if check.unloadable else "changed the numerics"
    return f"{what}: {check.reason or ''}"


def _numerics(pass_: PassLike) -> Numerics:
    return getattr(pass_, "numerics", "exact")


@dataclasses.dataclass
class PipelineResult:
    model: ir.Model
    records: list[PassRecord]
    warnings: list[str]
    numerics: Numerics  # the loosest kind among passes whose changes were kept
    verification: Verification | None = None  # of the result, when the manager has a verifier
    unconverged: list[str] = dataclasses.field(default_factory=list)  # fixpoints that hit their cap
    # the result's op histogram and weight bytes (``oir.histogram_and_weight_bytes``)
    summary: tuple[dict[str, int], int] | None = None


@dataclasses.dataclass
class _Run:
    """The state of one run of the pipeline."""

    fresh: Callable[[], ir.Model]
    signature: Signature
    check_each: bool
    reverts: dict[int, tuple[PassLike, str]]  # pass-run index -> the pass (by name) reverted from there on, and why
    records: list[PassRecord] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    unconverged: list[str] = dataclasses.field(default_factory=list)
    kept: list[tuple[int, PassLike]] = dataclasses.field(default_factory=list)  # (index, pass) that changed it
    summary: tuple[dict[str, int], int] = ({}, 0)  # of ``model`` as it is now (kept after every change)
    checkpoint: Callable[[], ir.Model] | None = None
    since_checkpoint: list[PassLike] = dataclasses.field(default_factory=list)
    index: int = 0  # pass runs so far
    kept_at_checkpoint: int = 0
    # the model's version: counts the changes kept and the restores so far (each may give
    # the passes a model they have not seen), and for each pass object whose last run left
    # the model unchanged, the version it left unchanged
    version: int = 0
    unchanged_at: dict[int, int] = dataclasses.field(default_factory=dict)  # id(pass) -> version
    model: ir.Model | None = None  # the result, once the steps have run
    serialized: Serialized | None = None  # the result's bytes as onnx's checker read them (``checked``)
    base: Numerics = "exact"  # the numerics the model had when the run began

    def numerics(self, count: int | None = None) -> Numerics:
        """The loosest numerics kind of the model after the first ``count`` kept pass runs
        (all by default)."""
        return loosest([self.base, *(_numerics(p) for _, p in self.kept[:count])])


class PassManager:
    def __init__(
        self,
        pipeline: Sequence[PipelineStep],
        *,
        strict: bool = False,
        verifier: Verifier | None = None,
        verify_each: bool = False,
        check_invariants: bool = True,
        progress: Union[bool, ProgressCallback] = False,
        returns_float: Callable[[Sequence[PassRecord], ir.Model], bool] | None = None,
        _numerics: Numerics = "exact",  # what the model given to run() already has: the loosest kept
    ) -> None:
        """``returns_float``: whether the caller returns, as its result, a run whose lossy
        steps changed nothing (given the run's records and model; None: it always does).
        Where it does not (a declined precision is an error), that model is written nowhere,
        so the user's samples do not run on it: the float steps' proof is its verification."""
        self.pipeline = list(pipeline)
        self.returns_float = returns_float
        self.progress = progress  # each pass is a progress phase of its own (``pass NAME``)
        self._base_numerics = _numerics
        self.strict = strict
        self.verifier = verifier
        self.verify_each = verify_each
        self.check_invariants = check_invariants

    # ----------------------------------------------------------------- the run

    def run(self, model: ir.Model, *, fresh: Callable[[], ir.Model] | None = None,
            summary: tuple[dict[str, int], int] | None = None) -> PipelineResult:
        """Run the pipeline on ``model`` (modified in place; where the steps split for a
        verification before a lossy step, the lossy steps run on a copy: the result is
        ``PipelineResult.model``, whatever ``model`` holds after). ``fresh`` returns a new copy of
        the model as given, for reverts and replays (default: a copy taken now);
        ``summary``: ``oir.histogram_and_weight_bytes(model)``, when the caller has it.

        Verified once at the end, a pipeline whose later steps change the numbers on purpose
        (float16, INT8: looser numerics than a fusion's) is verified before the first of
        them too: the float passes before it are judged at their own tolerance, not at the
        lossy pass's, and a float pass at fault is reverted without running the lossy pass
        again for the bisection."""
        if fresh is None:
            fresh = _copier(model)
        split = self._lossy_start()
        if split is not None:
            return self._run_split(model, fresh, split, summary)
        run = self._complete(model, fresh, reverts={}, summary=summary)
        verification = None
        if self.verifier is not None:
            run, verification = self._verified(run)
        return PipelineResult(run.model, run.records, run.warnings, run.numerics(), verification, run.unconverged,
                              run.summary)

    def _lossy_start(self) -> int | None:
        """Where the pipeline splits for a verification before its first lossy step: that
        step's position, when there are float steps before it and verification is once."""
        if self.verifier is None or self.verify_each:
            return None
        for position, step in enumerate(self.pipeline):
            if any(NUMERICS_ORDER.index(_numerics(p)) > NUMERICS_ORDER.index("fusion") for p in step_passes(step)):
                return position if position > 0 else None
        return None

    def _run_split(self, model: ir.Model, fresh: Callable[[], ir.Model], split: int,
                   summary: tuple[dict[str, int], int] | None) -> PipelineResult:
        """The float steps, verified (bisected and reverted on failure), then the rest from
        their verified result: a later failure is bisected among the later steps only.

        The float steps' result is proved equal to the original where it can be
        (``Verifier.prove``): the user's samples then run on it only if it is what is
        written, i.e. when the later steps change nothing and the caller returns that model
        (``returns_float``); where they change it, the final
        verification runs the samples on their result."""
        assert self.verifier is not None
        options = dict(strict=self.strict, verifier=self.verifier, check_invariants=self.check_invariants,
                       progress=self.progress)
        head = PassManager(self.pipeline[:split], **options, _numerics=self._base_numerics)
        first = head._complete(model, fresh, reverts={}, summary=summary)
        head_run, check = first, self.verifier.prove(first.model, first.numerics(), serialized=first.serialized)
        if check is None or not check.passed:
            # the check of this same model need not try the proof again: where it found none, none is found
            head_run, check = head._verified(first, prove=check is not None)
        if check.status == "failed":
            return self._split_result(head_run, check, self._not_run(split))
        # the tail's verification judges the head's changes too: at least at their tolerance
        tail = PassManager(self.pipeline[split:], **options, _numerics=head_run.numerics())
        # the tail runs on a copy (sharing the tensors): where it is reverted, the model it
        # made is held by its run alone, which lets it go (``_verified``), while the caller's
        # model and the head's run keep the float steps' result
        head_model = head_run.model  # never changed by the tail: copies of it are fresh ones
        fresh = lambda: oir.clone(head_model)  # noqa: E731
        run = tail._complete(fresh(), fresh, reverts={}, summary=head_run.summary)
        if run.kept:
            run, verification = tail._verified(run)
            return PipelineResult(run.model, head_run.records + run.records, head_run.warnings + run.warnings,
                                  run.numerics(), verification, head_run.unconverged + run.unconverged, run.summary)
        if check.proof is not None and self.verifier.user_samples and \
                (self.returns_float is None or self.returns_float(head_run.records + run.records, run.model)):
            # the float steps' result is what is written: the user's samples run on it (the
            # later steps' result, which is it: they may have worked on it and restored it)
            head_run.model = run.model
            head_run, check = head._verified(head_run)
            if head_run is not first:  # a float pass was reverted: that model is written
                return self._split_result(head_run, check, records=run.records)
        # of this very model, when the lossy steps changed nothing
        return PipelineResult(run.model, head_run.records + run.records, head_run.warnings + run.warnings,
                              run.numerics(), check, head_run.unconverged + run.unconverged, run.summary)

    def _not_run(self, split: int) -> list[str]:
        """The warning for the steps from ``split`` on when the float steps before them fail."""
        skipped = ", ".join(dict.fromkeys(pass_name(p) for step in self.pipeline[split:] for p in step_passes(step)))
        return [f"not run: {skipped} (the float passes before them failed verification)"]

    @staticmethod
    def _split_result(head_run: _Run, check: Verification, warnings: Sequence[str] = (),
                      records: Sequence[PassRecord] = ()) -> PipelineResult:
        """The float steps' run as the pipeline's result, with ``warnings`` added."""
        return PipelineResult(head_run.model, [*head_run.records, *records], [*head_run.warnings, *warnings],
                              head_run.numerics(), check, head_run.unconverged, head_run.summary)

    def _complete(self, model: ir.Model, fresh: Callable[[], ir.Model], reverts: dict[int, tuple[PassLike, str]],
                  summary: tuple[dict[str, int], int] | None = None) -> _Run:
        """Run the steps (``summary``: ``model``'s, when known); should onnx's checker reject
        the result, run them again from a fresh copy checking after every pass."""
        run = self._run_steps(model, fresh, check_each=False, reverts=reverts, summary=summary)
        if self.check_invariants:
            problems, run.serialized = checked(run.model)
            if problems:
                discarded = len(run.records)
                run = self._run_steps(fresh(), fresh, check_each=True, reverts=reverts)
                message = (f"onnx checker rejected the pipeline's result ({problems[0]}); "
                           f"ran it again checking after every pass ({discarded} pass runs discarded)")
                warnings.warn(message, PipelineWarning, stacklevel=3)
                run.warnings.insert(0, message)
        return run

    def _verified(self, run: _Run, prove: bool = True) -> tuple[_Run, Verification]:
        """Verify the result; on failure find the pass run responsible by bisection, run the
        pipeline again with it reverted, and verify that. ``prove``: False when a proof of
        ``run``'s model was tried and found none (its check runs the samples alone)."""
        assert self.verifier is not None
        check = self.verifier.check(run.model, run.numerics(), serialized=run.serialized, prove=prove)
        reverts: dict[int, tuple[PassLike, str]] = dict(run.reverts)
        attempts: dict[int, PassRecord] = {}  # the reverted pass runs' records, from the run that made them
        for _ in range(MAX_BISECTIONS):
            if check.status != "failed" or not run.kept or self.verify_each:
                break
            index, failing = self._bisect(run, check)
            culprit = next(p for i, p in run.kept if i == index)
            if self.strict:
                raise PassFailedError(f"pass '{pass_name(culprit)}' {_failure_words(failing)}")
            # this run of the pass and its later runs, under any instance of that name (a fixpoint
            # or a later step would repeat the rewrite, and each would cost a bisection)
            reverts[index] = (culprit, _failure_words(failing))
            attempts[index] = run.records[index]
            # the failed model and its bytes go before the pipeline runs again and its result
            # is verified: the caller's reference to this run no longer holds them
            fresh, run.model, run.serialized = run.fresh, None, None
            oir.collect_for(run.summary[1])  # a model is a reference cycle: a collection frees it
            run = self._complete(fresh(), fresh, reverts)
            for at, attempt in attempts.items():  # the replay skipped them: what they did, and took, is the attempt's
                record = run.records[at] if at < len(run.records) else None
                if record is not None and record.name == attempt.name and record.status == "reverted":
                    run.records[at] = dataclasses.replace(record, time_s=attempt.time_s, stats=attempt.stats)
            check = self.verifier.check(run.model, run.numerics(), serialized=run.serialized)
        return run, check

    def _bisect(self, run: _Run, check: Verification) -> tuple[int, Verification]:
        """The index of the first kept pass run whose result fails verification (replayed
        from a fresh copy), with that verification. The replays are compared on the samples
        the result failed on (``check``), where the tolerance judges each sample alone: a
        replay that fails there fails the whole check. The model after every kept pass is
        the result itself, which failed ``check``: it is never replayed (passes are
        deterministic; replaying them all would run the whole pipeline, an INT8 step's
        calibration and fallback included, again for the same model)."""
        assert self.verifier is not None
        kept = run.kept
        focus = check.samples_over() or None
        lo, hi = 0, len(kept)  # the model after kept[:lo] passes, after kept[:hi] fails
        failing = check
        while hi - lo > 1:
            mid = (lo + hi) // 2
            step = self.verifier.check(self._replay(run, mid), run.numerics(mid), samples=focus)
            if step.status == "failed":
                hi, failing = mid, step
            else:
                lo = mid
        return kept[hi - 1][0], failing

    def _replay(self, run: _Run, count: int) -> ir.Model:
        model = run.fresh()
        for _, pass_ in run.kept[:count]:
            model = pass_(model).model
        return model

    def _run_steps(self, model: ir.Model, fresh: Callable[[], ir.Model], *, check_each: bool,
                   reverts: dict[int, tuple[PassLike, str]], summary: tuple[dict[str, int], int] | None = None) -> _Run:
        """Run the steps; with Python's cyclic garbage collector paused when the steps are
        float rewrites only (exact or fusion) and not verified one by one (see
        ``_pauses_collector``)."""
        if not self._pauses_collector():
            return self._execute_steps(model, fresh, check_each=check_each, reverts=reverts, summary=summary)
        with oir.collector_paused():
            return self._execute_steps(model, fresh, check_each=check_each, reverts=reverts, summary=summary)

    def _pauses_collector(self) -> bool:
        """Whether the steps run with the cyclic garbage collector paused. Float rewrites
        mostly build objects that stay alive (nodes, values, tensors); what they drop is
        freed by reference counting, except the few cycles of removed nodes and their
        outputs, left to the collector's first run after the steps. The collections their
        allocations would trigger scan every object in the process, the imported libraries'
        included, and free next to nothing. Not paused: per-pass verification (each new
        checkpoint drops a whole model copy) and lossy steps (float16, INT8: calibration
        and the layer-by-layer fallbacks build and drop model copies)."""
        if self._verifies():
            return False
        loosest_float = NUMERICS_ORDER.index("fusion")
        return all(NUMERICS_ORDER.index(_numerics(p)) <= loosest_float
                   for step in self.pipeline for p in step_passes(step))

    def _execute_steps(self, model: ir.Model, fresh: Callable[[], ir.Model], *, check_each: bool,
                       reverts: dict[int, tuple[PassLike, str]], summary: tuple[dict[str, int], int] | None) -> _Run:
        run = _Run(fresh=fresh, signature=signature(model), check_each=check_each, reverts=reverts,
                   base=self._base_numerics)
        run.summary = summary if summary is not None else oir.histogram_and_weight_bytes(model)
        run.checkpoint = fresh
        for step in self.pipeline:
            if isinstance(step, Fixpoint):
                model = self._run_fixpoint(run, step, model)
            elif isinstance(step, Prepared):
                model = self._run_prepared(run, step, model)
            elif not self._would_change_nothing(run, step):
                model, _ = self._run_pass(run, step, model, iteration=None)
        run.model = model
        return run

    def _run_fixpoint(self, run: _Run, fixpoint: Fixpoint, model: ir.Model) -> ir.Model:
        """Rounds of the passes until a round changes nothing. A pass that would see the
        very model its last run left unchanged, or a model without its triggers, is not run
        (``_would_change_nothing``); so a round ends without running the passes after the
        last one that changed the model in the round before, and still detects that nothing
        changed."""
        changed_by: list[str] = []
        for iteration in range(1, fixpoint.max_iters + 1):
            changed_by = []
            for pass_ in fixpoint.passes:
                if self._would_change_nothing(run, pass_):
                    continue
                model, modified = self._run_pass(run, pass_, model, iteration=iteration)
                if modified:
                    changed_by.append(pass_name(pass_))
            if not changed_by:
                return model
        message = (
            f"{fixpoint.name} stopped unconverged after {fixpoint.max_iters} iterations "
            f"(last round changed by: {', '.join(changed_by)})"
        )
        warnings.warn(message, PipelineWarning, stacklevel=2)
        run.warnings.append(message)
        run.unconverged.append(fixpoint.name)
        return model

    def _run_prepared(self, run: _Run, step: Prepared, model: ir.Model) -> ir.Model:
        """The preparation, then the main pass; when the main pass keeps no change, the
        model as given (a copy taken before: graphs copied, tensors shared), a new
        checkpoint there, and the preparation's kept runs dropped and recorded as undone."""
        given = oir.clone(model)
        kept, first, summary = len(run.kept), len(run.records), run.summary
        for pass_ in step.preparation:
            if not self._would_change_nothing(run, pass_):
                model, _ = self._run_pass(run, pass_, model, iteration=None)
        main_changed = False
        if not self._would_change_nothing(run, step.main):
            model, main_changed = self._run_pass(run, step.main, model, iteration=None)
        if main_changed or len(run.kept) == kept:
            return model
        why = f"undone: {pass_name(step.main)} kept no change, and this pass ran only to prepare for it"
        run.records[first:] = [dataclasses.replace(r, status="reverted", reason=why) if r.status == "changed" else r
                               for r in run.records[first:]]
        run.kept = run.kept[:kept]
        run.summary = summary
        run.version += 1
        self._set_checkpoint(run, given)
        return given

    # ----------------------------------------------------------------- instruments

    def _problems(self, run: _Run, model: ir.Model, pass_: PassLike) -> tuple[str | None, dict | None]:
        """The instruments after a pass that changed the model: why it must be reverted
        (None: keep it), and the verification record when numerics were checked."""
        if self.check_invariants:
            problems = check_invariants(model, run.signature, run_checker=run.check_each or self._verifies(),
                                        float16_io=bool(getattr(pass_, "float16_interface", False)))
            if problems:
                return "broke an invariant: " + problems[0], None
        if self._verifies():
            assert self.verifier is not None
            check = self.verifier.check(model, loosest([run.numerics(), _numerics(pass_)]))
            record = {**check.to_dict(), "summary": check.describe()}
            if check.status == "failed":
                return _failure_words(check), record
            return None, record
        return None, None

    @staticmethod
    def _would_change_nothing(run: _Run, pass_: PassLike) -> bool:
        """Whether running the pass now would change nothing, known without running it:

        - its last run in ``run`` left the model unchanged and no change was kept since:
          it would see the very model it left unchanged, and passes are deterministic. One
          object serves every step that names the same pass with the same options
          (``build_pipeline``), so a later step or fixpoint skips it too;
        - the pass says it changes nothing in a model of the op types the run's op
          histogram of the current model holds (``_Run.summary``): ``Pass.changes_nothing``,
          by default when the model holds no node of its ``triggers``; a rule pass when
          no rule's pattern can match (onnx-ir's own passes say nothing)."""
        if run.unchanged_at.get(id(pass_)) == run.version:
            return True
        changes_nothing = getattr(pass_, "changes_nothing", None)
        return changes_nothing is not None and changes_nothing(run.summary[0])

    def _verifies(self) -> bool:
        return self.verifier is not None and self.verify_each

    # ----------------------------------------------------------------- one pass

    def _ran_before(self, run: _Run) -> str:
        names = [r.name for r in run.records]
        return ", ".join(names) if names else "none"

    def _set_checkpoint(self, run: _Run, model: ir.Model) -> None:
        run.checkpoint = _copier(model)  # each call returns a new copy
        run.since_checkpoint = []
        run.kept_at_checkpoint = len(run.kept)

    def _restore(self, run: _Run) -> ir.Model:
        """The model as it was before the pass being reverted: a copy of the checkpoint
        with the passes run since replayed on it. Should a replay raise or come out
        unsound, the checkpoint itself, and the replayed passes' changes are dropped with a
        warning."""
        assert run.checkpoint is not None
        model = run.checkpoint()
        if run.since_checkpoint:
            try:
                for pass_ in run.since_checkpoint:
                    model = pass_(model).model
                problems = check_invariants(model, run.signature, run_checker=False) if self.check_invariants else []
            except Exception as error:  # noqa: BLE001
                problems = [f"{type(error).__name__}: {error}"]
            if problems:
                names = ", ".join(dict.fromkeys(pass_name(p) for p in run.since_checkpoint))
                message = f"replaying {names} after a revert failed ({problems[0]}); their changes were dropped"
                warnings.warn(message, PipelineWarning, stacklevel=3)
                run.warnings.append(message)
                model = run.checkpoint()
                run.kept = run.kept[:run.kept_at_checkpoint]
                run.since_checkpoint = []
        run.summary = oir.histogram_and_weight_bytes(model)
        return model

    def _run_pass(self, run: _Run, pass_: PassLike, model: ir.Model, *,
                  iteration: int | None) -> tuple[ir.Model, bool]:
        """Run one pass (or record its planned revert). With per-pass verification, a new
        checkpoint before (verified passes are the ones most likely reverted) and after
        (they may be costly to replay)."""
        name = pass_name(pass_)
        index = run.index
        run.index += 1
        if self._verifies() and run.since_checkpoint:
            self._set_checkpoint(run, model)
        hist_before, bytes_before = run.summary
        start = time.perf_counter()
        status, reason, verification = "unchanged", None, None
        stats: dict[str, Any] = {}
        result = None
        planned = next((why for start, (reverted, why) in run.reverts.items()
                        if pass_name(reverted) == name and index >= start), None)
        if planned is not None:
            status, reason = "reverted", planned
        else:
            try:
                with Progress(f"pass {name}", 1, enabled=self.progress, bar=False) as bar:
                    result = pass_(model)
                    bar.advance()
            except BadInputError:  # the user's data or options, unusable: no pass's failure to revert
                raise
            except Exception as error:  # noqa: BLE001 - any failure of a pass is reverted
                if self.strict:
                    raise PassFailedError(
                        f"pass '{name}' raised {type(error).__name__}: {error} "
                        f"(passes run before it: {self._ran_before(run)})"
                    ) from error
                status, reason = "failed", f"raised {type(error).__name__}: {error}"
        elapsed = time.perf_counter() - start
        if result is not None:
            model = result.model
            stats = dict(getattr(result, "stats", {}) or {})
            if result.modified:
                status = "changed"
                reason, verification = self._problems(run, model, pass_)
                if reason is not None:
                    status = "reverted"
                    if self.strict:
                        raise PassFailedError(
                            f"pass '{name}' {reason} (passes run before it: {self._ran_before(run)})")
        if status in ("failed", "reverted") and planned is None:
            model = self._restore(run)
            run.version += 1
        elif status == "changed" and self._verifies():
            self._set_checkpoint(run, model)  # a revert later never replays a verified pass
        elif status == "changed":
            run.since_checkpoint.append(pass_)
        if status == "unchanged":
            run.unchanged_at[id(pass_)] = run.version
        if status == "changed":
            run.version += 1
            run.kept.append((index, pass_))
            if getattr(pass_, "float16_interface", False):
                run.signature = signature(model)  # later passes keep the new interface
            run.summary = oir.histogram_and_weight_bytes(model)
        hist_after, bytes_after = run.summary
        run.records.append(
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


def _copier(model: ir.Model) -> Callable[[], ir.Model]:
    """A function returning a new copy of ``model`` as it is now."""
    kept = oir.clone(model)
    return lambda: oir.clone(kept)
