"""Accuracy-aware fallback and measurements for quantized models.

- ``count_integer_nodes(model)``: the integer kernels onnxruntime runs once it has fused a
  QDQ model (ORT_ENABLE_EXTENDED, the optimized graph saved and counted).
- ``evaluate(reference, candidate, samples)``: SQNR per output over held-out samples (and
  argmax agreement for classifier-like outputs), on onnxruntime with its default
  optimizations, i.e. the integer kernels the user will run.
- ``rank_sensitivity`` and ``fallback``: when the quantized model misses the target, rank
  the quantized layers by sensitivity and return the worst to float (the top ``k``, ``k``
  searched by bisection) until the target holds.
- ``measure_latency``: median latency on onnxruntime CPU (2 threads by default);
  ``compare_latency``: float and INT8 measured interleaved (reported, never deciding:
  the speed decision is ``optcc.quant.cost_model``'s).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import math
import os
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from optcc import ir as oir
from optcc.errors import BadInputError
from optcc.numerics.decode import DecodePlan, stream_names, stream_plan, streamed
from optcc.numerics.metrics import sqnr_db as powers_db
from optcc.progress import Progress
from optcc.quant.suffix import cuttable, frontier, suffix
from optcc.runtime.latency import median_seconds
from optcc.runtime.session import RefusedModel, building_session, feedable, first_line, session_options
from optcc.runtime.shared_weights import light_proto, release_memory, weighted_session

__all__ = [
    "CandidateOutputs",
    "RefusedModel",
    "INTEGER_OPS",
    "Target",
    "Confirmation",
    "Evaluation",
    "count_integer_nodes",
    "integer_op_histogram",
    "measure_latency",
    "evaluate",
    "evaluate_candidate",
    "refused_layers",
    "shortfall",
    "model_outputs",
    "sqnr_db",
    "rank_sensitivity",
    "propagated_sqnr",
    "local_sqnr",
    "output_sqnr",
    "fallback",
    "spread_samples",
    "spread_positions",
    "deviating_positions",
    "RANKING_SAMPLES",
    "SpeedBound",
    "compare_latency",
]

Feeds = Mapping[str, np.ndarray]
# asked after each sample a candidate runs, with its outputs so far by name: True stops the runs
Stop = Callable[[Mapping[str, Sequence[np.ndarray]]], bool]
Results = dict[int, tuple["Evaluation", Any, dict[str, Any]]]  # candidates measured, by layers returned to float
RANKING_SAMPLES = 8  # samples the fallback's per-layer error estimates are measured on
OUTPUT_RANKING_SAMPLES = 2  # samples ``output_sqnr`` takes each layer's error to the outputs on: a float run per layer each
# the output ranking's work bound: its layer runs (one per layer and sample shown), whatever the number of layers;
# spent on the first and last layers and those worst by their own error (``_output_ranked``)
OUTPUT_RANKING_RUNS = 128
# ... less those where the fully quantized model deviates less than this fraction of the most it does on one of them
NEGLIGIBLE_DEVIATION = 0.01
OUTPUT_SEGMENTS = 8  # suffixes of the float model ``output_sqnr``'s runs start from
# the progress phases of the fallback, beside the search's own ("fallback: layers back to float")
RANKING_PHASE = "fallback: ranking layers by their own error"
OUTPUT_RANKING_PHASE = "fallback: ranking layers by their error at the outputs"
CONFIRMATION_PHASE = "fallback: confirming on every sample"
PROBES = (1, 2, 4)  # float layers tried first below a budget that meets the target: where the error concentrates
# the most candidates the estimated search builds below the budget, the probes included (``_search_estimated``)
SEARCH_CANDIDATES = 8

INTEGER_OPS = frozenset(
    {
        "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "QGemm", "QLinearAdd",
        "QLinearMul", "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearConcat",
        "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "QLinearConvTranspose",
        "QLinearReduceMean", "QLinearWhere", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
        "QAttention", "QEmbedLayerNormalization", "NhwcQLinearConv",
    }
)
_QUANTIZATION_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulNBits"})


def _session(model: ir.Model | bytes | onnx.ModelProto, optimize: bool | str, threads: int | None = None,
             optimized_path: str | None = None, weights: Mapping[str, np.ndarray] | None = None,
             arena: bool = True, prepack: bool = True, spin: bool = False) -> ort.InferenceSession:
    """A CPU session; an onnx-ir model (or a ``light_proto`` with its ``weights``) hands
    onnxruntime its weights in place instead of a serialized copy. ``optimized_path``:
    where onnxruntime writes the graph it runs, its large weights in a file beside it.
    ``arena=False``: activations go back to the system as they are freed (the sessions
    that measure accuracy run a few samples; the arena would keep their peak).
    ``prepack=False``: kernels keep their weights as stored (a session never run).
    ``spin``: its threads busy-wait between kernels, as onnxruntime's users run it (a
    timed session; ``session_options``)."""
    options = session_options(optimize=optimize, threads=threads, optimized_path=optimized_path, arena=arena,
                              prepack=prepack, spin=spin)
    if optimized_path is not None:
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         os.path.basename(optimized_path) + ".weights")
    if isinstance(model, ir.Model):
        model, weights = light_proto(model)
    with building_session():
        if isinstance(model, onnx.ModelProto):
            return weighted_session(model, weights or {}, options)
        data = model if isinstance(model, bytes) else oir.serialize(model).SerializeToString()
        return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def integer_op_histogram(model: ir.Model) -> dict[str, int]:
    """Op counts of the graph onnxruntime runs (ORT_ENABLE_EXTENDED, CPU) for ``model``,
    restricted to integer kernels and Q/DQ nodes left unfused."""
    with tempfile.TemporaryDirectory(prefix="optcc-int8-") as folder:
        path = os.path.join(folder, "optimized.onnx")
        # never run: its kernels need not pre-pack their weights, which happens after the
        # graph written (the fusions counted) is final
        _session(model, "extended", optimized_path=path, prepack=False)
        release_memory()
        saved = onnx.load(path, load_external_data=False)
    counts = collections.Counter(
        node.op_type
        for graph in oir.proto_graphs(saved.graph)
        for node in graph.node
        if node.op_type in INTEGER_OPS or node.op_type in ("QuantizeLinear", "DequantizeLinear")
    )
    return dict(sorted(counts.items()))


def quantization_ops(model: ir.Model) -> dict[str, int]:
    """How many of each quantization op (Q/DQ, integer kernels, MatMulNBits) the model
    holds, by op type."""
    counts: dict[str, int] = {}
    for node in oir.nodes(model):
        if node.op_type in _QUANTIZATION_OPS or node.op_type in INTEGER_OPS:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def quantized_already(model: ir.Model) -> str | None:
    """For a precision pass that declines a model holding quantization ops
    (``quantization_ops``): the reason, naming them with their counts; else None."""
    ops = quantization_ops(model)
    return "the model is already quantized (" + ", ".join(f"{n} {op}" for op, n in ops.items()) + ")" if ops else None


def count_integer_nodes(model: ir.Model) -> int:
    """How many integer kernels (QLinearConv, QLinearMatMul, MatMulInteger, QGemm, ...)
    onnxruntime ends up running for ``model``."""
    return sum(n for op, n in integer_op_histogram(model).items() if op in INTEGER_OPS)


def measure_latency(model: ir.Model, feeds: Feeds, *, threads: int = 2, runs: int = 20,
                    warmup: int = 3) -> float:
    """Median seconds per run on onnxruntime CPU with all graph optimizations."""
    session = _session(model, "all", threads=threads, spin=True)
    return median_seconds(session, feeds, runs=runs, warmup=warmup)


def sqnr_db(reference: np.ndarray, result: np.ndarray) -> float:
    """10 log10(signal power / noise power); inf when identical."""
    ref = reference.astype(np.float64).ravel()
    difference = np.subtract(ref, result.ravel(), dtype=np.float64)  # the result widened exactly
    noise = float(np.sum(np.square(difference, out=difference)))
    return powers_db(float(np.sum(np.square(ref, out=ref))), noise)


def _classifier_like(array: np.ndarray) -> bool:
    return array.ndim == 2 and array.shape[-1] >= 2 and np.issubdtype(array.dtype, np.floating)


@dataclasses.dataclass(frozen=True)
class Target:
    """What the quantized model must achieve on every output, over the held-out samples.

    Without ``judge``: SQNR >= ``min_sqnr_db`` on every float output and argmax
    agreement >= ``min_argmax_agreement`` on classifier-like ones. With ``judge`` (a
    ``optcc.numerics.task.TaskJudge``, called with the candidate's outputs by name):
    the judge's verdict decides, SQNR is reported only."""

    min_sqnr_db: float = 25.0
    min_argmax_agreement: float = 0.9
    judge: Callable[[Mapping[str, Sequence[np.ndarray]]], dict[str, Any]] | None = dataclasses.field(
        default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        # a target at or below 0 dB (noise as strong as the signal) or NaN accepts every candidate
        if not (math.isfinite(self.min_sqnr_db) and self.min_sqnr_db > 0):
            raise BadInputError(f"the INT8 SQNR target must be a finite number of dB above 0, got {self.min_sqnr_db:g}")

    def to_dict(self) -> dict[str, Any]:
        return {"min_sqnr_db": self.min_sqnr_db, "min_argmax_agreement": self.min_argmax_agreement,
                "task_metric": self.judge is not None}


@dataclasses.dataclass(frozen=True)
class SpeedBound:
    """The speed a candidate must be modelled at to ship (``fallback``'s ``speed``): its
    modelled speedup over float32 (``speedup``, of a candidate as built), that of the
    candidate with the given layers float, built as the search would build it
    (``of_floats``, without judging it), and the speedup ``required``. Deterministic: a
    cost model, never a clock."""

    speedup: Callable[[ir.Model], float]
    of_floats: Callable[[Sequence[str]], float]
    required: float


@dataclasses.dataclass
class Evaluation:
    """Per-output SQNR (over all held-out samples) and argmax agreement; or, for a model
    onnxruntime refused to build (``refused``: its message), none, and a miss."""

    sqnr_db: dict[str, float]
    argmax_agreement: dict[str, float]
    target: Target
    task: dict[str, Any] | None = None  # the judge's verdict, when the target has one
    refused: str | None = None
    # per floating output in ``sqnr_db``: the squared error of each sample, in order (not reported)
    noise: dict[str, list[float]] = dataclasses.field(default_factory=dict, repr=False, compare=False)
    # run on the first samples only, that many, which decided a miss (``evaluate``'s ``verdict_only``)
    stopped_after: int | None = None

    @property
    def passed(self) -> bool:
        if self.refused is not None:
            return False
        if self.task is not None:
            return bool(self.task["passed"])
        return all(v >= self.target.min_sqnr_db for v in self.sqnr_db.values()) and all(
            v >= self.target.min_argmax_agreement for v in self.argmax_agreement.values()
        )

    @property
    def worst_sqnr_db(self) -> float:
        return -math.inf if self.refused is not None else min(self.sqnr_db.values(), default=math.inf)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "sqnr_db": {k: _finite(v) for k, v in self.sqnr_db.items()},
            "argmax_agreement": self.argmax_agreement,
            "target": self.target.to_dict(),
            **({"task": self.task} if self.task is not None else {}),
            **({"refused": self.refused} if self.refused is not None else {}),
            **({"stopped_after": self.stopped_after} if self.stopped_after is not None else {}),
        }


def _finite(x: float) -> float | str:
    if math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


class _Outputs:
    """Runs a model on the held-out samples once and keeps its outputs."""

    def __init__(self, model: ir.Model | onnx.ModelProto, samples: Sequence[Feeds], optimized: bool,
                 extra: Sequence[str] = (), weights: Mapping[str, np.ndarray] | None = None,
                 stream: DecodePlan | None = None, stop: Stop | None = None) -> None:
        """``model``: an onnx-ir model, or a proto (a ``light_proto`` with its ``weights``).
        ``stream``: a streaming model's plan (``optcc.numerics.decode.stream_plan``): each
        sample then also gives its second step's answers (``streamed``). ``stop``: asked
        after each sample with the outputs so far; True runs no more samples."""
        if isinstance(model, onnx.ModelProto):
            proto, weights = model, weights or {}
        else:
            proto, weights = light_proto(model)
        declared = {o.name for o in proto.graph.output}
        for name in extra:
            if name not in declared:
                proto.graph.output.append(onnx.ValueInfoProto(name=name))
        level: bool | str = "all" if optimized else False
        session = _session(proto, level, weights=weights, arena=False)
        del proto, weights
        self.names = [o.name for o in session.get_outputs()]

        def run_one(feeds: Feeds) -> list[np.ndarray]:
            return [np.asarray(a) for a in session.run(None, dict(feeds))]

        names = self.names if stream is None else stream_names(self.names, stream)
        self.values: list[list[np.ndarray]] = []
        for feeds in samples:
            self.values.append(run_one(feeds) if stream is None else streamed(run_one, self.names, stream, feeds))
            if stop is not None and stop({name: [row[i] for row in self.values] for i, name in enumerate(names)}):
                break
        self.names = names
        del session
        release_memory()

    def get(self, name: str) -> list[np.ndarray]:
        i = self.names.index(name)
        return [row[i] for row in self.values]

    @classmethod
    def of(cls, outputs: Mapping[str, Sequence[np.ndarray]]) -> _Outputs:
        """Outputs already computed (``model_outputs``'s form: name -> one array per sample)."""
        made = cls.__new__(cls)
        made.names = list(outputs)
        count = len(next(iter(outputs.values()), []))
        made.values = [[np.asarray(outputs[name][i]) for name in made.names] for i in range(count)]
        return made


def _compare(reference: _Outputs, candidate: _Outputs, names: Sequence[str], target: Target) -> Evaluation:
    sqnr: dict[str, float] = {}
    agreement: dict[str, float] = {}
    noise: dict[str, list[float]] = {}
    for name in names:
        refs, gots = reference.get(name), candidate.get(name)
        if not refs or not np.issubdtype(refs[0].dtype, np.floating):
            continue
        sqnr[name] = sqnr_db(np.concatenate([r.ravel() for r in refs]), np.concatenate([g.ravel() for g in gots]))
        noise[name] = [_squared_distance(r, g) for r, g in zip(refs, gots)]
        if _classifier_like(refs[0]):
            ref_arg = np.concatenate([r.argmax(-1) for r in refs])
            got_arg = np.concatenate([g.argmax(-1) for g in gots])
            agreement[name] = float(np.mean(ref_arg == got_arg))
    task = None
    if target.judge is not None:
        task = target.judge({name: candidate.get(name) for name in names})
    return Evaluation(sqnr, agreement, target, task, noise=noise)


def model_outputs(model: ir.Model, samples: Sequence[Feeds]) -> dict[str, list[np.ndarray]]:
    """The model's graph outputs by name, one array per sample (onnxruntime, no graph
    optimization: the float reference as written), and a streaming model's answers on its
    second step (``optcc.numerics.decode.streamed``)."""
    outputs = _Outputs(model, samples, False, stream=stream_plan(model))
    return {name: outputs.get(name) for name in outputs.names}


# runs a candidate on the samples judged, as ``evaluate`` runs it (its outputs by name); with a
# ``Stop``, on the first samples only, up to the first after which it says True
CandidateOutputs = Callable[..., Mapping[str, Sequence[np.ndarray]]]


def evaluate(reference: ir.Model, candidate: ir.Model, samples: Sequence[Feeds],
             target: Target = Target(), *, optimized: bool = True,
             reference_outputs: _Outputs | Mapping[str, Sequence[np.ndarray]] | None = None,
             outputs: CandidateOutputs | None = None, verdict_only: bool = False) -> Evaluation:
    """Compare the candidate's graph outputs with the float reference's on ``samples``, and
    a streaming model's answers on its second step (``reference_outputs``: the reference's,
    when already computed on them, as ``model_outputs`` returns them; ``outputs``: what
    runs the candidate on them, as ``optimized`` asks, in its place).
    ``verdict_only``: only ``passed`` is read, so the candidate stops running once the
    samples run make it miss whatever it gives on the others (the target's judge's
    ``misses_already``, in sample order); the evaluation is then ``_stopped``'s."""
    stream = stream_plan(reference)
    names = [v.name for v in reference.graph.outputs]
    names = names if stream is None else stream_names(names, stream)
    if isinstance(reference_outputs, Mapping):
        reference_outputs = _Outputs.of(reference_outputs)
    ref = reference_outputs if reference_outputs is not None else _Outputs(reference, samples, False, stream=stream)
    stop: Stop | None = getattr(target.judge, "misses_already", None) if verdict_only else None
    if outputs is not None:
        got = _Outputs.of(outputs(candidate) if stop is None else outputs(candidate, stop=stop))
    else:
        got = _Outputs(candidate, samples, optimized, stream=stream, stop=stop)
    if len(got.values) < len(samples):
        return _stopped(ref, got, names, target)
    return _compare(ref, got, names, target)


def _stopped(reference: _Outputs, got: _Outputs, names: Sequence[str], target: Target) -> Evaluation:
    """The evaluation of a candidate run on the first samples only, which its target's
    judge found to miss whatever the others give (``TaskJudge.misses_already``): SQNR and
    agreement over those samples, and the judge's verdict as if the candidate gave the
    reference's outputs on the others (a miss); ``stopped_after`` says how many it ran."""
    count = len(got.values)
    ran = _Outputs.of({name: reference.get(name)[:count] for name in reference.names})
    measured = _compare(ran, got, names, dataclasses.replace(target, judge=None))
    assert target.judge is not None
    completed = {name: [*got.get(name), *reference.get(name)[count:]] for name in names}
    return dataclasses.replace(measured, target=target, task=target.judge(completed), stopped_after=count)


def evaluate_candidate(reference: ir.Model, candidate: ir.Model, samples: Sequence[Feeds], target: Target,
                       ref_outputs: _Outputs | Mapping[str, Sequence[np.ndarray]] | None,
                       outputs: CandidateOutputs | None, verdict_only: bool = False) -> Evaluation:
    """``evaluate`` of a quantized candidate (``ref_outputs``: the reference's outputs, as
    ``evaluate``'s ``reference_outputs``; ``verdict_only``, as ``evaluate``'s); one
    onnxruntime refuses to build (``RefusedModel``, from ``outputs`` too) misses the
    target, with the refusal as the reason
    (``Evaluation.refused``), and a search goes on. One it builds and then cannot run on
    the samples raises: that is a fault of the candidate's making, not a refusal."""
    try:
        return evaluate(reference, candidate, samples, target, reference_outputs=ref_outputs, outputs=outputs,
                        verdict_only=verdict_only)
    except RefusedModel as e:
        return Evaluation({}, {}, target, refused=first_line(e))


def shortfall(evaluation: Evaluation) -> float:
    """How far an evaluation is from its target, lower is better: with a task judge, the
    largest ``deviation / allowed`` over the judged components (a component that passes,
    by its floor or by a user target, counts at most 1; one passed by its SQNR target with
    no floor measured, 1 unless it deviates nothing), else the negated worst output SQNR in
    dB."""
    if evaluation.task is None:
        return -evaluation.worst_sqnr_db
    worst = 0.0
    for row in evaluation.task.get("metrics", {}).values():
        if "passed" not in row:
            continue
        if row["passed"] and row.get("floor", 0.0) is None:  # no floor to divide by: at most 1
            worst = max(worst, 0.0 if row["deviation"] == 0.0 else 1.0)
            continue
        if not isinstance(row.get("allowed"), (int, float)):
            continue
        deviation = row["deviation"] if isinstance(row["deviation"], (int, float)) else math.inf
        allowed = float(row["allowed"])
        ratio = deviation / allowed if allowed > 0 else (math.inf if deviation > 0 else 0.0)
        worst = max(worst, min(ratio, 1.0) if row["passed"] else ratio)  # passed by a user target: 1
    return worst


# quantize(exclude=[...], only=[...] or None) -> (a new quantized model, the pass stats);
# stats["layer_outputs"][layer] = [name in the float model, name in the quantized model]
QuantizeFn = Callable[..., tuple[ir.Model, dict[str, Any]]]


def _flat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([a.ravel() for a in arrays])


def rank_sensitivity(reference: ir.Model, quantize: QuantizeFn, layers: Sequence[str],
                     samples: Sequence[Feeds], target: Target = Target(), *,
                     max_layers: int = 64, chunk: int = 8, give_up_after: int | None = None,
                     ) -> list[dict[str, Any]]:
    """Per layer, worst first: ``model_sqnr_db``, the worst model-output SQNR when only
    that layer is quantized (its error as propagated to the outputs), ``local_sqnr_db``,
    the SQNR of the layer's own result then (its error with float inputs), and
    ``alone_passes``, whether the model meets ``target`` with that layer alone quantized.
    Only the first ``max_layers`` layers are ranked; with ``give_up_after``, ranking stops
    (after the current chunk) once more layers than that miss the target alone. Streamed:
    one single-layer model at a time, the float model's intermediates kept for ``chunk``
    layers at a time."""
    model_outputs = [v.name for v in reference.graph.outputs]
    todo = list(layers[:max_layers])
    rows = []
    for start in range(0, len(todo), chunk):
        singles = []
        for layer in todo[start:start + chunk]:
            model, stats = quantize(only=[layer])
            float_name, quant_name = stats.get("layer_outputs", {}).get(layer, [None, None])
            singles.append((layer, light_proto(model), float_name, quant_name))
            del model
        ref_out = _Outputs(reference, samples, False, extra=[f for _, _, f, _ in singles if f])
        for layer, (proto, weights), float_name, quant_name in singles:
            got = _Outputs(proto, samples, False, extra=[quant_name] if quant_name else [], weights=weights)
            evaluation = _compare(ref_out, got, model_outputs, target)
            local = math.nan
            if float_name in ref_out.names and quant_name in got.names:
                local = _own_error(sqnr_db(_flat(ref_out.get(float_name)), _flat(got.get(quant_name))))
            rows.append({"layer": layer, "model_sqnr_db": evaluation.worst_sqnr_db, "local_sqnr_db": local,
                         "alone_passes": evaluation.passed})
        del ref_out, singles
        if give_up_after is not None and sum(not r["alone_passes"] for r in rows) > give_up_after:
            break
    rows.sort(key=lambda r: (r["model_sqnr_db"], math.inf if math.isnan(r["local_sqnr_db"]) else r["local_sqnr_db"]))
    return rows


def propagated_sqnr(reference: ir.Model, quantized: ir.Model, layer_outputs: Mapping[str, Sequence[str]],
                    samples: Sequence[Feeds]) -> dict[str, float]:
    """SQNR of every layer's result in the fully quantized model (quantization error as
    accumulated up to that layer), streamed sample by sample: only per-layer signal and
    noise sums are kept. A layer whose float result is all zeros (no signal to measure
    the error against) gets NaN (``_own_error``): no estimate, not the worst."""
    pairs = {layer: names for layer, names in layer_outputs.items() if names[0] and names[1]}
    ref_session = _extra_session(reference, [names[0] for names in pairs.values()])
    got_session = _extra_session(quantized, [names[1] for names in pairs.values()])
    signal = dict.fromkeys(pairs, 0.0)
    noise = dict.fromkeys(pairs, 0.0)
    ref_names = [names[0] for names in pairs.values()]
    got_names = [names[1] for names in pairs.values()]
    for feeds in samples:
        refs = ref_session.run(ref_names, dict(feeds))
        gots = got_session.run(got_names, dict(feeds))
        for layer, r, g in zip(pairs, refs, gots):
            r64 = np.asarray(r, np.float64)
            signal[layer] += float(np.sum(r64**2))
            noise[layer] += float(np.sum((r64 - np.asarray(g, np.float64)) ** 2))
    return {layer: _own_error(_db(signal[layer], noise[layer])) for layer in pairs}


def _extra_session(model: ir.Model, names: Sequence[str]) -> ort.InferenceSession:
    proto, weights = light_proto(model)
    declared = {o.name for o in proto.graph.output}
    for name in dict.fromkeys(names):
        if name not in declared:
            proto.graph.output.append(onnx.ValueInfoProto(name=name))
    return _session(proto, False, weights=weights, arena=False)


def local_sqnr(reference: ir.Model, quantized: ir.Model, layer_outputs: Mapping[str, Sequence[str]],
               samples: Sequence[Feeds], *, deltas: dict[str, list[np.ndarray]] | None = None,
               delta_samples: Collection[int] | None = None) -> dict[str, float]:
    """Every layer's own quantization error, all layers in one run: the SQNR of each
    quantized layer's result when its inputs come from the float model (no error
    arriving from upstream). One combined model: the float graph plus, per layer, a copy
    of its Q/DQ group (input Q/DQ pairs fed by the float tensors, dequantized weights and
    bias, the op, its output Q/DQ). A layer whose input cannot be traced to a float
    tensor (a folded rescale), or whose float result is all zeros (no signal to measure
    its error against) gets NaN; none has an entry when onnxruntime refuses the combined
    model (its copies of the layers, in that form). ``deltas``: filled with each layer's
    local error (its local result minus its float result) on the samples at the positions
    ``delta_samples`` (None: every sample), in order (``output_sqnr``'s ``deltas``); empty
    when onnxruntime refuses the combined model."""
    try:
        return _layer_errors(reference, quantized, layer_outputs, samples, deltas=deltas, delta_samples=delta_samples)
    except RefusedModel:
        if deltas is not None:
            deltas.clear()
        return {}


def _db(signal: float, noise: float) -> float:
    return math.inf if noise == 0 else (10 * math.log10(signal / noise) if signal > 0 else -math.inf)


def _layer_errors(reference: ir.Model, quantized: ir.Model, layer_outputs: Mapping[str, Sequence[str]],
                  samples: Sequence[Feeds], *,
                  deltas: dict[str, list[np.ndarray]] | None = None, delta_samples: Collection[int] | None = None,
                  ) -> dict[str, float]:
    """``local_sqnr``'s SQNR per layer. ``deltas``: filled with each layer's local error
    (local result minus float result) on the samples at the positions ``delta_samples``
    (None: every sample), one per sample, in order."""
    float_proto, weights = light_proto(reference)
    q_proto, q_weights = light_proto(quantized)
    float_values = {v for node in float_proto.graph.node for v in node.output} | {
        v.name for v in float_proto.graph.input} | {i.name for i in float_proto.graph.initializer}
    q_inits = {i.name: i for i in q_proto.graph.initializer}
    producer = {o: node for node in q_proto.graph.node for o in node.output}
    added_inits: dict[str, onnx.TensorProto] = {}
    nodes: list[onnx.NodeProto] = []
    fetch: dict[str, tuple[str, str]] = {}  # layer -> (float name, local name)

    def constant(name: str) -> bool:
        if name in q_inits:
            if name not in float_values:
                added_inits[name] = q_inits[name]
            return True
        return False

    def copy(node: onnx.NodeProto, inputs: list[str], outputs: list[str], tag: str) -> None:
        """Append a copy of ``node`` reading ``inputs``, writing ``outputs``. Its name is
        unique in the combined model: one layer's group can copy the same node twice (an
        op that reads one quantized activation through two inputs, ``Mul(x, x)``, copies
        that activation's QuantizeLinear once per input), so the name carries the copy's
        position, not only the layer's tag."""
        clone = onnx.NodeProto()
        clone.CopyFrom(node)
        clone.name = f"{tag}_{len(nodes)}_{node.name or node.op_type}"
        del clone.input[:]
        clone.input.extend(inputs)
        del clone.output[:]
        clone.output.extend(outputs)
        nodes.append(clone)

    by_output = {o: node for node in q_proto.graph.node for o in node.output}
    for index, (layer, (float_name, quant_name)) in enumerate(layer_outputs.items()):
        if not float_name or not quant_name or quant_name not in by_output:
            continue
        tag = f"optcc_local{index}"
        dq_out = by_output[quant_name]
        chain: list[tuple[onnx.NodeProto, list[str], list[str]]] = []
        if dq_out.op_type == "DequantizeLinear" and dq_out.input[0] in producer \
                and producer[dq_out.input[0]].op_type == "QuantizeLinear":
            q_out = producer[dq_out.input[0]]
            op = producer.get(q_out.input[0])
        else:
            q_out = dq_out = None  # type: ignore[assignment]
            op = by_output[quant_name]
        if op is None:
            continue
        inputs: list[str] = []
        ok = True
        for j, name in enumerate(op.input):
            if not name or constant(name) or name in float_values and name not in producer:
                inputs.append(name)
                continue
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                ok = ok and name in float_values
                inputs.append(name)
                continue
            if all(constant(x) for x in dq.input if x):  # a dequantized weight or bias
                chain.append((dq, list(dq.input), [f"{tag}_in{j}"]))
                inputs.append(f"{tag}_in{j}")
                continue
            q = producer.get(dq.input[0])
            if q is None or q.op_type != "QuantizeLinear" or q.input[0] not in float_values:
                ok = False
                break
            for x in (*q.input[1:], *dq.input[1:]):
                constant(x)
            chain.append((q, list(q.input), [f"{tag}_q{j}"]))
            chain.append((dq, [f"{tag}_q{j}", *dq.input[1:]], [f"{tag}_in{j}"]))
            inputs.append(f"{tag}_in{j}")
        if not ok:
            continue
        result = f"{tag}_result"
        chain.append((op, inputs, [f"{tag}_op"] if q_out is not None else [result]))
        if q_out is not None:
            for x in (*q_out.input[1:], *dq_out.input[1:]):
                constant(x)
            chain.append((q_out, [f"{tag}_op", *q_out.input[1:]], [f"{tag}_opq"]))
            chain.append((dq_out, [f"{tag}_opq", *dq_out.input[1:]], [result]))
        for node, ins, outs in chain:
            copy(node, ins, outs, tag)
        fetch[layer] = (float_name, result)
    if not fetch:
        return {}
    weights.update({name: q_weights[name] for name in added_inits if name in q_weights})
    del q_proto, q_weights
    float_proto.graph.node.extend(nodes)
    float_proto.graph.initializer.extend(added_inits.values())
    del float_proto.graph.output[:]
    names = list(dict.fromkeys(n for pair in fetch.values() for n in pair))
    float_proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    session = _session(float_proto, False, weights=weights, arena=False)
    del float_proto, weights, nodes, added_inits
    kept = [] if deltas is None else [i for i in range(len(samples)) if delta_samples is None or i in delta_samples]
    # per sample, per layer: (local noise, the float result's power)
    sums: dict[int, dict[str, tuple[float, float]]] = {}
    # the samples whose errors are kept run last: no other sample's results are made while they are held
    for position in [*(i for i in range(len(samples)) if i not in kept), *kept]:
        values = dict(zip(names, session.run(names, dict(samples[position]))))
        sums[position] = {}
        # a sample's float64 widenings are written over the same two arrays, made after its run
        # (none held while onnxruntime runs): the values and sums of fresh arrays, without a
        # new allocation (and its page faults) per layer
        wide, difference = _Scratch(), _Scratch()
        for layer, (float_name, local_name) in fetch.items():
            # compared with the layer's float result: its float64 copy (squared in place last)
            # and power are made once
            r = wide.widened(values[float_name])
            local = _squared_distance(r, values[local_name], difference)
            if position in kept:  # the local result is not read again
                deltas.setdefault(layer, []).append(_difference(values[local_name], values[float_name]))
            sums[position][layer] = (local, float(np.sum(np.square(r, out=r))))
        del values, wide, difference, r
    del session
    release_memory()
    # each layer's sums add the samples in their order, whichever ran first
    totals = {layer: [0.0, 0.0] for layer in fetch}
    for position in range(len(samples)):
        for layer, parts in sums[position].items():
            for j, part in enumerate(parts):
                totals[layer][j] += part
    return {layer: _own_error(_db(totals[layer][1], totals[layer][0])) for layer in fetch}


def _own_error(db: float) -> float:
    """A layer's own error in dB as the rankings read it: a float result of all zeros (-inf:
    no signal to measure the error against) is no estimate (NaN), not the worst; the
    layer's effect on the outputs, where measured, ranks it."""
    return math.nan if db == -math.inf else db


def _difference(result: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``result - reference``, written over ``result`` where it can hold it (its shape and
    dtype those of the difference): the same values without another array."""
    fits = result.flags.writeable and result.shape == np.broadcast_shapes(result.shape, reference.shape) \
        and np.result_type(result, reference) == result.dtype
    return np.subtract(result, reference, out=result if fits else None)


def _squared_distance(reference: np.ndarray, other: np.ndarray, scratch: _Scratch | None = None) -> float:
    """``sum((reference - other) ** 2)`` in float64 (both widened exactly: a float64
    ``reference`` is not copied), the same sum over the same values, with one temporary array
    (``scratch``'s, when given and the two have one shape)."""
    if scratch is not None and np.shape(reference) == np.shape(other):
        difference = scratch.array(np.shape(reference))
        np.subtract(reference, other, out=difference, dtype=np.float64)
    else:
        # at least 1-d: numpy returns the difference of two 0-d arrays as a scalar, no array to write into
        difference = np.atleast_1d(np.subtract(reference, other, dtype=np.float64))
    return float(np.sum(np.square(difference, out=difference)))


class _Scratch:
    """One float64 array reused for every shape asked of it (grown to the largest): a
    C-contiguous view of its first elements, which holds the same values, and sums to the
    same bits, as a new array of that shape would."""

    def __init__(self) -> None:
        self._flat = np.empty(0, np.float64)

    def array(self, shape: tuple[int, ...]) -> np.ndarray:
        """A float64 array of ``shape`` over the reused memory (its previous contents lost)."""
        size = math.prod(shape)
        if size > self._flat.size:
            self._flat = np.empty(size, np.float64)
        return self._flat[:size].reshape(shape)

    def widened(self, values: np.ndarray) -> np.ndarray:
        """``np.array(values, np.float64)`` written over the reused memory."""
        values = np.asarray(values)
        wide = self.array(values.shape)
        np.copyto(wide, values, casting="unsafe")
        return wide


def output_sqnr(reference: ir.Model, quantized: ir.Model, layer_outputs: Mapping[str, Sequence[str]],
                samples: Sequence[Feeds], *, deltas: Mapping[str, Sequence[np.ndarray]] | None = None,
                ) -> dict[str, float]:
    """Per layer, the worst model-output SQNR when only that layer's own quantization error
    (``local_sqnr``'s: its quantized result with float inputs, minus its float result) is
    added to its result in the float model: its error as the outputs see it. The float
    model gets an ``Add`` after every layer's result, fed that layer's error or a zero
    scalar; one run per layer and sample, the floating-point outputs compared with the
    same session's run with no error added. A layer's run starts at the last of up to
    ``OUTPUT_SEGMENTS`` cuts before it (``optcc.quant.suffix``, fed the values the whole
    model's clean run computed): the nodes before it compute what the clean run did.
    The sessions run with onnxruntime's graph optimizations: each compares its own runs.
    Layers without a local error (or with a result other than float32) are absent, all of
    them when onnxruntime refuses ``local_sqnr``'s combined model. A cut onnxruntime refuses
    is not used: its layers' runs start at the graph inputs. ``deltas``: the layers' local
    errors on ``samples`` when already measured (``local_sqnr``'s ``deltas``), so that
    combined model is not run again."""
    if deltas is None:
        deltas = {}
        local_sqnr(reference, quantized, layer_outputs, samples, deltas=deltas)
    if not deltas:
        return {}
    proto, weights = light_proto(reference)
    graph = proto.graph
    produced = {o for node in graph.node for o in node.output}
    injected = {layer: layer_outputs[layer][0] for layer, errors in deltas.items()
                if layer_outputs[layer][0] in produced and errors[0].dtype == np.float32}
    prefix = oir.unique_prefix((v for node in graph.node for v in (*node.input, *node.output, node.name)),
                               "optcc_inject/")
    feed_of = {name: f"{prefix}{i}" for i, name in enumerate(dict.fromkeys(injected.values()))}
    nodes: list[onnx.NodeProto] = []
    added_at: dict[str, int] = {}  # feed -> position of the Add that reads it
    for node in graph.node:
        clone = onnx.NodeProto()
        clone.CopyFrom(node)
        adds = []
        for j, out in enumerate(clone.output):
            if out in feed_of:  # the result renamed; the Add writes the name its consumers read
                clone.output[j] = feed_of[out] + "/clean"
                adds.append(onnx.helper.make_node("Add", [feed_of[out] + "/clean", feed_of[out]], [out],
                                                  name=feed_of[out] + "/add"))
        nodes.append(clone)
        for add in adds:
            added_at[add.input[1]] = len(nodes)
            nodes.append(add)
    del graph.node[:]
    graph.node.extend(nodes)
    for name, feed in feed_of.items():
        graph.input.append(onnx.helper.make_tensor_value_info(feed, onnx.TensorProto.FLOAT, None))
    floating = ("tensor(float)", "tensor(float16)", "tensor(double)")
    outputs = [o.name for o in graph.output]
    starts = _cuts(sorted(added_at.values()), OUTPUT_SEGMENTS) if cuttable(proto) else [0]
    carried = {start: frontier(proto, start) for start in starts[1:]}
    extra = [name for name in dict.fromkeys(name for names in carried.values() for name in names)
             if name not in outputs]

    def whole_session() -> ort.InferenceSession:
        """A session of the whole model, whose outputs include every value a cut carries."""
        whole = onnx.ModelProto()
        whole.CopyFrom(proto)
        whole.graph.output.extend(onnx.ValueInfoProto(name=name) for name in extra)
        return _session(whole, "all", weights=weights, arena=False)

    session = whole_session()
    types = {o.name: o.type for o in session.get_outputs()}
    outputs = [name for name in outputs if types[name] in floating]
    if not outputs:  # no error can be seen
        del session
        return dict.fromkeys(injected, math.inf)
    # a cut whose frontier holds a value other than a tensor (a sequence) is not used
    starts = [0, *(start for start in starts[1:] if all(types[x].startswith("tensor(") for x in carried[start]))]
    segment_of = {feed: max(start for start in starts if start <= at) for feed, at in added_at.items()}
    zero = np.zeros((1,), np.float32)
    noise = {layer: np.zeros(len(outputs)) for layer in injected}
    power = np.zeros(len(outputs))
    fed: dict[int, list[dict[str, np.ndarray]]] = {start: [] for start in starts[1:]}  # each cut's frontier, by sample
    later = list(dict.fromkeys(x for start in starts[1:] for x in carried[start]))  # the values the cuts are fed
    for start in starts:
        if start and not set(outputs) & {o for node in proto.graph.node[start:] for o in node.output}:
            continue  # the errors of the layers after this cut reach no output: no noise
        if start:
            cut = suffix(proto, start, {x: _element_type(types[x]) for x in carried[start]})
            try:
                session = _session(cut, "all", weights=weights, arena=False)
            except RefusedModel:  # its layers' runs start at the graph inputs instead: the same values
                session = whole_session()
            del cut
        names = [o.name for o in session.get_outputs() if o.name in outputs]
        inputs = feedable(session)
        at = [outputs.index(name) for name in names]
        layers = [layer for layer, value in injected.items() if segment_of[feed_of[value]] == start]
        for s, feeds in enumerate(samples):
            base = {**{k: v for k, v in {**dict(feeds), **(fed[start][s] if start else {})}.items() if k in inputs},
                    **{feed: zero for feed in feed_of.values() if feed in inputs}}
            if start:
                clean = [np.asarray(a, np.float64) for a in session.run(names, base)]
            else:  # the whole model: also the values each cut's suffix is fed
                values = session.run([*names, *later], base)
                clean = [np.asarray(a, np.float64) for a in values[:len(names)]]
                power += [float(np.sum(np.square(c))) for c in clean]
                computed = dict(zip(later, values[len(names):]))
                for cut_at in starts[1:]:
                    fed[cut_at].append({x: computed[x] for x in carried[cut_at]})
                del values, computed
            for layer in layers:
                got = session.run(names, {**base, feed_of[injected[layer]]: deltas[layer][s]})
                noise[layer][at] += [_squared_distance(c, g) for c, g in zip(clean, got)]
            if start:
                fed[start][s] = {}
        del session
    release_memory()
    return {layer: min((_db(p, n) for p, n in zip(power, noise[layer])), default=math.inf) for layer in injected}


def _element_type(name: str) -> int:
    """The ONNX element type of an onnxruntime tensor type (``tensor(float)``)."""
    return onnx.TensorProto.DataType.Value(name[len("tensor("):-1].upper())


def _cuts(positions: Sequence[int], count: int) -> list[int]:
    """Up to ``count`` node positions to start runs at: 0, then every
    ``len(positions) / count``-th of ``positions`` (sorted), so each segment holds about as
    many of them."""
    return sorted({0, *(positions[len(positions) * i // count] for i in range(1, count) if positions)})


def estimate_sensitivity(layers: Sequence[str], local: Mapping[str, float],
                         output: Mapping[str, float]) -> list[dict[str, Any]]:
    """Layers ranked worst first by the outputs' SQNR under their own error alone
    (``output_sqnr``), then by that error (``local_sqnr``); ties (and layers without an
    estimate, last) in graph order."""
    rows = [{"layer": layer, "output_sqnr_db": output.get(layer, math.nan), "local_sqnr_db": local.get(layer, math.nan),
             "position": i} for i, layer in enumerate(layers)]

    def key(value: float) -> tuple[bool, float]:
        return math.isnan(value), 0.0 if math.isnan(value) else value

    rows.sort(key=lambda r: (*key(r["output_sqnr_db"]), *key(r["local_sqnr_db"]), r["position"]))
    return rows


def spread_samples(samples: Sequence[Feeds], count: int | None) -> list[Feeds]:
    """At most ``count`` of ``samples``, spread evenly over them in order (the first and the
    last included), so samples of every kind interleaved in them are represented; all of
    them when ``count`` is None or not smaller."""
    return [samples[i] for i in spread_positions(len(samples), count)]


def spread_positions(total: int, count: int | None) -> list[int]:
    """The positions ``spread_samples`` takes of ``total`` samples."""
    if count is None or total <= count:
        return list(range(total))
    if count < 2:
        return list(range(max(count, 0)))
    return [int(i) for i in np.linspace(0, total - 1, count).round()]


def deviating_positions(evaluation: Evaluation, positions: Sequence[int]) -> list[int]:
    """Those of ``positions`` (of the samples ``evaluation`` judged) where some floating
    output of the judged model deviates from the float one by at least
    ``NEGLIGIBLE_DEVIATION`` of the most that output does on one of them (squared error), in
    order. A layer's error taken to an output (``output_sqnr``, which ranks a layer by its
    worst output) sums its squared error over the samples, so a sample where all the layers'
    errors together barely move every output adds little to the sums (on a text-free photo a
    text detector's map is blank, and stays blank quantized). All of ``positions`` when no
    sample deviates, or ``evaluation`` has no errors per sample for them."""
    noises = [noise for noise in evaluation.noise.values() if len(noise) > max(positions, default=-1)]
    if not noises or len(noises) < len(evaluation.noise):
        return list(positions)
    kept = [i for i in positions
            if any(noise[i] > 0 and noise[i] >= NEGLIGIBLE_DEVIATION * max(noise[j] for j in positions)
                   for noise in noises)]
    return kept or list(positions)


def _candidates(layers: Sequence[str], propagated: Mapping[str, float], limit: int) -> list[str]:
    """The layers worth ranking: all of them when there are at most ``limit``; else half
    the budget on the first layers in graph order (their error is amplified by everything
    after them: on PP-OCR, 40 dB of noise on the first conv's result alone costs the output
    20 dB) and the rest on the layers whose results are worst in the fully quantized model
    (those without an estimate, NaN, last)."""
    if len(layers) <= limit:
        return list(layers)
    chosen = list(layers[: limit // 2])

    def estimate(name: str) -> float:
        value = propagated.get(name, math.inf)
        return math.inf if math.isnan(value) else value

    for layer in sorted(layers, key=estimate):
        if len(chosen) >= limit:
            break
        if layer not in chosen:
            chosen.append(layer)
    return chosen


def fallback(reference: ir.Model, quantize: QuantizeFn, samples: Sequence[Feeds],
             target: Target = Target(), *, max_float_layers: int | None = None,
             max_layers_ranked: int = 256, ranking: str = "estimate", progress: Any = False,
             reference_outputs: Mapping[str, Sequence[np.ndarray]] | None = None,
             initial: tuple[ir.Model, dict[str, Any], Evaluation] | None = None,
             ranking_samples: int | None = RANKING_SAMPLES,
             confirm: Confirmation | Callable[[], Confirmation] | None = None,
             outputs: CandidateOutputs | None = None, speed: SpeedBound | None = None,
             ) -> tuple[ir.Model, dict[str, Any], dict[str, Any]]:
    """Quantize; if the target is missed on ``samples``, return the most sensitive layers
    to float, worst first, until the target holds or ``max_float_layers`` are float.

    Ranking (``rank_sensitivity``): each candidate layer quantized alone, by the worst
    model-output SQNR that causes. Candidates: every quantized layer, or at most
    ``max_layers_ranked`` of them (``_candidates``). Returning to float goes down the
    ranking, the top ``k`` layers float: ``k`` doubles (1, 2, 4, ...) until the target
    holds, then a bisection finds the smallest ``k`` that still meets it (one evaluation per
    step; errors do not add up exactly, so every ``k`` is measured, never inferred). When
    the ranking order cannot meet the target, the same search runs over the candidates in
    graph order (the first ``k`` layers float), and the better of the two is kept.
    Hopeless case: a layer whose quantization alone misses the target is taken to miss
    it in any company, so when more than ``max_float_layers`` layers do, ranking stops
    there and the fully quantized model comes back with ``target_met`` False and the
    count in ``hopeless`` (PP-OCRv4 det: most layers alone drop its output below 25 dB).
    Returns the model, the pass stats of the last quantization, and a report:
    ``initial`` and final ``evaluation``, ``sensitivity`` (the ranking), ``tried`` (each
    ``k`` evaluated), ``kept_float`` (layers returned to float, worst first),
    ``target_met``. When the target is never met, the best model seen is returned with
    ``target_met`` False (the driver then declines to quantize).

    A model onnxruntime refuses to build is never returned as meeting the target: when it
    refuses the fully quantized model, the layers it refuses quantized alone
    (``refused_layers``) stay float in every model made after, and ``report["refused_layers"]``
    gives each one's message; a candidate it refuses misses (``evaluate_candidate``). When
    it still refuses the model without them, that model comes back with ``target_met``
    False and its refusal in ``report["evaluation"]["refused"]``.

    ``ranking="estimate"`` (the default) replaces the measured ranking by
    ``estimate_sensitivity``. First every layer's own error (``local_sqnr``, all layers in
    one combined model run once over the samples, no single-layer model built) orders the
    layers, and the budget's whole ``k`` (``max_float_layers``) returns to float in that
    order: when even that misses, the search stops there (hopeless), having cost one
    candidate and no further ranking. Else the layers worst by their own error are ranked
    again by those errors as the outputs see them when added alone to the float model
    (``output_sqnr``, one float run per layer on ``OUTPUT_RANKING_SAMPLES`` of the samples,
    spread over them, less those where the fully quantized model barely deviates:
    ``deviating_positions``), as many layers as ``OUTPUT_RANKING_RUNS`` runs cover (the
    first and last in graph order among them: ``_output_ranked``), ahead of the others in
    their own-error order; that order is
    searched below the budget: the worst layer, then the worst two, then four, returned to
    float (``PROBES``: the error of a quantized model often sits in a few layers, and then
    this is the cheapest model and found in a few evaluations); when none meets the
    target, a bisection between the largest ``k`` that missed and the budget, in log space
    while the range spans more than a factor of 2 (``_midpoint``), until at most
    ``SEARCH_CANDIDATES`` candidates are judged below the budget; the fewest float layers
    measured to meet the target ship, the budget's model (measured first) when no ``k``
    below it did. So the ranking and search cost a fixed number of float runs and
    candidates whatever the number of layers, and a ``k`` that meets the target is never
    traded for one not measured.
    The estimates are measured on at most ``ranking_samples`` of the samples, spread evenly
    over them (``spread_samples``; None: all): a layer's SQNR sums its error over every
    element of its result, so a few samples estimate it as well as many, and the ranking
    only orders the layers; every candidate is still judged on all ``samples``. A layer
    whose own result is exact there (no error to take away) is in neither order
    (``_ranked``): it never takes a place in the budget.
    ``ranking="measured"``: the single-layer ranking and both orders described above.
    ``reference_outputs``: the reference's outputs on ``samples`` when already computed
    (``model_outputs``), so the float model is not run again. ``initial``: the fully
    quantized model, its pass stats and its evaluation on ``samples``, when already made.

    ``confirm``: a wider judgement a later check applies to the result (the verifier's,
    over every sample), or what makes it, called only when the search found a model (a
    judgement can cost runs: a noise floor). The model found is judged there too; when it misses, the search
    goes on under that judgement, in the same order, from the number of layers found
    (``_confirmed``), and ``report["confirmation"]`` says what happened. With the estimated
    ranking the budget's model is judged there as soon as it meets the target on
    ``samples``, before any ranking or candidate below it: when it misses there, no model is
    accepted (hopeless, ``_fallback_estimated``).

    ``outputs``: runs a candidate on ``samples`` as ``evaluate`` runs it and returns its
    outputs by name (the later check's runs, ``optcc.Verifier.outputs``, which keeps those
    of the last model asked about): every candidate is evaluated on them, so the check of
    the model returned does not run it again on those samples.

    ``speed``: what a model must be modelled at to ship (``SpeedBound``), where a model
    found too slow gives way to the fastest candidate measured to meet the target (the
    driver's speed choice): the estimated search stops measuring once no candidate left
    could ship in the place of the one it holds (``_search_estimated``), the model
    returned being the one that would ship had it measured on. Not used with ``confirm``
    (a candidate's confirmation decides too) nor once layers are refused."""
    @functools.cache
    def confirmation() -> Confirmation:  # ``confirm``'s judgement, made once: the budget's and the result's
        return confirm if isinstance(confirm, Confirmation) else confirm()  # type: ignore[misc,return-value]

    model, stats, report = _fallback(reference, quantize, samples, target, max_float_layers=max_float_layers,
                                     max_layers_ranked=max_layers_ranked, ranking=ranking, progress=progress,
                                     reference_outputs=reference_outputs, initial=initial,
                                     ranking_samples=ranking_samples, outputs=outputs,
                                     speed=speed if confirm is None else None,
                                     confirm=None if confirm is None else confirmation)
    order = report.pop("order", None)
    budget = report.pop("budget_confirmation", None)  # the budget's evaluation there, when judged
    if confirm is None or not report.get("target_met"):
        return model, stats, report
    with _phase(CONFIRMATION_PHASE, progress, report, "confirmation"):
        if report.get("refused_layers"):
            quantize = _excluding(quantize, list(report["refused_layers"]))
        return _confirmed(reference, quantize, model, stats, report, confirmation(), order, max_float_layers,
                          ranking_samples, budget)


@contextlib.contextmanager
def _phase(label: str, progress: Any, report: dict[str, Any], key: str) -> Iterator[None]:
    """A step of the fallback shown as a progress phase of its own (``label``) and its wall
    time added to ``report["seconds"][key]`` (reported only: no decision reads it)."""
    start = time.perf_counter()
    with Progress(label, 1, enabled=progress) as bar:
        yield
        bar.advance()
    seconds = report.setdefault("seconds", {})
    seconds[key] = round(seconds.get(key, 0.0) + time.perf_counter() - start, 3)


def _fallback(reference: ir.Model, quantize: QuantizeFn, samples: Sequence[Feeds], target: Target, *,
              max_float_layers: int | None, max_layers_ranked: int, ranking: str, progress: Any,
              reference_outputs: Mapping[str, Sequence[np.ndarray]] | None,
              initial: tuple[ir.Model, dict[str, Any], Evaluation] | None, ranking_samples: int | None,
              outputs: CandidateOutputs | None = None, speed: SpeedBound | None = None,
              confirm: Callable[[], Confirmation] | None = None,
              ) -> tuple[ir.Model, dict[str, Any], dict[str, Any]]:
    """``fallback`` on ``samples`` alone, but for the budget's model, which the estimated
    search also judges by ``confirm`` (``_fallback_estimated``); ``report["order"]``: the
    layers in the order the search returned them to float (absent when the fully quantized
    model passed); ``report["budget_confirmation"]``: the budget's ``Evaluation`` by
    ``confirm`` where the budget's model is the one found."""
    # the float model's outputs on the samples, computed once (or given: ``model_outputs``)
    ref_outputs = (_Outputs.of(reference_outputs) if reference_outputs is not None
                   else _Outputs(reference, samples, False, stream=stream_plan(reference)))
    if initial is not None:
        model, stats, initial = initial
    else:
        model, stats = quantize(exclude=[])
        initial = evaluate_candidate(reference, model, samples, target, ref_outputs, outputs)
    refused: dict[str, str] = {}
    if initial.refused is not None:  # the layers onnxruntime refuses stay float from here on
        refused = refused_layers(quantize, list(stats.get("layers", [])))
        if refused:
            quantize = _excluding(quantize, list(refused))
            model, stats = quantize(exclude=[])
            initial = evaluate_candidate(reference, model, samples, target, ref_outputs, outputs)
    report: dict[str, Any] = {"initial": initial.to_dict(), "kept_float": [], "sensitivity": [], "tried": [],
                              **({"refused_layers": refused} if refused else {})}
    if initial.refused is not None:  # no INT8 model onnxruntime builds to search from
        report.update(evaluation=initial.to_dict(), target_met=False,
                      hopeless=f"onnxruntime refuses the INT8 model ({initial.refused})")
        return model, stats, report
    if initial.passed:
        report.update(evaluation=initial.to_dict(), target_met=True)
        return model, stats, report
    layers = list(stats.get("layers", []))
    if ranking == "estimate":
        # the layers onnxruntime refuses are float in every candidate: no bound models them
        return _fallback_estimated(reference, quantize, samples, target, model, stats, initial, report,
                                   max_float_layers, ref_outputs, ranking_samples, progress, outputs,
                                   None if refused else speed, confirm)
    propagated = propagated_sqnr(reference, model, stats.get("layer_outputs", {}), samples)
    candidates = _candidates(layers, propagated, max_layers_ranked)
    ranking = rank_sensitivity(reference, quantize, candidates, samples, target, max_layers=len(candidates),
                               give_up_after=max_float_layers)
    for row in ranking:
        row["propagated_sqnr_db"] = propagated.get(row["layer"], math.nan)
    report["sensitivity"] = [{k: _finite(v) if isinstance(v, float) else v for k, v in r.items()} for r in ranking]
    failing_alone = sum(not row["alone_passes"] for row in ranking)
    if max_float_layers is not None and failing_alone > max_float_layers:
        report.update(evaluation=initial.to_dict(), target_met=False, hopeless=(
            f"fully quantized, and {failing_alone} layers each miss the target when quantized alone, more than the "
            f"{max_float_layers} allowed to return to float (ranking stopped after {len(ranking)} of "
            f"{len(candidates)} layers)"))
        return model, stats, report
    ranked = [row["layer"] for row in ranking]
    tried: list[dict[str, Any]] = []
    candidates_set = set(ranked)
    best: tuple[list[str], int, Results] | None = None
    # the ranking first; when it cannot meet the target, the layers in graph order (the
    # first layers' error is amplified by all the others: on PP-OCRv4 rec, half the layers
    # float gave 19.2 dB in graph order, 15.4 dB in ranking order)
    for name, order in (("sensitivity", ranked), ("graph order", [x for x in layers if x in candidates_set])):
        limit = len(order) if max_float_layers is None else min(max_float_layers, len(order))
        k, results = _search(reference, quantize, samples, target, order, limit, initial, model, stats, tried, name,
                             ref_outputs, outputs=outputs)
        found = results[k][0]
        if best is None or found.passed or found.worst_sqnr_db > best[2][best[1]][0].worst_sqnr_db:
            best = (order, k, results)
        if found.passed:
            break
    assert best is not None
    best_order, k, results = best
    evaluation, model, stats = results[k]
    report["tried"] = tried
    report.update(kept_float=best_order[:k], evaluation=evaluation.to_dict(), target_met=evaluation.passed,
                  order=best_order)
    return model, stats, report


def _estimated_order(reference: ir.Model, model: ir.Model, stats: dict[str, Any], samples: Sequence[Feeds],
                     evaluation: Evaluation, ranking_samples: int | None, report: dict[str, Any]) -> list[str]:
    """The quantized layers of ``model`` (judged on ``samples`` by ``evaluation``) worst
    first by ``estimate_sensitivity``: the layers' own errors measured once on
    ``ranking_samples`` of ``samples`` (``spread_samples``) and taken to the outputs
    (``output_sqnr``) on the samples ``_shown_positions`` picks, those errors kept from
    the one run that measured them all; the ranking goes to ``report["sensitivity"]``."""
    ranking, shown = spread_positions(len(samples), ranking_samples), _shown_positions(samples, evaluation)
    # the layers' errors on the samples shown are kept from this run when it measures them
    measured = set(shown) <= set(ranking)
    deltas: dict[str, list[np.ndarray]] | None = {} if measured else None
    layer_outputs = stats.get("layer_outputs", {})
    local = local_sqnr(reference, model, layer_outputs, [samples[i] for i in ranking], deltas=deltas,
                       delta_samples={ranking.index(i) for i in shown} if measured else None)
    seen = _output_ranking(reference, model, stats, _ranked(stats, local, {}, report), [samples[i] for i in shown],
                           deltas)
    del deltas
    return _ranked(stats, local, seen, report)


def _output_ranked(order: Sequence[str], layers: Sequence[str], samples: int) -> list[str]:
    """The layers the output ranking takes to the outputs: as many of ``order`` (the layers
    worst by their own error first) as ``OUTPUT_RANKING_RUNS`` runs cover at one run per
    layer and sample shown, at least one. A quarter of them are the first of ``order`` in
    graph order (``layers``' order) and a quarter the last: a small error in the first
    layers is amplified by everything after them, and the last ones write the outputs, so
    either can harm the outputs most with a small own error (on a YOLO detector the head's
    last layers and the stem's first do); the rest are the worst by their own error. The
    others rank after them by their own error (``estimate_sensitivity``): the ranking costs
    a bounded number of float runs, not one per layer and sample."""
    count = max(OUTPUT_RANKING_RUNS // max(samples, 1), 1)
    if len(order) <= count:
        return list(order)
    position = {layer: i for i, layer in enumerate(layers)}
    by_graph = sorted(order, key=lambda layer: position.get(layer, len(position)))
    ends = count // 4
    picked = dict.fromkeys([*by_graph[:ends], *by_graph[len(by_graph) - ends:]])
    for layer in order:  # the rest, worst own error first
        if len(picked) >= count:
            break
        picked.setdefault(layer)
    return list(picked)


def _output_ranking(reference: ir.Model, model: ir.Model, stats: Mapping[str, Any], order: Sequence[str],
                    shown: Sequence[Feeds], deltas: Mapping[str, Sequence[np.ndarray]] | None = None,
                    ) -> dict[str, float]:
    """``output_sqnr`` of the layers ``_output_ranked`` picks of ``order`` (the layers worst
    by their own error first; ``stats``: the pass stats of ``model``) on the samples
    ``shown`` (``deltas``: their errors there, when kept from the ranking run; the others'
    are not read)."""
    layer_outputs = stats.get("layer_outputs", {})
    picked = [layer for layer in _output_ranked(order, list(stats.get("layers", [])), len(shown))
              if layer in layer_outputs]
    kept = None if deltas is None else {layer: deltas[layer] for layer in picked if layer in deltas}
    return output_sqnr(reference, model, {layer: layer_outputs[layer] for layer in picked}, shown, deltas=kept)


def _shown_positions(samples: Sequence[Feeds], evaluation: Evaluation) -> list[int]:
    """The positions of the samples the output ranking runs on: ``OUTPUT_RANKING_SAMPLES``
    of ``samples`` (``spread_positions``), less those where the model ``evaluation`` judged
    on ``samples`` deviates next to nothing (``deviating_positions``)."""
    return deviating_positions(evaluation, spread_positions(len(samples), OUTPUT_RANKING_SAMPLES))


def _ranked(stats: dict[str, Any], local: Mapping[str, float], seen: Mapping[str, float],
            report: dict[str, Any]) -> list[str]:
    """The quantized layers (``stats["layers"]``) worst first by ``estimate_sensitivity`` of
    ``local`` (the layers' own errors, ``local_sqnr``) and of ``seen``, those errors
    taken to the outputs (``output_sqnr``; empty when not measured); the ranking goes to
    ``report["sensitivity"]``. A layer whose own result is exact on the samples (local
    SQNR +inf: quantizing it loses nothing there) is ranked but left out of the order:
    returning it to float gains nothing, so it never takes a place in the budget or the
    search."""
    ranking = estimate_sensitivity(list(stats.get("layers", [])), local, seen)
    report["sensitivity"] = [{k: _finite(v) if isinstance(v, float) else v for k, v in r.items()} for r in ranking]
    return [row["layer"] for row in ranking if row["local_sqnr_db"] != math.inf]


def _fallback_estimated(reference: ir.Model, quantize: QuantizeFn, samples: Sequence[Feeds], target: Target,
                        model: ir.Model, stats: dict[str, Any], initial: Evaluation, report: dict[str, Any],
                        max_float_layers: int | None, ref_outputs: _Outputs, ranking_samples: int | None,
                        progress: Any = False, outputs: CandidateOutputs | None = None,
                        speed: SpeedBound | None = None, confirm: Callable[[], Confirmation] | None = None,
                        ) -> tuple[ir.Model, dict[str, Any], dict[str, Any]]:
    """``fallback`` with ``ranking="estimate"`` (see ``fallback``): the budget in the order
    of the layers' own errors first; only when it meets the target, the output ranking and
    the search below it (``_search_estimated``).

    With ``confirm`` (the judgement the result must pass after the search, ``fallback``'s),
    the budget's model is judged there too as soon as it meets the target on ``samples``:
    when it misses there, the search stops (hopeless), as it does when the budget misses on
    ``samples``. The budget is the most float layers a candidate may have, in the order the
    search falls back to; the output ranking and the candidates below it are spent only
    where the judgement their result must pass accepts that much float."""
    with _phase(RANKING_PHASE, progress, report, "ranking"):
        local = local_sqnr(reference, model, stats.get("layer_outputs", {}), spread_samples(samples, ranking_samples))
    local_order = _ranked(stats, local, {}, report)
    limit = len(local_order) if max_float_layers is None else min(max_float_layers, len(local_order))
    tried: list[dict[str, Any]] = []
    report.update(tried=tried, order=local_order)
    results: Results = {0: (initial, model, stats)}
    # the budget, the probes, then bisection: at most about 1 + len(PROBES) + 2 log2(limit) candidates
    with Progress("fallback: layers back to float", len(PROBES) + 2 * max(limit, 1).bit_length() + 2,
                  enabled=progress) as bar:
        if not limit or not _attempt(reference, quantize, samples, target, local_order, limit, limit, results,
                                     tried, "local", ref_outputs, bar, outputs).passed:
            evaluation, model, stats = results[limit]
            report.update(kept_float=local_order[:limit], evaluation=evaluation.to_dict(), target_met=False,
                          hopeless=f"even the {limit} layers the budget allows, returned to float worst first, "
                                   "do not meet it")
            bar.advance(bar.total)
            return model, stats, report
        if confirm is not None:
            with _phase(CONFIRMATION_PHASE, progress, report, "confirmation"):
                confirmation = confirm()
                budget = evaluate_candidate(reference, results[limit][1], confirmation.samples, confirmation.target,
                                            confirmation.reference_outputs, confirmation.outputs)
            if not budget.passed:
                evaluation, model, stats = results[limit]
                report["confirmation"] = {"samples": len(confirmation.samples), "float_layers_found": limit,
                                          "passed": False, "float_layers": limit}
                report.update(kept_float=local_order[:limit], evaluation=budget.to_dict(), target_met=False,
                              hopeless=_unconfirmed(limit, len(confirmation.samples), limit))
                bar.advance(bar.total)
                return model, stats, report
            report["budget_confirmation"] = budget
        # the layers' errors measured again on the samples shown (not held through the candidate above)
        shown = [samples[i] for i in _shown_positions(samples, initial)]
        with _phase(OUTPUT_RANKING_PHASE, progress, report, "ranking"):
            seen = _output_ranking(reference, model, stats, local_order, shown)
        order = _ranked(stats, local, seen, report)
        found = _search_estimated(reference, quantize, samples, target, order, local_order, limit, report, results,
                                  tried, ref_outputs, bar, outputs, speed)
        if len(report["kept_float"]) < limit:  # a model below the budget found: not the one judged by ``confirm``
            report.pop("budget_confirmation", None)
        bar.advance(bar.total)  # the search may need fewer candidates than the bound
    return found


def refused_layers(quantize: QuantizeFn, layers: Sequence[str]) -> dict[str, str]:
    """The layers onnxruntime refuses to build a session of (all optimizations, as
    ``evaluate`` builds one) when each is quantized alone, with its message: a layer
    whose quantized form it has no kernel for, or cannot check. Sessions built, never run."""
    refused: dict[str, str] = {}
    for layer in layers:
        candidate, _ = quantize(only=[layer])
        try:
            _session(candidate, "all", prepack=False, arena=False)
        except RefusedModel as e:
            refused[layer] = str(e)
        del candidate
        release_memory()
    return refused


def _excluding(quantize: QuantizeFn, layers: Sequence[str]) -> QuantizeFn:
    """``quantize`` with ``layers`` always float."""
    def made(exclude: Sequence[str] = (), only: Sequence[str] | None = None) -> tuple[ir.Model, dict[str, Any]]:
        kept = [x for x in only if x not in layers] if only is not None else None
        return quantize(exclude=[*layers, *exclude], only=kept)
    return made


def _attempt(reference: ir.Model, quantize: QuantizeFn, samples: Sequence[Feeds], target: Target,
             order: Sequence[str], k: int, limit: int, results: Results, tried: list[dict[str, Any]], name: str,
             ref_outputs: _Outputs, bar: Progress, outputs: CandidateOutputs | None) -> Evaluation:
    """The first ``k`` layers of ``order`` returned to float, judged on ``samples``, into
    ``results[k]`` and ``tried``. Only models the search can still return keep their
    weights: one that meets the target, or the budget's (``k == limit``). Below the budget
    only the verdict is read (a miss ends its runs: ``evaluate``'s ``verdict_only``); the
    budget's evaluation is reported when it misses."""
    bar.advance()
    candidate, candidate_stats = quantize(exclude=list(order[:k]))
    evaluation = evaluate_candidate(reference, candidate, samples, target, ref_outputs, outputs,
                                    verdict_only=k < limit)
    results[k] = (evaluation, candidate, candidate_stats)
    _drop_models(results, [n for n in results if n != k] if evaluation.passed or k == limit else [k])
    tried.append(_tried(name, k, evaluation, order[:k]))
    return evaluation


def _tried(name: str, k: int, evaluation: Evaluation, kept: Sequence[str]) -> dict[str, Any]:
    """The report's row of a candidate: the order searched, its float layers, the verdict;
    for one that meets the target, which layers it keeps float (``kept_float``), so that
    it can be built again."""
    return {"order": name, "float_layers": k, "worst_sqnr_db": _finite(evaluation.worst_sqnr_db),
            "passed": evaluation.passed, **({"refused": evaluation.refused} if evaluation.refused else {}),
            **({"stopped_after": evaluation.stopped_after} if evaluation.stopped_after is not None else {}),
            **({"kept_float": list(kept)} if evaluation.passed else {})}


def _search_estimated(reference: ir.Model, quantize: QuantizeFn, samples: Sequence[Feeds], target: Target,
                      order: Sequence[str], budget_order: Sequence[str], limit: int, report: dict[str, Any],
                      results: Results, tried: list[dict[str, Any]], ref_outputs: _Outputs, bar: Progress,
                      outputs: CandidateOutputs | None, speed: SpeedBound | None = None,
                      ) -> tuple[ir.Model, dict[str, Any], dict[str, Any]]:
    """``_fallback_estimated``'s search below the budget, whose model (the first ``limit``
    layers of ``budget_order`` float) is in ``results[limit]`` and meets the target: the
    first ``PROBES`` layers of ``order`` alone, then bisection (``_midpoint``) between the
    largest ``k`` known to miss and the smallest known to meet, in ``order``.
    The result is the ``high`` of a pair ``(low, high = low + 1)`` both measured, ``high``
    meeting the target and ``low`` missing it: when meeting it is monotone in ``k`` (every
    ``k`` from the smallest that meets it on meets it too), that is the smallest such ``k``;
    when it is not, one such boundary, possibly above a smaller ``k`` that meets it but was
    never measured. When no ``k`` below the budget meets it, the budget's model. Either way
    the model returned is one measured to meet the target.

    Work bound: at most ``SEARCH_CANDIDATES`` candidates are judged below the budget (the
    probes included); once they are, the bisection stops and its ``high`` is the result
    (``report["search_bounded"]``): the fewest float layers measured to meet the target,
    whether or not meeting it is monotone in ``k``. Deterministic: a count, never a clock.

    ``speed``: the bisection stops, ``high`` its result, once no ``k`` left to measure
    (``low < k < high``) could ship: each is modelled below ``speed.required``
    (``SpeedBound.of_floats``), while ``high`` is modelled at or above it and faster than
    every other candidate measured to meet the target. Measured on, the search would end
    at ``high``, or below it at a model too slow to ship, in whose place the fastest
    candidate measured to meet the target ships (the driver's speed choice): ``high``
    either way. ``report["search_stopped"]`` says so. Showing it builds each candidate
    left unjudged (``SpeedBound.of_floats``, the fewest float first, up to the first that
    could ship), so it is tried only where the candidates not yet built are at most one
    more than the bisection would judge from there (``_bisection_count``): on a wider
    range the bisection narrows it first, and the result is the same either way."""
    speeds: dict[int, float] = {}  # the modelled speedup of each candidate measured to meet the target
    bounds: dict[int, float] = {}  # ``speed.of_floats`` of the first k layers of ``order`` float
    built: list[int] = []  # the candidates judged below the budget, in order: at most ``SEARCH_CANDIDATES``

    def attempt(k: int) -> bool:
        built.append(k)
        passed = _attempt(reference, quantize, samples, target, order, k, limit, results, tried, "estimate",
                          ref_outputs, bar, outputs).passed
        if passed and speed is not None:  # modelled while its model is held
            speeds[k] = speed.speedup(results[k][1])
        return passed

    def none_left_ships(low: int, high: int) -> bool:
        """Whether no candidate strictly between ``low`` and ``high`` could ship where
        ``high`` does (see above)."""
        if speed is None or high - low < 2 or speeds[high] < speed.required or \
                any(other >= speeds[high] for k, other in speeds.items() if k != high):
            return False
        if any(bounds.get(k, 0.0) >= speed.required for k in range(low + 1, high)):
            return False
        # showing it builds every unbounded candidate left: no more than the bisection judges
        # from here at most (``_bisection_count``), and one, else the bisection goes on
        if sum(k not in bounds for k in range(low + 1, high)) > _bisection_count(low, high) + 1:
            return False
        for k in range(low + 1, high):  # the fewest float layers first: the likeliest to be fast
            if k not in bounds:
                bounds[k] = speed.of_floats(list(order[:k]))
            if bounds[k] >= speed.required:
                return False
        return True

    if speed is not None:
        speeds[limit] = speed.speedup(results[limit][1])
    low, high = 0, limit  # low: the largest k known to miss; high: the smallest k known to meet
    for k in PROBES:  # the worst layers alone first: when the error sits in them, the cheapest model
        if k >= limit:
            break
        if attempt(k):
            high = k
            break
        low = k
    while high - low > 1:
        if len(built) >= SEARCH_CANDIDATES:
            report["search_bounded"] = (
                f"{len(built)} candidates judged below the budget, the most the search builds: the fewest float "
                f"layers measured to meet the target ({high}) ship, {low} having missed")
            break
        if none_left_ships(low, high):
            assert speed is not None
            report["search_stopped"] = (
                f"every candidate with {low + 1} to {high - 1} layers float is modelled below the required "
                f"{speed.required:g}x speedup (at most {max(bounds[k] for k in range(low + 1, high)):.2f}x), "
                f"and the {high} layers float found are modelled {speeds[high]:.2f}x, the fastest candidate "
                "measured to meet the target: none left to measure could ship in its place")
            break
        mid = _midpoint(low, high)
        if attempt(mid):
            high = mid
        else:
            low = mid
    evaluation, model, stats = results[high]
    kept = list((order if high < limit else budget_order)[:high])
    report.update(kept_float=kept, evaluation=evaluation.to_dict(), target_met=True,
                  order=order if high < limit else budget_order)
    return model, stats, report


def _midpoint(low: int, high: int) -> int:
    """The next ``k`` to measure strictly between ``low`` (missed) and ``high`` (met,
    ``high - low >= 2``): their geometric mean while ``high`` is more than twice ``low``,
    then their arithmetic mean. In log space the search takes about ``log2(log2(high /
    low))`` steps to narrow the range to a factor of 2 around the answer ``k``, then
    ``log2(k)``: a small ``k`` below a large budget costs a few candidates, as doubling
    from ``low`` would, a large one about as many as plain bisection."""
    mid = math.isqrt(low * high) if high > 2 * low else (low + high) // 2
    return min(max(mid, low + 1), high - 1)


def _bisection_count(low: int, high: int) -> int:
    """The most candidates the bisection between ``low`` (missed) and ``high`` (met) judges
    before they are adjacent: ``_midpoint``'s steps down its longest branch."""
    if high - low < 2:
        return 0
    mid = _midpoint(low, high)
    return 1 + max(_bisection_count(low, mid), _bisection_count(mid, high))


def _drop_models(results: Results, numbers: Sequence[int]) -> None:
    """Drop the candidate models of ``numbers`` from ``results`` (their evaluations and stats
    stay): the search can no longer return them, and each holds its own INT8 weights. The
    initial model (``0``) always stays."""
    for n in numbers:
        if n and results[n][1] is not None:
            evaluation, _, stats = results[n]
            results[n] = (evaluation, None, stats)


def _search(reference: ir.Model, quantize: QuantizeFn, samples: Sequence[Feeds], target: Target,
            order: Sequence[str], limit: int, initial: Evaluation, model: ir.Model, stats: dict[str, Any],
            tried: list[dict[str, Any]], name: str, ref_outputs: _Outputs | None = None, start: int = 0,
            outputs: CandidateOutputs | None = None, max_candidates: int | None = None,
            bounded: dict[str, Any] | None = None) -> tuple[int, Results]:
    """The smallest ``k <= limit`` above ``start`` (whose ``initial`` evaluation misses)
    whose first ``k`` layers of ``order`` returned to float meet the target: ``k``
    doubles until it does, then bisection. When none does, the ``k`` with the best
    worst-output SQNR. Returns ``k`` and the evaluated models by ``k``.
    ``max_candidates``: the bisection stops once that many candidates are judged, its
    result the smallest ``k`` measured to meet the target, which a smaller one not measured
    may also meet (the doubling is not bounded: it ends at ``limit`` within
    ``log2(limit / start)`` candidates); ``bounded`` then gets ``"bounded"``: the candidates
    judged and the range left.
    Once a ``k`` is known to meet the target, the result is it or a smaller ``k`` measured
    to meet it: a candidate that misses is only reported, so its runs stop as soon as the
    samples run decide the miss (``evaluate``'s ``verdict_only``; the ``tried`` row then
    says after how many samples). Until one is, every candidate runs on every sample: when
    none meets the target, the one with the best worst-output SQNR is returned."""
    results: Results = {start: (initial, model, stats)}

    def attempt(k: int, verdict_only: bool = False) -> Evaluation:
        candidate, candidate_stats = quantize(exclude=order[:k])
        evaluation = evaluate_candidate(reference, candidate, samples, target, ref_outputs, outputs,
                                        verdict_only=verdict_only)
        results[k] = (evaluation, candidate, candidate_stats)
        passing = [n for n, (e, _, _) in results.items() if n and e.passed]
        if passing:  # the search returns the smallest k that passes
            _drop_models(results, [n for n in results if n != min(passing)])
        tried.append(_tried(name, k, evaluation, order[:k]))
        return evaluation

    low, high, k = start, None, max(2 * start, 1)  # low: largest k known to miss; high: smallest k known to meet
    while limit > low and high is None:
        k = min(k, limit)
        if attempt(k).passed:
            high = k
        else:
            low = k
            if k >= limit:
                break
            k *= 2
    while high is not None and high - low > 1:
        if max_candidates is not None and len(results) - 1 >= max_candidates:
            if bounded is not None:
                bounded["bounded"] = (f"{len(results) - 1} candidates judged, the most the search builds: "
                                      f"{high} float layers measured to meet the target ship, {low} having missed")
            break
        mid = (low + high) // 2
        if attempt(mid, verdict_only=True).passed:  # ``high`` meets the target: a miss is never returned
            high = mid
        else:
            low = mid
    if high is None:  # never met: the best model seen, reported as missing the target
        return max(results, key=lambda n: (results[n][0].worst_sqnr_db, -n)), results
    return high, results


@dataclasses.dataclass(frozen=True)
class Confirmation:
    """A wider judgement of the fallback's result (``fallback``'s ``confirm``): its samples,
    the target that judges them, the float model's outputs on them by name, and where
    given, what runs a candidate on them for that judgement (its outputs by name, run as
    ``evaluate`` runs them: the later check's own runs, which it then reuses)."""

    samples: Sequence[Feeds]
    target: Target
    reference_outputs: Mapping[str, Sequence[np.ndarray]]
    outputs: CandidateOutputs | None = dataclasses.field(default=None, compare=False, repr=False)


def _confirmed(reference: ir.Model, quantize: QuantizeFn, model: ir.Model, stats: dict[str, Any],
               report: dict[str, Any], confirm: Confirmation, order: Sequence[str] | None,
               max_float_layers: int | None, ranking_samples: int | None, budget: Evaluation | None = None,
               ) -> tuple[ir.Model, dict[str, Any], dict[str, Any]]:
    """``fallback``'s result judged by ``confirm``; when it misses, the smallest number of
    layers above the one found, returned to float in the search's order (the estimated
    ranking on ``confirm``'s samples when the fully quantized model had passed), that
    ``confirm`` accepts, the bisection bounded to ``SEARCH_CANDIDATES`` candidates
    (``_search``: then the smallest number measured to be accepted, which
    ``report["confirmation"]["bounded"]`` says). ``budget``: ``model``'s evaluation by
    ``confirm`` when already judged (the budget's, ``_fallback_estimated``)."""
    ref_outputs = _Outputs.of(confirm.reference_outputs)
    found = len(report.get("kept_float", []))
    evaluation = budget if budget is not None else \
        evaluate_candidate(reference, model, confirm.samples, confirm.target, ref_outputs, confirm.outputs)
    report["confirmation"] = {"samples": len(confirm.samples), "float_layers_found": found,
                              "passed": evaluation.passed}
    if evaluation.passed:
        return model, stats, report
    if order is None:  # the fully quantized model had passed: no ranking was needed
        order = _estimated_order(reference, model, stats, confirm.samples, evaluation, ranking_samples, report)
    limit = len(order) if max_float_layers is None else min(max_float_layers, len(order))
    tried = report.setdefault("tried", [])
    k, results = _search(reference, quantize, confirm.samples, confirm.target, order, limit, evaluation, model,
                         stats, tried, "confirmation", ref_outputs, start=found, outputs=confirm.outputs,
                         max_candidates=SEARCH_CANDIDATES, bounded=report["confirmation"])
    evaluation, model, stats = results[k]
    report.update(kept_float=list(order[:k]), evaluation=evaluation.to_dict(), target_met=evaluation.passed)
    report["confirmation"]["float_layers"] = k
    if not evaluation.passed:
        report["hopeless"] = _unconfirmed(limit, len(confirm.samples), found)
    return model, stats, report


def _unconfirmed(limit: int, samples: int, found: int) -> str:
    """Why no candidate is accepted: the budget's ``limit`` float layers miss on all
    ``samples`` samples, where ``found`` of them (the search's result) met the target on the
    held-out ones."""
    held_out = "the fully quantized model" if not found else f"{found} layers returned to float"
    return (f"{limit} layers returned to float (the budget) do not meet it on all {samples} samples; "
            f"on the held-out ones, {held_out} did")


def compare_latency(reference: ir.Model, candidate: ir.Model, samples: Sequence[Feeds], *,
                    threads: int = 2, rounds: int = 7, runs: int = 5) -> dict[str, Any]:
    """Median latency of both models on onnxruntime CPU (all graph optimizations,
    ``threads`` intra-op threads), interleaved so that both see the same machine load:
    ``rounds`` times, each model runs ``runs`` times on the next held-out sample
    (``optcc.runtime.latency.median_seconds``); the result is the median over rounds. Also the
    spread (max/min of the per-round medians) of each, as a noise indication."""
    sessions = [_session(m, "all", threads=threads, spin=True)
                for m in (reference, candidate)]
    per_round: list[list[float]] = [[], []]
    for r in range(rounds):
        feeds = samples[r % len(samples)]
        order = (0, 1) if r % 2 == 0 else (1, 0)
        for i in order:
            per_round[i].append(median_seconds(sessions[i], feeds, runs=runs, warmup=1 if r else 3))
    ref_t, cand_t = (float(np.median(t)) for t in per_round)
    return {
        "float32_s": ref_t,
        "int8_s": cand_t,
        "ratio": cand_t / ref_t if ref_t > 0 else math.inf,
        "spread": [max(t) / min(t) if min(t) > 0 else math.inf for t in per_round],
        "threads": threads,
        "rounds": rounds,
        "runs_per_round": runs,
    }
