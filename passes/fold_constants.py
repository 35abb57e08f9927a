"""FoldConstantsPass: evaluate nodes whose inputs are all constants, once, at compile time.

Rewrite: in every graph (main graph, functions, If/Loop/Scan bodies; parents first, so a
body sees its enclosing graph's folded values), each node whose inputs are all constants
(initializers that are not graph inputs, Constant outputs, values folded before) is
evaluated and its outputs become constants: an initializer in the main graph that keeps
the value's name, a ``Constant`` node in bodies and functions and for graph outputs (a
folded graph output keeps its name, declared type and shape). Nodes left unused are
removed, with the initializers and Constant nodes that only they read.
With ``fold_shapes`` (default) Shape/Size of statically shaped values are folded first
(see ``fold_shapes.py``), so shape subgraphs (Shape->Gather->Concat->Reshape) fold too;
the pass repeats until nothing changes, so a second run is a no-op. A round runs shape
inference again only when what changed since the last one (this call's folds, or other
passes since an earlier call: the inference is kept in the graph's ``meta``) may change
what it finds (see ``shape_reuse.py``).

Reshape, Squeeze, Unsqueeze and exact Casts are computed with NumPy (see
``fold_data_movement.py``: the same bits the kernels write). The rest of the evaluation is
batched: per graph and wave, ONE temporary model holds all remaining foldable nodes
(constant inputs fed as graph inputs, every folded value a graph output) and runs in one
onnxruntime session with all graph optimizations disabled. If that session fails, nodes
are evaluated one by one with onnxruntime, then with ``onnx.reference`` for nodes
onnxruntime cannot run (e.g. kernels missing for a dtype); a result whose dtype is not
exactly the node's output dtype is refused. ConstantOfShape with a constant shape is
computed without a session: its value tensor broadcast to the shape, bit for bit what the
kernel writes.

Never folded (reported under ``kept_*`` in stats, by op type): non-default domains;
nodes with subgraph or function-reference attributes; nondeterministic ops (Random*,
Bernoulli, Multinomial, Dropout in training mode); Quantize/DequantizeLinear (the
quantized form of weights is kept as is); sequence/optional values; dtypes outside
float16/32/64, (u)int8-64, bool; folds that would grow the model by more than
``max_growth_bytes`` (output bytes minus the node's constant input bytes; generators
such as ConstantOfShape/Expand/Tile/Range are sized before they are evaluated) unless
``fold_large=True``.
Exact: the folded value is what the same kernel computes on the same constant inputs at
run time; shapes folded are those every admissible input has.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import onnx.reference
import onnx_ir as ir
import onnxruntime as ort

import optcc
from optcc.passes.fold_data_movement import evaluate as evaluate_without_session
from optcc.passes.fold_shapes import fold_shapes as fold_shape_ops
from optcc.passes.shape_reuse import holding as holding_inference
from optcc.passes.shape_reuse import recall as recall_inference
from optcc.passes.shape_reuse import remember as remember_inference
from optcc.passes.fold_shapes import SHAPE_OPS, materialize, remove_if_dead
from optcc.ir import const_array, initializers_are_constant, is_constant

__all__ = ["FoldConstantsPass", "DEFAULT_MAX_GROWTH_BYTES"]

DEFAULT_MAX_GROWTH_BYTES = 1 << 20

_DEFAULT_DOMAINS = ("", "ai.onnx")
NONDETERMINISTIC_OPS = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Bernoulli", "Multinomial"}
)
QUANTIZATION_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
NON_TENSOR_OPS = frozenset(
    {
        "SequenceConstruct", "SequenceEmpty", "SequenceInsert", "SequenceErase", "SequenceAt",
        "SequenceLength", "SplitToSequence", "ConcatFromSequence", "Optional",
        "OptionalGetElement", "OptionalHasElement", "SequenceMap",
    }
)
GENERATOR_OPS = frozenset({"ConstantOfShape", "Expand", "Tile", "Range"})
SAFE_DTYPES = frozenset(
    {
        ir.DataType.FLOAT16, ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.BOOL,
        ir.DataType.INT8, ir.DataType.INT16, ir.DataType.INT32, ir.DataType.INT64,
        ir.DataType.UINT8, ir.DataType.UINT16, ir.DataType.UINT32, ir.DataType.UINT64,
    }
)
_SAFE_NUMPY = frozenset(np.dtype(d.numpy()) for d in SAFE_DTYPES)


@dataclasses.dataclass
class _Stats:
    folded: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    folded_shapes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    kept: dict[str, collections.Counter] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(collections.Counter)
    )
    reference: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    sessions: int = 0
    warning: str | None = None

    def keep(self, reason: str, node: ir.Node) -> None:
        self.kept[reason][_op_name(node)] += 1

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.folded:
            out["folded"] = dict(sorted(self.folded.items()))
        if self.folded_shapes:
            out["folded_shapes"] = dict(sorted(self.folded_shapes.items()))
        if self.reference:
            out["evaluated_with_reference"] = dict(sorted(self.reference.items()))
        for reason in sorted(self.kept):
            if self.kept[reason]:
                out[reason] = dict(sorted(self.kept[reason].items()))
        if self.sessions:
            out["sessions"] = self.sessions
        if self.warning:
            out["warning"] = self.warning
        return out


def _op_name(node: ir.Node) -> str:
    return node.op_type if node.domain in _DEFAULT_DOMAINS else f"{node.domain}::{node.op_type}"


def _kind_reason(node: ir.Node) -> str | None:
    """Why a node of this kind is never folded (None: it may be)."""
    if node.domain not in _DEFAULT_DOMAINS:
        return "kept_custom_domain"
    if any(a.is_ref() for a in node.attributes.values()):
        return "kept_function_attribute"
    if optcc.ir.subgraphs(node):
        return "kept_control_flow"
    if node.op_type in NONDETERMINISTIC_OPS:
        return "kept_nondeterministic"
    if node.op_type == "Dropout" and _dropout_may_train(node):
        return "kept_nondeterministic"
    if node.op_type in QUANTIZATION_OPS:
        return "kept_quantized_weight"
    if node.op_type in NON_TENSOR_OPS:
        return "kept_non_tensor"
    for value in node.outputs:
        if value.type is not None and not isinstance(value.type, ir.TensorType):
            return "kept_non_tensor"
        if value.dtype is not None and value.dtype not in SAFE_DTYPES:
            return "kept_dtype"
    return None


def _dropout_may_train(node: ir.Node) -> bool:
    if len(node.inputs) < 3 or node.inputs[2] is None:
        return False
    training = const_array(node.inputs[2], inputs_constant=True)
    return training is None or bool(np.any(training))


def _float_product(array: np.ndarray) -> float:
    """The product of the elements as a float (what ``np.prod(array, dtype=np.float64)``
    gives for a shape's few elements: an overflow is ``inf``), without a ufunc call."""
    product = 1.0
    for element in array.reshape(-1).tolist():
        product *= element
    return product


def _estimated_bytes(node: ir.Node, arrays: Sequence[np.ndarray | None]) -> int | None:
    """Output bytes of a generator op computed from its constant inputs, before running it."""
    try:
        if node.op_type == "ConstantOfShape":
            attr = node.attributes.get("value")
            itemsize = np.dtype(attr.value.dtype.numpy()).itemsize if attr is not None else 4
            return int(_float_product(arrays[0])) * itemsize
        data = arrays[0]
        if node.op_type == "Expand":
            shape = np.broadcast_shapes(data.shape, tuple(int(d) for d in arrays[1]))
            return math.prod(shape) * data.itemsize
        if node.op_type == "Tile":
            return data.size * int(_float_product(arrays[1])) * data.itemsize
        if node.op_type == "Range":
            start, limit, delta = (float(a) for a in arrays[:3])
            count = max(math.ceil((limit - start) / delta), 0) if delta else 0
            return count * data.itemsize
    except Exception:  # noqa: BLE001 - malformed inputs: let the evaluation decide
        return None
    return None


class _GraphFolder:
    """Folds one graph (or function / body) in waves of batched evaluations."""

    def __init__(self, graph: ir.Graph | ir.Function, main_graph: bool, opset: int,
                 model: ir.Model, options: FoldConstantsPass, stats: _Stats) -> None:
        self.graph = graph
        self.inputs_constant = initializers_are_constant(model)
        self.as_initializer = main_graph and not self.inputs_constant
        self.opset = opset
        self.ir_version = int(model.ir_version or 0)
        self.options = options
        self.stats = stats
        self.rejected: set[ir.Node] = set()
        self._freed_memo: dict[ir.Value, int] = {}
        # the array of each constant tensor read so far: tensors are never modified in
        # place, so decoding one again (a proto-backed tensor decodes on every call) would
        # give the same array; nothing here writes to these arrays
        self._arrays: dict[ir.TensorProtocol, np.ndarray] = {}
        # fills (see ``_fill``) held as broadcast views until they are stored
        self._views: set[ir.Value] = set()
        # each ConstantOfShape's fill (or None) with the shape value and ``value`` attribute
        # it was computed from: a fill kept for its size is asked for again in later waves,
        # and a node's fill changes only with those (the shape value's data never changes:
        # tensors are never modified in place; a folded producer gives a new value)
        self._fills: dict[ir.Node, tuple[ir.Value | None, ir.Attr | None, np.ndarray | None]] = {}

    def _numpy(self, tensor: ir.TensorProtocol) -> np.ndarray:
        array = self._arrays.get(tensor)
        if array is None:
            array = self._arrays[tensor] = optcc.ir.fresh(tensor)
        return array

    def _const(self, value: ir.Value) -> np.ndarray | None:
        """``const_array``, with each tensor decoded once."""
        return const_array(value, inputs_constant=self.inputs_constant, decode=self._numpy)

    # ------------------------------------------------------------------ collection

    def _collect(self, skip: set[ir.Node]) -> list[ir.Node]:
        """The next wave: nodes whose inputs are constants or produced earlier in the wave.
        Generators too large to evaluate go to ``self._pending_large`` instead."""
        batch: list[ir.Node] = []
        produced: set[ir.Value] = set()
        self._pending_large: set[ir.Node] = set()
        for node in self.graph:
            if node in self.rejected or node in skip:
                continue
            if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS:
                continue
            found = self._constant_inputs(node, produced)
            if found is None:
                continue
            inputs, in_batch = found
            arrays = [None if b else self._const(v) for v, b in zip(inputs, in_batch)]
            if not all(b or a is not None for a, b in zip(arrays, in_batch)):
                continue
            reason = _kind_reason(node)
            if reason is None and any(
                a is not None and a.dtype not in _SAFE_NUMPY for a in arrays
            ):
                reason = "kept_dtype"
            if reason is not None:
                self._reject(reason, node)
                continue
            if node.op_type in GENERATOR_OPS:
                if any(in_batch):
                    continue  # sized in a later wave, once its inputs are materialized
                size = _estimated_bytes(node, arrays)
                if size is not None and self._too_large(size - sum(a.nbytes for a in arrays)):
                    self._pending_large.add(node)
                    continue
            batch.append(node)
            produced.update(node.outputs)
        return batch

    def _constant_inputs(self, node: ir.Node, produced: set[ir.Value]
                         ) -> tuple[list[ir.Value], list[bool]] | None:
        """The node's present inputs and, for each, whether this wave produces it; None
        when it has none or one is neither produced nor a constant (checked in order, up
        to the first that is not: most nodes read a computed value first)."""
        inputs: list[ir.Value] = []
        in_batch: list[bool] = []
        for value in node.inputs:
            if value is None:
                continue
            produced_here = value in produced
            if not produced_here and not is_constant(value, inputs_constant=self.inputs_constant):
                return None
            inputs.append(value)
            in_batch.append(produced_here)
        return (inputs, in_batch) if inputs else None

    def _reject(self, reason: str, node: ir.Node) -> None:
        self.rejected.add(node)
        self.stats.keep(reason, node)

    def _too_large(self, growth: int) -> bool:
        return not self.options.fold_large and growth > self.options.max_growth_bytes

    # ------------------------------------------------------------------ evaluation

    def _fill(self, node: ir.Node) -> np.ndarray | None:
        """ConstantOfShape computed without a session: its value broadcast to the constant
        shape (a copy of the value's bits into every element, which is all the kernel
        does); None when the node is anything else or outside the plain case."""
        if node.op_type != "ConstantOfShape" or len(node.outputs) != 1 or not node.inputs:
            return None
        source, attribute = node.inputs[0], node.attributes.get("value")
        kept = self._fills.get(node)
        if kept is not None and kept[0] is source and kept[1] is attribute:
            return kept[2]  # the same shape value and attribute as in an earlier wave
        result = self._new_fill(node)
        self._fills[node] = (source, attribute, result)
        return result

    def _new_fill(self, node: ir.Node) -> np.ndarray | None:
        shape = self._const(node.inputs[0])
        if shape is None or shape.dtype != np.int64 or shape.ndim != 1:
            return None
        dims = tuple(shape.tolist())  # a few Python ints: checked faster than the array
        if any(d < 0 for d in dims):
            return None
        attribute = node.attributes.get("value")
        if attribute is None:
            value = np.zeros((), np.float32)
        elif attribute.type == ir.AttributeType.TENSOR:
            value = self._numpy(attribute.value)  # as_tensor() isinstance-checks a Protocol: slow
            if value.size != 1 or value.dtype not in _SAFE_NUMPY:
                return None
        else:
            return None
        # a read-only view until stored (``_stored``): most fills of a wave may be kept for
        # their size, and copying them all only to drop them cost more than the rest
        filled = optcc.ir.filled_view(value, dims)
        result = (self._accept(node.outputs, [filled]) or {}).get(node.outputs[0])
        if result is not None:
            self._views.add(node.outputs[0])
        return result

    def _stored(self, value: ir.Value, array: np.ndarray) -> np.ndarray:
        """The array to store for ``value``: a fill's view becomes a C-ordered copy."""
        return array.copy() if value in self._views else array

    def _evaluate(self, batch: list[ir.Node]) -> dict[ir.Value, np.ndarray]:
        filled: dict[ir.Value, np.ndarray] = {}
        for node in batch:
            array = self._fill(node)
            if array is not None:
                filled[node.outputs[0]] = array
        rest = []
        for node in batch:  # in order: a node may read what an earlier one computed here
            if node.outputs[0] in filled:
                continue
            outputs = self._without_session(node, filled)
            if outputs is None:
                rest.append(node)
            else:
                filled.update(outputs)
        if not rest:
            return filled
        results = self._run_batch(rest, known=filled)
        if results is not None:
            return {**filled, **results}
        results = dict(filled)
        for node in rest:
            inputs = [v for v in node.inputs if v is not None]
            if not all(v in results or self._const(v) is not None for v in inputs):
                continue  # an input failed to evaluate; retried in a later wave if it folds
            outputs = self._run_batch([node], known=results)
            if outputs is None:
                outputs = self._run_reference(node, results)
                if outputs is not None:
                    self.stats.reference[_op_name(node)] += 1
            if outputs is None:
                self._reject("kept_unsupported", node)
                continue
            results.update(outputs)
        return results

    def _without_session(self, node: ir.Node, known: dict[ir.Value, np.ndarray]
                         ) -> dict[ir.Value, np.ndarray] | None:
        """The node's outputs computed with NumPy (``fold_data_movement``), when its inputs
        are constants or computed in ``known`` and it is a plain case. Reading a fill's
        view, the outputs may be views of it too: they are copied when stored, as fills are."""
        inputs: list[np.ndarray | None] = []
        reads_view = False
        for value in node.inputs:
            if value is None:
                inputs.append(None)
                continue
            reads_view |= value in self._views
            array = known.get(value)
            if array is None:
                array = self._const(value)
            if array is None:
                return None  # computed by a node of this wave that needs the session
            inputs.append(array)
        arrays = evaluate_without_session(node, self.opset, inputs)
        result = None if arrays is None else self._accept(node.outputs, arrays)
        if result is not None and reads_view:
            self._views.update(result)
        return result

    def _model(self, batch: Sequence[ir.Node], known: dict[ir.Value, np.ndarray]
               ) -> tuple[onnx.ModelProto, dict[str, np.ndarray], list[ir.Value]]:
        names: dict[ir.Value, str] = {}
        feeds: dict[str, np.ndarray] = {}
        graph_inputs, nodes, outputs = [], [], []
        for i, node in enumerate(batch):
            for value in node.inputs:
                if value is None or value in names:
                    continue
                name = names[value] = f"c{len(names)}"
                array = self._stored(value, known[value]) if value in known else self._const(value)
                assert array is not None
                feeds[name] = np.require(array, requirements="C")  # keeps 0-d arrays 0-d
                graph_inputs.append(onnx.helper.make_tensor_value_info(
                    name, onnx.helper.np_dtype_to_tensor_dtype(array.dtype), array.shape))
            proto = ir.serde.serialize_node(node)
            proto.name = f"n{i}"
            del proto.input[:]
            proto.input.extend(names[v] if v is not None else "" for v in node.inputs)
            del proto.output[:]
            for value in node.outputs:
                names[value] = f"c{len(names)}"
                proto.output.append(names[value])
                outputs.append(value)
            nodes.append(proto)
        graph = onnx.helper.make_graph(
            nodes, "fold", graph_inputs, [onnx.ValueInfoProto(name=names[v]) for v in outputs])
        model = onnx.helper.make_model(
            graph, opset_imports=[onnx.helper.make_opsetid("", self.opset)])
        model.ir_version = self.ir_version
        return model, feeds, outputs

    def _run_batch(self, batch: Sequence[ir.Node], known: dict[ir.Value, np.ndarray] | None = None
                   ) -> dict[ir.Value, np.ndarray] | None:
        model, feeds, outputs = self._model(batch, known or {})
        options = optcc.runtime.session_options()
        self.stats.sessions += 1
        try:
            session = ort.InferenceSession(
                model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            arrays = session.run(None, feeds)
        except Exception:  # noqa: BLE001 - missing kernel, bad dtype, ...: fall back
            return None
        return self._accept(outputs, arrays)

    def _run_reference(self, node: ir.Node, known: dict[ir.Value, np.ndarray]
                       ) -> dict[ir.Value, np.ndarray] | None:
        model, feeds, outputs = self._model([node], known)
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
            types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.output}
            arrays = onnx.reference.ReferenceEvaluator(model).run(None, feeds)
        except Exception:  # noqa: BLE001 - the reference cannot run it either
            return None
        result = self._accept(outputs, arrays)
        if result is None:
            return None
        for proto_out, value in zip(model.graph.output, outputs):
            expected = types.get(proto_out.name, 0)
            if value.dtype is None and (
                not expected or onnx.helper.tensor_dtype_to_np_dtype(expected) != result[value].dtype
            ):
                return None  # the dtype the node would produce is unknown or differs
        return result

    def _accept(self, outputs: Sequence[ir.Value], arrays: Sequence[Any]
                ) -> dict[ir.Value, np.ndarray] | None:
        result = {}
        for value, array in zip(outputs, arrays):
            if not isinstance(array, np.ndarray) or array.dtype not in _SAFE_NUMPY:
                return None
            if value.dtype is not None and np.dtype(value.dtype.numpy()) != array.dtype:
                return None
            if value.shape is not None and value.shape.is_static() and tuple(value.shape) != array.shape:
                return None
            result[value] = array
        return result if len(result) == len(outputs) else None

    # ------------------------------------------------------------------ size policy

    def _needed(self, value: ir.Value, folded: set[ir.Node]) -> bool:
        return value.is_graph_output() or any(use.node not in folded for use in value.uses())

    def _freed(self, value: ir.Value, folded: set[ir.Node]) -> int:
        """Bytes of an existing constant that folding ``folded`` leaves unused (0 if none).
        Memoized in ``self._freed_memo``, which ``_size_policy`` clears whenever ``folded``
        changes (a constant shared by hundreds of nodes made this quadratic)."""
        memo = self._freed_memo
        if value not in memo:
            memo[value] = self._freed_bytes(value, folded)
        return memo[value]

    def _freed_bytes(self, value: ir.Value, folded: set[ir.Node]) -> int:
        if value.is_graph_output() or value.is_graph_input():
            return 0
        if not all(use.node in folded for use in value.uses()):
            return 0
        if value.is_initializer() and value.const_value is not None:
            return int(value.const_value.nbytes)
        array = self._const(value)
        return 0 if array is None else array.nbytes

    def _growth(self, node: ir.Node, results: dict[ir.Value, np.ndarray], folded: set[ir.Node]) -> int:
        """Bytes folding ``node`` adds: its materialized outputs minus the constants it frees."""
        added = sum(results[v].nbytes for v in node.outputs if self._needed(v, folded))
        if not added:
            return 0
        return added - sum(self._freed(v, folded) for v in node.inputs if v is not None and v not in results)

    def _size_policy(self, folded: list[ir.Node], results: dict[ir.Value, np.ndarray]) -> set[ir.Node]:
        """Remove from ``folded`` what would grow the model too much; returns the removed.

        A fold growing the model by more than ``max_growth_bytes`` is kept as a node, and
        when the folds of a wave together grow it by more, every growing fold is kept (the
        decision depends on the graph only, so a second run decides the same)."""
        if self.options.fold_large:
            return set()
        limit = self.options.max_growth_bytes
        kept: set[ir.Node] = set()
        members = set(folded)
        self._freed_memo = {}
        while True:
            changed = False
            growth_now: dict[ir.Node, int] = {}
            for node in reversed(folded):  # consumers first: a kept consumer needs its inputs
                if node not in members:
                    continue
                node_growth = self._growth(node, results, members)
                if node_growth > limit:
                    members.discard(node)
                    self._freed_memo = {}
                    kept.add(node)
                    changed = True
                else:
                    growth_now[node] = node_growth
            # the loop's growths still hold when it kept nothing (``members`` unchanged)
            growth = {n: self._growth(n, results, members) if changed else growth_now[n]
                      for n in folded if n in members}
            freed_inputs = {
                v for n in growth for v in n.inputs if v is not None and v not in results
            }
            total = sum(
                results[v].nbytes for n in growth for v in n.outputs if self._needed(v, members)
            ) - sum(self._freed(v, members) for v in freed_inputs)
            if total > limit:
                growing = {n for n, g in growth.items() if g > 0}
                members -= growing
                self._freed_memo = {}
                kept |= growing
                changed |= bool(growing)
            if not changed:
                break
        folded[:] = [n for n in folded if n in members]
        return kept

    # ------------------------------------------------------------------ rewriting

    def _apply(self, batch: list[ir.Node], results: dict[ir.Value, np.ndarray]) -> tuple[bool, set[ir.Node]]:
        folded = [n for n in batch if n not in self.rejected and all(v in results for v in n.outputs)]
        large = self._size_policy(folded, results)
        members = set(folded)
        replacements: dict[ir.Node, list[ir.Value]] = {}
        for node in folded:
            replacements[node] = [
                materialize(self.graph, v, self._stored(v, results[v]), as_initializer=self.as_initializer)
                for v in node.outputs if self._needed(v, members)
            ]
        for node in reversed(folded):
            if remove_if_dead(self.graph, node, replacements[node]):
                self.stats.folded[_op_name(node)] += 1
            else:  # cannot happen: every output was replaced or read only by folded nodes
                self._reject("kept_internal_error", node)
        return bool(folded), large

    def run(self) -> bool:
        """Fold in waves until a wave changes nothing. After a wave that folded something,
        folds kept for their size are retried (their inputs may now be constants that
        folding frees), so a second run of the pass finds nothing to do."""
        modified = False
        large: set[ir.Node] = set()
        while True:
            batch = self._collect(skip=large)
            kept = set(self._pending_large)
            rejected_before = len(self.rejected)
            folded_any = False
            if batch:
                folded_any, kept_now = self._apply(batch, self._evaluate(batch))
                kept |= kept_now
            if folded_any:
                modified = True
                large = set()
                continue
            progress = bool(kept - large) or len(self.rejected) > rejected_before
            large |= kept
            if not progress:
                if not batch:
                    break
                for node in batch:  # never evaluate the same batch twice
                    if node not in large:
                        self._reject("kept_unsupported", node)
        for node in large:
            if node.graph is self.graph:
                self.stats.keep("kept_large", node)
        return modified


def _graph_opset(graph: ir.Graph | ir.Function, model: ir.Model) -> int:
    if isinstance(graph, ir.Function):
        version = graph.opset_imports.get("", graph.opset_imports.get("ai.onnx"))
        if version is not None:
            return int(version)
    return optcc.ir.default_opset(model)


class FoldConstantsPass(optcc.Pass):
    """Evaluate constant subgraphs (and static shapes) once and store the results."""

    name = "fold-constants"
    numerics = "exact"

    def __init__(self, max_growth_bytes: int = DEFAULT_MAX_GROWTH_BYTES, fold_large: bool = False,
                 fold_shapes: bool = True, max_rounds: int = 8) -> None:
        super().__init__()
        self.max_growth_bytes = max_growth_bytes
        self.fold_large = fold_large
        self.fold_shapes = fold_shapes
        self.max_rounds = max_rounds

    def __repr__(self) -> str:
        return (f"FoldConstantsPass(max_growth_bytes={self.max_growth_bytes}, "
                f"fold_large={self.fold_large}, fold_shapes={self.fold_shapes})")

    def call(self, model: ir.Model) -> optcc.PassResult:
        modified = False
        stats = _Stats()
        # the last shape inference, and the graph it saw (possibly taken by an earlier call)
        snapshot, findings = recall_inference(model)
        recalled = snapshot
        changed = True
        for _ in range(self.max_rounds):
            stats.kept.clear()  # what is kept is reported for the last round only
            changed = False
            if self.fold_shapes:
                # the last inference again when what changed since cannot alter its
                # findings (see ``shape_reuse``), else a new one; none without Shape/Size
                if not _has_shape_ops(model):
                    findings, snapshot = None, None
                else:
                    snapshot, findings = holding_inference(model, snapshot, findings)
                shapes = fold_shape_ops(model, inferred=findings.shapes if findings is not None else {})
                stats.folded_shapes.update(shapes)
                changed |= bool(shapes)
            for graph in optcc.ir.graphs(model):
                folder = _GraphFolder(graph, graph is model.graph, _graph_opset(graph, model),
                                      model, self, stats)
                changed |= folder.run()
            modified |= changed
            if not changed or not self.fold_shapes or not _has_shape_ops(model):
                break
        else:
            stats.warning = f"stopped unconverged after {self.max_rounds} rounds"
        if self.fold_shapes and (modified or snapshot is not recalled):
            # kept for a later call only when the last round changed nothing: then the
            # findings hold for the graph as it is now (a recalled snapshot that held, in a
            # call that changed nothing, stays as recorded: the graph is the one its record
            # was just checked against)
            remember_inference(model, snapshot if not changed else None, findings)
        return optcc.PassResult(model, modified, stats.to_dict())


def _has_shape_ops(model: ir.Model) -> bool:
    return optcc.ir.holds_op_type(model, SHAPE_OPS)
