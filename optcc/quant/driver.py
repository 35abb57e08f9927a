"""The INT8 driver: calibrate -> QuantizeInt8Pass -> accuracy-aware fallback.

``quantize_int8(model, calibration_data, method="minmax", ...)`` is what the API and CLI
call for ``--int8``. It never modifies its input, and returns ``(ir_model, stats)``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from optcc import ir as oir
from optcc.quant.bias_correction import FloatMeans, SegmentMeans, correct_biases, float_result_ranks
from optcc.runtime.session import REFUSALS, RefusedModel, first_line
from optcc.quant.calibration import (CalibrationData, ChannelMeans, Feeds, calibrate, calibration_positions,
                                     holdout_positions, load_samples, split_at)
from optcc.errors import BadInputError
from optcc.infra.registry import create_pass
from optcc.quant.cost_model import CPU_CLASSES, CostModel, Workload, compare_workloads, cpu_class, element_counts
from optcc.quant.fallback import (
    RANKING_SAMPLES,
    CandidateOutputs,
    Confirmation,
    SpeedBound,
    Target,
    compare_latency,
    evaluate,
    evaluate_candidate,
    fallback,
    integer_op_histogram,
    model_outputs,
    quantized_already,
    shortfall,
)
from optcc.numerics.decode import stream_plan
from optcc.numerics.inputs import input_roles
from optcc.numerics.task import (DEFAULT_MARGIN, FEW_EXPECTED_ERRORS, FLOOR_DRAWS, METRICS, MIN_DEVIATION, MIN_ITEMS,
                                 DeferredOutputs, TaskJudge, UserMetric, float_free_outputs, perturbation_draws,
                                 perturbation_roles, projected_outputs, recurrent_outputs, row_metrics,
                                 sequence_outputs, token_outputs, unmoved, wants_draws)

__all__ = ["Int8Options", "quantize_int8", "fold_batchnorm", "prepare_float", "upgrade_opset"]


def _run_pass(model: ir.Model, name: str, **options: Any) -> dict[str, Any]:
    """Run the registered pass ``name`` in place; its stats, with ``modified``."""
    result = create_pass(name, **options)(model)
    return {**dict(getattr(result, "stats", {}) or {}), "modified": bool(result.modified)}


def fold_batchnorm(model: ir.Model) -> dict[str, Any]:
    """Fold BatchNormalization with the ``fuse-batchnorm`` pass when it is available
    (returns its stats; ``{"unavailable": ...}`` when it is not)."""
    if not any(n.op_type == "BatchNormalization" for n in oir.nodes(model)):
        return {}
    return _run_pass(model, "fuse-batchnorm")


def prepare_float(model: ir.Model) -> dict[str, Any]:
    """Make the weights constants and fold what would otherwise be quantized separately
    into the convolutions, in place:

    - constants computed by nodes (the onnx model zoo's ConstantOfShape weights) are
      folded, whatever their size (``fold-constants`` with ``fold_large``): a weight
      computed at run time cannot be quantized, and the INT8 result stores it in a
      quarter of the float bytes;
    - BatchNormalization (``fuse-batchnorm``) and per-channel constant Mul/Add after a
      Conv (``fuse-conv-affine``, e.g. PP-LCNet's learnable affine blocks, 2 extra 8-bit
      roundings per layer otherwise).

    The fusions are the -O2 ones (within 1e-4), so a model that went through -O2 with
    ``--fold-large`` is unchanged. Returns the passes' stats."""
    stats: dict[str, Any] = {}
    if any(n.op_type in _WEIGHT_GENERATORS for n in model.graph):
        folded = _run_pass(model, "fold-constants", fold_large=True)
        if folded["modified"]:
            stats["fold-constants"] = folded
    bn = fold_batchnorm(model)
    if bn:
        stats["fuse-batchnorm"] = bn
    if any(n.op_type in ("Mul", "Add") for n in oir.nodes(model)):
        affine = _run_pass(model, "fuse-conv-affine")
        if affine.get("modified"):
            stats["fuse-conv-affine"] = affine
            _run_pass(model, "eliminate-dead-nodes")
    return stats


BIAS_CORRECTION_TOLERANCE = 2.0  # bias correction is dropped when it multiplies the task shortfall by more

_WEIGHT_GENERATORS = frozenset({"ConstantOfShape", "Expand", "Tile", "Range"})


def upgrade_opset(model: ir.Model, version: int = 13) -> tuple[ir.Model, str | None]:
    """The model converted to ``version`` of the default opset with onnx's version
    converter (per-channel QuantizeLinear needs 13), or the model unchanged and why."""
    current = oir.default_opset(model)
    if current >= version:
        return model, None
    try:
        converted = model.clone()  # shares the weights, which the conversion never copies
        oir.convert_opset(converted, version)
        return converted, None
    except Exception as e:  # noqa: BLE001 - the converter fails on some models
        return model, f"cannot convert opset {current} to {version} ({first_line(e)}); weights per tensor"


def _task_judge(model: ir.Model, held: Sequence[Any], metric: Any, margin: float, metric_target: float | None,
                min_sqnr_db: float, groups: Sequence[str] | None = None, draws: int = FLOOR_DRAWS) -> TaskJudge:
    """The judge of ``held``: the float model's outputs, and its noise floor (its outputs on
    the held-out samples perturbed at their resolution, ``optcc.numerics.task.perturb``),
    run when a judgement first needs it (``DeferredOutputs``).
    When a metric excuses float32's own errors or averages its floor over draws
    (``wants_draws`` of its rows, ``row_metrics``), the floor takes ``draws`` independent
    perturbations (``perturbation_draws``); else one."""
    moving = perturbation_roles(input_roles(model))
    stream = stream_plan(model)  # its state is judged in the second step's answers (``model_outputs``)
    moved, how = perturbation_draws(held, 1, **moving)
    reference = model_outputs(model, held)
    perturbed: Mapping[str, Sequence[Any]]
    if unmoved(held, moved[0]):  # no input moves: the perturbed outputs are the reference's
        perturbed = {name: list(values) for name, values in reference.items()}
    else:
        perturbed = DeferredOutputs(lambda: model_outputs(model, moved[0]))
    fields = dict(groups=groups, sequences=sequence_outputs(model), heads=projected_outputs(model),
                  exact=float_free_outputs(model), state=stream.state_outputs if stream is not None else (),
                  tokens=token_outputs(model, held, reference), recurrent=recurrent_outputs(model))
    more_outputs: list[Mapping[str, Sequence[Any]]] = []
    if draws >= 2 and wants_draws(row_metrics(reference, metric, **fields)):
        more, _ = perturbation_draws(held, draws, first=1, **moving)
        if all(unmoved(held, draw) for draw in more):
            more_outputs = [{name: list(values) for name, values in reference.items()} for _ in more]
        else:
            outputs = DeferredOutputs(lambda: model_outputs(model, [feeds for draw in more for feeds in draw]))
            count = len(held)

            def draw_of(d: int) -> DeferredOutputs:  # draw ``d``'s part of the one run of every draw
                return DeferredOutputs(lambda: {name: values[d * count:(d + 1) * count]
                                                for name, values in outputs.items()})

            more_outputs = [draw_of(d) for d in range(len(more))]
    # made once, with its floor over every draw
    return TaskJudge(reference, perturbed, metric, margin, metric_target, min_sqnr_db, how, draws=more_outputs,
                     **fields)


def _given_judge(o: Int8Options, positions: Sequence[int]) -> TaskJudge | None:
    """``o.judge``'s judge of the samples at ``positions`` when it judges them as ``o`` asks
    (metric, margin, targets, groups), else None: then the pass measures its own."""
    given = o.judge(positions) if o.judge is not None else None
    if given is None or len(next(iter(given.reference.values()), [])) != len(positions):
        return None
    # whether its floor takes more draws is decided by the rows of every sample it was planned among
    wanted = wants_draws(given.plan if given.rows is None else given.rows)
    if given.draw_count != (o.floor_draws if o.floor_draws > 1 and wanted else 1):
        return None  # its floor is measured on other perturbation draws
    groups = None if o.groups is None else [o.groups[i] for i in positions]
    metric = "auto" if given.metric is None else given.metric  # the judge reads None as "auto"
    if (metric, given.margin, given.metric_target, given.min_sqnr_db) != \
            (o.metric, o.metric_margin, o.metric_target, o.target.min_sqnr_db) or \
            (None if given.groups is None else list(given.groups)) != groups:
        return None
    return given


MIN_GROUP_SAMPLES = 2  # one calibrates, one is held out
SPEED_MACHINE_PREFIX = "INT8 ships on the speed modelled for"  # stats["speed_machine"]'s first words


def check_distinct(samples: Sequence[Feeds], path: object | None = None, hint: str = "",
                   groups: Sequence[str] | None = None) -> None:
    """BadInputError (naming ``path``, ending with ``hint``) unless ``samples`` (with
    ``groups``: each group's) hold at least ``MIN_GROUP_SAMPLES`` distinct samples: on one
    (or copies of one) the held-out judgement would rest on the very data that calibrated."""
    if groups is not None and len(groups) != len(samples):
        raise BadInputError(f"{len(groups)} group labels for {len(samples)} samples", path)
    parts: dict[str | None, list[Feeds]] = {}
    for i, feeds in enumerate(samples):
        parts.setdefault(None if groups is None else str(groups[i]), []).append(feeds)
    for label, part in parts.items():
        # fewer than 2 distinct samples is every one the same as the first: the first that
        # differs ends the comparison, so valid data cost one comparison, not a pass over all
        if not any(_differ(part[0], feeds) for feeds in part[1:]):
            whose = "the data hold" if label is None else f"group '{label}' holds"
            copies = f" ({len(part)} samples, all the same)" if len(part) > 1 else ""
            raise BadInputError(f"INT8 needs at least {MIN_GROUP_SAMPLES} distinct calibration samples, one to "
                                f"calibrate and one held out to judge it; {whose} 1{copies}{hint}", path)


def _differ(first: Feeds, other: Feeds) -> bool:
    """Whether two samples differ in their input names, or an input's dtype, shape or bytes."""
    if sorted(first) != sorted(other):
        return True
    for name, value in first.items():
        a, b = np.asarray(value), np.asarray(other[name])
        if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
            return True
    return False


def check_groups(groups: Sequence[str] | None, count: int, metric: Any, outputs: Sequence[str] | None) -> None:
    """BadInputError unless ``groups`` (None, or one label per sample of ``count``) gives
    each group at least ``MIN_GROUP_SAMPLES`` samples, and every key of a ``metric``
    mapping is ``*`` or names an output, ``@<group>`` a group, or ``<output>@<group>`` both
    (``outputs`` None: output names are not checked)."""
    labels: list[str] = []
    if groups is not None:
        if len(groups) != count:
            raise BadInputError(f"{len(groups)} group labels for {count} samples")
        sizes = {label: c["samples"] for label, c in _group_counts(groups, ()).items()}
        labels = list(sizes)
        few = [f"'{g}' ({n})" for g, n in sizes.items() if n < MIN_GROUP_SAMPLES]
        if few:
            raise BadInputError(f"group {', '.join(few)} has too few samples: each group needs at least "
                                f"{MIN_GROUP_SAMPLES} (one calibrates, one is held out)")
    if not isinstance(metric, Mapping):
        return
    for key in metric:
        if key == "*" or outputs is not None and key in outputs:
            continue
        output, at, group = str(key).rpartition("@")
        if outputs is None and not at:
            continue
        if outputs is not None and (at and output and output not in outputs or not at):
            hint = f"; the group '{key}' is '@{key}'" if not at and key in labels else ""
            if not at and key in (*METRICS, "auto", "target"):
                hint += f"; '{key}' is a metric: a key before '=' names an output or '@group'"
            raise BadInputError(f"INT8 metric for '{key}': the model has no output '{output or key}' "
                                f"(outputs: {', '.join(outputs)}){hint}")
        if not labels:
            raise BadInputError(f"INT8 metric for '{key}' names group '{group}', but the samples have no groups")
        if group not in labels:
            raise BadInputError(f"INT8 metric for '{key}' names group '{group}', which no sample is in "
                                f"(groups: {', '.join(labels)})")


MIN_GROUP_HELD_OUT = 10  # held-out samples a group's verdict rests on; on fewer, it is mostly chance


def _few_held_out(groups: Sequence[str] | None, held: Sequence[int]) -> list[str]:
    """Why a group's held-out part is too small to judge it: one line per group with fewer
    than ``MIN_GROUP_HELD_OUT`` samples at positions ``held`` (none without groups)."""
    if groups is None:
        return []
    return [f"group '{label}' on {c['held_out']} held-out samples: fewer than {MIN_GROUP_HELD_OUT}, a verdict "
            "mostly by chance (which samples they are, and the noise floor's draw)"
            for label, c in _group_counts(groups, held).items() if c["held_out"] < MIN_GROUP_HELD_OUT]


def _group_counts(groups: Sequence[str], held: Sequence[int]) -> dict[str, dict[str, int]]:
    """Per group (in order of first appearance): its samples, and how many are held out."""
    counts: dict[str, dict[str, int]] = {}
    for label in groups:
        counts.setdefault(str(label), {"samples": 0, "held_out": 0})["samples"] += 1
    for i in held:
        counts[str(groups[i])]["held_out"] += 1
    return counts


def _in_turn(positions: Sequence[int], groups: Sequence[str] | None, count: int) -> list[int]:
    """The first ``count`` of ``positions``, taken from each group in turn (groups in order
    of first appearance, each group's positions in order); without groups, the first."""
    if groups is None:
        return list(positions[:count])
    queues: dict[str, list[int]] = {}
    for i in positions:
        queues.setdefault(str(groups[i]), []).append(i)
    taken: list[int] = []
    while len(taken) < count and any(queues.values()):
        for queue in queues.values():
            if queue and len(taken) < count:
                taken.append(queue.pop(0))
    return taken


def _at(outputs: Callable[..., Mapping[str, Sequence[Any]]], positions: Sequence[int]) -> CandidateOutputs:
    """``outputs`` (``Int8Options.outputs``) of a candidate on the samples at ``positions``
    (with a ``stop``: on the first of them, up to the one after which it says True)."""
    return lambda model, stop=None: outputs(model, positions, stop=stop)


def _describe_miss(evaluation: Mapping[str, Any], target: Target) -> str:
    """Which judged metrics missed, with the floor, or the worst SQNR and agreement."""
    task = evaluation.get("task")
    if task:
        def below_target(row: Mapping[str, Any]) -> str:  # an SQNR row also missed the fixed target
            db = row.get("sqnr_db") if row.get("metric") == "sqnr" else None
            return f"SQNR {db:.1f} dB < {target.min_sqnr_db:g} dB target; " if isinstance(db, float) else ""

        misses = [f"{name} deviation {row['deviation']} > {row['allowed']} allowed ({below_target(row)}floor "
                  f"{row['floor']}, margin {task['margin']:g}{'; ' + row['why'] if row.get('why') else ''})"
                  for name, row in task["metrics"].items() if row.get("judged", True) and not row.get("passed", True)]
        groups = task.get("groups") or {}
        verdicts = ", ".join(f"{label} {'passes' if g['passed'] else 'misses'}" for label, g in groups.items())
        return (f"groups {verdicts}: " if groups else "") + ("; ".join(misses) or "the task metric misses")
    final = evaluation.get("sqnr_db", {})
    worst = min((v for v in final.values() if isinstance(v, float)), default=float("nan"))
    agreement = evaluation.get("argmax_agreement", {})
    detail = f"worst output SQNR {worst:.1f} dB (target {target.min_sqnr_db:g})"
    if agreement:
        detail += f", argmax agreement {min(agreement.values()):.2f} (target {target.min_argmax_agreement:g})"
    return detail


def _reported(pass_stats: Mapping[str, Any]) -> dict[str, Any]:
    """The quantize-int8 pass's stats as the INT8 stats report them: without its per-layer
    output names and ops (``layer_ops`` is reported on its own)."""
    return {k: v for k, v in pass_stats.items() if k not in ("layer_outputs", "layer_ops")}


@dataclasses.dataclass(frozen=True)
class Int8Options:
    """How ``quantize_int8`` calibrates, quantizes, judges and falls back (each field is
    described in its docstring); ``method_options`` go to the calibration method
    (``percentile``, ``levels``)."""

    method: str = "minmax"
    per_channel: bool = True
    activation_type: str = "uint8"
    exclude: Iterable[str] = ()
    holdout_fraction: float = 0.2
    groups: Sequence[str] | None = None
    target: Target = dataclasses.field(default_factory=Target)
    metric: str | UserMetric | Mapping[str, str | UserMetric] | None = "auto"
    metric_margin: float = DEFAULT_MARGIN
    metric_target: float | None = None
    floor_draws: int = FLOOR_DRAWS
    accuracy_fallback: bool = True
    max_float_layers: int | None = None
    max_float_fraction: float = 0.5
    max_layers_ranked: int = 256
    ranking_samples: int | None = RANKING_SAMPLES
    ranking: str = "estimate"
    require_target: bool = True
    require_speedup: bool = True
    min_speedup: float = 1.1
    cpu: str | None = None
    measure_latency: bool = False
    speed_threads: int = 2
    bias_correction: bool = True
    bias_correction_samples: int = 4
    cache_dir: str | os.PathLike | None = None
    bins: int | None = None
    executor: Any = dataclasses.field(default=None, compare=False)
    shards: int | None = None
    progress: bool = False
    prepare: bool = True
    equalize: bool = True
    smooth: bool = False
    method_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    judge: Callable[[Sequence[int]], TaskJudge | None] | None = dataclasses.field(default=None, compare=False)
    outputs: Callable[..., Mapping[str, Sequence[Any]]] | None = dataclasses.field(default=None, compare=False)

    @classmethod
    def of(cls, options: Int8Options | None = None, **fields: Any) -> Int8Options:
        """``options`` (default: the defaults) with ``fields`` replaced; a keyword that is
        no field goes to ``method_options``."""
        known = {f.name for f in dataclasses.fields(cls)}
        result = dataclasses.replace(options or cls(), **{k: v for k, v in fields.items() if k in known})
        extra = {k: v for k, v in fields.items() if k not in known}
        if extra:
            result = dataclasses.replace(result, method_options={**result.method_options, **extra})
        return result


def _thin_words(judge: TaskJudge | None, samples: int) -> str:
    """``judge``'s thin components (``TaskJudge.thin``) in words: the errors its items hold
    at the allowed rate and about how many samples like these would hold
    ``FEW_EXPECTED_ERRORS``; "" when none is thin, or no floor was measured (the words read
    only a floor already measured: they never measure one). A verdict on such a component
    turns on one or two items: more samples (with the task's content) make it decisive."""
    if judge is None or not judge.floor_measured:
        return ""
    words = []
    for name in judge.thin():
        key, part = name.rsplit(":", 1)
        items = judge.floor_items[key][part]
        expected = items * judge.margin * max(judge.floor[key][part], MIN_DEVIATION)
        if not items:  # float32 finds nothing to count on these samples: no rate to scale
            words.append(f"{name} over no items on these {samples} samples")
            continue
        if expected <= 0:  # no error allowed (a margin of 0): no count of samples makes one
            continue
        words.append(f"{name} over {items} items holds {expected:.1f} errors at the allowed rate on these "
                     f"{samples} samples; about {math.ceil(samples * FEW_EXPECTED_ERRORS / expected)} would hold "
                     f"{FEW_EXPECTED_ERRORS:g}")
    return "; ".join(words) + (": too few errors to tell float32's noise floor from a few times it, so one or two "
                               "items decide" if words else "")


def quantize_int8(
    model: oir.ModelSource,
    calibration_data: CalibrationData,
    method: str | None = None,
    options: Int8Options | None = None,
    **fields: Any,
) -> tuple[ir.Model, dict[str, Any]]:
    """Calibrate on the first ``1 - holdout_fraction`` of the samples (of each group's,
    with ``groups``), quantize, judge the held-out rest by the task and return the most
    sensitive layers to float until the judgement holds (``optcc.quant.fallback.fallback``).

    Acceptance (``optcc.numerics.task``): ``metric`` ("auto": per output, from its
    nature: argmax agreement for classifiers, CTC decode for sequence probabilities, box
    F1 and mask IoU for detection maps and YOLO-style boxes, SQNR otherwise; a name of
    ``METRICS``; a callable ``metric(ref_outputs, got_outputs) -> float``, higher is
    better; or a mapping from output name to either) compares the quantized model with
    the float one. It must deviate no more than ``metric_margin`` times the float
    model's own noise floor (the float model against itself with its inputs perturbed
    at their resolution), or reach ``metric_target`` (``target.min_sqnr_db`` for SQNR).
    ``metric=None`` keeps the plain ``target`` (SQNR and argmax agreement thresholds).
    ``stats["acceptance"]`` shows the metrics and the floor; every evaluation in
    ``stats["fallback"]`` shows the deviations next to it. When the held-out items of a
    count-based component are too few to show the margin (``TaskJudge.thin``), the last
    half of the samples is held out instead (``held_out_widened`` says so). When the
    held-out samples give a count-based component fewer than ``MIN_ITEMS`` items
    (``TaskJudge.undecided``), every candidate is judged on all the samples instead, the
    calibration ones included (``stats["acceptance"]["judged_samples"]`` and
    ``all_samples_judged`` say so).
    ``floor_draws``: where a metric counts scored decisions (top-1, decoded lines), the
    floor is measured on that many independent perturbation draws and the errors float32
    makes itself under some draw are not counted; YOLO boxes take the mean over that many
    draws as their floor (``optcc.numerics.task.TaskJudge``); else one draw.
    ``groups``: one label per sample; the last ``holdout_fraction`` of each group's
    samples is held out (and the last half of each when widened), so every group is
    judged, apart, against its own floor; a group with fewer than ``MIN_GROUP_HELD_OUT``
    samples held out widens the held-out part to half, and then has every sample judged,
    as too few items do; a metric mapping may name a group
    (``{"@photo": "added-boxes"}``, ``optcc.numerics.task.TaskJudge``). Each group needs at
    least ``MIN_GROUP_SAMPLES`` samples, and every key of a metric mapping must name an
    output or a group (``check_groups``; else BadInputError). Bias correction measures
    the first calibration samples of every group in turn.

    The INT8 model is returned only when it is worth shipping; otherwise the input model,
    unchanged, with ``stats["modified"] = False``, ``stats["declined"]`` ("speed" or
    "accuracy") and ``stats["reason"]`` in words:

    - ``require_speedup``: INT8 must be at least ``min_speedup`` times faster than float32
      (1.1 by default) by ``optcc.quant.cost_model``, a deterministic model of
      onnxruntime CPU (integer kernels it fuses, float islands and Q/DQ boundaries left,
      bytes moved) for the CPU class ``cpu`` ("x86-vnni", "x86-avx2", ``CPU_CLASSES``;
      default ``DEFAULT_CPU_CLASS`` whatever the machine, ``cpu_class``), never by a clock
      or by the machine: the same call gives the same decision under any load and on any
      machine; ``stats["latency"]["cpu"]`` names the class, how it was chosen and, next to
      a default, the class of this machine's CPU by its feature flags; where INT8 ships but
      the model for that class would decline it, ``stats["speed_machine"]`` says so, in
      words (it never decides). Checked on the fully
      quantized model first (the fastest INT8 variant: when even that is not faster, no
      fallback is attempted) and again on the model the fallback returns. ``measure_latency``: also time both models on
      onnxruntime (``speed_threads`` threads, interleaved) and report it in
      ``stats["latency"]["measured"]``; it never decides.
    - ``require_target``: when the fallback cannot meet ``target`` within
      ``max_float_layers`` layers returned to float (default: ``max_float_fraction`` of the
      quantized layers; beyond half, INT8 has little left to gain), the model would fail
      verification.

    ``prepare``: first fold generated weights and BatchNorm/affine layers into the
    convolutions (``prepare_float``); a pipeline that runs those passes itself turns it off.

    ``equalize``: before calibrating, rescale the channels between Conv -> (Relu) -> Conv
    pairs so both layers' weights have equal ranges (``equalize-cross-layer``, exact in
    real arithmetic), which evens out the per-tensor activation range between them. On
    the corpus it lowers every task deviation (docs/int8.md). On by default; the
    equalized layers' intermediates are other tensors (renamed), so per-layer comparisons
    with the original by name skip them.

    ``smooth``: before calibrating, move the outlier channels of LayerNorm outputs read
    by MatMuls into those MatMuls' weights (``smooth-activations``, SmoothQuant-style,
    exact in real arithmetic). Off by default: on the real MiniLM it changed nothing the
    task metric sees (docs/int8.md).

    ``bias_correction``: every model this builds with all its layers quantized or only
    some returned to float (not the single-layer models of the ranking) gets its Conv and
    Gemm biases corrected for the mean shift quantization causes
    (``optcc.quant.bias_correction.correct_biases``), measured on the first
    ``bias_correction_samples`` calibration samples; a model declined for speed is not
    corrected (its speed is checked first, and again once corrected). With a task judge, the fully
    quantized model is judged with and without the correction, and the correction is
    dropped for the whole run when the corrected one fails and the correction is
    clearly worse on the held-out samples (the uncorrected model passes, or the corrected
    one's ``shortfall`` is more than ``BIAS_CORRECTION_TOLERANCE`` times larger); a
    corrected model that passes ships without the comparison. ``stats["bias_correction"]``
    says which and why.

    ``executor`` (any ``concurrent.futures.Executor``: a process pool, Dask's
    ``client.get_executor()``, ...): calibration statistics are collected in ``shards``
    contiguous shards on it and merged in order
    (``optcc.quant.calibration.collect_statistics_sharded``), which gives the ranges of a
    single-process run bit for bit, so the same model.

    ``ranking_samples``: the fallback's per-layer error estimates are measured on that
    many of the judged samples, spread evenly (``optcc.quant.fallback.fallback``).

    ``judge``: returns the task judge of the samples at the given positions, in order,
    built on another float model that computes the same (``optcc.Verifier.sample_judge``:
    the original's outputs and noise floor, which the final verification judges with too,
    each row's metric chosen from every sample); used when it judges with this call's
    metric, margin, targets and groups, so the float model and its perturbed copy run once
    for the pass and the verification, the perturbed copy on a sample only when a judge
    holds it (the held-out ones; the others only for a model to confirm).
    The verification judges every sample, the calibration ones too, so the fallback's
    result is confirmed on that judge before it is accepted; when it misses there, more
    layers return to float until it passes (``fallback``'s ``confirm``;
    ``stats["fallback"]["confirmation"]``).
    ``outputs``: with that judge, runs a candidate on the samples at the given positions
    as the verification runs it and returns its outputs by name (``optcc.Verifier.outputs``,
    which keeps them for its check of that model): every candidate's evaluation on the
    judged samples and the confirmation take the candidate's outputs from it, so neither
    the confirmation nor the verification runs a model again on samples it was judged on.

    ``stats``: method, seconds (wall time per phase: prepare, calibrate, quantize,
    speed_check, fallback (its search) or evaluate, fallback_ranking,
    fallback_confirmation, report), calibration (samples, cache), ranges (per tensor), pass stats
    (quantized ops, kept float and why), fallback (per-layer sensitivity, layers kept
    float, SQNR before/after), integer_nodes (onnxruntime's fused integer kernels) and
    size before/after (weight bytes) of an INT8 model returned, latency when measured.
    """
    o = Int8Options.of(options, **({"method": method} if method is not None else {}), **fields)
    cpu = cpu_class(o.cpu)  # the CPU class the speed decision is modelled for
    loaded = oir.load(model)
    working = loaded.clone() if loaded is model else loaded
    untouched = loaded if loaded is model else loaded.clone()  # what a declined call returns
    samples = list(load_samples(calibration_data))
    if not samples:
        raise BadInputError("no calibration samples given (empty data)")
    check_groups(o.groups, len(samples), o.metric, [v.name for v in working.graph.outputs])
    stats: dict[str, Any] = {"method": o.method, "modified": False}

    judged_any = False  # whether a candidate was judged (the held-out judge's floor is reported after)

    def report_floor() -> None:
        """The held-out judge's floor in ``stats["acceptance"]``, or why it was not measured."""
        if "acceptance" not in stats:
            return
        measured = judge is not None and judge.floor_measured
        stats["acceptance"]["floor"] = judge.floor if judge is not None and measured else None
        thin = _thin_words(judge, len(judged))
        if thin:
            stats["acceptance"]["thin"] = thin
        if not measured:
            stats["acceptance"]["floor_not_measured"] = (
                f"every row is judged by SQNR and every candidate judged met the {o.target.min_sqnr_db:g} dB target, "
                f"which no floor can fail" if judged_any else "no candidate was judged")

    def decline(kind: str, reason: str) -> tuple[ir.Model, dict[str, Any]]:
        stats.update(modified=False, declined=kind, reason=reason)
        stats.setdefault("fallback", {"kept_float": [], "target_met": None, "skipped": reason})
        report_floor()
        return untouched, stats

    already = quantized_already(working)
    if already:  # Q/DQ over an INT8 model's Q/DQ would requantize what is quantized already
        return decline("nothing", already + "; INT8 quantizes float models")
    seconds: dict[str, float] = {}
    stats["seconds"] = seconds  # wall time per phase
    clock = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[phase] = round(seconds.get(phase, 0.0) + now - clock, 3)
        clock = now

    if o.per_channel and oir.default_opset(working) < 13:
        before = oir.default_opset(working)
        working, problem = upgrade_opset(working, 13)
        stats["opset"] = {"before": before, "after": oir.default_opset(working), "problem": problem}
    if o.prepare:
        folded = prepare_float(working)
        if folded:
            stats["float_fusions"] = folded
    if o.equalize:
        stats["equalize"] = _run_pass(working, "equalize-cross-layer")
    held_positions = holdout_positions(len(samples), o.holdout_fraction, o.groups)
    calib, held = split_at(samples, held_positions)
    lap("prepare")
    float_model = working
    judged = held  # the samples every candidate is judged on
    judged_positions = held_positions
    judge: TaskJudge | None = None
    # what makes the verifier's judgement of every sample, where it is shared
    confirm: Callable[[], Confirmation] | None = None
    judged_outputs: CandidateOutputs | None = None  # the verification's runs of a candidate on ``judged``
    if o.metric is not None:
        every = list(range(len(samples)))
        given_positions = held_positions  # ``given``'s samples (``held_positions`` may widen)
        given = _given_judge(o, given_positions)
        shared = given is not None  # the verifier's judges, its floor run on the samples they hold alone

        def judge_at(positions: Sequence[int]) -> TaskJudge:  # the verifier's judge of those samples
            if list(positions) == given_positions and given is not None:
                return given
            assert o.judge is not None
            judge = o.judge(positions)
            assert judge is not None
            return judge

        def own_judge(positions: Sequence[int]) -> TaskJudge:  # the judge of those samples, in order
            if shared:
                return judge_at(positions)
            return _task_judge(float_model, [samples[i] for i in positions], o.metric, o.metric_margin,
                               o.metric_target, o.target.min_sqnr_db,
                               None if o.groups is None else [o.groups[i] for i in positions], o.floor_draws)

        judge = own_judge(held_positions)
        thin = judge.thin()
        few = _few_held_out(o.groups, held_positions)
        widened: list[str] = []
        halves = holdout_positions(len(samples), o.holdout_fraction, o.groups, half=True)
        if (thin or few) and len(held) < len(halves):
            # the held-out items cannot show the margin, or a group's few samples decide by
            # chance: hold out half the samples (of each group) instead
            if thin:
                widened.append(f"{'; '.join(thin)} on {len(held)} held-out samples: at the allowed rate they hold "
                               f"fewer than {FEW_EXPECTED_ERRORS:g} errors, too few to tell float32's noise floor "
                               "from a few times it")
            widened += few
            held_positions = judged_positions = halves
            calib, held = split_at(samples, held_positions)
            judged = held
            judge = own_judge(held_positions)
        undecided = judge.undecided()
        few = _few_held_out(o.groups, held_positions)
        everything: list[str] = []  # why every sample is judged
        if (undecided or few) and len(held) < len(samples):
            # too few items (or a group's samples) held out for the task metric to decide: judge every sample
            everything = ([f"{'; '.join(undecided)} on the {len(held)} held-out samples: fewer than {MIN_ITEMS} "
                           "items"] if undecided else []) + few
            judged, judged_positions = samples, every
            judge = own_judge(every)
        o = dataclasses.replace(o, target=dataclasses.replace(o.target, judge=judge))
        share = o.outputs if shared else None  # the verification's runs of a candidate
        if share is not None:  # the verification keeps them for its check
            judged_outputs = _at(share, judged_positions)
        if shared and judged is not samples:
            # the final verification judges every sample: the fallback's result must pass there too
            # (its judge, with the floor of the samples not judged here, made only for a model found)
            made: list[Confirmation] = []  # made once: the fallback's and a faster candidate's (below)

            def confirm_every() -> Confirmation:
                if not made:
                    whole = judge_at(every)
                    made.append(Confirmation(samples, dataclasses.replace(o.target, judge=whole), whole.reference,
                                             outputs=None if share is None else _at(share, every)))
                return made[0]

            confirm = confirm_every
        stats["acceptance"] = {"metrics": judge.metric_names(), "chosen": judge.chosen(), "margin": o.metric_margin,
                               "metric_target": o.metric_target, "perturbation": dict(judge.perturbation),
                               "floor": None, "floor_draws": judge.draw_count,  # ``report_floor``
                               "held_out_samples": len(held), "judged_samples": len(judged),
                               **({} if o.groups is None else {"groups": _group_counts(o.groups, held_positions)}),
                               "reference": "the verifier's (the original model)" if shared
                               else "the float model this pass starts from"}
        if widened:
            stats["acceptance"]["held_out_widened"] = (
                f"{'; '.join(widened)}, so half the samples{' of each group' if o.groups is not None else ''} "
                f"({len(held)}) are held out")
        if judged is not held:
            stats["acceptance"]["all_samples_judged"] = (
                f"{'; '.join(everything)}, so every candidate is judged on all {len(samples)} samples (the "
                f"{len(calib)} calibration ones too)")
        lap("noise_floor")
    if o.smooth:
        stats["smooth"] = _run_pass(working, "smooth-activations", samples=calib)
        lap("prepare")
    options: dict[str, Any] = dict(o.method_options)
    if o.bins is not None:
        options["bins"] = o.bins
    # the samples bias correction measures: the first calibration ones, of every group in turn
    calibrated = calibration_positions(len(samples), held_positions)  # ``calib``'s positions in ``samples``
    measured_at = [calibrated.index(i) for i in _in_turn(calibrated, o.groups, o.bias_correction_samples)]
    # the float model's channel means there, taken by calibration's runs of those samples where it can
    taken = ChannelMeans(float_result_ranks(float_model), measured_at) if o.bias_correction else None
    calibration = calibrate(float_model, calib, o.method, cache_dir=o.cache_dir, progress=o.progress,
                            executor=o.executor, shards=o.shards, means=taken, **options)
    stats["calibration"] = {**calibration.to_dict(), "held_out_samples": len(held)}
    stats["ranges"] = {k: [float(v[0]), float(v[1])] for k, v in calibration.ranges.items()}
    lap("calibrate")
    user_exclude = list(o.exclude)

    # the fully quantized model, by whether its biases are corrected: asked for again, built once.
    # A model stored here is complete (its biases corrected before it is stored) and from then on
    # only read (judged, modelled, searched from) until this call returns, so the one stored may be
    # the very model handed on: ``make()`` hands out a clone of it, equal to one taken when it was stored
    fully: dict[bool, tuple[ir.Model, dict[str, Any]]] = {}
    correcting = o.bias_correction  # set once by the held-out judgement below
    measured_on = [calib[i] for i in measured_at]
    # the float model's channel means every corrected candidate is corrected towards, measured once
    float_means = FloatMeans(float_model, measured_on,
                             taken=[] if taken is None else [taken.taken.get(i, {}) for i in measured_at])
    # and the segment means every candidate shares upstream of its first float layer, measured once
    segment_means = SegmentMeans()

    def build(exclude: Sequence[str] = (), only: Sequence[str] | None = None) -> tuple[ir.Model, dict[str, Any]]:
        """The float model with ``exclude`` kept float (``only``: just those layers
        quantized), its biases as quantized."""
        result = create_pass(
            "quantize-int8",
            ranges=calibration.ranges,
            per_channel=o.per_channel,
            activation_type=o.activation_type,
            exclude=[*user_exclude, *exclude],
            only=only,
            count_fused=False,
        )(float_model.clone())
        return result.model, dict(result.stats)

    def with_corrected_bias(candidate: ir.Model, result_stats: dict[str, Any]) -> tuple[ir.Model, dict[str, Any]]:
        """``candidate`` (``build``'s, all its layers quantized or some returned to float)
        with its biases corrected in place, when the run corrects them."""
        if correcting:
            try:
                result_stats["bias_correction"] = correct_biases(
                    float_model, candidate, measured_on, progress=o.progress,
                    means=float_means, measured=segment_means)
            except (RefusedModel, *REFUSALS) as e:  # onnxruntime refused the measuring model:
                # nothing was written (biases are written after the last run); keep it as is
                result_stats["bias_correction"] = {"layers": 0, "error": first_line(e)}
        return candidate, result_stats

    def make(exclude: Sequence[str] = (), only: Sequence[str] | None = None) -> tuple[ir.Model, dict[str, Any]]:
        # a fallback candidate is kept only by the search, which drops those it can no longer
        # return (each holds its own INT8 weights)
        whole = only is None and not exclude
        if whole and correcting in fully:
            model, made_stats = fully[correcting]
            return model.clone(), dict(made_stats)
        model, result_stats = build(exclude, only)
        if only is None:
            model, result_stats = with_corrected_bias(model, result_stats)
        if whole:
            fully[correcting] = (model, dict(result_stats))
        return model, result_stats

    counts = element_counts(calibration.stats)
    # the float model's workload, read once: nothing changes the float model after calibration
    # (candidates are built on clones of it), and its features do not depend on the CPU class
    float_workload = functools.cache(lambda: Workload.of(float_model, counts))

    def speedup_of(candidate: ir.Model | Workload, constants: CostModel) -> dict[str, Any]:
        """``compare_modelled`` of ``candidate`` (or its workload) against the float model."""
        work = candidate if isinstance(candidate, Workload) else Workload.of(candidate, counts)
        return compare_workloads(float_workload(), work, constants)

    # the class of this machine's CPU where the default models another: reported, never deciding
    machine = cpu.machine if cpu.source == "default" and cpu.machine in CPU_CLASSES and cpu.machine != cpu.name \
        else None
    checked: list[tuple[float, float]] = []  # per speed check: the speedup modelled, and for ``machine``

    def slower(candidate: ir.Model, key: str) -> str | None:
        work = Workload.of(candidate, counts)  # read once, costed for both classes
        modelled = speedup_of(work, cpu.constants)
        latency = stats.setdefault("latency", {})
        latency[key] = {"modelled_speedup": modelled["speedup"], "float32": modelled["float32"],
                        "int8": modelled["int8"]}
        if machine is not None:
            there = speedup_of(work, CPU_CLASSES[machine])["speedup"]
            latency[key]["modelled_speedup_machine"] = there
            checked.append((modelled["speedup"], there))
        latency["cpu"] = cpu.to_dict()
        latency["constants"] = modelled["constants"]
        if o.measure_latency:  # reported only: a clock never decides
            latency[key]["measured"] = compare_latency(float_model, candidate, held, threads=o.speed_threads)
        lap("speed_check")
        speedup = f"modelled speedup {modelled['speedup']:.2f}x for {cpu.describe()}"
        stats["speed"] = f"{speedup}, " + (f"{o.min_speedup:g}x required" if o.require_speedup else "none required")
        if modelled["speedup"] >= o.min_speedup:
            return None
        return (
            f"INT8 is not faster than float32 by the required {o.min_speedup:g}x on onnxruntime CPU "
            f"({speedup}: {modelled['int8']['integer_kernels']} integer kernels, "
            f"{modelled['int8']['float_kernels']} float kernels, {modelled['int8']['boundaries']} "
            f"Q/DQ conversions left; optcc.quant.cost_model); kept float32"
        )

    def slower_on_machine() -> None:
        """``stats["speed_machine"]``: when the INT8 model shipped on the default class's
        speed would miss the required speedup modelled for this machine's CPU class
        (a slower integer MAC rate: x86-avx2 under the x86-vnni default), what that class
        models and how to choose it. It never decides."""
        if machine is None or not checked or not o.require_speedup:
            return
        here, there = checked[-1]  # the model shipped is the one checked last
        if there < o.min_speedup <= here:
            stats["speed_machine"] = (
                f"{SPEED_MACHINE_PREFIX} {cpu.name} (the default, {here:.2f}x); modelled for this "
                f"machine's CPU class, {machine}, it is {there:.2f}x, below the required {o.min_speedup:g}x: "
                f"--int8-cpu {machine} would decline it")

    def fastest_accepted(report: dict[str, Any]) -> tuple[ir.Model, dict[str, Any]] | None:
        """When the fallback's result (the fewest layers float it found) is modelled too
        slow: of the other candidates it measured to meet the target (``tried`` rows that
        passed), the one modelled fastest, at or above ``min_speedup`` (ties: fewer float
        layers, then the one measured first), built again and judged again on ``judged``
        and, where the fallback's result had to pass a confirmation, by that confirmation
        too; the next fastest when it misses. None when no such candidate passes.
        ``report["speed_choice"]`` says what was chosen and why."""
        refused = list(report.get("refused_layers", {}))  # float in every candidate the fallback built
        found = list(report["kept_float"])
        rows: list[dict[str, Any]] = []
        for row in report.get("tried", []):
            if row["passed"] and row["kept_float"] != found and \
                    all(row["kept_float"] != seen["kept_float"] for seen in rows):
                rows.append(row)
        speeds = []
        for row in rows:  # each built once to model its speed, and dropped: it holds its own weights
            candidate, _ = make(exclude=row["kept_float"] + refused)
            speeds.append(speedup_of(candidate, cpu.constants)["speedup"])
            del candidate
        ranked = sorted(range(len(rows)), key=lambda i: (-speeds[i], len(rows[i]["kept_float"]), i))
        choice: dict[str, Any] = {
            "found": {"float_layers": len(found), "modelled_speedup": stats["latency"]["after_fallback"][
                "modelled_speedup"]},
            "candidates": [{"order": rows[i]["order"], "float_layers": len(rows[i]["kept_float"]),
                            "modelled_speedup": speeds[i]} for i in ranked]}
        report["speed_choice"] = choice
        for i in ranked:
            if speeds[i] < o.min_speedup:
                break
            candidate, candidate_stats = make(exclude=rows[i]["kept_float"] + refused)
            evaluation = evaluate_candidate(float_model, candidate, judged, o.target,
                                            None if judge is None else judge.reference, judged_outputs,
                                            verdict_only=True)
            verdicts = {"judged": evaluation.passed}
            if evaluation.passed and confirm is not None and "confirmation" in report:
                wider = confirm()
                verdicts["confirmation"] = evaluate_candidate(float_model, candidate, wider.samples, wider.target,
                                                              wider.reference_outputs, wider.outputs).passed
            choice["candidates"][ranked.index(i)]["passed_again"] = verdicts
            if all(verdicts.values()):
                choice["chosen"] = (
                    f"{len(rows[i]['kept_float'])} layers float ({rows[i]['order']} order), modelled "
                    f"{speeds[i]:.2f}x: the fastest candidate measured to meet the target, where the "
                    f"{len(found)} layers float found are modelled {choice['found']['modelled_speedup']:.2f}x, "
                    f"below the required {o.min_speedup:g}x")
                report.update(kept_float=list(rows[i]["kept_float"]), evaluation=evaluation.to_dict())
                return candidate, candidate_stats
        return None

    def speed_decline(fully_quantized: ir.Model) -> tuple[ir.Model, dict[str, Any]] | None:
        """The decline when ``fully_quantized`` (the fastest INT8 variant) is not faster
        enough; its modelled speed is reported whether or not it decides."""
        problem = slower(fully_quantized, "fully_quantized")
        if problem and o.require_speedup:
            return decline("speed", problem + " (even with every layer quantized; no fallback attempted)"
                           + _fed_weights_note(working))
        return None

    # a model declined for speed is never bias-corrected: the correction only adds nodes
    # (a DequantizeLinear for a layer that had no bias), so the uncorrected model is modelled
    # at least as fast, and a decline of it is the corrected one's decline
    quantized, pass_stats = build()
    stats["pass"] = _reported(pass_stats)
    stats["layer_ops"] = dict(pass_stats.get("layer_ops") or {})  # every quantizable layer's op, for the report
    lap("quantize")
    if not pass_stats.get("layers"):
        return decline("nothing", "nothing quantizable (no layer met the preconditions: "
                       f"{_unmet_preconditions(working, pass_stats)})" + _fed_weights_note(working))
    if (declined := speed_decline(quantized)) is not None:
        return declined
    if correcting:
        if judge is not None:  # the held-out judgement below may ask for it uncorrected: built once
            fully[False] = (quantized.clone(), dict(pass_stats))
        quantized, pass_stats = with_corrected_bias(quantized, pass_stats)
        stats["pass"] = _reported(pass_stats)
        lap("quantize")
        if (declined := speed_decline(quantized)) is not None:  # as it ships: modelled and reported
            return declined
    fully[correcting] = (quantized, dict(pass_stats))  # ``make()``'s, asked for again
    max_float_layers = o.max_float_layers
    if max_float_layers is None:
        max_float_layers = int(o.max_float_fraction * len(pass_stats["layers"]))
    initial = None
    judged_any = True  # every path from here judges a candidate
    if judge is not None and correcting and (pass_stats.get("bias_correction") or {}).get("layers"):
        # bias correction is kept only where it helps the task on the held-out samples (a
        # detector's class logits can all shift by the background's mean error)
        corrected = evaluate_candidate(float_model, quantized, judged, o.target, judge.reference, judged_outputs)
        # a model onnxruntime refuses is the fallback's to mend (``fallback``: its refused layers float)
        unbuildable = corrected.refused is not None
        initial = None if unbuildable else (quantized, pass_stats, corrected)
        stats["bias_correction"] = {"kept": True, "not_chosen": "onnxruntime refuses the INT8 model"} if unbuildable \
            else {"kept": True, "shortfall_corrected": round(shortfall(corrected), 6)}
        if not corrected.passed and not unbuildable:  # a model that passes ships as it is
            correcting = False
            plain, plain_stats = fully[False]  # judged as stored
            uncorrected = evaluate(float_model, plain, judged, o.target, reference_outputs=judge.reference,
                                   outputs=judged_outputs)
            # dropped only when clearly worse: the uncorrected model passes, or the corrected
            # one misses by more than twice as much (a smaller difference is within the noise
            # of a few held-out samples)
            kept = not uncorrected.passed and \
                shortfall(corrected) <= BIAS_CORRECTION_TOLERANCE * shortfall(uncorrected)
            stats["bias_correction"].update(kept=kept, shortfall_uncorrected=round(shortfall(uncorrected), 6))
            if kept:
                correcting = True
            else:
                plain_stats = dict(plain_stats)
                quantized, pass_stats, initial = plain, plain_stats, (plain, plain_stats, uncorrected)
        lap("bias_correction_choice")
    if correcting:  # every model made from here is corrected
        fully.pop(False, None)
    if o.accuracy_fallback:
        # what a candidate must be modelled at to ship, where no candidate is bias-corrected: then
        # ``build``'s is the model the search would judge and ship (``make``), its speed modelled exactly
        speed = SpeedBound(lambda candidate: speedup_of(candidate, cpu.constants)["speedup"],
                           lambda floats: speedup_of(build(floats)[0], cpu.constants)["speedup"],
                           o.min_speedup) if o.require_speedup and not correcting else None
        quantized, pass_stats, report = fallback(
            float_model, make, judged, o.target, max_float_layers=max_float_layers,
            max_layers_ranked=o.max_layers_ranked, ranking=o.ranking, progress=o.progress,
            ranking_samples=o.ranking_samples,
            reference_outputs=None if judge is None else judge.reference, initial=initial, confirm=confirm,
            outputs=judged_outputs, speed=speed,
        )
    else:
        evaluation = initial[2] if initial is not None else evaluate_candidate(
            float_model, quantized, judged, o.target, None, None)
        report = {"evaluation": evaluation.to_dict(), "target_met": evaluation.passed, "kept_float": []}
    lap("fallback" if o.accuracy_fallback else "evaluate")
    for step, spent in report.pop("seconds", {}).items():  # the fallback's ranking and confirmation apart
        seconds[f"fallback_{step}"] = spent
        seconds["fallback"] = round(seconds["fallback"] - spent, 3)
    stats["pass"] = _reported(pass_stats)
    stats["fallback"] = report
    refused = report.get("evaluation", {}).get("refused")
    if refused:  # never shipped: nothing could run it
        return decline("nothing", f"onnxruntime refuses the INT8 model ({refused}); kept float32")
    if o.require_target and not report.get("target_met"):
        evaluation = report.get("evaluation", {})
        if report.get("hopeless"):
            how = report["hopeless"]
        else:
            budget = f"at most {max_float_layers} of {len(stats['pass'].get('layers', [])) + len(report.get('kept_float', []))}"
            how = f"with {len(report.get('kept_float', []))} layers returned to float ({budget} allowed)"
        where = f"{len(held)} held-out samples" if judged is held else \
            f"all {len(judged)} samples ({len(held)} held out)"
        if not report.get("confirmation", {}).get("passed", True):
            where = f"all {len(samples)} samples, as the verification judges them (met on the {len(held)} held out)"
        thin_words = _thin_words(judge, len(judged))
        return decline("accuracy", f"INT8 misses the accuracy target on {where}: "
                                   f"{_describe_miss(evaluation, o.target)}; {how}; kept float32"
                                   + (f" ({thin_words})" if thin_words else ""))
    if report.get("kept_float"):
        problem = slower(quantized, "after_fallback")
        if problem and o.require_speedup:
            faster = fastest_accepted(report)
            if faster is None:
                return decline("speed", problem + f" (after returning {len(report['kept_float'])} layers to float)")
            quantized, pass_stats = faster
            stats["pass"] = _reported(pass_stats)
            slower(quantized, "after_fallback")  # the model shipped, as modelled: meets the requirement
    # what onnxruntime runs of the model returned (a declined one is never run again)
    histogram = integer_op_histogram(quantized)
    stats["integer_op_histogram"] = histogram
    stats["integer_nodes"] = sum(n for op, n in histogram.items() if op not in ("QuantizeLinear", "DequantizeLinear"))
    stats["size_bytes"] = {"before": oir.weight_bytes(float_model), "after": oir.weight_bytes(quantized)}
    lap("report")
    report_floor()
    slower_on_machine()
    stats["modified"] = True
    return quantized, stats


# layers with weights that INT8 leaves float whatever their ranges (no QDQ form is written for them)
UNQUANTIZED_LAYERS = ("LSTM", "GRU", "RNN", "ConvTranspose", "Einsum")


def _unmet_preconditions(model: ir.Model, pass_stats: Mapping[str, Any]) -> str:
    """Why no layer was quantized, counted by reason, most first: the quantizing pass's
    ``kept_float`` (``12 Conv inside an If branch (...)``) and the layers of an op INT8
    never quantizes (``2 LSTM (not quantized by INT8)``)."""
    counts = dict(pass_stats.get("kept_float") or {})
    for graph in oir.graphs(model):
        for node in graph:
            if node.op_type in UNQUANTIZED_LAYERS and node.domain in ("", "ai.onnx"):
                reason = f"{node.op_type} (not quantized by INT8)"
                counts[reason] = counts.get(reason, 0) + 1
    if not counts:
        return "the model has no Conv, Gemm, MatMul, Add, Mul, Concat or pooling layer"
    said = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])))
    if any(" inside a" in reason for reason in counts):  # "Conv inside an If branch", "... inside a Loop body"
        said += "; calibration records the main graph's values only, so a layer in an If/Loop/Scan body has no range"
    return said


def _fed_weights_note(model: ir.Model) -> str:
    """Why layers whose weights a caller may feed stay float, and what the user can do: from
    IR 4 on, an initializer listed as a graph input is a default (``oir.overridable_inputs``), so a
    Conv/ConvTranspose/Gemm/MatMul reading its weight from one is not quantized as weighted.
    Empty when no layer of the main graph does."""
    overridable = set(oir.overridable_inputs(model))
    fed = sum(1 for node in model.graph if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")
              and len(node.inputs) > 1 and node.inputs[1] in overridable)
    if not fed:
        return ""
    return (f"; {fed} Conv/Gemm/MatMul layer(s) read their weight from a graph input with a default, which a "
            "caller may feed, so it is no constant to quantize: if the weights are fixed, remove them from the "
            "model's graph inputs")
