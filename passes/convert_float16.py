"""ConvertFloat16Pass: float32 weights and computation to float16, verified, with fallback.

Rewrite: float32 initializers, Constants and node computations become float16, in the main
graph, If/Loop/Scan bodies and functions (``float16_rewrite``). Graph inputs/outputs keep
float32 (``keep_io_types=True``, or the names to keep; others become float16), with one
Cast at each boundary; body and function interfaces keep their types the same way.

A node stays float32 when (the reason is reported in ``stats["kept_float32"]``):
- its op is in ``block`` (op types or node names), or is custom-domain (onnxruntime's fused
  float ops in ``com.microsoft``, ``optcc.fp16.schemas.CONTRIB_FLOAT_OPS``, are not: they
  convert like standard ops when the probe finds them runnable in float16), or is an op whose
  types are its semantics (Cast, Range, ConstantOfShape, random ops, quantization, control
  flow: their bodies are converted inside);
- onnxruntime has no float16 implementation of it (``optcc.fp16.support`` probes a
  one-node session per op type, opset and provider — CPU, plus CUDA when present — and
  caches the verdict; ops that CPU runs through its own inserted float32 Casts are
  converted and listed in ``stats["cpu_fp32_fallback_ops"]``);
- data says float16 is unsafe: on the given feeds (or 2 generated ones, made longer when
  the model cannot run them, as the verifier's) an input or output
  reaches |x| >= 65504, more than 10% of its non-zero values flush to zero in float16, or a
  reduction's partial sums / a normalization's squares would overflow;
- it only moves data (``MOVEMENT_OPS``: Reshape, Transpose, Unsqueeze, ...) in a connected group
  of such converting nodes whose every float input comes from float32 (a node kept float32,
  or a graph input that keeps its type) and none from a weight: float16 there computes
  nothing and only rounds the values it moves, behind a Cast on each side;
- it lies in a main-graph If's branch that no sample ran (the condition took one value on
  every sample): nothing would verify float16 there;
- the accuracy check fails: the candidate is compared with the float32 original on the
  same feeds (without ``inputs``: those ``checked_samples`` returns, the samples the final
  verification generates, so that the pass accepts what it accepts; else 2 of its own)
  by the rule the final verification applies (``optcc.numerics.float16``: per
  output, SQNR over all samples >= ``min_sqnr_db`` (default 40 dB) and cosine >= 0.9999, or
  the task judge, ``judge`` or one measured on the user's ``inputs``, deciding it with
  enough items within float32's noise floor); when an output is not accepted, main-graph
  nodes are ranked by how much SQNR they lose (their inputs' SQNR minus their outputs'),
  and the smallest prefix of that ranking whose return to float32 meets the tolerance is
  found by doubling then bisection. Those nodes are recorded by name in the model's
  ``metadata_props["optcc.fp16.keep_float32"]`` so that a second run keeps them too;
- the model as it would be written fails ``confirm`` (where ``confirms()`` holds:
  ``optcc.optimize`` gives a KV-cache decoder's next-token check, which reads a decoder
  otherwise than SQNR does): the SQNR choice is the first model confirmed, by the
  verification's own check (its prompts, steps and threshold: a choice made without them,
  so the verification of that model reuses the verdict); while one is refused, the same
  ranking's prefix doubles (at least one region more, all of them at the most) and that
  model, its weights chosen as above, is confirmed next on prompts apart from the
  verification's (``Verifier.held_apart``), ``MAX_CONFIRMATIONS`` models in all, so that
  the verification still judges the model chosen on prompts the choice never saw. When
  none is confirmed nothing converts, and the reason is the last check's own.
- onnxruntime's default session (every graph optimization) cannot build the model as it
  would be written, asked of ``builds`` (``optcc.optimize`` gives the verification's own
  check, run in a child process: onnxruntime 1.32's CPU optimizers crash on a float16
  Transpose(perm=[1, 0, 2]) feeding a MatMul by a constant): the nodes that build needs in
  float32 are found by bisection over the main graph's converting nodes (``_built``, at
  most ``MAX_BUILDS`` builds), kept with the build's problem as their reason, and the result
  judged again by the accuracy check; where no prefix of nodes kept float32 builds, nothing
  converts and the reason is the build's problem.

Weights (>= 64 values) that nodes kept float32 read are stored float16 behind one shared
``Cast(to=float)``: always when float16-representable (exact), otherwise only when the
candidate still meets the tolerance (``stats["float32_nodes_weights_stored_float16"]``).
Types the pass infers to rewrite are not left declared (no value_info growth).

The result must save at least ``MIN_WEIGHT_SAVING`` (25%) of the bytes of the model's
float32 weights of ``STORE16_MIN_ELEMENTS`` values or more, those the user keeps float32
(blocked nodes', overridable inputs' defaults) aside (a full conversion saves half);
otherwise nothing is converted and ``stats["reason"]`` says the saving and the threshold
(``stats["float_weight_bytes"]``): the accuracy check returned most layers to float32 and
a float16 model would be no smaller, only slower. The saving is read from the decisions
(``Rewriter.float_weight_bytes``), and the pass stops once no later decision can reach it.

Attention-mask fills (-inf, finfo(float32).min: constants that only build the additive
mask before Softmax / Attention) are first clamped to -16384 (``optcc.fp16.masks``), so
the mask path converts instead of staying float32 in every layer; exact in float32 on
every row with an unmasked key. The accuracy check compares with the model as given.

Not exact: float16 rounding; the tolerance above is checked before the pass returns.
Weights beyond +-65504 are clamped, each listed in ``stats["clamped"]``. A model with
external data is never copied whole: its sessions read the weights in place
(``optcc.runtime.make_session``), its float16 weights are made once into a temporary file
(``optcc.fp16.weights``) and the emulated candidates read them through one Cast each, so
models over 2 GB convert like small ones, within about their weights' size of memory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

import optcc
from optcc import fp16
from optcc.numerics import (ACCEPTED_BY_SQNR, ACCEPTED_BY_TASK, RETRY_SIZES, SATURATED_BELOW, TOLERANCES, OutputMetrics,
                            TaskJudge, Tolerance, UngeneratedInputError, Verifier, accept_float16, compare_outputs,
                            generate_inputs, resolve_providers, widen_float16)
from optcc.fp16 import (
    FLOAT, FLOAT16, FP16_MAX, KEEP_INPUTS, Emulator, Rewriter, Slots, exactly_float16, float16_slots)
from optcc.progress import Progress
from optcc.quant import quantized_already

KEEP_MARKER = "optcc.fp16.keep_float32"
FALLBACK_REASON = "returned to float32 by the accuracy check"
USER_BLOCK = "blocked by the user"
UNDERFLOW_FRACTION = 0.10
UNDERFLOW_SQNR_DB = 60.0  # below float16's own rounding noise (~70 dB): the flushed values matter
STORE16_MIN_ELEMENTS = 64  # smaller weights do not pay for the Cast node that reads them
STORE16_TRIALS = 4  # evaluations spent on weights of float32 nodes one by one
MAX_CONFIRMATIONS = 4  # models ``confirm`` judges at most: the SQNR choice and 3 with more float32
MAX_BUILDS = 24  # models ``builds`` is asked about at most: one culprit costs about log2(nodes) + 2
# the least share of the float32 weight bytes a float16 result must save to ship: a full
# conversion saves half; one the accuracy check returned mostly to float32 gains nothing
MIN_WEIGHT_SAVING = 0.25
# the progress phases of the pass, in the order they run
RANGES_PHASE = "fp16: measuring ranges"
CANDIDATE_PHASE = "fp16: judging the float16 model"
SEARCH_PHASE = "fp16: layers back to float32"
CONFIRM_PHASE = "fp16: confirming by the verification's check"
STORE16_PHASE = "fp16: float32 layers' weights stored float16"
BUILD_PHASE = "fp16: nodes onnxruntime's default session cannot build in float16"


class _BuildUnchecked(Exception):
    """A trial model whose default-session build could not be asked (``builds``)."""


_SUM_REDUCES = frozenset({"ReduceSum", "ReduceMean"})
_SQUARE_REDUCES = frozenset({"ReduceSumSquare", "ReduceL2", "LpNormalization"})
_NORMS = frozenset({"LayerNormalization", "InstanceNormalization", "GroupNormalization",
                    "MeanVarianceNormalization", "RMSNormalization", "SkipLayerNormalization",
                    "SkipSimplifiedLayerNormalization", "EmbedLayerNormalization"})
_SCORE_CAP_DB = 60.0  # about float16 rounding noise: losses below it are inherent
WHOLE_RUN_BYTES = 64 << 20  # a sample's values up to this size are ranked on one run of each model
# ops that only move, select or repeat their float input's values (no arithmetic on them)
MOVEMENT_OPS = frozenset({"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Slice",
                          "Gather", "GatherElements", "GatherND", "Concat", "Split", "Expand", "Tile",
                          "DepthToSpace", "SpaceToDepth"})
UNRUN_BRANCH = "which no sample ran"  # in the reason of nodes of an If branch no sample took
MOVEMENT_REASON = "moves data between float32 values only: float16 would just round it"
Feeds = Mapping[str, np.ndarray]


def _node_keys(model: ir.Model) -> tuple[dict[ir.Node, int], dict[ir.Node, int]]:
    """Each node's position in walk order, and each node's main-graph ancestor position."""
    keys: dict[ir.Node, int] = {}
    for graph in optcc.ir.graphs(model):
        for node in graph:
            keys[node] = len(keys)
    top: dict[ir.Node, int] = {}

    def mark(graph: ir.Graph, key: int) -> None:
        for node in graph:
            top[node] = key
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.GRAPH:
                    mark(attr.as_graph(), key)
                elif attr.type == ir.AttributeType.GRAPHS:
                    for g in attr.as_graphs():
                        mark(g, key)

    for node in model.graph:
        top[node] = keys[node]
        for attr in node.attributes.values():
            subs = [attr.as_graph()] if attr.type == ir.AttributeType.GRAPH else (
                list(attr.as_graphs()) if attr.type == ir.AttributeType.GRAPHS else [])
            for g in subs:
                mark(g, keys[node])
    return keys, top


def _values(model: ir.Model) -> set[ir.Value]:
    """Every value the graphs' nodes read or write (initializers included)."""
    return {v for g in optcc.ir.graphs(model) for n in g for v in (*n.inputs, *n.outputs) if v is not None}


@dataclasses.dataclass
class _Judged:
    """A candidate's judgement over the providers: per output its SQNR (the worst provider's)
    and the rule that accepted it (``"sqnr"``, ``"task"``; None: neither), and the task
    verdict per provider where the task judge ran."""

    sqnr: dict[str, float] = dataclasses.field(default_factory=dict)
    accepted_by: dict[str, str | None] = dataclasses.field(default_factory=dict)
    task: dict[str, dict] = dataclasses.field(default_factory=dict)
    problems: list[str] = dataclasses.field(default_factory=list)
    providers: int = 0  # judged on how many

    @property
    def passed(self) -> bool:
        """Judged on some provider, and every output accepted on every one."""
        return self.providers > 0 and not self.problems

    def add(self, metrics: Sequence[OutputMetrics], verdict: dict | None) -> None:
        """One provider's outputs (``accept_float16``) and task verdict (None: not asked)."""
        self.providers += 1
        for m in metrics:
            db = -math.inf if m.sqnr_db is None else m.sqnr_db
            self.sqnr[m.name] = min(self.sqnr.get(m.name, math.inf), db)
            # "task" where any provider needed the task; None where any provider failed
            before = self.accepted_by.get(m.name, ACCEPTED_BY_SQNR)
            self.accepted_by[m.name] = None if before is None or not m.passed else (
                ACCEPTED_BY_TASK if ACCEPTED_BY_TASK in (before, m.accepted_by) else ACCEPTED_BY_SQNR)
            if not m.passed:
                self.problems.append(f"'{m.name}' on {m.provider}: {m.problem}")
        if verdict is not None and metrics:
            self.task[metrics[0].provider] = verdict


def _label(node: ir.Node, key: int) -> str:
    return node.name or f"{node.op_type}#{key}"


class ConvertFloat16Pass(optcc.Pass):
    """Convert float32 computation to float16 where onnxruntime and the data allow it."""

    name = "convert-float16"
    numerics = "fp16"

    def __init__(
        self,
        keep_io_types: bool | Sequence[str] = True,
        block: Iterable[str] = (),
        inputs: Iterable[Feeds] | Feeds | None = None,
        input_shapes: Mapping[str, Sequence[int]] | None = None,
        input_ranges: Mapping[str, tuple[float, float]] | None = None,
        min_sqnr_db: float = 40.0,
        providers: Sequence[str] | None = None,
        max_evaluations: int = 24,
        judge: Callable[[str], TaskJudge | None] | None = None,
        checked_samples: Callable[[], Sequence[Feeds] | None] | None = None,
        confirm: Callable[[ir.Model, int], str | None] | None = None,
        confirms: Callable[[], bool] | None = None,
        builds: Callable[[ir.Model], tuple[str | None, str | None]] | None = None,
    ) -> None:
        super().__init__()
        self.keep_io_types = keep_io_types if isinstance(keep_io_types, bool) else frozenset(keep_io_types)
        self.block = frozenset(block)
        self.inputs = [dict(inputs)] if isinstance(inputs, Mapping) else (
            None if inputs is None else [dict(f) for f in inputs])
        self.input_shapes = dict(input_shapes or {})
        self.input_ranges = dict(input_ranges or {})  # value ranges of the generated inputs, by name
        self.min_sqnr_db = float(min_sqnr_db)
        self.providers = resolve_providers(providers)
        self.max_evaluations = max_evaluations
        self.judge = judge
        self.checked_samples = checked_samples
        # why the model the pass would write fails (None: it passes), given how many were judged before it
        self.confirm = confirm
        self.confirms = confirms  # whether ``confirm`` judges this run (None: whenever it is given)
        # whether onnxruntime's default session builds the model the pass would write: (why it cannot,
        # None), (None, why it could not be asked), or (None, None): it builds
        self.builds = builds
        self._scratch: str | None = None

    @property
    def float16_interface(self) -> bool:  # type: ignore[override]
        """Whether graph inputs/outputs may become float16 (tells the pass manager)."""
        return self.keep_io_types is not True

    def __repr__(self) -> str:
        return f"ConvertFloat16Pass(keep_io_types={self.keep_io_types!r}, block={sorted(self.block)!r})"

    def _keep_io(self, name: str) -> bool:
        return self.keep_io_types if isinstance(self.keep_io_types, bool) else name in self.keep_io_types

    # -- facts -------------------------------------------------------------------------
    def _facts(self, model: ir.Model) -> None:
        # the accuracy check compares with the model as given; ranges and candidates start
        # from the model with its attention-mask fills clamped (exact on valid inputs)
        self.original = model.clone()
        self._originals: dict[str, tuple[list[str], list[list[np.ndarray]]]] = {}
        self.reference = model.clone()
        self.mask_fills = fp16.clamp_mask_fills(self.reference)
        self.opset = optcc.ir.default_opset(model)
        self.inferred = optcc.ir.inferred_dtypes(model)
        checked = None if self.inputs or self.checked_samples is None else self.checked_samples()
        self.given = bool(self.inputs or checked)  # samples the original is known to run: never regenerated
        self.feeds = self.inputs or ([dict(f) for f in checked] if checked else generate_inputs(
            self.reference, self.input_shapes, samples=2, seed=0, ranges=self.input_ranges))
        # ranges and If conditions are observed on the user's samples, else on the first 2
        # generated ones (batch 1); the accuracy check judges every sample
        self.range_feeds = self.feeds if self.inputs else self.feeds[:2]
        # ranges, If conditions, of the first sample the values' types and sizes, and the
        # graph outputs per range feed (None: the model did not run)
        self.observed: fp16.ranges.Observation | None = None
        self.range_note = None
        try:
            self.observed = self._observed()
        except Exception as e:  # noqa: BLE001
            self.range_note = f"ranges not observed: onnxruntime cannot run the model ({e})"[:300]
        self.ranges = self.observed.ranges if self.observed else {}
        self.taken = self.observed.taken if self.observed else {}  # the values each If condition took
        # onnx's inference stops at com.microsoft ops; what onnxruntime computed has a type
        for name, dtype in (self.observed.dtypes if self.observed else {}).items():
            if self.inferred.get(name) is None:
                self.inferred[name] = ir.DataType.from_numpy(dtype)

    def _observed(self) -> fp16.ranges.Observation:
        """``observe`` of the reference over the range feeds; generated feeds the model
        cannot run are generated again with the sizes of ``RETRY_SIZES`` in turn, as the
        verifier does."""
        try:
            return fp16.ranges.observe(self.reference, self.range_feeds, self._scratch)
        except Exception:  # noqa: BLE001
            if self.given:  # the verification's samples stay what both judge
                raise
        *earlier, last = RETRY_SIZES
        for sizes in earlier:
            self.feeds = self.range_feeds = generate_inputs(self.reference, self.input_shapes, samples=2, seed=0,
                                                            ranges=self.input_ranges, **sizes)
            try:
                return fp16.ranges.observe(self.reference, self.feeds, self._scratch)
            except Exception:  # noqa: BLE001 - the next sizes are tried
                pass
        self.feeds = self.range_feeds = generate_inputs(self.reference, self.input_shapes, samples=2, seed=0,
                                                        ranges=self.input_ranges, **last)
        return fp16.ranges.observe(self.reference, self.feeds, self._scratch)

    def _dtype(self, value: ir.Value) -> ir.DataType | None:
        return value.dtype if value.dtype is not None else self.inferred.get(value.name or "")

    # -- reasons to keep a node float32 ------------------------------------------------
    def _range_reason(self, node: ir.Node) -> str | None:
        r = self.ranges
        ins = [r[v.name] for v in node.inputs if v is not None and v.name in r]
        outs = [r[v.name] for v in node.outputs if v.name in r]
        for v in (*node.inputs, *node.outputs):
            if v is not None and v.name in r and r[v.name].max_abs >= FP16_MAX:
                return f"'{v.name}' reaches |x| = {r[v.name].max_abs:.6g} >= 65504"
            if v is not None and v.name in r and r[v.name].flushed_fraction > UNDERFLOW_FRACTION \
                    and r[v.name].rounding_sqnr_db < UNDERFLOW_SQNR_DB:
                return (f"{r[v.name].flushed_fraction:.1%} of '{v.name}' underflows to 0 in float16 "
                        f"(its float16 SQNR {r[v.name].rounding_sqnr_db:.1f} dB < {UNDERFLOW_SQNR_DB:g})")
        if not ins:
            return None
        peak, size = ins[0].max_abs, ins[0].size
        extent = size / max(1, outs[0].size) if outs else 1
        if node.op_type in _SUM_REDUCES and peak * extent >= FP16_MAX:
            return f"partial sums up to {peak:.3g} x {extent:.0f} may overflow float16"
        if node.op_type in _SQUARE_REDUCES and peak * peak * extent >= FP16_MAX:
            return f"sums of squares up to {peak:.3g}^2 x {extent:.0f} may overflow float16"
        if node.op_type == "ReduceLogSumExp" and peak >= math.log(FP16_MAX):
            return f"exp({peak:.3g}) overflows float16"
        if node.op_type in _NORMS and peak * peak >= FP16_MAX:
            return f"squared deviations up to {peak:.3g}^2 overflow float16"
        return None

    def _probe_reason(self, node: ir.Node, slots: Slots, examples: Mapping[str, np.ndarray]) -> str | None:
        key = fp16.support.op_key(node.domain, node.op_type)
        if key in self._probed:
            return self._probed[key]
        made: list[list[np.ndarray | onnx.ValueInfoProto | None]] = []

        def specs() -> list[np.ndarray | onnx.ValueInfoProto | None]:
            # built only for a probe: it reads the node's weights
            if not made:
                made.append(self._probe_specs(node, examples))
            return made[0]

        proto = ir.serde.serialize_node(node)
        flags = [i in slots.inputs for i in range(len(node.inputs))]
        reason = None
        for provider in self.providers:
            status, detail = fp16.support.cached(node.domain, node.op_type, self.opset, provider) or \
                fp16.support.support(proto, specs(), flags, self.opset, provider)
            if status == "fallback" and provider == "CPUExecutionProvider":
                self._cpu_fallback.add(node.op_type)
            if status == "unsupported":
                reason = f"no float16 kernel in onnxruntime {ort.__version__} {provider}: {detail}"
            elif status == "unknown":
                reason = f"float16 support on {provider} could not be probed: {detail}"
            if reason:
                break
        self._probed[key] = reason
        return reason

    def _probe_examples(self, nodes: Iterable[ir.Node]) -> dict[str, np.ndarray]:
        """The first sample's values of the inputs that probes of ``nodes`` (in the order
        they are judged) can read: those of the first node of each op type without a cached
        verdict on every provider (``_probe_reason`` probes an op type once, on its first
        node), fetched in one run of the reference (none where it did not run)."""
        first: dict[str, ir.Node] = {}
        for node in nodes:
            first.setdefault(fp16.support.op_key(node.domain, node.op_type), node)
        names = {v.name for node in first.values()
                 if any(fp16.support.cached(node.domain, node.op_type, self.opset, p) is None for p in self.providers)
                 for v in node.inputs if v is not None and v.name and optcc.ir.as_numpy(v) is None}
        if self.observed is None or not names:
            return {}
        return fp16.ranges.values_of(self.reference, self.feeds[0], names, self._scratch)

    def _probe_specs(self, node: ir.Node, values: Mapping[str, np.ndarray]
                     ) -> list[np.ndarray | onnx.ValueInfoProto | None]:
        """Per input of ``node``: an example array (a constant, its value in ``values``, the
        first sample's (``_probe_examples``), or the feed) or its type and shape, for
        ``fp16.support``'s probe."""
        specs: list[np.ndarray | onnx.ValueInfoProto | None] = []
        for v in node.inputs:
            if v is None:
                specs.append(None)
                continue
            array = optcc.ir.as_numpy(v)
            if array is None:
                array = values.get(v.name) if v.name in values else self.feeds[0].get(v.name or "")
            if array is not None:
                specs.append(np.asarray(array))
                continue
            dims = None if v.shape is None else [d if isinstance(d, int) else -1 for d in v.shape]
            elem = self._dtype(v)
            specs.append(onnx.helper.make_tensor_value_info(
                v.name or "x", int(elem or FLOAT), dims) if dims is not None else
                onnx.helper.make_tensor_value_info(v.name or "x", int(elem or FLOAT), None))
        return specs

    def _base_keep(self, model: ir.Model) -> tuple[dict[int, str], dict[ir.Node, Slots]]:
        keys, top = _node_keys(model)
        marked = set(json.loads(model.metadata_props.get(KEEP_MARKER, "[]") or "[]"))
        keep: dict[int, str] = {}
        plan: dict[ir.Node, Slots] = {}
        self._probed: dict[str, str | None] = {}
        self._cpu_fallback: set[str] = set()
        unrun = self._unrun_branches(keys)
        judged: dict[ir.Node, tuple[int, Slots, str | None]] = {}  # the reasons no probe needs
        for node, key in keys.items():
            slots = float16_slots(node, self.opset, self._dtype)
            if isinstance(slots, str):
                continue  # nothing to convert; not a decision worth reporting
            reason = None
            if node in unrun:
                reason = unrun[node]
            elif node.op_type in self.block or (node.name and node.name in self.block):
                reason = USER_BLOCK
            elif node.name and node.name in marked:
                reason = "kept float32 by an earlier run's accuracy check"
            elif top.get(node) == key:
                reason = self._range_reason(node)
            judged[node] = (key, slots, reason)
        examples = self._probe_examples(node for node, (_, _, reason) in judged.items() if not reason)
        for node, (key, slots, reason) in judged.items():
            reason = reason or self._probe_reason(node, slots, examples)
            if reason:
                keep[key] = reason
            else:
                plan[node] = slots
        return keep, plan

    def _movement_islands(self, keep: Mapping[int, str]) -> dict[int, str]:
        """``keep`` plus the main-graph groups of converting data-movement nodes (connected
        through the values they pass each other) whose float inputs all come from float32:
        nodes kept float32, or graph inputs that keep their type; not from weights, and no
        value of the group read inside a subgraph or a float16 graph output."""
        graph = self.reference.graph
        keys, _ = _node_keys(self.reference)

        def slots(node: ir.Node) -> Slots | None:
            if keys[node] in keep or optcc.ir.subgraphs(node):
                return None
            found = float16_slots(node, self.opset, self._dtype)
            return None if isinstance(found, str) else found

        converting = {node: s for node in graph if (s := slots(node)) is not None}
        result = dict(keep)
        seen: set[ir.Node] = set()
        for start in converting:
            if start in seen:
                continue
            group, stack = [], [start]
            while stack:  # the connected group of converting nodes around ``start``
                node = stack.pop()
                if node in seen:
                    continue
                seen.add(node)
                group.append(node)
                for i in converting[node].inputs:
                    producer = node.inputs[i].producer()
                    if producer in converting:
                        stack.append(producer)
                for i in converting[node].outputs:
                    stack.extend(u.node for u in node.outputs[i].uses() if u.node in converting)
            if all(self._moves_float32(node, converting[node], converting) for node in group):
                result.update({keys[node]: MOVEMENT_REASON for node in group})
        return result

    def _moves_float32(self, node: ir.Node, slots: Slots, converting: Mapping[ir.Node, Slots]) -> bool:
        """Whether ``node`` only moves data, each float input from float32 or from a node of
        its group, and each float output read in the main graph only (never a float16
        graph output)."""
        if node.domain not in ("", "ai.onnx") or node.op_type not in MOVEMENT_OPS:
            return False
        for i in slots.inputs:
            value = node.inputs[i]
            producer = value.producer()
            if producer is None and not (value.is_graph_input() and self._keep_io(value.name or "")):
                return False  # a weight (converting halves it), or a graph input made float16
            if producer is not None and producer.op_type == "Constant" and producer not in converting:
                return False
        for i in slots.outputs:
            value = node.outputs[i]
            if value.is_graph_output() and not self._keep_io(value.name or ""):
                return False
            if any(u.node.graph is not node.graph for u in value.uses()):
                return False
        return True

    def _unrun_branches(self, keys: Mapping[ir.Node, int]) -> dict[ir.Node, str]:
        """The nodes of each main-graph If's branch that no sample ran (its condition took
        one value on every sample), with why they stay float32: no sample can verify float16
        there."""
        found: dict[ir.Node, str] = {}
        for node in self.reference.graph:
            cond = node.inputs[0] if node.op_type == "If" and node.domain in ("", "ai.onnx") and node.inputs else None
            seen = self.taken.get(cond.name or "") if cond is not None else None
            if not seen or len(seen) != 1:
                continue
            branch = "else_branch" if True in seen else "then_branch"
            if branch not in node.attributes:
                continue
            why = (f"in {_label(node, keys[node])}'s {branch}, {UNRUN_BRANCH} (its condition was "
                   f"{next(iter(seen))} on all {len(self.range_feeds)}): float16 there would go unverified")
            stack = [node.attributes[branch].as_graph()]
            while stack:
                for inner in stack.pop():
                    found[inner] = why
                    stack.extend(optcc.ir.subgraphs(inner))
        return found

    # -- building and judging candidates ----------------------------------------------
    def _rewrite(
        self, model: ir.Model, keep: Mapping[int, str], emulate: bool = False, store16: Collection[str] = ()
    ) -> ir.Model:
        annotated = {v for v in model.graph.outputs}
        declared = {v for v in _values(model)
                    if v.type is not None and not v.is_graph_output() and not v.is_graph_input()}
        for graph in optcc.ir.graphs(model):  # declare inferred float types before retyping
            for node in graph:
                for v in (*node.inputs, *node.outputs):
                    if v is not None and v.type is None and v not in annotated:
                        dtype = self.inferred.get(v.name or "")
                        if dtype is not None:
                            v.type = ir.TensorType(dtype)
        rewriter = (Emulator if emulate else Rewriter)(
            model, self._slots_of(model, keep), self._dtype, self._keep_io, store16, self.weights,
            external_result=self._external_result)
        self._last = rewriter.run()
        self._weight_casts = getattr(rewriter, "weight_casts", set())
        if not emulate:  # types declared for the rewrite only would each cost a value_info entry
            for v in _values(model):
                if v.is_graph_output() or v.is_graph_input() or v in declared:
                    continue
                v.type = None
                v.shape = None
        return model

    def _slots_of(self, model: ir.Model, keep: Mapping[int, str]) -> Callable[[ir.Node], Slots | None]:
        """The rewrite's decision per node of ``model``: its float16 slots, or None (kept)."""
        keys, top = _node_keys(model)

        def slots_of(node: ir.Node) -> Slots | None:
            key = keys[node]
            if key in keep or top.get(node, -1) in keep:
                return None
            slots = float16_slots(node, self.opset, self._dtype)
            return None if isinstance(slots, str) else slots

        return slots_of

    # -- what the result saves -----------------------------------------------------------
    def _float_weight_bytes(self, keep: Mapping[int, str], store16: Collection[str]) -> tuple[int, int]:
        """The bytes of the model's float32 weights (of ``STORE16_MIN_ELEMENTS`` values or
        more: scalars and short vectors weigh nothing; none a node the user blocked reads:
        the user keeps those float32), and theirs in the result of ``keep`` and
        ``store16`` (each weight stored float16 takes half), read from the decisions alone."""
        keys, top = _node_keys(self.reference)
        blocked = {v.name for node, key in keys.items() if USER_BLOCK in (keep.get(key), keep.get(top.get(node, -1)))
                   for v in node.inputs if v is not None and v.name}
        return Rewriter(self.reference, self._slots_of(self.reference, keep), self._dtype, self._keep_io,
                        store16).float_weight_bytes(STORE16_MIN_ELEMENTS, skip=blocked)

    def _short_of_saving(self, keep: Mapping[int, str], store16: Collection[str], bound: bool) -> str | None:
        """Why float16 gains too little to ship when ``keep`` and ``store16`` decide the
        result (``bound``: when they are the most it can still convert, every later
        decision keeping more float32): its float32 weights save less than
        ``MIN_WEIGHT_SAVING`` of their bytes. None when they save enough, or the model has
        no float32 weights (float16 is then its computation alone)."""
        before, after = self._float_weight_bytes(keep, store16)
        self._saving = (before, after)
        if not before or before - after >= MIN_WEIGHT_SAVING * before:
            return None
        returned = sum(why == FALLBACK_REASON for why in keep.values())
        return (f"float16 would save {'at most ' if bound else ''}{(before - after) / before:.1%} of the float32 "
                f"weight bytes ({optcc.infra.format_bytes(before)} -> {optcc.infra.format_bytes(after)}), "
                f"below the {MIN_WEIGHT_SAVING:.0%} threshold (a full conversion saves 50%): "
                f"{len(keep)} layer(s) stay float32"
                + (f", {returned} of them returned by the accuracy check" if returned else ""))

    def _decline(self, stats: dict[str, Any], keep: Mapping[int, str], reason: str) -> dict[str, Any]:
        """``stats`` of a conversion declined for ``reason`` before its rewrite."""
        self._report_kept(stats, keep)
        before, after = self._saving
        stats.update({"reason": reason, "evaluations": self.evaluations,
                      "float_weight_bytes": {"float32": before, "float16": after, "min_saving": MIN_WEIGHT_SAVING}})
        return stats

    def _candidate_feeds(self, candidate: ir.Model,
                         feeds: Sequence[Feeds] | None = None) -> list[dict[str, np.ndarray]]:
        """``feeds`` (default: every sample) as ``candidate`` reads them: float16 inputs cast."""
        types = {v.name: v.dtype for v in candidate.graph.inputs}
        return [{k: (a.astype(np.float16) if types.get(k) == FLOAT16 else a) for k, a in f.items()}
                for f in (self.feeds if feeds is None else feeds)]

    def _original_outputs(self, provider: str) -> tuple[list[str], list[list[np.ndarray]]]:
        """The model as given: its output names and outputs per sample (run once, so that
        no two sessions of a large model live at once). On the CPU, the samples ``observe``
        ran are not run again where the reference is the model as given (no mask fill
        clamped): its graph outputs there are these."""
        if provider not in self._originals:
            names = [v.name for v in self.original.graph.outputs]
            seen = self.observed.outputs if self.observed is not None and not self.mask_fills \
                and provider == "CPUExecutionProvider" else []
            rest = self.feeds[len(seen):]
            if rest:
                ref = fp16.ranges.session(self.original, provider, self._scratch)
                names = [o.name for o in ref.get_outputs()]
                seen = [*seen, *(optcc.runtime.detached(ref.run(None, f)) for f in rest)]
            self._originals[provider] = (names, list(seen))
        return self._originals[provider]

    def _task_judge(self, provider: str) -> Callable[[], TaskJudge | None] | None:
        """The task judge of the feeds on ``provider``, made when first asked: the one given
        (``judge``), else, for the user's samples, one measured here on the model as given
        (``Verifier.sample_judge``); None on generated samples (the task is the user's)."""
        if self.judge is not None:
            return lambda: self.judge(provider)  # type: ignore[misc]
        if not self.inputs:
            return None

        def own() -> TaskJudge | None:
            if self._verifier is None:
                self._verifier = Verifier(self.original, inputs=self.feeds, providers=self.providers)
            return self._verifier.sample_judge(provider)

        return own

    def _output_sqnr(self, candidate: ir.Model) -> _Judged:
        """The candidate judged on every provider as the final verification judges a float16
        result (``optcc.numerics.float16``): per output the SQNR rule (summed over the
        samples: ``min_sqnr_db``, cosine ``TOLERANCES["fp16"]``'s) or the task."""
        tolerance = Tolerance(min_sqnr_db=self.min_sqnr_db, min_cosine=TOLERANCES["fp16"].min_cosine)
        judged = _Judged()
        for provider in self.providers:
            names, originals = self._original_outputs(provider)
            session = fp16.ranges.session(candidate, provider, self._scratch, arena=False)
            got = [widen_float16(optcc.runtime.detached(session.run(None, f16)), original)
                   for original, f16 in zip(originals, self._candidate_feeds(candidate))]
            metrics = [compare_outputs(name, provider, [o[i] for o in originals], [g[i] for g in got], tolerance)
                       for i, name in enumerate(names)]
            metrics, verdict = accept_float16(metrics, self._task_judge(provider),
                                              {name: [g[i] for g in got] for i, name in enumerate(names)})
            judged.add(metrics, verdict)
        return judged

    def _evaluate(
        self, keep: Mapping[int, str], store16: Collection[str] = ()
    ) -> tuple[bool, _Judged, ir.Model]:
        candidate = self._rewrite(self.reference.clone(), keep, emulate=True, store16=store16)
        self.evaluations += 1
        try:
            judged = self._output_sqnr(candidate)
        except Exception:  # noqa: BLE001 - a candidate onnxruntime rejects fails the check
            return False, _Judged(), candidate
        return judged.passed, judged, candidate

    def _converting(self, keep: Mapping[int, str]) -> list[ir.Node]:
        """The main-graph nodes of the reference that ``keep`` leaves converting (float16
        slots, or subgraphs converted inside), in graph order."""
        keys, _ = _node_keys(self.reference)
        return [node for node in self.reference.graph if keys[node] not in keep and (
            not isinstance(float16_slots(node, self.opset, self._dtype), str) or bool(optcc.ir.subgraphs(node)))]

    def _ranking(self, candidate: ir.Model, keep: Mapping[int, str]) -> list[set[int]]:
        """Regions (a main-graph node with the converted producers of its inputs), most
        harmful first: ranked by the SQNR the node loses between its inputs and outputs."""
        keys, _ = _node_keys(self.reference)
        ranked = self._converting(keep)
        converting = set(ranked)
        measured: dict[str, float] = {}
        if self.observed is not None:
            nbytes = self.observed.nbytes
            # both models' parts together hold about one sample's values, as ``observe`` did
            part_bytes = max(WHOLE_RUN_BYTES, sum(nbytes.values()) // 2)
            try:
                measured = fp16.ranges.values_sqnr(
                    self.reference, candidate, self.feeds[0], self._candidate_feeds(candidate, self.feeds[:1])[0],
                    {v.name for node in ranked for v in (*node.inputs, *node.outputs) if v is not None},
                    nbytes, part_bytes=part_bytes, scratch=self._scratch, skip=self._weight_casts)
            except Exception:  # noqa: BLE001 - a candidate onnxruntime rejects ranks nothing first
                measured = {}

        def sqnr(value: ir.Value | None) -> float:
            if value is None or value.name not in measured:
                return _SCORE_CAP_DB
            return max(-_SCORE_CAP_DB, min(_SCORE_CAP_DB, measured[value.name]))

        scores = []
        for node in ranked:
            lost = min((sqnr(v) for v in node.inputs), default=_SCORE_CAP_DB) - min(
                (sqnr(v) for v in node.outputs), default=_SCORE_CAP_DB)
            region = {keys[node]} | {keys[v.producer()] for v in node.inputs
                                     if v is not None and v.producer() in converting}
            scores.append((-lost, keys[node], region))
        return [region for _, _, region in sorted(scores, key=lambda t: (t[0], t[1]))]

    def _fallback(
        self, keep: dict[int, str], candidate: ir.Model
    ) -> tuple[dict[int, str], _Judged, bool]:
        ranked = self._ranking(candidate, keep)
        labels = {k: _label(n, k) for n, k in _node_keys(self.reference)[0].items()}

        def with_prefix(k: int) -> dict[int, str]:
            extra = {key: FALLBACK_REASON for region in ranked[:k] for key in region}
            return {**keep, **extra}

        low, high, best, met = 0, None, None, False
        k = 1
        # the doubling and the bisection each judge at most one candidate per bit of len(ranked)
        bound = min(2 * len(ranked).bit_length() + 2, max(self.max_evaluations - self.evaluations, 1))
        with Progress(SEARCH_PHASE, bound) as bar:
            while k <= len(ranked) and self.evaluations < self.max_evaluations:
                ok, sqnr, _ = self._evaluate(with_prefix(k))
                bar.advance()
                if ok:
                    high, best, met = k, sqnr, True
                    break
                low, k = k, min(2 * k, len(ranked)) if k < len(ranked) else k + 1
            if high is None:
                high = len(ranked)
                met, best, _ = self._evaluate(with_prefix(high))
                bar.advance()
            while high - low > 1 and self.evaluations < self.max_evaluations:
                mid = (low + high) // 2
                ok, sqnr, _ = self._evaluate(with_prefix(mid))
                bar.advance()
                if ok:
                    high, best, met = mid, sqnr, True
                else:
                    low = mid
            bar.advance(bound)
        self._fallback_labels = sorted({labels[key] for region in ranked[:high] for key in region})
        self._ranked = (keep, ranked, high)
        return with_prefix(high), best or _Judged(), met

    # -- weights of float32 nodes stored in float16 --------------------------------------
    def _store16_candidates(
        self, keep: Mapping[int, str]
    ) -> tuple[dict[str, int], dict[str, int]]:
        """Float32 weights (initializers, Constants) some node keeps reading in float32 that
        could be stored float16 behind one ``Cast(to=float)``, with their sizes: exactly
        float16-representable ones (exact), others within range without meaningful
        underflow that nodes kept float32 read (lossy: checked before use). Weights read
        by custom-domain ops, in a slot that keeps its type, by nodes the user blocked or in
        an If branch no sample ran (exact ones aside) are left alone."""
        keys, top = _node_keys(self.reference)
        exact: dict[str, int] = {}
        lossy: dict[str, int] = {}

        def reason(node: ir.Node) -> str | None:
            return keep.get(keys.get(node, -1)) or keep.get(top.get(node, -1))

        for graph in optcc.ir.graphs(self.reference):
            weights: list[tuple[ir.Value, ir.TensorProtocol]] = []
            if isinstance(graph, ir.Graph):
                weights += [(v, v.const_value) for v in graph.initializers.values()
                            if v.dtype == FLOAT and v.const_value is not None and not v.is_graph_input()]
            for node in graph:
                is_constant = node.op_type == "Constant" and node.domain in ("", "ai.onnx")
                attr = node.attributes.get("value") if is_constant else None
                if attr is not None and attr.type == ir.AttributeType.TENSOR and attr.as_tensor().dtype == FLOAT:
                    weights.append((node.outputs[0], attr.as_tensor()))
            for value, tensor in weights:
                uses = list(value.uses())
                if (tensor.size < STORE16_MIN_ELEMENTS or not uses or value.is_graph_output() or not value.name
                        or any(u.node.domain not in ("", "ai.onnx")
                               or u.idx in KEEP_INPUTS.get(u.node.op_type, ()) for u in uses)):
                    continue
                why = [reason(u.node) for u in uses]
                if not any(why):
                    continue  # no kept reader: the ordinary rewrite stores it in float16 already
                # read only now (most weights have no kept reader), into an array that goes
                # with this weight: the model's own view of an external file would stay mapped
                array = fp16.weights.float32_values(tensor)
                if exactly_float16(array):
                    exact[value.name] = int(array.size)
                    continue
                if USER_BLOCK in why or any(w and UNRUN_BRANCH in w for w in why):
                    continue  # rounded weights of an unrun branch: no sample would check them
                peak = fp16.ranges.finite_abs_max(array)
                if peak is not None and peak < FP16_MAX and \
                        fp16.ranges.float16_rounding_sqnr_db(array) >= UNDERFLOW_SQNR_DB:
                    lossy[value.name] = int(array.size)
        return exact, lossy

    def _choose_store16(
        self, keep: Mapping[int, str], sqnr: _Judged
    ) -> tuple[set[str], _Judged, dict, str | None]:
        """The weights to store float16 under float32 nodes: exact ones always; the others
        only while the candidate still meets the tolerance: all at once, else one by one,
        largest first (at most ``STORE16_TRIALS`` more evaluations). And why the result
        saves too little to ship (``_short_of_saving``; None: it saves enough), said
        before an evaluation when even every weight it could still round would not do."""
        exact, lossy = self._store16_candidates(keep)
        chosen, report = set(exact), {"exact": len(exact), "rounded": 0}
        short = self._short_of_saving(keep, chosen | set(lossy), bound=bool(lossy))
        if short:
            return chosen, sqnr, report, short
        if lossy:
            with Progress(STORE16_PHASE, 1 + min(len(lossy), STORE16_TRIALS)) as bar:
                ok, trial_sqnr, _ = self._evaluate(keep, store16=chosen | set(lossy))
                bar.advance()
                trials = [] if ok else sorted(lossy, key=lambda n: (-lossy[n], n))[:STORE16_TRIALS]
                if ok:
                    chosen |= set(lossy)
                    sqnr = trial_sqnr
                elif short := self._short_of_saving(keep, chosen | set(trials), bound=True):
                    return chosen, sqnr, report, short
                for i, name in enumerate(trials):
                    ok, one_sqnr, _ = self._evaluate(keep, store16=chosen | {name})
                    bar.advance()
                    if ok:
                        chosen.add(name)
                        sqnr = one_sqnr
                        continue
                    left = trials[i + 1:]
                    short = self._short_of_saving(keep, chosen | set(left), bound=bool(left))
                    if short:
                        return chosen, sqnr, report, short
                bar.advance(bar.total)
            report["rounded"] = len(chosen) - len(exact)
            if len(chosen) - len(exact) < len(lossy):
                report["not_rounded"] = sorted(set(lossy) - chosen)
        sizes = {**exact, **lossy}
        report["bytes_saved"] = 2 * sum(sizes[n] for n in chosen)
        return chosen, sqnr, report, self._short_of_saving(keep, chosen, bound=False)

    # -- the pass ------------------------------------------------------------------------
    def call(self, model: ir.Model) -> optcc.PassResult:
        # sessions on models with external data load from a file saved here (not from bytes)
        configured = set(vars(self))
        with tempfile.TemporaryDirectory(prefix="optcc-fp16-") as scratch:
            self._scratch = scratch
            self._verifier: Verifier | None = None  # the task judge's, when this run measures its own
            try:
                return self._call(model)
            finally:
                if self._verifier is not None:
                    self._verifier.close()
                self._scratch = None
                # the run's state (model copies, emulated candidates, sampled values) goes with
                # it: the pass object outlives the run in the pipeline
                for name in set(vars(self)) - configured:
                    delattr(self, name)

    def _call(self, model: ir.Model) -> optcc.PassResult:
        already = quantized_already(model)
        if already:  # float16 between Q/DQ pairs adds a Cast at every boundary and keeps the integer ops
            return optcc.PassResult(model, False,
                                    {"skipped": f"nothing converted: {already}; float16 converts float models"})
        # float16 weights are made once and shared by every candidate and the result; a
        # model with external data gets them in a file (see optcc.fp16.weights)
        self.weights = fp16.Float16Weights(
            spill=optcc.ir.uses_external_data(model) or optcc.ir.needs_external_data(model))
        # weights past protobuf's limit: the result's float16 weights stay in that file (the
        # model saves with external data anyway); otherwise they are read into memory
        self._external_result = optcc.ir.weight_bytes(model) > optcc.ir.EXTERNAL_DATA_THRESHOLD_BYTES
        self._weight_casts: set[str] = set()
        try:
            with Progress(RANGES_PHASE, 1) as bar:
                self._facts(model)
                bar.advance()
        except UngeneratedInputError as e:  # a string input, say: only the user's samples can feed it
            return optcc.PassResult(model, False, {"skipped": f"nothing converted: no samples to judge float16 on: {e}"})
        self.evaluations = 0
        self._fallback_labels: list[str] = []
        # the accuracy check's ranking, once made: the keep it ranks from, its regions, the prefix taken
        self._ranked: tuple[dict[int, str], list[set[int]], int] | None = None
        self._confirmations: list[str | None] = []  # ``confirm``'s verdicts, in order
        keep, plan = self._base_keep(self.reference)
        keep = self._movement_islands(keep)
        reference_keys, _ = _node_keys(self.reference)
        plan = {node: slots for node, slots in plan.items() if reference_keys[node] not in keep}
        stats: dict = {"providers": self.providers, "samples": len(self.feeds),
                       "note": "float16 on CPU is for size: onnxruntime runs most float16 CPU "
                               "kernels through float32"}
        if self.mask_fills:
            stats["mask_fills_clamped"] = {"to": fp16.MASK_FILL, "constants": self.mask_fills}
        if self.range_note:
            stats["ranges"] = self.range_note
        if self.observed is None:
            stats["skipped"] = "nothing converted: " + (self.range_note or "no reference values")
            return optcc.PassResult(model, False, stats)
        exact, lossy = self._store16_candidates(keep)
        if not plan and not exact and not lossy:
            self._report_kept(stats, keep)
            return optcc.PassResult(model, False, stats)
        # the accuracy check only ever keeps more float32: decline before it where even
        # this much float16 would save too little
        short = self._short_of_saving(keep, {*exact, *lossy}, bound=True)
        if short:
            return optcc.PassResult(model, False, self._decline(stats, keep, short))
        with Progress(CANDIDATE_PHASE, 1) as bar:
            ok, judged, candidate = self._evaluate(keep)
            bar.advance()
        if not ok:
            keep, judged, ok = self._fallback(keep, candidate)
            if ok:  # the nodes returned to float32 may leave data movement between float32 values
                settled = self._movement_islands(keep)
                if settled != keep:
                    now_ok, now_judged, _ = self._evaluate(settled)
                    if now_ok:
                        keep, judged = settled, now_judged
        del candidate  # no emulated model outlives the search: a confirmation builds the written one
        if not ok:
            stats["skipped"] = (
                f"nothing converted: no float16 conversion met {self.min_sqnr_db:g} dB SQNR, or the task "
                f"judge with enough items, on every output after {self.evaluations} evaluation(s) "
                f"({'; '.join(judged.problems) or judged.sqnr})")
            self._report_kept(stats, keep)
            if judged.task:
                stats["task"] = judged.task
            return optcc.PassResult(model, False, stats)
        store16, judged, store_report, short = self._choose_store16(keep, judged)
        if not short and self.confirm is not None and (self.confirms is None or self.confirms()):
            keep, store16, judged, store_report, refused = self._confirmed(
                model, keep, store16, judged, store_report)
            if refused:
                stats["confirmations"] = self._confirmations
                return optcc.PassResult(model, False, self._decline(stats, keep, refused))
        if short:
            if self._fallback_labels and all(reference_keys[node] in keep for node in plan):
                short = f"{self._all_returned_reason()}; {short}"  # no layer left float16: that comes first
            elif self._fallback_labels:
                short += self._near_zero_note()
            return optcc.PassResult(model, False, self._decline(stats, keep, short))
        if self.builds is not None:
            keep, judged, unbuilt = self._built(model, keep, store16, judged, stats)
            if unbuilt:
                return optcc.PassResult(model, False, self._decline(stats, keep, unbuilt))
        sqnr = judged.sqnr
        self._write(model, keep, store16)
        result = self._last
        self._report_kept(stats, keep)
        stats.update({
            "converted": dict(sorted(result.converted_nodes.items())),
            "initializers_converted": result.initializers_converted,
            "float32_nodes_weights_stored_float16": store_report,
            "casts_inserted": result.casts_inserted,
            "casts_removed": result.casts_removed,
            "clamped": result.clamped,
            "cpu_fp32_fallback_ops": sorted(self._cpu_fallback),
            "returned_to_float32": self._fallback_labels,
            "sqnr_db": {k: (round(v, 2) if math.isfinite(v) else str(v)) for k, v in sqnr.items()},
            "min_sqnr_db": self.min_sqnr_db,
            "accepted_by": judged.accepted_by,
            "evaluations": self.evaluations,
            "float_weight_bytes": {"float32": self._saving[0], "float16": self._saving[1],
                                   "min_saving": MIN_WEIGHT_SAVING},
        })
        if judged.task:  # the task judge's rows, deviation against float32's noise floor
            stats["task"] = judged.task
        if self._confirmations:
            stats["confirmations"] = self._confirmations
        if not result.converted_nodes and self._fallback_labels:
            stats["reason"] = self._all_returned_reason()
        return optcc.PassResult(model, result.modified, stats)

    def _write(self, model: ir.Model, keep: Mapping[int, str], store16: Collection[str]) -> ir.Model:
        """``model`` rewritten in place as the pass writes it: mask fills clamped, ``keep``
        float32, ``store16``'s weights stored float16, the nodes the accuracy check returned
        to float32 named in ``KEEP_MARKER``."""
        model_keys, _ = _node_keys(model)
        fp16.clamp_mask_fills(model)
        self._rewrite(model, keep, store16=store16)
        if self._fallback_labels:
            names = self._name_fallback_nodes(model_keys, keep)
            marked = set(json.loads(model.metadata_props.get(KEEP_MARKER, "[]") or "[]")) | names
            model.metadata_props[KEEP_MARKER] = json.dumps(sorted(marked))
        return model

    def _confirmed(
        self, model: ir.Model, keep: dict[int, str], store16: set[str], judged: _Judged, report: dict
    ) -> tuple[dict[int, str], set[str], _Judged, dict, str | None]:
        """The first choice whose written model ``confirm`` passes: the SQNR rule's (``keep``,
        ``store16``), then the accuracy check's ranking with its prefix doubled (one region
        more at least, every region at the most), each prefix that meets the SQNR rule with
        its weights chosen as before (``_choose_store16``), ``MAX_CONFIRMATIONS`` models in all.
        Returns its keep, store16, judgement and store report, and why nothing converts when
        no model was confirmed (None: one was): the check's reason, the one the verification
        would give, after the saving's where more float32 saves too little."""
        tried = None  # the ranking's prefix of the model confirmed last (None: the SQNR rule's own)
        with Progress(CONFIRM_PHASE, MAX_CONFIRMATIONS) as bar:
            while True:
                written = self._write(model.clone(), keep, store16)
                refused = self.confirm(written, len(self._confirmations))  # type: ignore[misc]
                self._confirmations.append(refused)
                bar.advance()
                if refused is None:
                    bar.advance(bar.total)
                    return keep, store16, judged, report, None
                if self._ranked is None:  # the SQNR rule took the first model: rank its layers now
                    _, _, first = self._evaluate(keep)
                    self._ranked = (keep, self._ranking(first, keep), 0)
                unranked, ranked, taken = self._ranked
                prefix = taken if tried is None else tried
                tried, met = prefix, False
                while not met and len(self._confirmations) < MAX_CONFIRMATIONS and prefix < len(ranked):
                    prefix = min(max(2 * prefix, prefix + 1), len(ranked))
                    more = self._movement_islands(
                        {**unranked, **{key: FALLBACK_REASON for region in ranked[:prefix] for key in region}})
                    met, now_judged, _ = self._evaluate(more)
                if not met:
                    return keep, store16, judged, report, (
                        f"the next-token check refused the {len(self._confirmations)} float16 model(s) "
                        f"tried (the first on the verification's prompts, the rest on prompts apart), the last "
                        f"with {tried} of the {len(ranked)} region(s) the accuracy check ranks back in float32: "
                        f"{refused}")
                keep, tried = more, prefix
                labels = {k: _label(n, k) for n, k in _node_keys(self.reference)[0].items()}
                self._fallback_labels = sorted({labels[key] for region in ranked[:prefix] for key in region})
                store16, judged, report, short = self._choose_store16(keep, now_judged)
                if short:
                    return keep, store16, judged, report, \
                        f"{short}; more float16 failed the verification's check: {refused}"

    def _built(
        self, model: ir.Model, keep: dict[int, str], store16: set[str], judged: _Judged, stats: dict[str, Any]
    ) -> tuple[dict[int, str], _Judged, str | None]:
        """The chosen model as written (``keep``, ``store16``) when onnxruntime's default
        session builds it (``builds``: or could not be asked, which the verification asks
        again); else the same with the float16 nodes this search finds the build needs back
        in float32, each kept with the build's problem as its reason. Nodes are the main
        graph's converting ones in graph order; keeping a prefix of them float32 is built,
        bisected to the shortest prefix that builds, whose last node is one the build needs
        in float32; with the nodes found so far kept, the search goes on before that node
        until they alone build (about log2(nodes) + 2 builds per node found, ``MAX_BUILDS``
        in all). Only a build that was asked and succeeded counts as building: a trial that
        could not be asked ends the search, so what is written never turns on a child
        process's fate. The result is judged again by the accuracy check and the saving
        threshold. Returns the keep, its judgement, and why nothing converts (None: a model
        that builds was found): the build's problem with why the search ended, or the
        check's or the saving's reason. ``stats["default_build"]`` says what the build
        refused, the nodes found it needs in float32, and those kept."""
        problem, _ = self.builds(self._write(model.clone(), keep, store16))  # type: ignore[misc]
        if problem is None:
            return keep, judged, None
        keys, _ = _node_keys(self.reference)
        nodes = [keys[node] for node in self._converting(keep)]
        labels = {k: (_label(n, k), n.op_type) for n, k in keys.items()}
        found: list[int] = []
        asked = 1
        unchecked = None

        def trial(extra: Iterable[int]) -> dict[int, str]:
            return {**keep, **{key: f"{problem} with this {labels[key][1]} in float16" for key in (*found, *extra)}}

        def builds(extra: Iterable[int]) -> bool:
            nonlocal asked, unchecked
            asked += 1
            bar.advance()
            refused, unchecked = self.builds(self._write(model.clone(), trial(extra), store16))  # type: ignore[misc]
            if unchecked is not None:
                raise _BuildUnchecked
            return refused is None

        # invariant: with ``found`` kept, the prefix nodes[:low] fails; nodes[:high] builds once ``sure``
        low, high, sure, done = 0, len(nodes), False, False
        with Progress(BUILD_PHASE, MAX_BUILDS) as bar:
            try:
                while high - low >= 1 and asked < MAX_BUILDS:
                    while high - low > 1 and asked < MAX_BUILDS:
                        middle = (low + high) // 2
                        if builds(nodes[:middle]):
                            high, sure = middle, True
                        else:
                            low = middle
                    if high - low > 1 or asked >= MAX_BUILDS or not (sure or builds(nodes[:high])):
                        break
                    found.append(nodes[high - 1])  # the prefix without it fails, with it builds
                    # the nodes found alone: the prefix just built when it was the first node
                    if high == 1 or (asked < MAX_BUILDS and builds(())):
                        done = True
                        break
                    low, high = 0, high - 1  # the rest of the culprits lie before it
            except _BuildUnchecked:
                pass
            bar.advance(bar.total)
        needed = [labels[key][0] for key in sorted(found)]
        stats["default_build"] = {"problem": problem, "builds": asked, "needed_float32": needed,
                                  "kept_float32": needed if done else []}
        if unchecked is not None:
            return keep, judged, (f"{problem}; the search for the nodes it needs in float32 could not build a "
                                  f"trial model: {unchecked}")
        if not done:
            so_far = f" (found {len(found)}: {', '.join(needed)})" if found else ""
            return keep, judged, (f"{problem}; no set of float16 nodes back in float32 was found to make it build "
                                  f"within {asked} build(s) of the model as it would be written{so_far}")
        kept = trial(())
        ok, now_judged, _ = self._evaluate(kept, store16)
        if not ok:
            return kept, now_judged, (f"{problem}; with the {len(found)} node(s) it needs back in float32, the "
                                      f"accuracy check fails ({'; '.join(now_judged.problems) or now_judged.sqnr})")
        return kept, now_judged, self._short_of_saving(kept, store16, bound=False)

    def _all_returned_reason(self) -> str:
        """Why nothing is left float16 after every converted layer went back to float32,
        naming the outputs that stay near zero on generated samples (``_near_zero_note``)."""
        return (f"every layer went back to float32 to keep each output's SQNR >= {self.min_sqnr_db:g} dB "
                f"on {len(self.feeds)} {'given' if self.inputs else 'generated'} sample(s)") + self._near_zero_note()

    def _near_zero_note(self) -> str:
        """On generated samples, ``; output ... stays below ...: give real samples`` for
        the outputs that stay near zero there (a detector's map on an input without
        objects), whose SQNR such samples cannot measure; else ''."""
        reason = ""
        values = dict(zip([v.name for v in self.reference.graph.outputs],
                          self.observed.outputs[0])) if self.observed and self.observed.outputs else {}
        near_zero = [v.name for v in self.reference.graph.outputs
                     if v.name in values and values[v.name].dtype.kind == "f" and values[v.name].size
                     and float(np.max(np.abs(values[v.name]))) < SATURATED_BELOW]
        if near_zero and not self.inputs:
            reason = (f"; output {', '.join(repr(n) for n in near_zero)} stays below {SATURATED_BELOW:g} there, "
                       "where SQNR measures rounding alone: give real samples (--inputs)")
        return reason

    def _name_fallback_nodes(self, keys: Mapping[ir.Node, int], keep: Mapping[int, str]) -> set[str]:
        """Names of the nodes the accuracy check kept (unnamed ones get a name)."""
        names = set()
        for node, key in keys.items():
            if keep.get(key) == FALLBACK_REASON:
                if not node.name:
                    node.name = f"fp16_keep/{node.op_type}_{key}"
                names.add(node.name)
        return names

    def _report_kept(self, stats: dict[str, Any], keep: Mapping[int, str]) -> None:
        """``stats["kept_float32"]``: label -> why, for the nodes kept float32; and
        ``stats["kept_float32_ops"]``: label -> op type (a named node's label does not say)."""
        keys, _ = _node_keys(self.reference)
        kept = [(_label(n, k), n.op_type, keep[k]) for n, k in keys.items() if k in keep]
        stats["kept_float32"] = {label: why for label, _, why in kept}
        stats["kept_float32_ops"] = {label: op for label, op, _ in kept}
