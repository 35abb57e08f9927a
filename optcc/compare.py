"""``optcc compare A B``: run two models on the same inputs and compare every output.

B is judged against A, the reference, by optcc's verifier (``optcc.numerics.verify``), as it
judges an optimized model against its original: ``compare`` on a model optcc wrote gives the
verdict its verification gave on the same samples, with every output's numbers (it never
passes by proof: both models always run, on onnxruntime's CPU provider with the sessions
verification runs, graph optimizations off except for an INT8 B, which runs as its users
run it).

Inputs are the user's samples, else those verification generates
(``optcc.numerics.generate_inputs``: ``samples`` of them, ``DEFAULT_SAMPLES`` by default,
the last with a free batch axis ``BATCH_SAMPLE`` long), made again at the sizes verification
retries when A cannot run them (the notes say so). An input dynamic in A and fixed in B
(``--overwrite-input-shape``) is generated at B's sizes. A KV-cache decoder is judged over
a short decode and a streaming model over a second step, as verification judges them.
Outputs are matched by name; an output only one model has is a mismatch, and the others
are still judged; so is B holding A's outputs in another order (as in verification: a
caller reading outputs by position would get them swapped).

Two ways to judge:
- ``numerics`` (default ``exact``): the verifier's judge for that kind of change. "exact":
  max relative error 1e-5 of each output's scale. "fusion": 1e-4, and the samples an output
  is beyond that on are judged again per element against A evaluated in float64, each element
  allowed ``ORIGINAL_ERROR_FACTOR`` times A's own float32 error there or, for an output a
  bounded kernel makes (a saturated probability map), that many times the kernel's
  resolution. "fp16": SQNR and cosine over the samples; on the user's samples an output
  that misses them is still accepted when the task judge decides it within float32's noise
  floor (``optcc.numerics.float16``). "int8": the task judge (top-1, CTC decode, boxes,
  embeddings, ...; ``task_metric`` chooses as ``--int8-metric`` does) against A's own noise
  floor under input perturbation (``optcc.numerics.task``). Each output says which judge
  decided and its numbers.
- ``rtol``/``atol``: every element within ``|b - a| <= atol + rtol * |a|`` (numpy's
  ``allclose`` rule with A as the reference), per sample, the worst sample reported.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from optcc import ir as oir
from optcc.errors import BadInputError, UnverifiedError
from optcc.ir.overwrite import check_input_shapes
from optcc.ir.zipmap import DetachedZipMaps, check_same_zipmaps, load_apart
from optcc.numerics import (ACCEPTED_BY_SQNR, ACCEPTED_BY_TASK, DEFAULT_MARGIN, DEFAULT_SAMPLES,
                            ORIGINAL_ERROR_FACTOR, TOLERANCES, OutputMetrics, Tolerance, UngeneratedInputError,
                            Verification, Verifier, check_feeds, compare_outputs)
from optcc.numerics.task import UserMetric
from optcc.numerics.verify import chosen_text, task_rows_text
from optcc.runtime.session import first_line, float16_feedable, session_options

__all__ = ["Comparison", "compare_models", "format_comparison"]

Feeds = Mapping[str, np.ndarray]
PROVIDER = "CPUExecutionProvider"


@dataclasses.dataclass
class Comparison:
    """Per-output metrics and the verdict. With ``numerics``: the verifier's verdict
    (``verification``), each output's metrics over all samples and the judge that decided
    it (``judges``); with ``rtol``/``atol``: each output's worst sample."""

    outputs: list[OutputMetrics]
    samples: int
    criterion: str
    only_in_a: list[str]
    only_in_b: list[str]
    reordered: list[str] | None = None  # B's order of the shared outputs, where it is not A's
    notes: list[str] = dataclasses.field(default_factory=list)
    judges: dict[str, str] = dataclasses.field(default_factory=dict)
    verification: Verification | None = None

    @property
    def passed(self) -> bool:
        judged = self.verification.passed if self.verification is not None else all(m.passed for m in self.outputs)
        return judged and not self.only_in_a and not self.only_in_b and self.reordered is None

    def failed(self, output: OutputMetrics) -> str | None:
        """Why ``output`` fails (its metrics' problem, or a task row beyond its allowance), or None."""
        if not output.passed:
            return output.problem or "failed"
        task = None if self.verification is None else self.verification.task
        if task is not None and _task_rows_failed(task, output.name):
            return "task: " + task_rows_text(task, output.name)
        return None

    def to_dict(self) -> dict[str, Any]:
        verification = None if self.verification is None else \
            {k: v for k, v in self.verification.to_dict().items() if k != "outputs"}
        return {"passed": self.passed, "samples": self.samples, "criterion": self.criterion,
                "outputs": [{**m.to_dict(), "passed": self.failed(m) is None,
                             **({"judged_by": self.judges[m.name]} if m.name in self.judges else {})}
                            for m in self.outputs],
                "only_in_a": self.only_in_a, "only_in_b": self.only_in_b, "reordered": self.reordered,
                "notes": self.notes,
                "verification": verification}


def _session(model: ir.Model, path: str | None, label: str) -> ort.InferenceSession:
    options = session_options()
    source: Any = path if path is not None else oir.serialize(model).SerializeToString()
    try:
        return ort.InferenceSession(source, options, providers=[PROVIDER])
    except Exception as error:  # noqa: BLE001 - anything onnxruntime raises
        raise UnverifiedError(f"{label}: onnxruntime cannot load the model: {first_line(error)}") from None


def _run(session: ort.InferenceSession, feeds: Feeds, label: str) -> dict[str, np.ndarray]:
    float16 = float16_feedable(session)
    feeds = {k: v.astype(np.float16) if k in float16 and v.dtype == np.float32 else v for k, v in feeds.items()}
    try:
        values = session.run(None, dict(feeds))
    except Exception as error:  # noqa: BLE001
        raise UnverifiedError(f"{label}: onnxruntime cannot run the model: {first_line(error)}") from None
    return {o.name: np.asarray(v) for o, v in zip(session.get_outputs(), values)}


def _load(source: oir.ModelSource) -> tuple[ir.Model, str | None, str, DetachedZipMaps | None]:
    """The model (a caller's ``ir.Model`` copied: judging may change its graph outputs),
    its file or None, its label, and the trailing ZipMaps set apart from it (the model is
    then the part before them, in memory: ``detach_zipmaps``), else None."""
    label = str(source) if isinstance(source, (str, os.PathLike)) else "<model>"
    model, zipmaps = load_apart(source)
    if zipmaps is not None:
        return model, None, label, zipmaps
    if isinstance(source, (str, os.PathLike)):
        return model, str(source), label, None
    return (oir.clone(model) if model is source else model), None, label, None


def _allclose(metrics: OutputMetrics, a: np.ndarray, b: np.ndarray, rtol: float, atol: float) -> OutputMetrics:
    if metrics.problem is not None or not np.issubdtype(a.dtype, np.floating):
        return metrics  # shape/dtype/NaN problems, or integers compared exactly
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    finite = np.isfinite(a64) & np.isfinite(b64)
    bad = int(np.count_nonzero(np.abs(b64 - a64)[finite] > atol + rtol * np.abs(a64)[finite]))
    if bad:
        metrics.passed = False
        metrics.problem = f"{bad} of {a.size} values outside atol {atol:g} + rtol {rtol:g} * |a|"
    return metrics


def _output_names(model: ir.Model) -> list[str]:
    return [v.name for v in model.graph.outputs]


def _keep_outputs(model: ir.Model, names: Sequence[str]) -> None:
    """Make ``names`` (outputs of ``model``) its graph outputs, in that order."""
    by_name = {v.name: v for v in model.graph.outputs}
    model.graph.outputs.clear()
    model.graph.outputs.extend(by_name[n] for n in names)


def compare_models(
    a: oir.ModelSource,
    b: oir.ModelSource,
    *,
    inputs: Iterable[Feeds] | Feeds | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    numerics: str = "exact",
    rtol: float | None = None,
    atol: float | None = None,
    inputs_label: str | None = None,
    task_metric: str | UserMetric | Mapping[str, Any] | None = None,
    task_margin: float = DEFAULT_MARGIN,
) -> Comparison:
    """Compare B's outputs with A's (the reference) on ``inputs`` or generated feeds, judged
    as the module docstring says. ``task_metric`` and ``task_margin``: how "int8" judges
    (``Verifier``'s, as ``quantize_int8``'s ``metric`` and ``metric_margin``).

    Raises BadInputError for unusable models or inputs (B's inputs must have A's names),
    UnverifiedError when onnxruntime cannot load or run either model, or the samples
    compare nothing. ``inputs_label`` (the samples' file) is named in errors about a sample.
    """
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is not None and not value >= 0:  # NaN too: no element would ever match
            raise BadInputError(f"{name} must be 0 or more, got {value:g}")
    model_a, path_a, label_a, zipmaps_a = _load(a)
    model_b, path_b, label_b, zipmaps_b = _load(b)
    check_same_zipmaps(zipmaps_a, zipmaps_b, label_b)
    result = _compared(model_a, path_a, label_a, model_b, path_b, label_b, inputs=inputs, input_shapes=input_shapes,
                       samples=samples, seed=seed, numerics=numerics, rtol=rtol, atol=atol, inputs_label=inputs_label,
                       task_metric=task_metric, task_margin=task_margin)
    if zipmaps_a is not None:  # as optimizing judges them: the ZipMaps the same, the tensors they read compared
        read = ", ".join(f"'{name}'" for name in zipmaps_a.inputs)
        result.notes = [*result.notes, f"ZipMap outputs compared through the tensors they read ({read}); "
                                       "the ZipMaps are the same"]
    return result


def _compared(model_a: ir.Model, path_a: str | None, label_a: str, model_b: ir.Model, path_b: str | None,
              label_b: str, *, inputs: Iterable[Feeds] | Feeds | None, input_shapes: Mapping[str, Sequence[int]] | None,
              samples: int, seed: int, numerics: str, rtol: float | None, atol: float | None,
              inputs_label: str | None, task_metric: str | UserMetric | Mapping[str, Any] | None,
              task_margin: float) -> Comparison:
    """``compare_models`` on the loaded models A and B (each its file or None, and its label)."""
    names_a = sorted(v.name for v in model_a.graph.inputs if not v.is_initializer())
    names_b = sorted(v.name for v in model_b.graph.inputs if not v.is_initializer())
    if names_a != names_b:
        raise BadInputError(f"the graph inputs differ: {names_a} in A, {names_b} in B", label_b)
    if numerics not in TOLERANCES:
        raise BadInputError(f"unknown numerics '{numerics}' (one of {', '.join(TOLERANCES)})")
    if input_shapes:
        check_input_shapes(model_a, input_shapes, label=label_a)
    feeds_list: list[dict[str, np.ndarray]] | None = None
    if inputs is not None:
        feeds_list = [dict(inputs)] if isinstance(inputs, Mapping) else [dict(f) for f in inputs]
        if not feeds_list:
            raise BadInputError("no inputs given (empty iterable)")
        for i, feeds in enumerate(feeds_list):
            where = f"sample {i} in {inputs_label}" if inputs_label else f"sample {i}"
            check_feeds(model_a, feeds, label=where)
    outputs_a, outputs_b = _output_names(model_a), _output_names(model_b)
    common = [n for n in outputs_a if n in outputs_b]
    order_b = [n for n in outputs_b if n in outputs_a]  # a caller reading outputs by position sees this order
    only_in = dict(only_in_a=[n for n in outputs_a if n not in outputs_b],
                   only_in_b=[n for n in outputs_b if n not in outputs_a],
                   reordered=order_b if order_b != common else None)
    by_tolerance = rtol is None and atol is None
    criterion = f"{numerics} tolerance" if by_tolerance else f"rtol {rtol or 0:g}, atol {atol or 0:g}"
    if not common:
        return Comparison(outputs=[], samples=0, criterion=criterion, **only_in)
    if by_tolerance and (common != outputs_a or common != outputs_b):
        # the verifier judges a model with the original's outputs: both keep those they share
        _keep_outputs(model_a, common)
        _keep_outputs(model_b, common)
        path_a = path_b = None
    notes: list[str] = []
    if by_tolerance or feeds_list is None:
        sizes = _fixed_in_b(model_a, model_b, input_shapes or {}) if feeds_list is None else None
        try:  # generated now: an input that cannot be generated (a string, say) is A's to say
            verifier = Verifier(path_a or model_a, parsed=model_a if path_a else None, inputs=feeds_list,
                                providers=[PROVIDER], input_shapes=sizes, samples=samples, seed=seed,
                                task_metric=task_metric, task_margin=task_margin)
            verifier.feeds  # noqa: B018
        except UngeneratedInputError as error:  # only --inputs can feed A
            raise UngeneratedInputError(str(error), label_a) from None
        with verifier:
            if by_tolerance:
                return _judged(verifier, model_b, numerics, label_a, label_b, only_in)
            # the samples as made again for A to run (where none runs, A's error is met below)
            feeds_list = verifier.generated_samples() or verifier.feeds
            notes = verifier.notes()
    outputs = _within(model_a, path_a, label_a, model_b, path_b, label_b, feeds_list, common,
                      rtol or 0.0, atol or 0.0)
    return Comparison(outputs=outputs, samples=len(feeds_list), criterion=criterion, notes=notes, **only_in)


def _judged(verifier: Verifier, model_b: ir.Model, numerics: str, label_a: str, label_b: str,
            only_in: Mapping[str, list[str]]) -> Comparison:
    """B judged by ``verifier`` (A's) with ``numerics``' tolerance, every sample run."""
    verification = verifier.check(model_b, numerics, prove=False)
    if verification.status == "skipped":  # A cannot run, or the samples compare nothing
        raise UnverifiedError(f"{label_a}: {verification.reason}")
    if verification.status == "failed" and not verification.outputs:  # B cannot be loaded or run
        raise UnverifiedError(f"{label_b}: {verification.reason}")
    judges = {m.name: _judge(m, verification) for m in verification.outputs}
    return Comparison(outputs=verification.outputs, samples=verification.samples,
                      criterion=f"{numerics} tolerance, as optcc's verifier judges", notes=verification.notes,
                      judges=judges, verification=verification, **only_in)


def _within(model_a: ir.Model, path_a: str | None, label_a: str, model_b: ir.Model, path_b: str | None,
            label_b: str, feeds_list: Sequence[Feeds], common: Sequence[str], rtol: float,
            atol: float) -> list[OutputMetrics]:
    """Each output's worst sample under the ``allclose`` rule."""
    session_a = _session(model_a, path_a, label_a)
    session_b = _session(model_b, path_b, label_b)
    worst: dict[str, OutputMetrics] = {}
    for feeds in feeds_list:
        got_a = _run(session_a, feeds, label_a)
        got_b = _run(session_b, feeds, label_b)
        for name in common:
            ref, got = got_a[name], got_b[name]
            if got.dtype == np.float16 and ref.dtype == np.float32:
                got = got.astype(np.float32)  # a float16 interface, judged on float32 values
            metrics = _allclose(compare_outputs(name, "cpu", ref, got, Tolerance()), ref, got, rtol, atol)
            current = worst.get(name)
            if current is None or _badness(metrics) > _badness(current):
                worst[name] = metrics
    return [worst[n] for n in common]


def _task_rows_failed(task: Mapping[str, Any], output: str) -> bool:
    groups = task.get("groups") or ()
    return any(value.get("passed") is False and value.get("judged", True)
               for row, value in task.get("metrics", {}).items()
               if row.rpartition(":")[0] == output or any(row.rpartition(":")[0] == f"{output}@{g}" for g in groups))


def _judge(m: OutputMetrics, verification: Verification) -> str:
    """The judge that decided output ``m`` of ``verification``, and its numbers, in words."""
    tolerance = verification.tolerance
    task = verification.task
    if verification.numerics == "int8" and task is not None and tolerance == TOLERANCES["int8"]:
        return f"task against A's noise floor, {chosen_text(task, m.name)}: {task_rows_text(task, m.name)}"
    if m.accepted_by == ACCEPTED_BY_TASK:
        return (f"task against A's noise floor (SQNR {m.sqnr_db:.1f} dB below {tolerance.min_sqnr_db:g}): "
                f"{task_rows_text(task, m.name)}")
    if m.accepted_by == ACCEPTED_BY_SQNR or tolerance.min_sqnr_db is not None:
        rule = f"SQNR >= {tolerance.min_sqnr_db:g} dB and cosine >= {tolerance.min_cosine:g}"
        if not m.passed and task is not None and verification.numerics == "fp16":
            rows = task_rows_text(task, m.name)
            rule += f" (nor did the task judge accept it: {rows})" if rows != "no rows" else \
                f" ({task.get('unavailable') or 'the task judge had no row to decide it by'})"
        return rule
    if tolerance.max_rel is None:
        return "values equal" if m.problem is None else m.problem
    rule = f"max rel <= {tolerance.max_rel:g} of the output's scale"
    if m.original_max_rel is not None:
        return (f"{rule}, or per element {ORIGINAL_ERROR_FACTOR:g}x A's own float32 error against "
                f"{verification.reference} (A's own max rel {m.original_max_rel:.3g}"
                + (f", at most {m.allowance_used:.0%} of the allowance used)" if m.passed and m.allowance_used
                   is not None else ")"))
    if m.passed and m.max_rel is not None and m.max_rel > tolerance.max_rel and m.allowance_used is not None:
        return (f"{rule}, or per element {ORIGINAL_ERROR_FACTOR:g}x the float32 resolution of the bounded "
                f"kernel that makes it (max abs {m.max_abs:.3g}, at most {m.allowance_used:.0%} of the allowance)")
    return rule


def _fixed_in_b(model_a: ir.Model, model_b: ir.Model,
                given: Mapping[str, Sequence[int]]) -> dict[str, Sequence[int]]:
    """Sizes for generating A's inputs: ``given``, plus, for an input it does not size
    whose dims are dynamic in A and all static in B (B written with
    ``--overwrite-input-shape``), B's sizes, where they agree with A's static dims. So the
    generated feeds fit both models, instead of A's default sizes that B refuses."""
    shapes: dict[str, Sequence[int]] = dict(given)
    inputs_b = {v.name: v for v in model_b.graph.inputs}
    for value in model_a.graph.inputs:
        other = inputs_b.get(value.name)
        if value.name in shapes or value.is_initializer() or value.shape is None \
                or other is None or other.shape is None or other.shape.rank() != value.shape.rank():
            continue
        dims_a, dims_b = list(value.shape), list(other.shape)
        if not all(isinstance(d, int) and d > 0 for d in dims_b) or all(isinstance(d, int) for d in dims_a):
            continue
        if all(not isinstance(a, int) or a == b for a, b in zip(dims_a, dims_b)):
            shapes[value.name] = [int(d) for d in dims_b]
    return shapes


def _badness(m: OutputMetrics) -> tuple[int, float]:
    rel = m.max_rel if m.max_rel is not None and math.isfinite(m.max_rel) else (math.inf if m.max_rel else 0.0)
    return (0 if m.passed else 1, rel)


def _num(value: float | None, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return format(value, spec)


def format_comparison(result: Comparison) -> str:
    """A table: one row per output (with the judge that decided it, when the verifier
    judged), then the verifier's verdict and the comparison's."""
    width = max([len("output"), *(len(m.name) for m in result.outputs)])
    rows = [f"{'output':<{width}}  {'max abs':>9}  {'max rel':>9}  {'SQNR dB':>8}  {'cosine':>9}  verdict"]
    for m in result.outputs:
        problem = result.failed(m)
        verdict = "ok" if problem is None else f"MISMATCH: {problem}"
        rows.append(f"{m.name:<{width}}  {_num(m.max_abs, '.3g'):>9}  {_num(m.max_rel, '.3g'):>9}  "
                    f"{_num(m.sqnr_db, '.1f'):>8}  {_num(m.cosine, '.6f'):>9}  {verdict}")
        if m.name in result.judges:
            rows.append(f"{'':<{width}}  judged by: {result.judges[m.name]}")
    for name in result.only_in_a:
        rows.append(f"{name:<{width}}  only in A")
    for name in result.only_in_b:
        rows.append(f"{name:<{width}}  only in B")
    if result.reordered is not None:
        rows.append(f"B's outputs in another order: {', '.join(result.reordered)} (a caller reading them by "
                    "position gets them swapped)")
    rows.extend(f"note: {note}" for note in result.notes)
    if result.verification is not None:
        rows.append(f"verifier: {result.verification.describe()}")
    verdict = "MATCH" if result.passed else "MISMATCH"
    rows.append(f"{verdict} ({result.criterion}, {result.samples} sample(s))")
    return "\n".join(rows)
