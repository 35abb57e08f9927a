"""The float32 -> float16 rewrite itself, given a decision per node (convert or keep).

Used by ``convert_float16.ConvertFloat16Pass``, which decides which nodes to keep. Here:

- which inputs/outputs of a node become float16 comes from the op's schema (onnx's, or
  onnxruntime's for its fused float ops in ``com.microsoft``, ``optcc.fp16.schemas``):
  every type parameter that admits ``tensor(float16)`` and holds a float32 slot, except slots that
  must keep their type (``KEEP_INPUTS``: Resize/Upsample roi and scales); a node whose
  kept slot shares a type parameter with a converted one is kept whole;
- an initializer or float32 Constant becomes float16 (a new tensor, values beyond
  +-65504 clamped and counted) when every reader converts it, or when the caller names it
  in ``store16`` (stored float16, read through one shared ``Cast(to=float)`` by the readers
  that stay float32: exact when its values are float16-representable, otherwise the caller
  checks the accuracy); otherwise it stays float32;
- a value read in another type than it has gets one Cast per (graph, value, type), shared
  by all readers in that graph, except a small float32 initializer (``COPY_MAX_ELEMENTS``)
  whose every finite value is within +-65504 read in float16: its readers read a float16
  initializer copy beside it (the values the Cast would compute: both round to nearest
  even), shared by every graph that sees it; an original Cast reads a value that became
  float16 as it is (Cast accepts any type and f16->f32 is exact), and ``Cast(to=float)``
  of a float16 value read as float16 reads the float16 value itself (f16->f32->f16 is
  exact; f32->f16->f32 is never removed);
- graph outputs keep their name and float32 type: the float16 value is renamed and one
  Cast restores the output. Subgraph (If/Loop/Scan body) and function inputs/outputs
  keep their types the same way, so control-flow nodes themselves never change type.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Iterable
from typing import Any

import numpy as np
import onnx_ir as ir

from optcc import ir as oir
from optcc.fp16.schemas import signature

FLOAT = ir.DataType.FLOAT
FLOAT16 = ir.DataType.FLOAT16
FP16_MAX = 65504.0

# Input slots whose type is a parameter of the op, not its data: never converted.
KEEP_INPUTS: dict[str, frozenset[int]] = {
    "Resize": frozenset({1, 2}),
    "Upsample": frozenset({1}),
}
# Ops whose output type is an attribute, whose float16 form is not worth having, or that
# own subgraphs: they compute as they are and readers get a Cast when needed.
KEEP_OPS = frozenset({
    "Cast", "CastLike", "Range", "ConstantOfShape", "EyeLike", "RandomNormal", "RandomUniform",
    "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli", "NonMaxSuppression",
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv",
    "QLinearMatMul", "MatMulInteger", "ConvInteger", "If", "Loop", "Scan", "SequenceConstruct",
    "SequenceInsert", "SequenceAt", "SplitToSequence", "ConcatFromSequence", "SequenceEmpty",
    "Optional", "OptionalGetElement", "Constant",
})
# Ops that read any element type and never need a Cast in front of them.
NEUTRAL_OPS = frozenset({"Shape", "Size"})
# The most elements of a float32 initializer that readers read in float16 and others in
# float32 for which the float16 readers get a float16 copy beside it, not a Cast node.
COPY_MAX_ELEMENTS = 1024
# Source types whose Cast to float32 is exact, so Cast(Cast(x, f32), f16) == Cast(x, f16).
_EXACT_IN_FLOAT = frozenset({
    ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.BOOL, ir.DataType.INT8,
    ir.DataType.UINT8, ir.DataType.INT16, ir.DataType.UINT16,
})


def _is_default(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


def _omitted(value: ir.Value) -> bool:
    """An optional output the node does not write (named '' in ONNX): it holds no value and
    has no type, so it neither converts nor stops its type parameter from converting."""
    return value.name == "" and not value.uses()


@dataclasses.dataclass(frozen=True)
class Slots:
    """The input and output indices of one node that become float16."""

    inputs: frozenset[int]
    outputs: frozenset[int]


def float16_slots(node: ir.Node, opset: int, dtype: Callable[[ir.Value], ir.DataType | None]) -> Slots | str:
    """The node's float32 slots that can become float16, or the reason it cannot convert."""
    if _is_default(node) and node.op_type in KEEP_OPS:
        return f"{node.op_type} keeps its types"
    if _is_default(node) and node.op_type in NEUTRAL_OPS:
        return f"{node.op_type} reads any type"
    sig = signature(node.domain, node.op_type, opset)
    if isinstance(sig, str):
        return sig
    allowed = sig.allowed

    def params(formals: tuple[str, ...], values: Iterable[ir.Value | None]) -> list[str | None]:
        return [formals[min(i, len(formals) - 1)] if formals else None for i, _ in enumerate(values)]

    in_params = params(sig.inputs, node.inputs)
    out_params = [None if _omitted(v) else p for v, p in zip(node.outputs, params(sig.outputs, node.outputs))]
    keep = KEEP_INPUTS.get(node.op_type, frozenset())
    kept_params = {in_params[i] for i in keep if i < len(in_params)}
    convertible = {
        p for p in set(in_params) | set(out_params)
        if p in allowed and "tensor(float16)" in allowed[p] and p not in kept_params
    }
    for p in sorted(convertible, key=str):  # a type parameter converts as a whole, or not at all
        slot_types = [dtype(v) for v, q in zip(node.inputs, in_params) if v is not None and q == p]
        slot_types += [dtype(v) for v, q in zip(node.outputs, out_params) if q == p]
        if slot_types and all(t is not None and t not in (FLOAT, FLOAT16) for t in slot_types):
            convertible.discard(p)  # it holds another type (Attention's bool mask): that stays
        elif any(t not in (FLOAT, FLOAT16) for t in slot_types):
            return f"type parameter {p} of {node.op_type} holds a type that is not float32/float16"
    ins = frozenset(
        i for i, (v, p) in enumerate(zip(node.inputs, in_params))
        if v is not None and p in convertible and dtype(v) == FLOAT
    )
    outs = frozenset(
        i for i, (v, p) in enumerate(zip(node.outputs, out_params))
        if p in convertible and dtype(v) == FLOAT
    )
    if not ins and not outs:
        return "no float32 data"
    return Slots(ins, outs)


@dataclasses.dataclass
class RewriteStats:
    converted_nodes: dict[str, int] = dataclasses.field(default_factory=dict)
    casts_inserted: int = 0
    casts_removed: int = 0
    initializers_converted: int = 0
    clamped: list[str] = dataclasses.field(default_factory=list)

    @property
    def modified(self) -> bool:
        return bool(self.converted_nodes or self.casts_inserted or self.initializers_converted)


def _to_float16(array: np.ndarray, name: str, stats: RewriteStats) -> np.ndarray:
    finite = np.isfinite(array)
    over = finite & (np.abs(array) > FP16_MAX)
    if over.any():
        stats.clamped.append(
            f"'{name}': {int(over.sum())} value(s) beyond +-65504 (max |x| "
            f"{float(np.abs(array[finite]).max()):.6g}) clamped to +-65504"
        )
        array = np.where(over, np.sign(array) * FP16_MAX, array)
    return array.astype(np.float16)


def _rounded(array: np.ndarray) -> np.ndarray:
    """``array`` as float16 storage gives it back in float32 (clamped; non-finite kept)."""
    clipped = np.clip(array, -FP16_MAX, FP16_MAX).astype(np.float16).astype(np.float32)
    return np.where(np.isfinite(array), clipped, array).astype(np.float32)


CHUNK_ELEMENTS = 1 << 20  # whole-weight checks hold a chunk's temporaries, not the weight's


def flat_chunks(array: np.ndarray) -> Iterable[np.ndarray]:
    """``array``'s values in order, as views of at most ``CHUNK_ELEMENTS`` values."""
    flat = np.asarray(array).reshape(-1)
    return (flat[start:start + CHUNK_ELEMENTS] for start in range(0, flat.size, CHUNK_ELEMENTS))


def exactly_float16(array: np.ndarray) -> bool:
    """Whether every value of a float32 array survives float32 -> float16 -> float32."""
    with np.errstate(over="ignore"):
        return all(np.array_equal(chunk.astype(np.float16).astype(np.float32), chunk, equal_nan=True)
                   for chunk in flat_chunks(array))


class Rewriter:
    """Rewrites one model given ``slots_of``: node -> Slots (convert) or None (keep)."""

    def __init__(
        self,
        model: ir.Model,
        slots_of: Callable[[ir.Node], Slots | None],
        dtype: Callable[[ir.Value], ir.DataType | None],
        keep_io: Callable[[str], bool],
        store16: Collection[str] = (),
        weights: Any = None,
        external_result: bool = False,
    ) -> None:
        self.model = model
        self.store16 = frozenset(store16)
        self.weights = weights  # optcc.fp16.weights.Float16Weights: where float16 initializers come from
        self.external_result = external_result  # converted initializers stay in the weights' file
        self.dtype = dtype
        self.keep_io = keep_io
        self.names = oir.ModelNames(model)
        self.stats = RewriteStats()
        self.graphs = list(oir.graphs(model))
        self.plan: dict[ir.Node, Slots] = {}
        for graph in self.graphs:
            for node in graph:
                slots = slots_of(node)
                if slots is not None:
                    self.plan[node] = slots
        self.original_type: dict[ir.Value, ir.DataType | None] = {}
        self.casts: dict[tuple[int, ir.Value, ir.DataType], ir.Value] = {}
        self.copies: dict[ir.Value, ir.Value | None] = {}  # float32 initializer -> its float16 copy

    # -- decisions -------------------------------------------------------------------
    def _reads_as(self, node: ir.Node, index: int) -> ir.DataType | None:
        """The type ``node`` needs input ``index`` in (None: any)."""
        if node.op_type in NEUTRAL_OPS and _is_default(node):
            return None
        slots = self.plan.get(node)
        if slots is not None and index in slots.inputs:
            return FLOAT16
        value = node.inputs[index]
        return self.original_type.get(value) if value is not None else None

    def _all_readers_convert(self, value: ir.Value) -> bool:
        """Whether every reader reads ``value`` as float16 or reads any type (Shape); a
        reader that keeps its types reads the value's own type, float32 where that type is
        unknown too."""
        uses = value.uses()
        return bool(uses) and not value.is_graph_output() and all(
            self._reads_as(u.node, u.idx) == FLOAT16 or (u.node.op_type in NEUTRAL_OPS and _is_default(u.node))
            for u in uses
        )

    # -- the rewrite -----------------------------------------------------------------
    def _record_types(self) -> None:
        for graph in self.graphs:
            for v in graph.inputs:
                self.original_type.setdefault(v, self.dtype(v))
            for node in graph:
                for v in (*node.inputs, *node.outputs):
                    if v is not None:
                        self.original_type.setdefault(v, self.dtype(v))

    def run(self) -> RewriteStats:
        nodes = [(g, n) for g in self.graphs for n in g]
        self._record_types()
        self._retype_outputs()
        self._retype_constants()
        self._retype_main_inputs()
        self._fix_graph_outputs()
        self._insert_casts(nodes)
        return self.stats

    def _set16(self, value: ir.Value) -> None:
        value.type = ir.TensorType(FLOAT16)

    def _retype_outputs(self) -> None:
        for node, slots in self.plan.items():
            for i in slots.outputs:
                self._set16(node.outputs[i])
            key = node.op_type
            self.stats.converted_nodes[key] = self.stats.converted_nodes.get(key, 0) + 1

    def _converts_initializer(self, value: ir.Value) -> bool:
        """Whether ``run`` stores float32 initializer ``value`` (not a graph input) in float16."""
        return (
            self.original_type.get(value, self.dtype(value)) == FLOAT
            and not value.is_graph_input()
            and value.const_value is not None
            and (self._all_readers_convert(value) or value.name in self.store16)
        )

    @staticmethod
    def _float_constant(node: ir.Node) -> ir.TensorProtocol | None:
        """The float32 tensor of a ``Constant(value=...)`` node (None for any other node)."""
        if node.op_type != "Constant" or not _is_default(node) or "value" not in node.attributes:
            return None
        attr = node.attributes["value"]
        if attr.type != ir.AttributeType.TENSOR or attr.as_tensor().dtype != FLOAT:
            return None
        return attr.as_tensor()

    def float_weight_bytes(self, min_size: int = 1, skip: Collection[str] = ()) -> tuple[int, int]:
        """The bytes of the float32 weights of at least ``min_size`` values (initializers,
        ``Constant`` tensors, the defaults of main-graph inputs that become float16; not
        the defaults of inputs that keep their type, which a caller may replace, nor those
        named in ``skip``) before ``run``, and of the same weights after it: each one
        ``run`` stores in float16 takes half. Read from the decisions alone; nothing is
        rewritten."""
        self._record_types()
        before = after = 0

        def add(tensor: ir.TensorProtocol, converts: bool, name: str | None) -> None:
            nonlocal before, after
            if tensor.size < min_size or name in skip:
                return
            before += 4 * tensor.size
            after += (2 if converts else 4) * tensor.size

        for graph in self.graphs:
            if isinstance(graph, ir.Graph):
                for value in graph.initializers.values():
                    if value.const_value is None or value.const_value.dtype != FLOAT:
                        continue
                    if not value.is_graph_input():
                        add(value.const_value, self._converts_initializer(value), value.name)
                    elif graph is self.model.graph and self._converts_main_input(value):
                        add(value.const_value, True, value.name)  # a default of an input that becomes float16
            for node in graph:
                tensor = self._float_constant(node)
                if tensor is not None:
                    out = node.outputs[0]
                    add(tensor, self._all_readers_convert(out) or out.name in self.store16, out.name)
        return before, after

    def _retype_constants(self) -> None:
        for graph in self.graphs:
            if isinstance(graph, ir.Graph):
                for value in list(graph.initializers.values()):
                    if self._converts_initializer(value):
                        self._store16(value)
            for node in graph:
                tensor = self._float_constant(node)
                if tensor is None:
                    continue
                out = node.outputs[0]
                if self._all_readers_convert(out) or out.name in self.store16:
                    array = _to_float16(oir.decoded(tensor), out.name or "", self.stats)
                    node.attributes["value"] = ir.AttrTensor("value", ir.tensor(array, name=out.name))
                    self._set16(out)
                    self.stats.initializers_converted += 1

    def _store16(self, value: ir.Value) -> None:
        """Hold an initializer's tensor in float16 and type the value so."""
        assert value.const_value is not None
        if self.weights is not None:
            half, note = self.weights.get(value.const_value, value.name or "", in_memory=not self.external_result)
            self.stats.clamped.extend([note] if note else [])
            value.const_value = half
        else:
            array = _to_float16(oir.decoded(value.const_value), value.name or "", self.stats)
            value.const_value = ir.tensor(array, name=value.name)
        self._set16(value)
        self.stats.initializers_converted += 1

    def _converts_main_input(self, value: ir.Value) -> bool:
        """Whether main-graph input ``value`` becomes float16 (its default with it)."""
        return self.original_type.get(value) == FLOAT and not self.keep_io(value.name or "")

    def _retype_main_inputs(self) -> None:
        for value in self.model.graph.inputs:
            if self._converts_main_input(value):
                if value.const_value is not None:  # a default a caller may replace: held in the input's type
                    self._store16(value)
                else:
                    self._set16(value)

    def _fix_graph_outputs(self) -> None:
        for graph in self.graphs:
            is_main = graph is self.model.graph
            restored: dict[ir.Value, ir.Value] = {}
            for i, value in enumerate(list(graph.outputs)):
                if self.original_type.get(value, self.dtype(value)) != FLOAT or value.dtype != FLOAT16:
                    continue
                if is_main and not self.keep_io(value.name or ""):
                    continue
                if value not in restored:
                    name, shape = value.name or "", value.shape
                    value.name = self.names.value(f"{name}_float16")
                    out = ir.Value(name=name, type=ir.TensorType(FLOAT), shape=shape)
                    cast = ir.Node("", "Cast", [value], [ir.AttrInt64("to", FLOAT)], outputs=[out],
                                   name=self.names.value(f"{name}/cast_float32"))
                    self._place(graph, value, cast)
                    restored[value] = out
                graph.outputs[i] = restored[value]

    def _place(self, graph: ir.Graph | ir.Function, value: ir.Value, cast: ir.Node) -> None:
        producer = value.producer()
        if producer is not None and producer.graph is graph:
            graph.insert_after(producer, cast)
        elif len(graph) > 0:
            graph.insert_before(next(iter(graph)), cast)
        else:
            graph.append(cast)
        self.stats.casts_inserted += 1

    def _float16_copy(self, value: ir.Value) -> ir.Value | None:
        """A float16 initializer beside float32 initializer ``value`` (in its graph, seen by
        the graphs nested there) holding what ``Cast(value, to=float16)`` computes; None for
        a value that is no initializer, a default a caller may feed, more than
        ``COPY_MAX_ELEMENTS`` elements, or a finite value beyond +-65504 (the Cast overflows
        it to infinity)."""
        if value not in self.copies:
            tensor, owner = value.const_value, value.graph
            copy = None
            if (value.is_initializer() and not value.is_graph_input() and tensor is not None
                    and tensor.dtype == FLOAT and tensor.size <= COPY_MAX_ELEMENTS and isinstance(owner, ir.Graph)):
                array = oir.decoded(tensor)
                if not (np.abs(array[np.isfinite(array)]) > FP16_MAX).any():
                    name = self.names.value(f"{value.name}_float16")
                    copy = ir.Value(name=name, type=ir.TensorType(FLOAT16), shape=value.shape,
                                    const_value=ir.tensor(array.astype(np.float16), name=name))
                    owner.register_initializer(copy)
            self.copies[value] = copy
        return self.copies[value]

    def _cast(self, graph: ir.Graph | ir.Function, value: ir.Value, to: ir.DataType) -> ir.Value:
        key = (id(graph), value, to)
        if key in self.casts:
            return self.casts[key]
        copy = self._float16_copy(value) if to == FLOAT16 else None
        if copy is not None:
            self.casts[key] = copy
            return copy
        source = value
        producer = value.producer()
        if (
            to == FLOAT16 and producer is not None and producer.op_type == "Cast"
            and _is_default(producer) and producer.inputs[0] is not None
            and producer.inputs[0].dtype in _EXACT_IN_FLOAT
        ):
            source = producer.inputs[0]  # Cast(x, f32) read as f16: read x, or cast x directly
            self.bypassed.add(producer)
            if source.dtype == FLOAT16:
                self.casts[key] = source
                return source
        suffix = "float16" if to == FLOAT16 else "float32"
        out = ir.Value(name=self.names.value(f"{value.name}_{suffix}"), type=ir.TensorType(to),
                       shape=value.shape)
        cast = ir.Node("", "Cast", [source], [ir.AttrInt64("to", to)], outputs=[out],
                       name=self.names.value(f"{value.name}/cast_{suffix}"))
        self._place(graph, source, cast)
        self.casts[key] = out
        return out

    def _insert_casts(self, nodes: list[tuple[ir.Graph | ir.Function, ir.Node]]) -> None:
        self.bypassed: set[ir.Node] = set()
        for graph, node in nodes:
            for i, value in enumerate(node.inputs):
                if value is None:
                    continue
                want = self._reads_as(node, i)
                if want is None or value.dtype is None or value.dtype == want:
                    continue
                if node.op_type == "Cast" and _is_default(node) and value.dtype == FLOAT16:
                    continue  # Cast reads any type, and f16 -> f32 is exact: Cast(x16) == Cast(Cast(x16, f32))
                if {want, value.dtype} == {FLOAT, FLOAT16}:
                    node.replace_input_with(i, self._cast(graph, value, want))
        for cast in self.bypassed:  # original Cast(to=float) nodes nobody reads any more
            out = cast.outputs[0]
            if not out.uses() and not out.is_graph_output() and cast.graph is not None:
                cast.graph.remove(cast, safe=True)
                self.stats.casts_removed += 1


class Emulator(Rewriter):
    """The same decisions, emulated in float32: every value the rewrite would hold in
    float16 is rounded to float16 by an explicit Cast pair (onnxruntime's CPU provider
    runs float16 nodes without kernels in float32 and drops its own Cast pairs, so the
    float16 model itself would hide float16 rounding there; explicit pairs in a float32
    graph are kept). Rounded values take the original names, for per-tensor comparison.

    With spilling ``weights`` (models with external data), a rounded initializer is its
    float16 tensor (made once, on disk) read through one ``Cast(to=float)``: the same
    values as rounding it in float32 (f16 -> f32 is exact; clamping and non-finite values
    agree), without a float32 copy of every weight in memory. The Casts' outputs are
    listed in ``weight_casts`` (they are not values of the original).
    """

    def run(self) -> RewriteStats:
        self._record_types()  # weights a float32 node reads are rounded only in store16
        rounded: dict[tuple[int, ir.Value], ir.Value] = {}
        self.weight_casts: set[str] = set()
        self._order: dict[int, dict[ir.Node, int]] = {}  # per graph: its original nodes' positions
        spill = self.weights is not None and self.weights.spill

        def round_(graph: ir.Graph | ir.Function, value: ir.Value) -> ir.Value:
            key = (id(graph), value)
            if key not in rounded:
                half = ir.Value(name=self.names.value(f"{value.name}_f16"), type=ir.TensorType(FLOAT16),
                                shape=value.shape)
                back = ir.Value(name=self.names.value(f"{value.name}_rounded"), type=ir.TensorType(FLOAT),
                                shape=value.shape)
                first = ir.Node("", "Cast", [value], [ir.AttrInt64("to", FLOAT16)], outputs=[half])
                second = ir.Node("", "Cast", [half], [ir.AttrInt64("to", FLOAT)], outputs=[back])
                self._place(graph, value, first)
                graph.insert_after(first, second)
                rounded[key] = back
            return rounded[key]

        for graph in self.graphs:
            if isinstance(graph, ir.Graph):
                for value in list(graph.initializers.values()):
                    if value.dtype == FLOAT and value.const_value is not None and not value.is_graph_input() \
                            and (self._all_readers_convert(value) or value.name in self.store16):
                        if spill:
                            rounded[(id(graph), value)] = self._read_float16(graph, value)
                        elif self.weights is not None:  # one rounded copy shared by every candidate
                            value.const_value = self.weights.rounded(value.const_value, value.name or "")
                        else:
                            value.const_value = ir.tensor(_rounded(value.const_value.numpy()), name=value.name)
            for node in graph:  # Constants stored float16 but read in float32
                out = node.outputs[0] if node.outputs else None
                if node.op_type == "Constant" and _is_default(node) and out is not None \
                        and out.name in self.store16 and "value" in node.attributes \
                        and node.attributes["value"].type == ir.AttributeType.TENSOR \
                        and node.attributes["value"].as_tensor().dtype == FLOAT:
                    array = _rounded(node.attributes["value"].as_tensor().numpy())
                    node.attributes["value"] = ir.AttrTensor("value", ir.tensor(array, name=out.name))
        for node, slots in list(self.plan.items()):
            graph = node.graph
            assert graph is not None
            for i in slots.inputs:
                value = node.inputs[i]
                if value is not None and value.name in self.weight_casts:
                    continue  # a float16 weight read as float32: rounded already
                if value is not None and not (value.producer() is not None and value.producer() in self.plan):
                    node.replace_input_with(i, round_(graph, value))
            for i in slots.outputs:
                value = node.outputs[i]
                users = [(u.node, u.idx) for u in value.uses()]
                outputs = [j for j, o in enumerate(graph.outputs) if o is value]
                name = value.name
                value.name = self.names.value(f"{name}_unrounded")
                new = round_(graph, value)
                new.name = name
                for user, idx in users:
                    user.replace_input_with(idx, new)
                for j in outputs:
                    graph.outputs[j] = new
            self.stats.converted_nodes[node.op_type] = self.stats.converted_nodes.get(node.op_type, 0) + 1
        return self.stats

    def _read_float16(self, graph: ir.Graph, value: ir.Value) -> ir.Value:
        """Replace float32 initializer ``value`` by its float16 tensor and one
        ``Cast(to=float)`` that every reader reads instead; returns the Cast's output."""
        assert value.const_value is not None and value.name
        half_tensor, _ = self.weights.get(value.const_value, value.name)
        name = value.name
        del graph.initializers[name]
        value.name = self.names.value(f"{name}_float32_unused")
        half = ir.Value(name=self.names.value(f"{name}_f16"), type=ir.TensorType(FLOAT16), shape=value.shape,
                        const_value=half_tensor)
        graph.register_initializer(half)
        back = ir.Value(name=self.names.value(f"{name}_rounded"), type=ir.TensorType(FLOAT), shape=value.shape)
        cast = ir.Node("", "Cast", [half], [ir.AttrInt64("to", FLOAT)], outputs=[back])
        readers = [u.node for u in value.uses()]
        if readers and all(r.graph is graph for r in readers):
            # just before its first reader: onnxruntime runs nodes in graph order where it
            # can, so the float32 copy exists only while it is read, not all of them at once
            order = self._order.get(id(graph))
            if order is None:
                order = self._order[id(graph)] = {n: i for i, n in enumerate(graph)}
            graph.insert_before(min(readers, key=order.__getitem__), cast)
        else:
            self._place(graph, half, cast)
        value.replace_all_uses_with(back)
        self.weight_casts.add(back.name or "")
        return back
