"""``optcc compare A B``: run two models on the same inputs and compare every output.

Both models run on onnxruntime's CPU provider with its graph optimizations off (so its
fusions neither hide nor cause a difference) and its log lines off stderr. Inputs are the
user's samples or generated from A's graph inputs (``optcc.numerics.generate_inputs``), an
input dynamic in A and fixed in B (``--overwrite-input-shape``) at B's sizes.
Generated inputs that A cannot run (a window of a fixed length, an axis that must be 1)
are generated again with the sizes verification retries (``RETRY_SIZES``), and the
comparison's notes say so. Outputs are matched by name; an output only one model has is
a mismatch.

Two ways to judge an output, per sample, the worst sample reported:
- ``numerics`` (default ``exact``): optcc's tolerance for that kind of rewrite
  (``optcc.numerics.TOLERANCES``: max relative error for exact/fusion, SQNR and cosine for
  fp16/int8), relative to A;
- ``rtol``/``atol``: every element within ``|b - a| <= atol + rtol * |a|`` (numpy's
  ``allclose`` rule with A as the reference).
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
from optcc.numerics import (RETRY_SIZES, TOLERANCES, OutputMetrics, Tolerance, UngeneratedInputError, check_feeds,
                            compare_outputs, generate_inputs, sizes_text)
from optcc.runtime.session import first_line, float16_feedable, session_options

__all__ = ["Comparison", "compare_models", "format_comparison"]

Feeds = Mapping[str, np.ndarray]
PROVIDER = "CPUExecutionProvider"


@dataclasses.dataclass
class Comparison:
    """Per-output metrics (worst sample) and the verdict."""

    outputs: list[OutputMetrics]
    samples: int
    criterion: str
    only_in_a: list[str]
    only_in_b: list[str]
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.only_in_a and not self.only_in_b and all(m.passed for m in self.outputs)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "samples": self.samples, "criterion": self.criterion,
                "outputs": [m.to_dict() for m in self.outputs],
                "only_in_a": self.only_in_a, "only_in_b": self.only_in_b, "notes": self.notes}


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


def _load(source: oir.ModelSource) -> tuple[ir.Model, str | None, str]:
    model = oir.load(source)
    if isinstance(source, (str, os.PathLike)):
        return model, str(source), str(source)
    return model, None, "<model>"


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


def compare_models(
    a: oir.ModelSource,
    b: oir.ModelSource,
    *,
    inputs: Iterable[Feeds] | Feeds | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    samples: int = 1,
    seed: int = 0,
    numerics: str = "exact",
    rtol: float | None = None,
    atol: float | None = None,
    inputs_label: str | None = None,
) -> Comparison:
    """Compare B's outputs with A's (the reference) on ``inputs`` or generated feeds.

    Raises BadInputError for unusable models or inputs (B's inputs must have A's names),
    UnverifiedError when onnxruntime cannot load or run either model. ``inputs_label``
    (the samples' file) is named in errors about a sample.
    """
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is not None and not value >= 0:  # NaN too: no element would ever match
            raise BadInputError(f"{name} must be 0 or more, got {value:g}")
    model_a, path_a, label_a = _load(a)
    model_b, path_b, label_b = _load(b)
    names_a = sorted(v.name for v in model_a.graph.inputs if not v.is_initializer())
    names_b = sorted(v.name for v in model_b.graph.inputs if not v.is_initializer())
    if names_a != names_b:
        raise BadInputError(f"the graph inputs differ: {names_a} in A, {names_b} in B", label_b)
    if numerics not in TOLERANCES:
        raise BadInputError(f"unknown numerics '{numerics}' (one of {', '.join(TOLERANCES)})")
    if input_shapes:
        check_input_shapes(model_a, input_shapes, label=label_a)
    if inputs is None:
        sizes = _fixed_in_b(model_a, model_b, input_shapes or {})
        try:
            feeds_list = generate_inputs(model_a, sizes, samples=samples, seed=seed)
        except UngeneratedInputError as error:  # a string input, say: only --inputs can feed A
            raise UngeneratedInputError(str(error), label_a) from None
    else:
        feeds_list = [dict(inputs)] if isinstance(inputs, Mapping) else [dict(f) for f in inputs]
        if not feeds_list:
            raise BadInputError("no inputs given (empty iterable)")
        for i, feeds in enumerate(feeds_list):
            where = f"sample {i} in {inputs_label}" if inputs_label else f"sample {i}"
            check_feeds(model_a, feeds, label=where)
    by_tolerance = rtol is None and atol is None
    tolerance = TOLERANCES[numerics] if by_tolerance else Tolerance()
    criterion = f"{numerics} tolerance" if by_tolerance else f"rtol {rtol or 0:g}, atol {atol or 0:g}"
    session_a = _session(model_a, path_a, label_a)
    session_b = _session(model_b, path_b, label_b)
    notes: list[str] = []
    first_a: dict[str, np.ndarray] | None = None  # A's outputs on the first sample, when run already
    if inputs is None:
        feeds_list, first_a, retried = _runnable(session_a, feeds_list, model_a, sizes, samples, seed)
        notes += [retried] if retried else []
    outputs_a = [o.name for o in session_a.get_outputs()]
    outputs_b = [o.name for o in session_b.get_outputs()]
    common = [n for n in outputs_a if n in outputs_b]
    worst: dict[str, OutputMetrics] = {}
    for index, feeds in enumerate(feeds_list):
        got_a = first_a if index == 0 and first_a is not None else _run(session_a, feeds, label_a)
        got_b = _run(session_b, feeds, label_b)
        for name in common:
            ref, got = got_a[name], got_b[name]
            if got.dtype == np.float16 and ref.dtype == np.float32:
                got = got.astype(np.float32)  # a float16 interface, judged on float32 values
            metrics = compare_outputs(name, "cpu", ref, got, tolerance)
            if not by_tolerance:
                metrics = _allclose(metrics, ref, got, rtol or 0.0, atol or 0.0)
            current = worst.get(name)
            if current is None or _badness(metrics) > _badness(current):
                worst[name] = metrics
    return Comparison(
        outputs=[worst[n] for n in common],
        samples=len(feeds_list),
        criterion=criterion,
        only_in_a=[n for n in outputs_a if n not in outputs_b],
        only_in_b=[n for n in outputs_b if n not in outputs_a],
        notes=notes,
    )


def _runnable(session: ort.InferenceSession, generated: list[dict[str, np.ndarray]], model: ir.Model,
              shapes: Mapping[str, Sequence[int]], samples: int, seed: int
              ) -> tuple[list[dict[str, np.ndarray]], dict[str, np.ndarray] | None, str | None]:
    """``generated`` when A runs its first sample, else the first of ``RETRY_SIZES``' feeds it
    runs, with A's outputs on their first sample and a note saying what was retried;
    ``generated`` and no outputs when none runs (the comparison then says why)."""
    for sizes in ({}, *RETRY_SIZES):
        feeds = generate_inputs(model, shapes, samples=samples, seed=seed, **sizes) if sizes else generated
        try:
            first = _run(session, feeds[0], "")
        except UnverifiedError:
            continue
        retried = f"generated inputs did not run on A; they were made again with {sizes_text(sizes)}"
        return feeds, first, retried if sizes else None
    return generated, None, None


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
    """A table: one row per output, then the verdict."""
    width = max([len("output"), *(len(m.name) for m in result.outputs)])
    rows = [f"{'output':<{width}}  {'max abs':>9}  {'max rel':>9}  {'SQNR dB':>8}  {'cosine':>9}  verdict"]
    for m in result.outputs:
        verdict = "ok" if m.passed else f"MISMATCH: {m.problem}"
        rows.append(f"{m.name:<{width}}  {_num(m.max_abs, '.3g'):>9}  {_num(m.max_rel, '.3g'):>9}  "
                    f"{_num(m.sqnr_db, '.1f'):>8}  {_num(m.cosine, '.6f'):>9}  {verdict}")
    for name in result.only_in_a:
        rows.append(f"{name:<{width}}  only in A")
    for name in result.only_in_b:
        rows.append(f"{name:<{width}}  only in B")
    rows.extend(f"note: {note}" for note in result.notes)
    verdict = "MATCH" if result.passed else "MISMATCH"
    rows.append(f"{verdict} ({result.criterion}, {result.samples} sample(s))")
    return "\n".join(rows)
