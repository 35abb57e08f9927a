"""Acceptance of a float16 result: per output, the SQNR rule or the task judge with enough
evidence.

An output of a float16 candidate is accepted when

- **the SQNR rule** holds: its SQNR against the float32 original, summed over all samples,
  is at least the fp16 tolerance's (40 dB) and its cosine at least 0.9999; or
- **the task** decides it and passes it (``task_decides``): the INT8 task judge
  (``optcc.numerics.task.TaskJudge``: top-1 on confident samples, CTC decode, detection-map
  boxes and mask, YOLO boxes, pooled embeddings), against float32's own noise floor under
  input perturbation, with every judged count-based component over enough items to show
  the margin: at least ``MIN_ITEMS`` (``TaskJudge.undecided``) and at least
  ``FEW_EXPECTED_ERRORS`` errors at its allowed rate (``TaskJudge.thin``). An output judged
  by SQNR in the task (its metric is ``sqnr``, or a component fell back to an SQNR row) or
  by a callback (no items to count) is not decided by the task: the SQNR rule alone
  judges it.

An integer or boolean output (decoded ids, labels) has no SQNR: it is accepted when its
values equal float32's, or when the task decides it and passes it (``labels``: the rows
that differ, against float32's own under input noise). Whatever the task says, an output
with a structural problem fails: NaN or infinities where float32 has none (float16
overflow), another shape or dtype (``compare_outputs`` reports these before any SQNR).
The pass's accuracy check (``ConvertFloat16Pass``) and the final verification both judge
with ``accept_float16``, and through ``optimize`` with one judge.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from optcc.numerics.metrics import OutputMetrics
from optcc.numerics.task import REPORTED_ONLY, TaskJudge

__all__ = ["ACCEPTED_BY_SQNR", "ACCEPTED_BY_TASK", "task_decides", "accept_float16", "widen_float16"]

ACCEPTED_BY_SQNR = "sqnr"
ACCEPTED_BY_TASK = "task"


def task_decides(judge: TaskJudge, verdict: Mapping[str, Any]) -> dict[str, bool]:
    """Per output the task can decide on these samples, whether ``verdict`` (the judge's
    verdict on a candidate) passes it. Decided: every row of the output judges a built-in
    task metric other than ``sqnr``; the output has a judged count-based component (one
    that counts items) and none of them is undecided or thin on the floor's items; the
    candidate's rows hold no SQNR row; and no component other than the reported-only
    ones went unjudged."""
    weak = {part.rsplit(":", 1)[0] for part in (*judge.undecided(), *judge.thin())}
    passed: dict[str, bool] = {}
    counted: set[str] = set()  # outputs with a judged component over items
    excluded: set[str] = set()
    for key, metric in judge.plan.items():
        if not isinstance(metric, str):
            return {}  # a callback judges all outputs at once, over no items
        name = judge.output_of(key)
        if metric == "sqnr" or key in weak:
            excluded.add(name)
    for row, value in verdict.get("metrics", {}).items():
        key, part = row.rsplit(":", 1)
        name = judge.output_of(key)
        if part in REPORTED_ONLY:
            continue
        if value.get("metric") == "sqnr" or value.get("judged") is False:
            excluded.add(name)  # judged by SQNR, or not at all: the task did not decide it
            continue
        passed[name] = passed.get(name, True) and bool(value.get("passed"))
        if "items" in value:
            counted.add(name)
    return {name: ok for name, ok in passed.items() if name in counted and name not in excluded}


def accept_float16(metrics: Sequence[OutputMetrics], judge: Callable[[], TaskJudge | None] | None,
                   got: Mapping[str, Sequence[np.ndarray]]) -> tuple[list[OutputMetrics], dict[str, Any] | None]:
    """``metrics`` (one provider's, each output judged by the SQNR rule) with ``accepted_by``
    set: "sqnr" where the rule holds; "task", and passed, where it fails without a
    structural problem and the task decides and passes the output (``task_decides``).
    ``judge`` gives the task judge of these samples (None: no task judge), asked only when
    some output fails the SQNR rule and could be rescued; ``got``: the candidate's outputs
    by name, one array per sample. Returns the judge's verdict too (None when it did not
    run), with ``accepted_by`` per output and the outputs the task decided."""
    result = [dataclasses.replace(m, accepted_by=ACCEPTED_BY_SQNR) if m.passed else m for m in metrics]
    # a structural problem (NaN/inf where float32 has none, shape, dtype) leaves no SQNR; an
    # integer output whose values alone differ is the task's to judge (its ``labels`` rows)
    rescuable = {m.name for m in result if not m.passed and (m.sqnr_db is not None or m.values_differ)}
    if judge is None or not rescuable:
        return result, None
    try:
        task_judge = judge()
        verdict = None if task_judge is None else task_judge(got)
    except Exception as e:  # noqa: BLE001 - no task judgement: the SQNR rule alone decides
        said = str(e).splitlines()[0][:300] if str(e) else repr(e)
        return result, {"unavailable": f"the task judge could not run: {said}"}
    if task_judge is None or verdict is None:
        return result, None
    decided = task_decides(task_judge, verdict)
    # the SQNR it missed stays in ``sqnr_db``; the verdict's rows say why the task accepted
    result = [dataclasses.replace(m, passed=True, accepted_by=ACCEPTED_BY_TASK, problem=None)
              if m.name in rescuable and decided.get(m.name) else m for m in result]
    verdict = {**verdict, "accepted_by": {m.name: m.accepted_by for m in result},
               "decided_by_task": sorted(decided)}
    return result, verdict


def widen_float16(got: Sequence[np.ndarray], originals: Sequence[np.ndarray]) -> list[np.ndarray]:
    """A candidate's outputs (one case), float16 ones as float32 (exact) where the
    original's (``originals``: one case of the original's outputs) are float32."""
    return [np.asarray(g).astype(np.float32) if np.asarray(g).dtype == np.float16 and np.asarray(o).dtype == np.float32
            else g for g, o in zip(got, originals)]
