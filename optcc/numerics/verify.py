"""The verifier: an optimized model against its original, on onnxruntime, judged against a
reference more precise than the thing judged.

Every session runs with onnxruntime's own graph optimizations and weight pre-packing off,
so its fusions can neither hide nor cause a difference, and a weight that a rewrite made
constant (a fold) is read by the kernel that read it computed (a pre-packed convolution
or LSTM weight takes another code path, whose rounding a model can amplify past the exact
tolerance). INT8 candidates are the exception: they run with onnxruntime's optimizations,
which turn their QDQ pairs into the integer kernels a user's session runs (and the INT8
pass judged); as written, onnxruntime would emulate them in float. Inputs are the user's
feed dicts, else ``DEFAULT_SAMPLES`` generated samples that fit the model (``optcc.numerics.inputs``),
the last of which gives the batch axes nothing sizes ``BATCH_SAMPLE`` rows (the others
1; its other free dims are as many times shorter), so that a result specialized to batch
1 shows. The last also feeds every float graph input with a default a caller may
replace (an initializer listed as an input, IR 4 on) a value off that default
(``optcc.numerics.inputs.varied_defaults``), so that a result that reads the default
where the input is fed shows; where the original cannot run on those, the samples feed
the defaults and ``notes`` says so, as it does when the user's samples feed no such
input. When the original cannot run those,
they are generated again with the batch sample's other free dims as long as the other
samples' (a stack of unpadded convolutions runs only above some size; no note, as that
sample is no weaker), then with batch 1
in every sample (a graph that assumes batch 1
behind a symbolic dim), then with the sizes of ``RETRY_SIZES`` in turn (free dynamic
dims ``RETRY_DYNAMIC_DIM`` long: a reflect-padded or framed signal needs more than the
default; then also 1 between the first and the last axis: a recurrent state's unnamed
batch axis), each with the batch sample first and without it next; samples of the
shapes already tried are not run again. The report says which were run, and why.

For "exact" and "fusion" results checked on generated samples, the verifier first tries
to prove that the candidate computes the original's function (``optcc.numerics.equivalence``):
when every output is proved and onnxruntime loads the candidate, the check passes with
no sample generated or run (reference "proof"). The user's own samples always run. Samples
on which every output of the original is NaN, infinite or empty compare nothing (NaN and
infinities are compared by position only): the check is then a proof or skipped, never a pass.

Otherwise, what the candidate is compared with depends on what the kept passes may
change (``optcc.numerics.kinds``):

- "exact" rewrites compute the same thing with the same kernels: the candidate is compared
  with the float32 original, within 1e-5 of each output's scale. Never widened.
- "fusion" results (rewrites exact in real arithmetic) pass within the tolerance of the
  float32 original. The samples an output is beyond it on are judged again per element,
  against the original evaluated in float64 on those samples (``optcc.numerics.float64``)
  where that is possible within its budget, else every sample against the float32 original
  (the report says which, and why): each element may be off by the tolerance or by
  ``ORIGINAL_ERROR_FACTOR`` times the float32 original's own rounding there
  (``optcc.numerics.metrics``), whichever is larger. Against
  float64 that is the original's own error; against the float32 original, its difference
  to a second float32 evaluation of the same math (onnxruntime's basic optimizations,
  which fold and reassociate as fusions do). Both are computed only when needed.
- "fp16" results are compared with the float32 original by SQNR and cosine; with the
  default fp16 tolerance, an output that misses them is still accepted when the task judge
  (below) decides it with enough items and finds it within float32's noise floor
  (``optcc.numerics.float16``). NaN or infinities float32 does not have always fail.

INT8 results (with the default "int8" tolerance) are judged by the task, relative to the
float32 original's own noise floor (``optcc.numerics.task``): the original is also run on
the samples perturbed at their inputs' resolution, and each output's task metric (top-1,
CTC decode, boxes, pooled embeddings and their ranking, next token; the rows of integer
outputs such as decoded ids; SQNR over all samples otherwise) must deviate no more than
the margin times that floor. Every other numerics compares integer outputs exactly. A pass
that judges its INT8 result on the verifier's samples has it run by ``Verifier.outputs``,
which keeps the outputs, by the model's content digest, for the check of that very model:
it runs once.

KV-cache decoders are verified over a decode (``optcc.numerics.decode``): each sample runs
``DECODE_STEPS`` steps, every model feeding its own ``present`` outputs back as ``past`` and
the original's greedy token, compared with the float32 original's decode. A lossy result
("fp16" or "int8" with its default tolerance and no task metric of the user's) has its
logits and cache judged instead by its next-token agreement over ``NEXT_TOKEN_STEPS``
steps from each prompt, each step fed the original's greedy token: it passes when its
argmax is the original's at ``NEXT_TOKEN_AGREEMENT`` of the steps (their metrics on the
short decode, and its free-running agreement, are reported, not judged; any other output
keeps its tolerance). The prompts are the user's samples, else ``NEXT_TOKEN_PROMPTS``
generated ones (``next_token_feeds``), which leave room in the position table for that
many steps. ``held_apart`` gives a verifier of other samples, for a search that must not
fit the samples its result is verified on; for a decoder it asks
``NEXT_TOKEN_SEARCH_AGREEMENT`` of the steps, more than the result is asked, and where the
next tokens judge every output, they alone decide: no short decode runs whose metrics
nobody would read (the result is then verified by this verifier, short decode included). Where the
original's own next-token decode cannot run, the result is "skipped", as below. A
streaming model (one whose state outputs its caller feeds back, ``optcc.numerics.state``) runs a second step per sample from the state
the first returned (``optcc.numerics.decode.streamed``): the task judge judges its answers
on both steps, its state outputs only through the second.

A verification that cannot run (onnxruntime cannot run the original on the inputs) has
status "skipped" with the reason; callers must not treat it as a pass.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Union

import numpy as np
import onnx
import onnx_ir as ir

from optcc import ir as oir
from optcc.errors import BadInputError, PipelineWarning
from optcc.numerics.decode import (DECODE_STEPS, NEXT_TOKEN_AGREEMENT, NEXT_TOKEN_PROMPT_LENGTH,
                                   NEXT_TOKEN_PROMPTS, NEXT_TOKEN_SEARCH_AGREEMENT, NEXT_TOKEN_STEPS, decode_plan,
                                   forced_tokens, free_agreement, greedy_tokens, next_token_agreement, run_decode,
                                   stream_names, stream_plan, streamed)
from optcc.numerics.equivalence import Premise, number_original, prove_equivalent
from optcc.numerics.float16 import ACCEPTED_BY_TASK, accept_float16, widen_float16
from optcc.numerics.float64 import MAX_REFERENCE_BYTES, Float64Reference
from optcc.numerics.inputs import (BATCH_SAMPLE, DEFAULT_DYNAMIC_DIM, RETRY_SIZES, UngeneratedInputError, check_feeds,
                                   decode_room, generate_inputs, input_roles, sizes_text, variable_defaults,
                                   varied_defaults)
from optcc.numerics.kinds import Numerics
from optcc.numerics.metrics import ORIGINAL_ERROR_FACTOR, SATURATED_BELOW, TOLERANCES, OutputMetrics, Tolerance, bounded_resolution, compare_outputs
from optcc.numerics.task import (DEFAULT_MARGIN, FEW_EXPECTED_ERRORS, FLOOR_DRAWS, DeferredOutputs, TaskJudge,
                                 UserMetric, float_free_outputs, moves_nothing, perturbation_draws, perturbation_roles,
                                 projected_outputs, recurrent_outputs, row_choices, sequence_outputs, token_outputs,
                                 unmoved, wants_draws)
from optcc.progress import Progress
from optcc.runtime.default_build import DefaultBuild, default_build
from optcc.runtime.session import (CPU, HANDOVER_MIN_BYTES, building_session, first_line, float16_feedable,
                                   make_session, resolve_providers, run, session_options)
from optcc.runtime.shared_weights import Serialized, content_digest, light_proto, release_memory, weighted_session

__all__ = ["DEFAULT_SAMPLES", "REFERENCES", "Verification", "Verifier", "chosen_text", "named_task_rows", "task_rows_text",
           "verify"]

Feeds = Mapping[str, np.ndarray]
ModelRef = Union[ir.Model, str, os.PathLike]

DEFAULT_SAMPLES = 3
# the numerics of results whose element types a run converted: a user's session of them, built
# with onnxruntime's default options, is asked for before they pass (``_default_build``)
CONVERTED: tuple[Numerics, ...] = ("fp16", "int8")
REPARSE_MAX_BYTES = 64 * 1024 * 1024  # an original file up to this size is parsed again for the proof
REFERENCES = ("auto", "float32")
# the bytes of the outputs ``Verifier.outputs`` keeps of the models before the last, at the
# least (more when the last model's own outputs are larger)
KEPT_OUTPUT_BYTES = 64 << 20
# the progress phases of the reference runs, apart from the candidate's ("verifying")
REFERENCE_PHASE = "reference: the original"
FLOOR_PHASE = "noise floor: float32 on perturbed samples"
FLOAT64_PHASE = "reference: float64"


@dataclasses.dataclass
class Verification:
    """The verdict over every output, provider and sample, and what it was judged against."""

    status: str  # "passed" | "failed" | "skipped"
    numerics: Numerics
    tolerance: Tolerance
    providers: list[str]
    samples: int
    outputs: list[OutputMetrics]
    reason: str | None = None
    reference: str = "float32 original"  # "float16 original" for a model with float16 inputs and outputs
    decode_steps: int | None = None  # steps per sample for a KV-cache decoder
    task: dict[str, Any] | None = None  # the task judge's verdict on the first provider, for INT8
    task_by_provider: dict[str, dict[str, Any]] | None = None  # every provider's, when there are several
    notes: list[str] = dataclasses.field(default_factory=list)  # what makes this check weaker
    proof: dict[str, Any] | None = None  # set when proved equal without running (reference "proof")
    # a lossy decoder's argmax at each step fed the original's tokens, against the original's, per
    # provider: what judges it (``optcc.numerics.decode.next_token_agreement``)
    next_token: dict[str, dict[str, Any]] | None = None
    # its own greedy tokens against the original's over the same prompts, per provider: reported,
    # never decisive (``optcc.numerics.decode.free_agreement``); absent where the check stopped early
    free_running: dict[str, dict[str, Any]] | None = None
    # the outputs those next tokens judge (its logits and the cache fed back, in output order):
    # any other output keeps the tolerance, without its argmax rule; () where no tokens judge
    token_judged: tuple[str, ...] = ()
    # failed because onnxruntime cannot load or build the result, not on its numbers
    unloadable: bool = False

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def samples_over(self) -> list[int]:
        """The samples (positions in the verifier's feeds) on which an output has an
        element beyond a maximum-relative tolerance."""
        return sorted({i for o in self.outputs for i in o.samples_over})

    def worst(self) -> OutputMetrics | None:
        failing = [o for o in self.outputs if not o.passed]
        if failing:
            return failing[0]
        return max(self.outputs, key=lambda o: o.max_rel or 0.0, default=None)

    def describe(self, quantized: str | None = None) -> str:
        """One line: the verdict, the reference and the worst output's numbers; ``quantized``
        names what was quantized when the tolerance's own name does not (``int4 weights``
        under the int8 tolerance)."""
        named = f"{self.numerics} tolerance" if quantized is None else \
            f"{quantized} under the {self.numerics} tolerance"
        if self.status == "skipped":
            return f"skipped ({self.reason})"
        where = ", ".join(p.replace("ExecutionProvider", "") for p in self.providers)
        if self.proof is not None:
            if not self.passed:
                return f"FAIL on {where}: {self.reason}"
            return (f"PASS by proof ({named}): every output is the original's computation "
                    f"(value numbering, {self.proof['folds_checked']} folded constant(s) evaluated); "
                    f"loads on {where}")
        worst = self.worst()
        verdict = "PASS" if self.passed else "FAIL"
        steps = f" of {self.decode_steps} decode steps each (present fed back as past)" if self.decode_steps else ""
        text = (f"{verdict} on {where} ({named}, {self.samples} sample(s){steps}, "
                f"against {self.reference.split(' (')[0] if 'unavailable' in self.reference else self.reference})")
        if worst is not None:
            bits = [f"worst output '{worst.name}'"]
            if worst.problem:
                bits.append(worst.problem)
            elif worst.max_rel is not None:
                bits.append(f"max rel {worst.max_rel:.3g}")
                if worst.original_max_rel is not None:
                    bits[-1] += f" (the original's own: {worst.original_max_rel:.3g})"
                if worst.passed and self.tolerance.max_rel is not None and worst.max_rel > self.tolerance.max_rel \
                        and worst.max_abs is not None:
                    # passed per element within an absolute allowance (a bounded kernel's
                    # resolution, the original's own error) on a sample of small values
                    bits.append(f"max abs {worst.max_abs:.3g}")
                    if worst.allowance_used is not None:
                        bits.append(f"each element within its allowance (at most {worst.allowance_used:.0%} of it; "
                                    f"{self.tolerance.max_rel:g} of the scale, or the kernel's resolution or "
                                    f"{ORIGINAL_ERROR_FACTOR:g}x the original's own error where larger)")
            if worst.sqnr_db is not None and self.numerics in ("fp16", "int8"):
                bits.append(f"SQNR {worst.sqnr_db:.1f} dB")
            text += ": " + ", ".join(bits)
            said = not self.passed and worst.passed and bool(self.reason)
            if said:
                text += f"; {self.reason}"
        else:
            said = bool(self.reason)
            if said:
                text += f": {self.reason}"
        if self.passed and self.numerics == "int8" and self.task:  # the noise floor next to the result
            judged = dict.fromkeys(_row_parts(row, self.task.get("groups") or ())[0]
                                   for row in self.task.get("metrics", {}))
            rows = named_task_rows(self.task, judged)
            if rows:
                text += "; against float32's noise floor: " + ", ".join(rows)
        groups = (self.task or {}).get("groups")
        if groups:
            text += "; groups judged apart: " + ", ".join(
                f"{label} {'PASS' if g['passed'] else 'FAIL'} ({g['samples']} sample(s))"
                for label, g in groups.items())
        rescued = [o for o in self.outputs if o.accepted_by == ACCEPTED_BY_TASK]
        if rescued:
            text += "; accepted by the task, below the SQNR rule or with integer values changed: " + "; ".join(
                f"'{o.name}' on {o.provider.replace('ExecutionProvider', '')} ("
                + (f"SQNR {o.sqnr_db:.1f} dB, " if o.sqnr_db is not None else f"{o.values_differ} values differ, ")
                + task_rows_text((self.task_by_provider or {}).get(o.provider) or self.task, o.name) + ")"
                for o in rescued)
        for provider, run_ in (self.next_token or {}).items():
            if not (said and not run_["passed"]):  # a failed run's words are the reason's
                text += f"; {next_token_text(provider.replace('ExecutionProvider', ''), run_)}"
            free = (self.free_running or {}).get(provider)
            if free is not None:
                text += f"; free-running (not judged): {free['agreement']:.1%} ({_parted(free)})"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "numerics": self.numerics,
            "tolerance": dict(dataclasses.asdict(self.tolerance)),
            "providers": self.providers,
            "samples": self.samples,
            "reference": self.reference,
            "decode_steps": self.decode_steps,
            "task": self.task,
            "task_by_provider": self.task_by_provider,
            "notes": self.notes,
            "reason": self.reason,
            "outputs": [o.to_dict() for o in self.outputs],
            "proof": self.proof,
            "next_token": self.next_token,
            "free_running": self.free_running,
        }


class Verifier:
    """Runs the original once per provider (and once in float64), then checks candidates.

    ``inputs``: feed dicts (an iterable is consumed once); None generates ``samples``
    feeds with ``input_shapes`` for dynamic dimensions and ``input_ranges`` for values.
    ``reference``: "auto" (float64 where needed and possible, else the float32 original)
    or "float32" (always the float32 original). ``parsed``: ``original`` (a path) already
    parsed, handed over: nothing else may change it (e.g. a clone of the parse the passes
    change, which shares its immutable tensors and so costs no second copy of the weights),
    unless ``parsed_changes``: then ``parsed`` is the parse the passes go on to change in
    place, and the verifier takes from it now what a proof reads of the original
    (``number_original``; where that cannot be taken, a clone), parsing ``original`` again
    only if it needs more (samples). ``original_parse``: the file's protobuf parse that
    ``parsed`` was built from, left as the file holds it (``oir.load_keeping_parse``), handed
    over for that numbering's shape inference instead of a second parse of the file
    (dropped after it, read or not).
    ``task_metric``, ``task_margin``, ``task_target``, ``task_groups`` and
    ``task_min_sqnr_db``: how INT8 results are judged (``TaskJudge``'s metric, margin,
    metric_target, groups and min_sqnr_db).
    """

    def __init__(
        self,
        original: ModelRef,
        *,
        inputs: Iterable[Feeds] | Feeds | None = None,
        providers: Sequence[str] | None = None,
        input_shapes: Mapping[str, Sequence[int]] | None = None,
        input_ranges: Mapping[str, tuple[float, float]] | None = None,
        samples: int = DEFAULT_SAMPLES,
        seed: int = 0,
        tolerances: Mapping[Numerics, Tolerance] | None = None,
        progress: bool = False,
        reference: str = "auto",
        decode_steps: int = DECODE_STEPS,
        task_metric: str | UserMetric | Mapping[str, Any] | None = None,
        task_margin: float = DEFAULT_MARGIN,
        task_target: float | None = None,
        task_groups: Sequence[str] | None = None,
        task_min_sqnr_db: float = TOLERANCES["int8"].min_sqnr_db,
        parsed: ir.Model | None = None,
        parsed_changes: bool = False,
        original_parse: onnx.ModelProto | None = None,
    ) -> None:
        if reference not in REFERENCES:
            raise BadInputError(f"unknown reference '{reference}' (use {', '.join(REFERENCES)})")
        self.providers = resolve_providers(providers)
        self.tolerances = {**TOLERANCES, **(tolerances or {})}
        self.reference = reference
        self._progress = progress
        self._scratch_folder: tempfile.TemporaryDirectory | None = None  # made when a session needs one
        model = original if isinstance(original, ir.Model) else parsed if parsed is not None else oir.load(original)
        self._parsed: ir.Model | None = model  # the original, parsed (None: parse it again when needed)
        self._original_label = f"{oir.interface_float_type(model)} original"  # what the samples compare with
        self.original: Any = original if isinstance(original, (str, os.PathLike)) else model
        self._feeds: list[dict[str, np.ndarray]] | None = None
        self._generate: dict[str, Any] | None = None
        self._retried: str | None = None  # why the generated samples were made again, and how
        self._unvaried: str | None = None  # why no generated sample feeds varied defaults (the original's error)
        self._options = dict(providers=providers, input_shapes=input_shapes, input_ranges=input_ranges,
                             samples=samples, seed=seed, tolerances=tolerances, progress=progress,
                             reference=reference, decode_steps=decode_steps, task_metric=task_metric,
                             task_margin=task_margin, task_target=task_target, task_min_sqnr_db=task_min_sqnr_db)
        if inputs is None:
            self._generate = dict(shapes=input_shapes, samples=samples, seed=seed, ranges=input_ranges,
                                  decode_steps=decode_steps, last_batch=BATCH_SAMPLE)
            generate_inputs(model, **{**self._generate, "samples": 0})  # bad options raise now
        else:
            self._feeds = [dict(inputs)] if isinstance(inputs, Mapping) else [dict(f) for f in inputs]
            if not self._feeds:
                raise BadInputError("no verification inputs given (empty iterable)")
            for i, feeds in enumerate(self._feeds):
                check_feeds(model, feeds, label=f"verification sample {i}")
        self._premise: Premise | None = None  # the original numbered for the first proof
        # the file's parse handed over, for the first shape inference of the original (``_original_proto``)
        self._handed_parse = original_parse
        if parsed_changes and model is parsed and parsed is not None:
            if self._generate is not None:  # a proof runs only on generated samples
                self._premise = self._numbered(parsed)
            self._parsed = None if self._premise is not None else oir.clone(parsed)
        self._handed_parse = None  # unread by the numbering: not held while the passes run
        self._steps = decode_steps
        self._tokens: list[list[np.ndarray]] | None = None  # per sample, the original's greedy tokens
        # per provider and prompt, the original's greedy tokens ([rows, steps]) the next-token check is fed
        self._token_reference: dict[str, list[np.ndarray]] = {}
        self._apart: Verifier | None = None
        # the share of a lossy decoder's next tokens that accepts it (``held_apart``'s: a search's margin)
        self._agreement = NEXT_TOKEN_AGREEMENT
        # whether a decoder whose next tokens judge every output is judged by them alone (``held_apart``'s)
        self._tokens_alone = False
        # ``_default_build``'s verdicts by model content (``_digest``), shared with ``_apart``
        self._built: dict[str, DefaultBuild] = {}
        self._float32: dict[str, list[list[np.ndarray]]] | None = None
        self._task = dict(metric=task_metric, margin=task_margin, metric_target=task_target,
                          min_sqnr_db=task_min_sqnr_db)
        self._groups = None if task_groups is None else list(task_groups)
        self._judges: dict[tuple[str, tuple[int, ...]], TaskJudge] = {}  # by provider and positions
        self._judge_plans: dict[str, _JudgePlan] = {}
        self._alternate: dict[str, list[list[np.ndarray]] | None] = {}
        self._names: list[str] = []
        self._error: str | None = None
        self._float64: dict[tuple[int, ...], Float64Reference] = {}  # by the samples' positions
        # the INT8 candidates a pass had run (``outputs``), by digest and provider, the last asked about last
        self._kept: dict[tuple[str, str], _KeptOutputs] = {}
        # the last next-token check (``judges_by_tokens``): its model's content digest, numerics,
        # samples and whether a proof was allowed, and its verdict
        self._token_check: tuple[tuple[Any, ...], Verification] | None = None

    @property
    def _model(self) -> ir.Model:
        """The original, parsed: parsed again on first use where only the proof's numbering
        was taken from a parse the passes change."""
        if self._parsed is None:
            self._parsed = oir.load(self.original)
        return self._parsed

    def _numbered(self, parsed: ir.Model) -> Premise | None:
        """``parsed`` numbered for a proof (``number_original``), or None where it cannot be."""
        try:
            with oir.collector_paused():  # the numbering's tables all stay alive until the proof
                return number_original(parsed, original_proto=self._original_proto)
        except Exception:  # noqa: BLE001 - then a clone serves the proof
            return None

    def _original_source(self, provider: str) -> Any:
        """What the original's sessions on ``provider`` load: on the CPU, its parse where the
        verifier holds it and its weights come to ``HANDOVER_MIN_BYTES`` or more
        (``make_session`` hands them over in place: a session of the file would hold a copy
        of them beside the parse, twice their size while it loads); else the original as
        given (another provider would be handed a saved copy of the parse). Either way the
        same graph and weights run on the same kernels (pre-packing off)."""
        if provider == CPU and self._parsed is not None and oir.weight_bytes(self._parsed) >= HANDOVER_MIN_BYTES:
            return self._parsed
        return self.original

    @functools.cached_property
    def _plan(self) -> Any:
        return decode_plan(self._model) if self._steps > 1 else None

    @functools.cached_property
    def _stream(self) -> Any:
        return stream_plan(self._model) if self._plan is None else None

    @functools.cached_property
    def _resolution(self) -> dict[str, float]:
        return {v.name: bounded_resolution(v.producer().op_type if v.producer() else None)
                for v in self._model.graph.outputs}

    @property
    def feeds(self) -> list[dict[str, np.ndarray]]:
        """The samples: the user's, else generated on first use (a proof needs none)."""
        if self._feeds is None:
            self._feeds = self._generated()
        return self._feeds

    def _generated(self, **sizes: int) -> list[dict[str, np.ndarray]]:
        """Samples generated with ``sizes`` over the options given, the last of which also
        feeds every float graph input with a default a caller may replace a value off that
        default (``varied_defaults``), unless the original was found not to run on those."""
        samples = generate_inputs(self._model, **{**self._generate, **sizes})
        if samples and self._varied_defaults and self._unvaried is None:
            samples[-1] = {**samples[-1], **self._varied_defaults}
        return samples

    @functools.cached_property
    def _varied_defaults(self) -> dict[str, np.ndarray]:
        """What generated samples feed the original's float inputs with a default
        (``varied_defaults``); empty for the user's samples, which feed what they feed."""
        return {} if self._generate is None else varied_defaults(self._model, self._generate["seed"])

    @property
    def _scratch(self) -> tempfile.TemporaryDirectory:
        """A scratch folder for sessions that must save a model first (made on first use)."""
        if self._scratch_folder is None:
            self._scratch_folder = tempfile.TemporaryDirectory(prefix="optcc-verify-")
        return self._scratch_folder

    def close(self) -> None:
        if self._apart is not None:
            self._apart.close()
        if self._premise is not None:
            self._premise.release()
            self._premise = None
        if self._scratch_folder is not None:
            self._scratch_folder.cleanup()

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- references

    def _cases(self, session: Any, samples: Sequence[Feeds] | None = None,
               advance: Callable[[int], None] = lambda steps: None) -> list[list[np.ndarray]]:
        """A session's outputs on every sample (every decode step of every sample for a
        KV-cache decoder, fed the original's tokens once they are known); ``advance(1)``
        after each sample (a progress bar's)."""
        samples = self.feeds if samples is None else samples
        float16_inputs = float16_feedable(session)

        def run_one(feeds: Feeds) -> list[np.ndarray]:
            return run(session, _fit_float16(feeds, float16_inputs))

        names = [o.name for o in session.get_outputs()]
        cases: list[list[np.ndarray]] = []
        if self._stream is not None:  # each case: the first step's outputs, then the second's answers
            for feeds in samples:
                cases.append(streamed(run_one, names, self._stream, feeds))
                advance(1)
            return cases
        if self._plan is None:
            for feeds in samples:
                cases.append(run_one(feeds))
                advance(1)
            return cases
        tokens: list[list[np.ndarray]] = []
        for i, feeds in enumerate(samples):
            given = None if self._tokens is None else self._tokens[i]
            steps, chosen = run_decode(run_one, names, self._plan, feeds, steps=self._steps, tokens=given)
            cases.extend(steps)
            tokens.append(chosen)
            advance(1)
        if self._tokens is None:
            self._tokens = tokens
        return cases

    def _float32_outputs(self) -> dict[str, list[list[np.ndarray]]] | None:
        """The original's outputs per provider and case (None when it cannot run). Generated
        samples the original cannot run are generated again with batch 1, then with the
        sizes of ``RETRY_SIZES`` in turn (module docstring), and that is said in ``notes``."""
        if self._float32 is None and self._error is None:
            try:
                return self._run_with_retries()
            except UngeneratedInputError as error:  # no samples but the user's can feed it: a proof may pass
                self._float32, self._error = None, f"no samples can be generated for the original: {error}"
            finally:
                release_memory()  # the original's sessions, gone before a candidate's is built
        return self._float32

    def _run_with_retries(self) -> dict[str, list[list[np.ndarray]]] | None:
        """``_float32_outputs`` without its guard: the original run, retried at larger sizes
        on generated samples."""
        error, loaded = self._run_generated()
        where = ""
        if loaded and error is not None and self._generate is not None:
            tried = {_shapes(self.feeds)}
            retry_error = failed = error  # failed: the last error met, the one the retry that runs answers
            for sizes in _RETRIES:
                feeds = self._generated(**sizes)
                if _shapes(feeds) in tried:  # no batch axis to size: the same shapes fail the same way
                    continue
                tried.add(_shapes(feeds))
                self._feeds = feeds
                retry_error, _ = self._run_generated(sizes)
                if retry_error is None:
                    break
                failed = retry_error
            if retry_error is None:  # a batch sample as long as the others is no weaker: no note
                self._retried = None if "last_dynamic_dim" in sizes else _retried_text(sizes, error, failed)
                error = None
            else:
                where = " on generated inputs (give samples that fit with --inputs, or sizes with --input-shape)"
                error = retry_error
        if error is not None:
            self._float32 = None
            self._error = f"onnxruntime cannot run the original model{where}: {error}"
        return self._float32

    def _run_generated(self, sizes: Mapping[str, int] | None = None) -> tuple[str | None, bool]:
        """``_run_original``; where it fails on a last sample that feeds varied defaults, the
        same samples again with the defaults (``sizes``: those they were generated with): when
        the original runs on those, no generated sample varies the defaults from then on,
        and ``notes`` says why."""
        error, loaded = self._run_original()
        if error is None or not loaded or self._generate is None or not self._varied_defaults \
                or self._unvaried is not None:
            return error, loaded
        varied = self._feeds
        self._unvaried = error
        self._feeds = self._generated(**(sizes or {}))
        plain, loaded = self._run_original()
        if plain is not None:  # not the varied defaults: the samples fail either way
            self._unvaried, self._feeds = None, varied
        return (None if plain is None else error), loaded

    def _session(self, source: Any, provider: str, **options: Any) -> Any:
        """A session that runs ``source`` as the module docstring says every verification
        session runs: graph optimizations and pre-packing off, unless ``options`` ask."""
        return make_session(source, provider, scratch=self._scratch.name,
                            options=session_options(**{"prepack": False, **options}))

    def _run_original(self) -> tuple[str | None, bool]:
        """Run the original on every provider and sample into ``_float32``: why not, in one
        line (None when it ran), and whether its sessions loaded."""
        self._float32 = {}
        with Progress(REFERENCE_PHASE, len(self.providers) * len(self.feeds), enabled=self._progress) as bar:
            for provider in self.providers:
                try:
                    session = self._session(self._original_source(provider), provider)
                except Exception as e:  # noqa: BLE001 - anything onnxruntime raises
                    return first_line(e), False
                try:
                    self._names = [o.name for o in session.get_outputs()]
                    self._float32[provider] = self._cases(session, advance=bar.advance)
                except UngeneratedInputError:
                    raise  # no run can have samples: not a failure of the original's
                except Exception as e:  # noqa: BLE001
                    return first_line(e), True
        return None, True

    def _alternate_outputs(self, provider: str) -> list[list[np.ndarray]] | None:
        """The original's outputs with onnxruntime's basic optimizations (None: cannot run)."""
        if provider not in self._alternate:
            try:
                session = self._session(self._original_source(provider), provider, optimize=True)
                self._alternate[provider] = self._cases(session)
            except Exception:  # noqa: BLE001 - then the as-written evaluation alone counts
                self._alternate[provider] = None
        return self._alternate[provider]

    def _by_name(self, cases: Sequence[Sequence[np.ndarray]]) -> dict[str, list[np.ndarray]]:
        names = self._names if self._stream is None else stream_names(self._names, self._stream)
        return {name: [case[i] for case in cases] for i, name in enumerate(names)}

    def _judged(self, cases: Sequence[Sequence[np.ndarray]]) -> dict[str, list[np.ndarray]]:
        """The outputs the task judge sees: all but a decoder's caches, which are its state,
        not its answer (each decode step feeds a model its own, so their errors are judged
        where they show: in the later steps' logits)."""
        state = self._plan.state_outputs if self._plan is not None else frozenset()
        return {name: values for name, values in self._by_name(cases).items() if name not in state}

    def task_judge(self, provider: str, positions: Sequence[int] | None = None) -> TaskJudge:
        """The judge of INT8 results on ``provider`` over the samples at ``positions`` (by
        position in ``feeds``; all of them by default): the original's outputs there, and its
        outputs on them perturbed at their resolution (the noise floor). Its rows' metrics
        are chosen from every sample's outputs and each sample is perturbed as among all of
        them (draw ``d`` of sample ``i`` seeded by ``i``, then ``(i, d)``), so the judge of
        some samples is the judge of all of them ``select``ed to those. The perturbed
        original runs on a sample the first time a judge holding it needs its floor
        (``DeferredOutputs``; none when every judgement passes whatever the floor): a judge
        of the held-out samples runs none of the others (a KV-cache decoder's judge holds
        every sample: its rows are decode steps)."""
        every = list(range(len(self.feeds)))
        positions = every if positions is None or self._plan is not None else list(positions)
        key = (provider, tuple(positions))
        if key not in self._judges:
            shared = self._judge_plan(provider)
            session = None

            def cases(draw: int) -> list[list[np.ndarray]]:
                """The original's cases on the samples at ``positions`` perturbed by ``draw``;
                where that draw moves no input, its cases on ``self.feeds`` (the same session
                options and inputs)."""
                nonlocal session
                float32 = self._float32_outputs()
                assert float32 is not None
                if shared.unmoved[draw]:
                    return float32[provider] if self._plan is not None else [float32[provider][p] for p in positions]
                kept = shared.perturbed[draw]
                missing = [p for p in positions if p not in kept]
                if missing:
                    (moved,), _ = perturbation_draws(self.feeds, draw + 1, first=draw, at=missing, **shared.moving)
                    if session is None:
                        session = self._session(self._original_source(provider), provider)
                    with Progress(FLOOR_PHASE, len(missing), enabled=self._progress) as bar:
                        ran = self._cases(session, moved, bar.advance)
                    if self._plan is not None:  # decode steps, not samples: never kept by position
                        return ran
                    kept.update(zip(missing, ran))
                return [kept[p] for p in positions]

            masks = None if shared.masks is None else [shared.masks[p] for p in positions]
            groups = None if self._groups is None or self._plan is not None else [self._groups[p] for p in positions]
            reference = shared.reference if positions == every else \
                {name: [values[p] for p in positions] for name, values in shared.reference.items()}
            def floor_draw(draw: int) -> DeferredOutputs:  # run when a judgement first needs the floor
                return DeferredOutputs(lambda: self._judged(cases(draw)))

            self._judges[key] = TaskJudge(
                reference, floor_draw(0), perturbation=shared.how, masks=masks, groups=groups,
                draws=[floor_draw(d) for d in range(1, len(shared.unmoved))], rows=shared.rows,
                reasons=shared.reasons, sequences=shared.sequences, heads=shared.heads, exact=shared.exact,
                state=shared.state, tokens=shared.tokens, recurrent=shared.recurrent, **self._task)
        return self._judges[key]

    def _judge_plan(self, provider: str) -> _JudgePlan:
        """What every task judge on ``provider`` shares (``_JudgePlan``), made once."""
        if provider not in self._judge_plans:
            float32 = self._float32_outputs()
            assert float32 is not None
            roles = input_roles(self._model)
            moving = perturbation_roles(roles)
            # a fed default moves by one ulp, whatever its shape (a weight's could pass for an image's)
            moving["not_images"] |= {v.name for v in oir.overridable_inputs(self._model)}
            reference = self._judged(float32[provider])
            groups = self._groups if self._plan is None else None
            fields = dict(sequences=sequence_outputs(self._model), heads=projected_outputs(self._model),
                          exact=float_free_outputs(self._model), recurrent=recurrent_outputs(self._model),
                          state=self._stream.state_outputs if self._stream is not None else (),
                          tokens=token_outputs(self._model, self.feeds, reference) if self._plan is None else {})
            rows, reasons = row_choices(reference, self._task["metric"], groups=groups, **fields)
            # float32's own errors excused, or a mean floor: more draws
            draws = FLOOR_DRAWS if self._plan is None and wants_draws(rows) else 1
            moved, how = perturbation_draws(self.feeds, 1, **moving)  # how each input moves, from every sample
            # per draw, whether it moves no input: the runs perturb each sample again when they need it
            still = [unmoved(self.feeds, moved[0]), *(moves_nothing(self.feeds, d, **moving) for d in range(1, draws))]
            del moved
            masks = None
            mask_names = [n for n, role in roles.items() if role == "mask"]
            if mask_names and self._plan is None:
                masks = [f.get(mask_names[0]) for f in self.feeds]
            self._judge_plans[provider] = _JudgePlan(
                reference, rows, reasons, moving, how, still, masks, [{} for _ in still], **fields)
        return self._judge_plans[provider]

    def sample_judge(self, provider: str = "CPUExecutionProvider",
                     positions: Sequence[int] | None = None) -> TaskJudge | None:
        """The task judge on ``provider`` with one row per sample of ``feeds`` at ``positions``
        (all of them by default), in order (what a pass judging the same samples can share:
        ``Int8Options.judge`` on the CPU, ``ConvertFloat16Pass(judge=...)`` per provider;
        ``task_judge``); None for a KV-cache decoder (a row per decode step), for a provider
        not verified on, or when the original cannot run."""
        if self._plan is not None or provider not in self.providers or self._float32_outputs() is None:
            return None
        return self.task_judge(provider, positions)

    def float64_reference(self, positions: Sequence[int]) -> Float64Reference:
        """The original's float64 outputs on the samples at ``positions`` (by position in
        ``feeds``, in that order), or why not. Built once per set of positions: its work
        budget counts those samples alone."""
        key = tuple(positions)
        if key not in self._float64:
            original, reason = self._float64_original
            if original is None:
                self._float64[key] = Float64Reference(None, None, reason)
            else:
                with Progress(FLOAT64_PHASE, len(key), enabled=self._progress) as bar:
                    self._float64[key] = Float64Reference.build(original, [self.feeds[i] for i in key],
                                                                advance=bar.advance)
        return self._float64[key]

    @functools.cached_property
    def _float64_original(self) -> tuple[onnx.ModelProto | None, str | None]:
        """The original serialized and checked for a float64 reference, or why no set of
        samples can have one; shared by every set."""
        if self.reference == "float32":
            return None, "float32 reference requested"
        if self._plan is not None:
            return None, f"{self._steps}-step decode of a KV-cache decoder"
        if oir.weight_bytes(self._model) > MAX_REFERENCE_BYTES // 2:
            return None, "weights too large to hold in float64"
        try:
            proto = oir.serialize(self._model)
            onnx.checker.check_model(proto, full_check=False)
        except Exception as e:  # noqa: BLE001
            return None, f"cannot serialize the original: {first_line(e)}"
        return proto, None

    # ----------------------------------------------------------------- checking

    def check(self, model: ir.Model, numerics: Numerics = "exact", samples: Sequence[int] | None = None,
              *, serialized: Serialized | None = None, prove: bool = True) -> Verification:
        """Compare ``model`` with the reference on every provider and sample. ``samples``:
        positions in ``feeds`` to compare on alone, where the tolerance judges each sample
        by itself (a maximum relative error, no decode: a bisection's check on the samples
        that failed); elsewhere every sample runs. ``serialized``: ``model``'s bytes when the
        caller has them (``Serialized``), used instead of serializing it again. ``prove``:
        False runs the samples whatever a proof would say (a comparison that reports every
        output's numbers).

        A lossy decoder's check (``judges_by_tokens``) of the model the previous such check
        judged, with the same numerics, is that check's verification: its prompts, steps,
        threshold are this verifier's, the model is the same when its ``content_digest`` is,
        and ``samples`` and ``prove`` must be the same (a search's confirmation of its choice
        and the verification of the result that choice wrote run its decodes once)."""
        try:
            if not self.judges_by_tokens(numerics):
                return self._check(model, numerics, samples, serialized=serialized, prove=prove)
            key = (content_digest(model), numerics, None if samples is None else tuple(samples), prove)
            if self._token_check is None or self._token_check[0] != key:
                self._token_check = (key, self._check(model, numerics, samples, serialized=serialized, prove=prove))
            return self._token_check[1]
        finally:
            release_memory()  # the sessions it built are gone: their freed heap goes back to the system

    @property
    def _output_names(self) -> list[str]:
        """The original's output names, as a session of it lists them."""
        return [v.name for v in self._model.graph.outputs]

    def judges_by_tokens(self, numerics: Numerics) -> bool:
        """Whether ``check`` judges a ``numerics`` result by its next tokens: a lossy result
        of a KV-cache decoder with its default tolerance and no task metric of the user's
        (its logits and the cache it feeds back; any other output keeps its tolerance)."""
        return numerics in ("fp16", "int8") and self.tolerances[numerics] == TOLERANCES[numerics] \
            and self._task["metric"] in (None, "auto") and self._plan is not None

    def _by_tokens_alone(self, numerics: Numerics) -> bool:
        """Whether ``check`` judges a ``numerics`` result by its next tokens alone: a search's
        check of a decoder every output of which its next tokens judge (no verification
        samples run to be compared: their metrics would decide nothing)."""
        return self._tokens_alone and self.judges_by_tokens(numerics) and self._plan is not None \
            and {v.name for v in self._model.graph.outputs} <= {self._plan.logits, *self._plan.state_outputs}

    def _check(self, model: ir.Model, numerics: Numerics, samples: Sequence[int] | None, *,
               serialized: Serialized | None, prove: bool) -> Verification:
        """``check`` itself: the proof or the samples, without reusing a decoder's last
        next-token verdict."""
        tolerance = self.tolerances[numerics]
        if prove and not self.user_samples:  # the user's samples always run
            proved = self.prove(model, numerics, serialized=serialized)
            if proved is not None:
                return proved
        whole = serialized is not None and not serialized.aside
        source = serialized.data if whole else self._source(model)
        tokens_alone = self._by_tokens_alone(numerics)
        float32 = {provider: [] for provider in self.providers} if tokens_alone else self._float32_outputs()
        base = dict(numerics=numerics, tolerance=tolerance, providers=self.providers, samples=len(self._feeds or []),
                    decode_steps=self._steps if self._plan is not None else None)
        if float32 is None:
            return Verification(status="skipped", outputs=[], reason=self._error, **base)
        # the user's samples say nothing here: a proof still holds on every input
        if not tokens_alone and self._compares_nothing:
            proved = self.prove(model, numerics, serialized=serialized) if self.user_samples and prove else None
            if proved is not None:
                return dataclasses.replace(proved, notes=[*proved.notes, self._compares_nothing])
            return Verification(status="skipped", outputs=[], reason=self._compares_nothing, **base)
        # the tokens judge a lossy decoder's logits and cache; any other output keeps its tolerance
        # (without the argmax rule, which reads class scores: the tokens judge those)
        by_tokens = self.judges_by_tokens(numerics)
        by_task = numerics == "int8" and tolerance == TOLERANCES["int8"] and not by_tokens
        token_judged = {self._plan.logits, *self._plan.state_outputs} if by_tokens and self._plan is not None \
            else set()
        others = dataclasses.replace(tolerance, min_argmax_agreement=None)
        if token_judged:
            base["token_judged"] = tuple(name for name in self._output_names if name in token_judged)
        # fp16 with its default tolerance, on the user's samples: an output failing the SQNR rule
        # may be accepted by the task (``optcc.numerics.float16``); not over a decode's steps
        # (the pass cannot share that judge), nor on generated inputs (no user's task)
        float16_task = numerics == "fp16" and tolerance == TOLERANCES["fp16"] and self._plan is None \
            and self._generate is None
        if by_task or by_tokens:
            tolerance = Tolerance()  # metrics reported; the task judge or the tokens decide
        positions = list(range(len(self.feeds)))
        if samples and self._plan is None and tolerance == Tolerance(max_rel=tolerance.max_rel) \
                and tolerance.max_rel is not None:
            positions = sorted({i for i in samples if 0 <= i < len(self.feeds)}) or positions
            base["samples"] = len(positions)
        feeds = [self.feeds[i] for i in positions]
        # float64 judges max-rel tolerances (rewrites exact in real arithmetic) where the float32
        # original cannot; SQNR-type tolerances measure the loss a lossy conversion adds to it
        precise = tolerance.max_rel is not None and numerics != "exact" and not by_task
        references: set[str] = set()
        reference = self._original_label
        if by_task:
            reference += ", judged by the task against its noise floor"
        if by_tokens:
            reference += f", judged by its next tokens over {self._token_steps} steps per prompt"
        verdicts: dict[str, Any] = {}
        next_token: dict[str, dict[str, Any]] = {}
        free: dict[str, dict[str, Any]] = {}
        metrics: list[OutputMetrics] = []
        if by_tokens:
            try:  # the original's own decode on every provider, before any is judged: where it cannot
                # run, nothing judges the candidate (and no provider's verdict is dropped for it); its
                # first prompt now, the others once a candidate's decode reaches them
                for provider in self.providers:
                    self._reference_tokens(provider, 1)
            except _OriginalDecodeError as e:
                return Verification(status="skipped", outputs=[], reason=self._reference_failed(e),
                                    reference=reference, **base)
        with Progress("verifying", len(self.providers) * len(feeds), enabled=self._progress) as bar:
            for provider in self.providers:
                session = None
                kept = self._kept_cases(model, source, provider, positions) if numerics == "int8" else None
                if kept is not None:  # a pass had this very model run on these samples (``outputs``)
                    candidate_names, got_all = kept
                else:
                    try:
                        session = self._candidate_session(source, provider, numerics)
                    except Exception as e:  # noqa: BLE001
                        reason = f"onnxruntime cannot load the optimized model: {first_line(e)}"
                        return Verification(status="failed", outputs=metrics, reason=reason, reference=reference,
                                            unloadable=True, **base)
                    candidate_names = [o.name for o in session.get_outputs()]
                if candidate_names != (self._names or self._output_names):
                    reason = f"outputs {candidate_names} != original {self._names or self._output_names}"
                    return Verification(status="failed", outputs=metrics, reason=reason, reference=reference, **base)
                if session is not None and not tokens_alone:
                    try:
                        got_all = self._cases(session, feeds, bar.advance)
                    except Exception as e:  # noqa: BLE001
                        reason = f"onnxruntime cannot run the optimized model: {first_line(e)}"
                        return Verification(status="failed", outputs=metrics, reason=reason, reference=reference,
                                            **base)
                else:
                    bar.advance(len(feeds))  # run before, by the pass
                if by_tokens:
                    assert session is not None  # a decoder's outputs are never kept (``_kept_cases``)
                    # held by ``candidate`` alone, which ``_next_tokens`` may drop (and build again)
                    candidate = _CandidateSession(lambda: self._candidate_session(source, provider, numerics), session)
                    session = None
                    try:
                        next_token[provider], free_run = self._next_tokens(candidate, provider)
                        if free_run is not None:
                            free[provider] = free_run
                    except _OriginalDecodeError as e:
                        # an earlier provider's failure stands: nothing judging this one drops it
                        failed = [p for p, verdict in next_token.items() if not verdict["passed"]]
                        if failed or not all(m.passed for m in metrics):
                            reason = (f"changed the numerics on {', '.join(failed) or 'an earlier provider'}; on "
                                      f"{provider}, {self._reference_failed(e)}")
                            return Verification(status="failed", outputs=metrics, reason=reason,
                                                reference=reference, **base)
                        return Verification(status="skipped", outputs=[], reason=self._reference_failed(e),
                                            reference=reference, **base)
                    except Exception as e:  # noqa: BLE001
                        reason = f"the optimized model's next-token decode does not run: {first_line(e)}"
                        return Verification(status="failed", outputs=metrics, reason=reason, reference=reference,
                                            **base)
                    finally:
                        candidate.drop()
                if tokens_alone:
                    continue
                if numerics in ("fp16", "int8"):
                    got_all = [widen_float16(outs, float32[provider][0]) for outs in got_all]
                labelled: set[str] = set()  # integer outputs the task judges by their rows: not compared exactly
                if by_task:
                    judge = self.task_judge(provider)
                    verdicts[provider] = judge(self._judged(got_all))
                    labelled = judge.labelled_outputs()
                compared: list[OutputMetrics] = []
                firsts = []  # per output: its metrics against the float32 original, and what they compared
                for index, name in enumerate(self._names):
                    resolution = 0.0 if numerics == "exact" else self._resolution.get(name, 0.0)
                    originals = [float32[provider][i][index] for i in positions]
                    gots = [outs[index] for outs in got_all]
                    judged = dataclasses.replace(tolerance, exact_integers=False) if name in labelled else \
                        others if by_tokens and name not in token_judged else tolerance
                    first = compare_outputs(name, provider, originals, gots, judged, resolution=resolution)
                    beyond = precise and bool(first.elements_over) and originals[0].dtype.kind == "f"
                    firsts.append((first, beyond, originals, gots, judged, resolution))
                # the samples a float output is beyond the tolerance on: the only ones judged again
                again = sorted({positions[j] for first, beyond, *_ in firsts if beyond for j in first.samples_over})
                for index, (first, beyond, originals, gots, judged, resolution) in enumerate(firsts):
                    result, used = first, self._original_label
                    if beyond:
                        result, used = self._judge_again(first, index, provider, originals, gots, judged,
                                                         resolution, positions, again)
                    references.add(used)
                    compared.append(dataclasses.replace(
                        result, samples_over=tuple(positions[j] for j in result.samples_over)))
                if float16_task:
                    compared, verdict = accept_float16(compared, lambda: self.sample_judge(provider),
                                                       self._judged(got_all))
                    if verdict is not None:
                        verdicts[provider] = verdict
                metrics.extend(compared)
        if by_task and verdicts and not any(self.task_judge(provider).floor_measured for provider in verdicts):
            reference = f"{self._original_label}, judged by the task (every output's SQNR meets its target, " \
                        "which no noise floor can fail: the floor is not measured)"
        if by_task and verdicts:
            reference += f"; {chosen_text(verdicts[next(iter(verdicts))])}"
        if references - {self._original_label}:
            reference = "; ".join(sorted(references - {self._original_label}))
        weak = self._weak_outputs() if any(not m.passed for m in metrics) else {}
        problems = [f"'{m.name}' on {m.provider}: {m.problem}"
                    + (f" (the output {weak[m.name]}: give {self._telling_samples})" if m.name in weak else "")
                    for m in metrics if not m.passed]
        chosen: dict[str, str] = {}  # the failed rows' metrics and why they were chosen, said once
        for provider, verdict in verdicts.items() if by_task else ():  # fp16: the task only accepts
            failed = [row for row, value in verdict["metrics"].items() if value.get("passed") is False]
            problems += [f"'{row}' on {provider}: {_task_problem(verdict['metrics'][row])}" for row in failed]
            keys = {row.rpartition(":")[0] for row in failed}
            chosen.update((key, _chosen_words(key, c)) for key, c in (verdict.get("chosen") or {}).items()
                          if key in keys)
        if chosen:
            problems.append(f"judged {'; '.join(chosen.values())}")
        problems += [next_token_text(provider, run_) for provider, run_ in next_token.items() if not run_["passed"]]
        unbuilt = None
        if not problems and numerics in CONVERTED:  # passed as run here: does a user's session build it?
            built = self._default_build(model, source)
            if built.unchecked is not None:
                warnings.warn(f"not checked that a user's session builds the result: {built.unchecked}",
                              PipelineWarning, stacklevel=2)
            unbuilt = built.problem
            if unbuilt is not None:
                problems.append(unbuilt)
        status = "failed" if problems else "passed"
        return Verification(status=status, outputs=metrics, reason="; ".join(problems) or None, reference=reference,
                            task=verdicts.get(self.providers[0]),
                            task_by_provider=verdicts if len(verdicts) > 1 or set(verdicts) - {self.providers[0]}
                            else None,
                            notes=[] if tokens_alone else self.notes() + (_few_items(verdicts.get(self.providers[0]),
                                                             generated=not self.user_samples) if by_task else []),
                            next_token=next_token or None, free_running=free or None,
                            unloadable=unbuilt is not None, **base)

    @property
    def user_samples(self) -> bool:
        """Whether the samples are the user's: ``check`` then runs them on every model."""
        return self._generate is None

    def generated_samples(self) -> list[dict[str, np.ndarray]] | None:
        """The generated samples ``check`` compares on, as made again for the original to run
        (which runs it, as the first ``check`` would); None for the user's samples, or when
        the original cannot run any."""
        if self.user_samples or self._float32_outputs() is None:
            return None
        return self.feeds

    def prove(self, model: ir.Model, numerics: Numerics = "exact", *,
              serialized: Serialized | None = None) -> Verification | None:
        """A pass by proof, whoever gave the samples: every output of ``model`` proved to be
        the original's computation and onnxruntime loading it (a failed verification when it
        cannot); None when ``numerics`` is looser than "fusion" or nothing is proved. A proof
        holds on every input, so it serves a model that is only a step on the way (the float
        passes' result that a float16 or INT8 step changes further); ``check`` proves only
        with generated samples, as the user's own samples always run on what is written."""
        if numerics not in ("exact", "fusion"):
            return None
        return self._proved(model, numerics, self.tolerances[numerics], serialized)

    def _candidate_session(self, source: Any, provider: str, numerics: Numerics) -> Any:
        """The session ``check`` runs a ``numerics`` candidate (``source``: ``_source``'s) in."""
        # a lossy candidate's kernels may widen its stored weights on every run (float16
        # on CPU, dequantized weights): without the arena that memory is returned
        # an INT8 candidate runs as its users run it: onnxruntime fuses its QDQ pairs
        # into the integer kernels the INT8 pass judged (``optcc.quant.fallback``)
        as_users_run = {"optimize": "all", "prepack": True} if numerics == "int8" else {}
        session = self._session(source, provider, arena=numerics in ("exact", "fusion"), **as_users_run)
        if isinstance(source, ir.Model):
            # a large model's weights were handed over: the heap its build freed (the copies
            # its graph optimizations and pre-packing worked from) goes back to the system
            # before the runs add theirs
            release_memory()
        return session

    def outputs(self, model: ir.Model, positions: Sequence[int], provider: str = CPU,
                stop: Callable[[Mapping[str, Sequence[np.ndarray]]], bool] | None = None,
                ) -> dict[str, list[np.ndarray]]:
        """An INT8 candidate's outputs by name on the samples at ``positions`` (in ``feeds``),
        run as ``check`` runs it (``RefusedModel`` when onnxruntime refuses to build its
        session; what it raises running one, as raised). The models asked about keep their
        outputs, by their digest (``_digest``), until the next INT8 check on ``provider``, which
        uses them when it judges one of those very models: a pass that judges its result on the
        verifier's samples (the INT8 pass's confirmation, of a model its search measured before
        others) and the verification of that result run it once on each sample. The outputs kept
        of the models before the last come to no more bytes than the last one's or
        ``KEPT_OUTPUT_BYTES``, whichever is more (the oldest dropped first): at most twice the
        memory of keeping the last alone, or that many bytes beside it. Small outputs (a
        score, a class vector) of every model a search judged are kept, so a later
        judgement of an earlier candidate (the fastest of those that met the target) runs it
        on no sample again. Not for a KV-cache decoder. ``stop``: asked, after each sample
        run, with the outputs on ``positions`` so far (a first part of them, by name): True
        runs no more, and those are returned."""
        source = self._source(model)  # serialized once: its bytes identify the model too
        key = (_digest(model, source), provider)
        kept = self._kept.pop(key, None) or _KeptOutputs(key[0], provider, [], {})
        self._kept[key] = kept  # the last asked about, last
        missing = [p for p in dict.fromkeys(positions) if p not in kept.cases]
        ran = len(positions)  # how many of ``positions`` have their outputs
        if missing:
            with building_session():  # a model onnxruntime refuses, told apart from one that fails to run
                session = self._candidate_session(source, provider, "int8")
            kept.names = [o.name for o in session.get_outputs()]
            if stop is None or self._plan is not None:  # a decoder's samples run together (their tokens)
                for position, outs in zip(missing, self._cases(session, [self.feeds[p] for p in missing])):
                    kept.cases[position] = outs
            else:
                for ran, position in enumerate(positions, 1):
                    if position in kept.cases:
                        continue
                    kept.cases[position] = self._cases(session, [self.feeds[position]])[0]
                    if ran < len(positions) and stop(self._named(kept, positions[:ran])):
                        break
            del session
            release_memory()
        held = sum(k.nbytes() for k in self._kept.values()) - kept.nbytes()
        allowed = max(kept.nbytes(), KEPT_OUTPUT_BYTES)
        for older in list(self._kept):
            if held <= allowed or older == key:
                break
            held -= self._kept.pop(older).nbytes()
        return self._named(kept, positions[:ran])

    def _named(self, kept: _KeptOutputs, positions: Sequence[int]) -> dict[str, list[np.ndarray]]:
        """``kept``'s outputs on ``positions``, by name (a streaming model's answers too)."""
        names = kept.names if self._stream is None else stream_names(kept.names, self._stream)
        return {name: [kept.cases[p][i] for p in positions] for i, name in enumerate(names)}

    def _kept_cases(self, model: ir.Model, source: Any, provider: str,
                    positions: Sequence[int]) -> tuple[list[str], list[list[np.ndarray]]] | None:
        """``model``'s output names and cases at ``positions`` on ``provider`` when ``outputs``
        kept them all for this very model; else None. What was kept for ``provider`` is
        released: an INT8 check is the last use of the outputs a pass had made for it."""
        kept = [k for k in self._kept.values() if k.provider == provider]
        if not kept:
            return None
        self._kept = {key: k for key, k in self._kept.items() if k.provider != provider}
        if self._plan is not None:
            return None
        whole = [k for k in kept if all(p in k.cases for p in positions)]
        digest = _digest(model, source) if whole else None
        found = next((k for k in whole if k.digest == digest), None)
        if found is None:
            return None
        return found.names, [found.cases[p] for p in positions]

    def _next_tokens(self, session: _CandidateSession,
                     provider: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The candidate's argmax at each step from each prompt, fed the original's greedy
        tokens on ``provider`` (decoded once: the first prompt, then the others once a
        candidate reaches the second; the candidate's ``session`` is dropped while they
        decode and built again, so that no two sessions are alive at once),
        against them over ``NEXT_TOKEN_STEPS`` steps each (``next_token_agreement``), and its
        own free-running decode's agreement over the same prompts (``free_agreement``;
        reported). It stops at the step where more steps differ than the agreement asked for
        (``NEXT_TOKEN_AGREEMENT``, ``held_apart``'s more) allows of them all: it fails whatever
        the steps left show, ``stopped`` says where, and no free-running decode runs (None).
        ``_OriginalDecodeError`` where the original's own decode of a prompt cannot run."""
        prompts = self.next_token_feeds
        candidate = _feeding(session.get())
        total = self._token_steps * sum(_rows(feeds, self._plan) for feeds in prompts)
        allowed = math.floor((1 - self._agreement) * total)  # more differing steps than this fail
        forced: list[np.ndarray] = []
        differing = 0
        for index, feeds in enumerate(prompts):
            # the first prompt's reference alone at first (a candidate that fails there needs no
            # more); every other prompt's at once, in one session of the original, once it is reached
            if index == 1 and len(self._token_reference.get(provider, ())) < len(prompts):
                candidate = None
                session.drop()
                release_memory()  # the candidate's session, gone before the original's is built
                self._reference_tokens(provider, len(prompts))
                candidate = _feeding(session.get())
            want = self._reference_tokens(provider, 1 if index == 0 else len(prompts))[index]
            forced.append(forced_tokens(candidate, self._names, self._plan, feeds, want, allowed - differing))
            differing += int((forced[-1] != want[:, :forced[-1].shape[1]]).sum())
            if differing > allowed:
                reference = self._reference_tokens(provider, index + 1)
                verdict = next_token_agreement(reference, forced, self._agreement)
                done = forced[-1].shape[1]
                if index + 1 < len(prompts) or done < want.shape[1]:
                    at = f"step {done} of {want.shape[1]} of prompt {index + 1}" if done < want.shape[1] \
                        else f"{index + 1}"
                    verdict["stopped"] = (f"after {at} of {len(prompts)} prompts: {differing} of all "
                                          f"{total} steps differ, more than the {allowed} allowed")
                return verdict, None
        reference = self._reference_tokens(provider, len(prompts))
        # until a row's first differing step its free-running decode is the forced one: where no
        # step differs, it is the original's tokens without running it
        free = [want if np.array_equal(got, want)
                else greedy_tokens(candidate, self._names, self._plan, feeds, self._token_steps)
                for feeds, want, got in zip(prompts, reference, forced)]
        return next_token_agreement(reference, forced, self._agreement), free_agreement(reference, free)

    def _reference_tokens(self, provider: str, count: int) -> list[np.ndarray]:
        """The original's greedy tokens on ``provider`` from the first ``count`` of
        ``next_token_feeds`` ([rows, steps] each), each prompt decoded once (one session of
        the original for those decoded in one call); ``_OriginalDecodeError`` from what
        onnxruntime raises where it cannot."""
        decoded = self._token_reference.setdefault(provider, [])
        if len(decoded) < count:
            try:
                session = self._session(self._original_source(provider), provider)
                self._names = self._names or [o.name for o in session.get_outputs()]
                original = _feeding(session)
                for feeds in self.next_token_feeds[len(decoded):count]:
                    decoded.append(greedy_tokens(original, self._names, self._plan, feeds, self._token_steps))
            except Exception as e:  # noqa: BLE001 - anything onnxruntime raises
                raise _OriginalDecodeError(first_line(e)) from e
            finally:
                session = original = None
                release_memory()  # the original's session, gone before a candidate's is built
        return decoded[:count]

    def decode_prompts(self, numerics: Numerics = "int8") -> None:
        """The original's next-token decode of every prompt on every provider, run now, and
        its outputs on the verification's samples where ``check`` compares them (a lossy
        decoder's check starts from both): a caller about to make large arrays has them run
        first, so that the original's weights and those are never held at once (the
        original's session of a later decode would be built beside a candidate's weights,
        alive while its session is dropped). Only the tokens and outputs are kept. Nothing
        for a model whose ``numerics`` result is not judged by its next tokens; an error is
        left to the check."""
        if not self.judges_by_tokens(numerics):
            return
        for provider in self.providers:
            try:
                self._reference_tokens(provider, len(self.next_token_feeds))
            except _OriginalDecodeError:
                return
        if not self._by_tokens_alone(numerics):
            self._float32_outputs()

    def _reference_failed(self, error: _OriginalDecodeError) -> str:
        """Why nothing judges a candidate by its next tokens: the original's decode fails."""
        return (f"onnxruntime cannot run the original's next-token decode ({self._token_steps} "
                f"steps per prompt): {error}")

    @functools.cached_property
    def _token_steps(self) -> int:
        """``NEXT_TOKEN_STEPS``, or fewer where the position table leaves room for fewer
        from some prompt (``decode_room``)."""
        rooms = [room for feeds in self.next_token_feeds if (room := decode_room(self._model, feeds)) is not None]
        return max(1, min([NEXT_TOKEN_STEPS, *rooms]))

    @functools.cached_property
    def next_token_feeds(self) -> list[dict[str, np.ndarray]]:
        """The prompts a lossy decoder's next-token decode starts from: the user's samples,
        else ``NEXT_TOKEN_PROMPTS`` generated from the verifier's seed: each
        ``NEXT_TOKEN_PROMPT_LENGTH`` random token ids (the last sample ``BATCH_SAMPLE`` rows
        of half as many) from an empty cache, with room for ``NEXT_TOKEN_STEPS`` steps
        (shorter where the position table is shorter: then as many steps as it holds)."""
        if self._generate is None:
            return self.feeds
        return generate_inputs(self._model, **{**self._generate, "samples": NEXT_TOKEN_PROMPTS,
                                               "decode_steps": NEXT_TOKEN_STEPS, "past_length": 0,
                                               "dynamic_dim": NEXT_TOKEN_PROMPT_LENGTH})

    def held_apart(self) -> Verifier:
        """A verifier of the same original and options on other samples, for a search whose
        result this verifier judges: for a KV-cache decoder, generated samples of another
        seed (prompts apart from this verifier's; the user's samples stay this verifier's
        alone, so its check of them judges prompts the search never saw), whose next-token
        check asks for ``NEXT_TOKEN_SEARCH_AGREEMENT``: a search keeps the first candidate that
        passes, one whose steps on these prompts happen to differ less than on others, so it
        is held to fewer differing steps than the result, and which, where the next tokens
        judge every output (the logits and the cache), judges by them alone (module doc); for
        any other model, this verifier itself (its task judge already holds out nothing a
        search could fit)."""
        if self._plan is None:
            return self
        if self._apart is None:
            options = dict(self._options)
            options["seed"] = options["seed"] + 1
            self._apart = Verifier(self.original, parsed=self._model, **options)
            self._apart._agreement = NEXT_TOKEN_SEARCH_AGREEMENT
            self._apart._tokens_alone = True
            self._apart._built = self._built
        return self._apart

    def _source(self, model: ir.Model) -> Any:
        """What onnxruntime loads ``model`` from: its bytes; the model itself when it needs
        external data or holds ``HANDOVER_MIN_BYTES`` of weights or more (``make_session``
        then hands its weights over in place: no serialized copy of them, twice their size,
        lives while the sessions are built) or cannot be serialized (``make_session`` meets
        the same error where it is reported)."""
        if oir.needs_external_data(model) or oir.uses_external_data(model) \
                or oir.weight_bytes(model) >= HANDOVER_MIN_BYTES:
            return model
        try:
            return oir.serialize(model).SerializeToString()
        except Exception:  # noqa: BLE001
            return model

    def _original_proto(self) -> onnx.ModelProto | None:
        """The original's file parsed again, without external data, when that is cheaper
        than serializing the parse (a small file); else None. The parse handed over
        (``original_parse``: the file parsed as this would parse it) serves the first call."""
        path = self.original
        if not isinstance(path, (str, os.PathLike)) or os.path.getsize(path) > REPARSE_MAX_BYTES:
            return None
        handed, self._handed_parse = self._handed_parse, None
        if handed is not None:
            return handed
        try:
            return onnx.load(path, load_external_data=False)
        except Exception:  # noqa: BLE001 - then the proof serializes the parse
            return None

    def _proved(self, model: ir.Model, numerics: Numerics, tolerance: Tolerance,
                serialized: Serialized | None = None) -> Verification | None:
        """A pass without running the models, when every output is proved equal to the
        original's (``optcc.numerics.equivalence``) and onnxruntime loads the candidate on
        every provider; None when not proved. onnxruntime loads the candidate's whole bytes
        when ``serialized`` holds them, and the proof parses them only if it reads the
        candidate's serialization; else the candidate is serialized without its weights
        (``optcc.runtime.shared_weights``, or ``serialized``'s bytes of that form:
        onnxruntime gets them as arrays, the proof reads only the graph). The candidate is
        loaded after the proof, only when proved: onnxruntime holds the interpreter lock
        through most of a load, so a load beside the proof would not overlap it, only
        contend with it."""
        light = None
        whole = serialized.data if serialized is not None and not serialized.aside else None
        if whole is None and not (oir.needs_external_data(model) or oir.uses_external_data(model)):
            try:
                proto, weights = serialized.light() if serialized is not None else light_proto(model)
                light = (proto.SerializeToString(), weights)
            except Exception:  # noqa: BLE001 - the samples' path meets the same error where it is reported
                return None
        source = whole if whole is not None else light if light is not None else model
        parsed: Callable[[], onnx.ModelProto] | None = None  # the candidate's serialization, for the proof
        if whole is not None:
            parsed = functools.partial(onnx.ModelProto.FromString, whole)
        elif light is not None:
            parsed = functools.partial(onnx.ModelProto.FromString, light[0])
        premise, self._premise = self._premise, None  # the original numbered before the passes: once
        try:
            with oir.collector_paused():  # the proof's tables all stay alive until it returns
                given = proto if light is not None else parsed
                proof = None if premise is None else premise.prove(model, candidate_proto=given)
                if proof is None or not proof.complete:  # the full proof may know more (e.g. ranks)
                    # a parse of its own: the numbering may have changed the first
                    fresh = proto if proof is None and light is not None else None if parsed is None else parsed()
                    proof = prove_equivalent(self._model, model, original_proto=self._original_proto,
                                             candidate_proto=fresh)
        except Exception:  # noqa: BLE001 - no proof: the samples decide
            return None
        finally:
            if premise is not None:
                premise.release()
        if not proof.complete:
            return None
        error = self._load_error(source)
        base = dict(numerics=numerics, tolerance=tolerance, providers=self.providers, samples=0, outputs=[],
                    reference="proof", proof=proof.to_dict())
        if error is not None:
            original_error = self._load_error(self._source(self._model))
            if original_error is not None:  # not the passes' doing: the model given does not load either
                return Verification(status="skipped", reason=f"onnxruntime cannot load the original model: "
                                    f"{original_error}", **base)
            return Verification(status="failed", reason=f"onnxruntime cannot load the optimized model: {error}",
                                unloadable=True, **base)
        return Verification(status="passed", **base)

    def default_build_problem(self, model: ir.Model) -> tuple[str | None, str | None]:
        """Whether onnxruntime's default session builds ``model`` on each provider: (why it
        cannot, None), (None, why it could not be asked), or (None, None) when it builds;
        the verdict ``check`` asks of a converted result, kept by content, so that a search
        asking it of the model it then writes leaves the verification nothing to build again."""
        built = self._default_build(model, self._source(model))
        return built.problem, built.unchecked

    def _default_build(self, model: ir.Model, source: Any) -> DefaultBuild:
        """Whether onnxruntime's default session (every graph optimization) builds ``model``
        on each provider: its problem on the first that cannot, else why some provider could
        not be asked (``unchecked``), else neither. Asked of a child process
        (``default_build``), which loads it saved in the scratch folder (``source``: its
        bytes, when ``_check`` has them), external data beside it; a checked verdict is kept
        once per model content, for this verifier and those held apart from it (a search's
        choice and the result it wrote are the same model); one not checked is asked again."""
        key = _digest(model, source)
        if key in self._built:
            return self._built[key]
        path = os.path.join(self._scratch.name, "default-build.onnx")
        problem = unchecked = None
        try:
            if isinstance(source, bytes):
                with open(path, "wb") as file:
                    file.write(source)
            else:
                oir.save(model, path, external_data=oir.needs_external_data(model) or oir.uses_external_data(model))
            for provider in self.providers:
                built = default_build(path, provider)
                unchecked = unchecked or built.unchecked
                if built.problem is not None:
                    problem = built.problem
                    break
        finally:
            for leftover in (path, path + ".data"):
                if os.path.exists(leftover):
                    os.remove(leftover)
        verdict = DefaultBuild(problem=problem, unchecked=None if problem is not None else unchecked)
        if verdict.unchecked is None:
            self._built[key] = verdict
        return verdict

    def _load_error(self, source: Any) -> str | None:
        """Why onnxruntime cannot load ``source`` (a model, its bytes, or a graph serialized
        without its weights and those weights) on some provider, in one line; None when it
        can. One thread: the session only loads (no thread pool to start)."""
        for provider in self.providers:
            try:
                if isinstance(source, bytes):
                    make_session(source, provider, options=session_options(threads=1))
                elif isinstance(source, tuple):
                    graph, weights = source
                    weighted_session(onnx.ModelProto.FromString(graph), weights, session_options(threads=1), provider)
                else:
                    make_session(source, provider, scratch=self._scratch.name)
            except Exception as e:  # noqa: BLE001
                return first_line(e)
        return None

    @functools.cached_property
    def _compares_nothing(self) -> str | None:
        """Why no sample can tell any model from the original (every output of the original
        empty, NaN or infinite on every element of every sample: the comparison skips such
        elements), or None."""
        cases = next(iter((self._float32_outputs() or {}).values()), [])
        arrays = [np.asarray(value) for case in cases for value in case]
        if not arrays or not all(_holds_nothing(a) for a in arrays):
            return None
        return ("every output of the original is NaN, infinite or empty on every sample: the samples "
                "compare nothing (give samples it computes finite values on)")

    def notes(self) -> list[str]:
        """Outputs the samples barely exercise: empty or NaN everywhere (nothing compared; a
        detector's boxes after its threshold on an image without objects), the same value
        everywhere, or a bounded kernel's output saturated near 0 (a detector's map on such
        an image)."""
        found = [f"output '{name}' {weakness}" for name, weakness in self._weak_outputs().items()]
        if found:
            found.append(f"give {self._telling_samples} for a stronger check")
        unfed = self._unfed_defaults()
        if unfed:
            found.insert(0, f"no sample feeds the graph input(s) with a default {_listed(unfed)}: every sample "
                            "ran on their defaults, so a result that reads a default where a caller feeds its "
                            "input goes unseen (feed other values in one sample for a stronger check)")
        if self._unvaried is not None:
            found.insert(0, f"onnxruntime cannot run the original with the defaults of its graph input(s) "
                            f"{_listed(self._varied_defaults)} varied ({self._unvaried}): every "
                            "sample ran on their defaults, so a result that reads a default where a caller feeds "
                            "its input goes unseen")
        return [self._retried, *found] if self._retried else found

    def _unfed_defaults(self) -> list[str]:
        """The float graph inputs with a default (``variable_defaults``) that none of the
        user's samples feeds; none for generated samples, which vary them."""
        if not self.user_samples:
            return []
        return [v.name for v in variable_defaults(self._model) if not any(v.name in f for f in self.feeds)]

    @property
    def _telling_samples(self) -> str:
        """The samples that would check an output these barely exercise: real ones in place
        of generated ones; other ones in place of the user's."""
        return "samples on which the outputs vary" if self.user_samples else "real samples with --inputs"

    def _weak_outputs(self) -> dict[str, str]:
        """Per output the samples barely exercise, how (see ``notes``)."""
        float32 = self._float32_outputs() or {}
        found: dict[str, str] = {}
        for index, name in enumerate(self._names):
            values = [np.asarray(outs[index]) for outs in next(iter(float32.values()), [])]
            if values and all(_holds_nothing(v) for v in values):
                found[name] = "is NaN or infinite on every element of every sample (nothing compared)" \
                    if any(v.size for v in values) else "is empty on every sample (nothing compared)"
                continue
            floats = [v.astype(np.float64) for v in values if v.dtype.kind == "f" and v.size]
            finite = [v[np.isfinite(v)] for v in floats]
            if not finite:
                continue
            high = max(float(np.abs(v).max()) for v in finite if v.size)
            flat = 1e-6 * max(high, 1e-30)
            spread = max(float(v.max()) for v in finite if v.size) - min(float(v.min()) for v in finite if v.size)
            if spread <= flat:
                found[name] = "has the same value on every element of every sample"
            elif all(float(v.max() - v.min()) <= flat for v in finite if v.size) and any(v.size > 1 for v in finite):
                # (a one-element output, a probability or a score, varies across samples only)
                found[name] = "has one value on all its elements in every sample"
            elif self._resolution.get(name) and high < SATURATED_BELOW:
                found[name] = f"stays below {high:.2g} on every sample (saturated)"
        return found

    def _judge_again(self, first: OutputMetrics, index: int, provider: str, originals: Sequence[np.ndarray],
                     gots: Sequence[np.ndarray], tolerance: Tolerance, resolution: float,
                     positions: Sequence[int], again: Sequence[int]) -> tuple[OutputMetrics, str]:
        """An inexact rewrite's output beyond the tolerance of the float32 original (``first``
        its metrics there), judged again, and what against: the samples it is beyond on per
        element against float64 (built for ``again``, those of every output, by position in
        ``feeds``), the others kept as they passed; without float64, every sample against the
        float32 original's rounding noise. ``positions``: the samples compared."""
        name = first.name
        reference = self.float64_reference(again)
        if reference.outputs is not None:
            over = set(first.samples_over)
            by_position = dict(zip(again, reference.outputs))
            # a sample within the tolerance keeps the float32 original as its reference (no own error)
            refs = [by_position[p][name] if j in over else originals[j] for j, p in enumerate(positions)]
            result = compare_outputs(name, provider, refs, gots, tolerance, originals, resolution=resolution)
            if result.elements_over:  # the second float32 evaluation, only when it matters
                alternate = self._alternate_outputs(provider)
                if alternate is not None:
                    alternates = [alternate[i][index] for i in positions]
                    result = compare_outputs(name, provider, refs, gots, tolerance, originals, alternates,
                                             resolution=resolution)
            return result, reference.kind or "float64"
        result = first
        alternate = self._alternate_outputs(provider)
        if alternate is not None:  # its rounding noise against the as-written run
            noise = [alternate[i][index] for i in positions]
            result = compare_outputs(name, provider, originals, gots, tolerance, noise, resolution=resolution)
        return result, f"{self._original_label} (float64 unavailable: {reference.reason})"


def _digest(model: ir.Model, source: Any) -> str:
    """What identifies the model a session of ``source`` (``Verifier._source``'s) runs: the
    SHA-256 of its bytes, or, for the model itself (handed over in place), its
    ``content_digest``. Equal digests: the same graph on the same weights."""
    if isinstance(source, bytes):
        return "bytes:" + hashlib.sha256(source).hexdigest()
    return "content:" + content_digest(model)


@dataclasses.dataclass
class _JudgePlan:
    """What every task judge of one provider shares (``Verifier.task_judge``): the original's
    judged outputs on every sample, each row's metric chosen from them, how the inputs move
    and how they were described, per perturbation draw whether it moves no input, the
    attention masks per sample, per draw the original's cases on the perturbed samples run
    so far (by position), and the judge's fields read from the model."""

    reference: dict[str, list[np.ndarray]]
    rows: dict[str, Any]
    reasons: dict[str, str]
    moving: dict[str, set[str]]
    how: dict[str, str]
    unmoved: list[bool]
    masks: list[Any] | None
    perturbed: list[dict[int, list[np.ndarray]]]
    sequences: Any = ()
    heads: Any = ()
    exact: Any = ()
    state: Any = ()
    tokens: Any = dataclasses.field(default_factory=dict)
    recurrent: Any = ()


@dataclasses.dataclass
class _KeptOutputs:
    """One candidate's outputs kept by ``Verifier.outputs``: its digest (``_digest``), the
    provider, its output names, and its outputs by sample position."""

    digest: str
    provider: str
    names: list[str]
    cases: dict[int, list[np.ndarray]]

    def nbytes(self) -> int:
        """The bytes of the outputs kept."""
        return sum(int(np.asarray(a).nbytes) for outs in self.cases.values() for a in outs)


# what generated samples the original cannot run are made again with, in turn: the batch
# sample with its other free dims as long as the other samples' (a model that cannot run
# below some size, as a stack of unpadded convolutions), batch 1 everywhere, then each of
# ``RETRY_SIZES`` with the batch sample and without it
_RETRIES: tuple[dict[str, int], ...] = (
    {"last_dynamic_dim": DEFAULT_DYNAMIC_DIM},
    {"last_batch": 1},
    *({**sizes, "last_batch": batch} for sizes in RETRY_SIZES for batch in (BATCH_SAMPLE, 1)),
)


def _shapes(samples: Sequence[Feeds]) -> tuple:
    return tuple(tuple(sorted((name, np.shape(value)) for name, value in feeds.items())) for feeds in samples)


def _retried_text(sizes: Mapping[str, int], error: str, failed: str) -> str:
    """Why the generated samples were made again (``error``: the first run's; ``failed``:
    the last failed run's, the one before ``sizes``), and how."""
    batch = "batch 1 in every sample (a result specialized to batch 1 goes unseen)"
    if "dynamic_dim" not in sizes:
        return (f"generated inputs whose last sample has batch {BATCH_SAMPLE} did not run on the original "
                f"({failed}); they were made again with {batch}")
    return (f"generated inputs with free dynamic dims of {DEFAULT_DYNAMIC_DIM} did not run on the original "
            f"({error}); they were made again with {sizes_text(sizes)}"
            + (f" and {batch}" if sizes.get("last_batch") == 1 else ""))


def _listed(names: Iterable[str]) -> str:
    """Names quoted, the first three, then how many more."""
    quoted = [repr(n) for n in names]
    return ", ".join(quoted[:3]) + (f" and {len(quoted) - 3} more" if len(quoted) > 3 else "")


def _holds_nothing(array: np.ndarray) -> bool:
    """Whether ``array`` has no element a comparison reads: empty, or floating point with
    only NaN and infinities (compared by position alone)."""
    return array.size == 0 or (array.dtype.kind == "f" and not np.isfinite(array).any())


def _num(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, (int, float)) else str(value)


def _row_parts(row: str, groups: Iterable[str]) -> tuple[str, str | None, str]:
    """A task row's output, group and component: a row is ``OUTPUT:PART``, or with
    ``groups`` (a verdict's) ``OUTPUT@GROUP:PART``; an output's name may hold '@' and ':'."""
    key, _, part = row.rpartition(":")
    group = max((g for g in groups if key.endswith("@" + g)), key=len, default=None)
    return (key if group is None else key[:-len(group) - 1]), group, part


def _parted(run: Mapping[str, Any]) -> str:
    """How a free-running decode (``free_agreement``'s dict) parted from the original's, in words."""
    steps = [step for step in run["first_divergence"] if step < run["steps"]]
    return f"{len(steps)} of {run['rows']} rows parted, the first at step {min(steps)}" if steps \
        else "no row parted"


def _few_items(verdict: Mapping[str, Any] | None, generated: bool = False) -> list[str]:
    """A note per count-based task row that passed over too few items to show the margin:
    at its allowed rate the items hold fewer than ``FEW_EXPECTED_ERRORS`` errors, so a
    model deviating a few times its floor would often pass as well. Each says what to do:
    how many times the samples (those of the row's group; real ones for ``generated``)."""
    notes = []
    groups = (verdict or {}).get("groups") or ()
    for row, value in (verdict or {}).get("metrics", {}).items():
        items, allowed = value.get("items"), value.get("allowed")
        if value.get("passed") and isinstance(items, int) and isinstance(allowed, (int, float)) \
                and items * allowed < FEW_EXPECTED_ERRORS:
            more = math.ceil(FEW_EXPECTED_ERRORS / max(items * allowed, 1e-9))
            group = _row_parts(row, groups)[1]
            todo = (f"give real samples with --inputs, about {more}x as many as were generated" if generated
                    else f"give group '{group}' about {more}x as many samples" if group
                    else f"give about {more}x as many samples")
            notes.append(f"'{row}' passed over only {items} items, too few to catch a model a few times worse "
                         f"than float32's own noise (at the allowed error rate, {allowed:.3g}, {items} items hold "
                         f"{items * allowed:.1f} errors); {todo}")
    return notes


def task_rows_text(verdict: Mapping[str, Any] | None, output: str) -> str:
    """An output's judged task rows in words, each the rule that decided it, true as written:
    the deviation against the floor's allowance (a failed row's beyond it), or, where a
    fixed target accepted what the allowance did not, the target met."""
    groups = (verdict or {}).get("groups") or ()
    rows = [(part, value) for row, value in (verdict or {}).get("metrics", {}).items()
            for name, _, part in [_row_parts(row, groups)] if name == output and value.get("judged", True)]
    return ", ".join(_row_text(part, v) for part, v in rows) or "no rows"


def named_task_rows(verdict: Mapping[str, Any] | None, outputs: Iterable[str]) -> list[str]:
    """``'<output>' <task_rows_text>`` for each of ``outputs`` that has judged task rows."""
    return [f"'{name}' {rows}" for name in outputs for rows in [task_rows_text(verdict, name)] if rows != "no rows"]


def _row_text(part: str, v: Mapping[str, Any]) -> str:
    """One judged task row (``task_rows_text``) in words."""
    if "sqnr_db" in v:
        return _sqnr_row_text(part, v)
    items = f", {v['items']} items" if "items" in v else ""
    within = float(v["deviation"]) <= float(v["allowed"])  # "inf" and "nan" read as floats too
    floor = f"floor {_num(v['floor'])}{items}"
    if v.get("passed") is False:
        return f"{part} {_num(v['deviation'])} > {_num(v['allowed'])} ({floor})"
    if within:
        return f"{part} {_num(v['deviation'])} <= {_num(v['allowed'])} ({floor})"
    return (f"{part} score {_num(v.get('score'))} >= target {_num(v.get('target'))} ({_num(v['deviation'])} "
            f"> {_num(v['allowed'])} allowed by the {floor})")


UNMOVED_FLOOR = "float32's outputs did not move under input noise"  # why a noise floor is 0


def _sqnr_row_text(part: str, v: Mapping[str, Any]) -> str:
    """An SQNR row in decibels, higher being better: the SQNR against the target and the
    least the floor allows (its noise ratios are what the judge compares: ``deviation <=
    allowed`` is ``sqnr_db >= allowed's dB``). A floor of 0 (float32's outputs unmoved by
    input noise) allows no noise: only the target can pass such a row."""
    got, target = f"{part} {_decibels(v['sqnr_db'])}", f"{_num(v.get('target_db'))} dB target"
    if v.get("floor") is None:  # passed by the SQNR target alone: no floor measured
        return f"{got} >= {target} (no floor measured: none could fail it)"
    if float(v["floor"]) == 0.0:
        relation = "<" if v.get("passed") is False else ">="
        return f"{got} {relation} {target} (the floor allows no noise: {UNMOVED_FLOOR})"
    ratio = float(v["allowed"])  # > 0 here: the margin is positive and the floor is not 0
    allowed = f"{_decibels(-10.0 * math.log10(ratio) if ratio > 0 else math.inf)} allowed"
    floor = f"floor {_decibels(v.get('floor_sqnr_db'))}"
    if v.get("passed") is False:
        return f"{got} < {target} and < {allowed} ({floor})"
    if float(v["deviation"]) <= float(v["allowed"]):
        return f"{got} >= {allowed} ({floor})"
    return f"{got} >= {target} (< {allowed} by the {floor})"


def _decibels(value: Any) -> str:
    """A decibel figure in words: 3 significant digits, never "-0 dB"."""
    return f"{_num(value + 0.0 if isinstance(value, float) else value)} dB"


def chosen_text(verdict: Mapping[str, Any] | None, output: str | None = None) -> str:
    """Which metric judged each row of a task verdict (``output``'s alone, when given), and
    why it was chosen, in words."""
    groups = (verdict or {}).get("groups") or ()
    return "; ".join(_chosen_words(key, c) for key, c in ((verdict or {}).get("chosen") or {}).items()
                     if output is None or _row_parts(f"{key}:", groups)[0] == output) or "no output judged"


def _chosen_words(key: str, chosen: Mapping[str, str]) -> str:
    """A row's metric and why it was chosen (a verdict's ``chosen`` entry), in words."""
    return f"'{key}' by {chosen['metric']} ({'as given' if chosen['why'] == 'given' else chosen['why']})"


def _task_problem(row: Mapping[str, Any]) -> str:
    if "sqnr_db" in row:
        return (f"SQNR {_num(row['sqnr_db'])} dB (float32's own under input noise: "
                f"{_num(row.get('floor_sqnr_db'))} dB)")
    return (f"{row['metric']} deviation {_num(row['deviation'])} > allowed {_num(row['allowed'])} "
            f"(float32's own under input noise: {_num(row['floor'])})")


def next_token_text(provider: str, run_: Mapping[str, Any]) -> str:
    """What a next-token check found (``next_token_agreement``'s dict, with ``stopped`` where
    the decode stopped once the verdict was decided), in words: a stopped check's agreement
    is over the steps it compared before it stopped, not over all the steps it would have."""
    steps = f"{run_['rows']} rows of {run_['steps']} steps"
    if run_.get("stopped"):
        return (f"next tokens on {provider}: stopped {run_['stopped']} (at least {_percent(run_['threshold'])} "
                f"needed); {run_['agreement']:.1%} as the original's over the {run_['tokens']} steps compared "
                f"before it stopped, each fed the original's tokens ({steps})")
    return (f"next tokens on {provider}: {run_['agreement']:.1%} of {run_['tokens']} steps as the original's, each "
            f"fed the original's tokens ({run_['differing']} differ; {steps}; at least "
            f"{_percent(run_['threshold'])} needed)")


def _percent(share: float) -> str:
    """A share as a percentage with no trailing zeros: 0.99 as '99%', 0.993 as '99.3%'."""
    return f"{share * 100:g}%"


@dataclasses.dataclass
class _CandidateSession:
    """The candidate's onnxruntime session, held here alone so that it can be dropped while
    the original's runs and built again (``build``) when next needed."""

    build: Callable[[], Any]
    session: Any = None

    def get(self) -> Any:
        """The session, built again where it was dropped."""
        if self.session is None:
            self.session = self.build()
        return self.session

    def drop(self) -> None:
        self.session = None


class _OriginalDecodeError(Exception):
    """The original's own next-token decode raised (the cause, whose first line is this
    error's message): nothing judges a candidate."""


def _rows(feeds: Feeds, plan: Any) -> int:
    """The batch rows of a decode prompt: its token ids' first dimension."""
    return int(np.asarray(feeds[plan.ids]).shape[0])


def _feeding(session: Any) -> Callable[[Feeds], Sequence[np.ndarray]]:
    """A run of ``session`` on float32 feeds (rounded to float16 where it takes float16)."""
    float16_inputs = float16_feedable(session)
    return lambda feeds: run(session, _fit_float16(feeds, float16_inputs))


def _fit_float16(feeds: Feeds, float16_inputs: frozenset[str]) -> dict[str, np.ndarray]:
    """float32 feeds of inputs a float16 conversion made float16 (``keep_io_types=False``),
    rounded to float16."""
    return {name: array.astype(np.float16) if name in float16_inputs and array.dtype == np.float32 else array
            for name, array in feeds.items()}


def verify(
    original: ModelRef,
    optimized: ir.Model,
    *,
    numerics: Numerics = "exact",
    **verifier_options: Any,
) -> Verification:
    """One-shot verification of ``optimized`` against ``original`` (see ``Verifier``)."""
    with Verifier(original, **verifier_options) as verifier:
        return verifier.check(optimized, numerics)
