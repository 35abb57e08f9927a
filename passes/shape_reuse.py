"""When fold-constants may reuse a shape inference instead of running it again.

``InferenceSnapshot.of(model)`` records the main graph as shape inference saw it: the
Shape/Size nodes and the ancestors of the values they read (their "cone"), each node with
its inputs and outputs. ``still_holds(model, findings)`` says whether inference run on the
model now would find the same shapes for every value a Shape/Size node reads now, so that
shape folding may use ``findings`` again. Within one fold-constants call only its own
folds change the graph. The snapshot may also outlive the call (``remember`` keeps it in
the graph's ``meta``, ``recall`` finds it): then, at the end of the call, while the
findings hold, it records what other passes may change too (``record``): for the cone's
nodes their kind and attribute objects, their outputs' annotations (name, type, dims),
for the values they read that no cone node computes the annotation, graph-input role and
tensor, which values Shape/Size read, and the model's IR version and opsets; a later call
checks those as well. It holds when:

- the model is still the plain case (no functions, no subgraphs), with the same IR version
  and opsets;
- every Shape/Size node of the graph now reads a value one of the recorded Shape/Size
  nodes read (so its shape is in the recorded cone's findings); and in the cone:
- every node is still in the main graph with the same kind, attributes and outputs (their
  annotations unchanged), reading the same values (their annotations, graph-input role and
  tensor unchanged), or was removed with none of its outputs read any more (a fold, or a
  dead constant); or
- a node's input was replaced by an initializer that inference cannot tell from the value
  it replaced: either inference had found that value's exact static dims and elem type,
  which the initializer has, it is not a tensor of rank 0 or 1 (to which onnx's data
  propagation may give data: an int32/int64 initializer's values, a shape cast to float),
  and the node is of a kind whose shape
  inference reads its inputs' types and dims only (``DATA_BLIND_OPS``); or the value was
  a ``Constant`` node's output (its one attribute ``value``, a tensor) and the initializer
  holds that very tensor under the same name (``lift-constants``): inference reads a
  Constant's ``value`` and an initializer alike, as the tensor's type, dims and data; or
- a node's input was replaced by another value a cone node computed (a node's output
  read in its place after a no-op was removed, or a common subexpression merged), which
  inference found as it found the value it replaced: of the same type (element type and
  dims, a symbolic dim of the same name), and either neither is a tensor of rank 0 or 1
  (the only values onnx's data propagation gives data, of any element type: a Cast carries
  a shape's data into float) nor a ``Constant``'s (whose data inference reads), or both
  are the same output of nodes of the same kind and attributes that read the very same
  values (``eliminate-common-subexpressions``), which inference gave the same propagated
  data.

Inference derives a value's type from its ancestors alone (nodes outside the cone do not
reach it), from what each ancestor is (kind, attributes, opset), the annotations it
merges and the small int tensors data propagation reads; a node whose inputs look the
same to inference gets the same output types, so by induction every recorded value gets
the same shape. Only models without functions and subgraphs (no captured values) qualify;
anything else never reuses.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir

import optcc
from optcc.passes.eliminate_common_subexpressions import attributes_key, same_tensors
from optcc.passes.fold_shapes import ShapeFindings, shape_findings

__all__ = ["InferenceSnapshot", "DATA_BLIND_OPS", "holding", "recall", "remember"]

_DEFAULT_DOMAINS = ("", "ai.onnx")
_SHAPE_OPS = ("Shape", "Size")
# default-domain ops whose shape inference reads no input's data, only types and dims
# (onnx's data propagation runs for some of them, e.g. Add, but on tensors of rank 0 or 1
# only, of any element type, which never count as unchanged below)
DATA_BLIND_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Max", "Min", "Conv", "ConvTranspose", "MatMul", "Gemm",
    "BatchNormalization", "InstanceNormalization", "LayerNormalization", "PRelu",
})
_META_KEY = "optcc.fold_constants.inference"


def _is_shape_op(node: ir.Node) -> bool:
    return node.op_type in _SHAPE_OPS and node.domain in _DEFAULT_DOMAINS


def _write_annotation(out: list, value: ir.Value) -> None:
    """Append what inference merges from a value's annotation: its name, type and dims."""
    type_, shape = value.type, value.shape
    out.append(value.name)
    out.append(type_ if type_ is None else type(type_))
    out.append(None if type_ is None else type_.dtype)
    if shape is None:
        out.append(None)
    else:
        out.append(len(shape))
        out.extend(shape)


def _write_node(out: list, node: ir.Node, inputs: tuple, computed: dict[ir.Value, str | None]) -> None:
    """Append, flat (a few list appends instead of a tuple per fact: these records are
    kept across passes and built for every cone node), what inference reads of ``node``
    besides which values it reads: its kind and attribute objects (never changed in
    place: a changed attribute is a new object; compared by identity first, then by
    onnx-ir's equality), its outputs' annotations, and for each of ``inputs`` (what it
    read when recorded; an input replaced since is checked as a look-alike) that no cone
    node computes (``computed``) its annotation, graph-input role and tensor (by
    identity: tensors are never modified in place)."""
    attributes = node.attributes.data  # the UserDict's own dict: its Mapping methods are slow
    out.append(node.domain)
    out.append(node.op_type)
    out.append(node.overload)
    out.append(len(attributes))
    out.extend(attributes.values())
    outputs = node.outputs
    out.append(len(outputs))
    for value in outputs:
        _write_annotation(out, value)
    for value in inputs:
        if value is None or value in computed:
            continue
        out.append(value)
        _write_annotation(out, value)
        out.append(value.is_graph_input())
        out.append(value.is_initializer())
        out.append(value.const_value)  # held: compared by identity (below)


def _same(recorded: list, now: list) -> bool:
    """Element by element, identity first (tensors: identity only)."""
    if len(recorded) != len(now):
        return False
    for old, new in zip(recorded, now):
        if old is new:
            continue
        if isinstance(old, ir.TensorProtocol) or isinstance(new, ir.TensorProtocol):
            return False
        if old != new:
            return False
    return True


class InferenceSnapshot:
    """The main graph as one shape inference saw it (see the module docstring)."""

    def __init__(self, graph: ir.Graph | None, nodes: dict[ir.Node, tuple[tuple, tuple]],
                 names: dict[ir.Value, str | None]) -> None:
        self.graph = graph  # None: the model does not qualify
        self.nodes = nodes  # the cone: each node's inputs and outputs
        self.names = names
        # each cone output's node and position (a removed node's outputs lose their producer)
        self.producers = {value: (node, i) for node, (_, outputs) in nodes.items() for i, value in enumerate(outputs)}
        self.constants: dict[ir.Value, ir.TensorProtocol] = {}  # Constant outputs: their tensor
        # what passes other than fold-constants may change (``record``); None until recorded
        self.kept: _Kept | None = None

    @classmethod
    def of(cls, model: ir.Model) -> InferenceSnapshot:
        graph = model.graph
        if not _plain(model):
            return cls(None, {}, {})
        shape_ops = [node for node in graph if _is_shape_op(node)]
        # the Shape/Size nodes and the ancestors of what they read
        cone = set(shape_ops) | optcc.ir.ancestors(v for n in shape_ops for v in n.inputs)
        nodes = {node: (tuple(node.inputs), tuple(node.outputs)) for node in cone}
        names = {value: value.name for _, outputs in nodes.values() for value in outputs}
        snapshot = cls(graph, nodes, names)
        snapshot.constants = {node.outputs[0]: tensor for node in cone if (tensor := _constant_tensor(node)) is not None}
        return snapshot

    def record(self, model: ir.Model) -> None:
        """Record what other passes may change (see ``_Kept``), for a later call to check.
        Call it only while the findings hold for the graph as it is: then what fold-constants
        itself left unchanged is what inference saw."""
        if self.graph is None:
            return
        read = frozenset(v for n in self.graph if _is_shape_op(n) for v in n.inputs if v is not None)
        present = [node for node in self.nodes if node.graph is self.graph]
        flat: list = []
        ends: list[int] = []
        inputs = []
        for node in present:
            inputs.append(tuple(node.inputs))
            _write_node(flat, node, inputs[-1], self.names)
            ends.append(len(flat))
        self.kept = _Kept(_model_facts(model), read, present, inputs, flat, ends)

    def still_holds(self, model: ir.Model, findings: ShapeFindings) -> bool:
        """Whether inference now would find ``findings.shapes`` again (see the module docstring)."""
        if self.graph is None or model.graph is not self.graph or not findings.infos:
            return False
        if not self._cone_holds(findings):
            return False  # checked first: what other passes change shows here most often
        return self.kept is None or self.kept.still_holds(model, self)

    def _cone_holds(self, findings: ShapeFindings) -> bool:
        """Each cone node still there with its inputs, or removed unread, or reading a
        look-alike initializer in place of a value (see the module docstring)."""
        for node, (inputs, outputs) in self.nodes.items():
            if node.graph is None:  # removed: nothing may read what it computed
                if any(v.uses() or v.is_graph_output() for v in outputs):
                    return False
                continue
            if node.graph is not self.graph:
                return False
            now = tuple(node.inputs)
            if now == inputs:
                continue
            if len(now) != len(inputs):
                return False
            data_blind = node.domain in _DEFAULT_DOMAINS and node.op_type in DATA_BLIND_OPS
            for old, new in zip(inputs, now):
                if old is not new and not self._looks_the_same(old, new, findings, data_blind):
                    return False
        return True

    def _looks_the_same(self, old: ir.Value | None, new: ir.Value | None, findings: ShapeFindings,
                        data_blind: bool) -> bool:
        """Whether inference reads the initializer ``new`` as it read the value ``old``, as an
        input of a node of a ``data_blind`` kind (see ``DATA_BLIND_OPS``) or of any kind."""
        if old is None or new is None or old not in self.names:
            return False
        if new in self.names:
            return self._found_alike(old, new, findings)
        tensor = new.const_value
        if not new.is_initializer() or new.is_graph_input() or tensor is None:
            return False
        if old in self.constants:
            return self._lifted(old, new)
        if not data_blind:
            return False
        info = findings.infos.get(self.names[old]) if self.names[old] else None
        if info is None or not info.type.HasField("tensor_type"):
            return False
        tensor_type = info.type.tensor_type
        if not tensor_type.HasField("shape"):
            return False
        dims = []
        for dim in tensor_type.shape.dim:
            if not dim.HasField("dim_value") or dim.dim_value < 0:
                return False
            dims.append(dim.dim_value)
        if tensor_type.elem_type != tensor.dtype.value or tuple(dims) != tuple(tensor.shape.numpy()):
            return False
        if (new.shape is not None and tuple(new.shape) != tuple(dims)) or (new.dtype not in (None, tensor.dtype)):
            return False  # its own annotation says otherwise
        return len(dims) > 1  # a tensor of rank 0 or 1 may carry propagated data (``_may_carry_data``)

    def _found_alike(self, old: ir.Value, new: ir.Value, findings: ShapeFindings) -> bool:
        """Whether inference finds ``new``, another cone node's output, as it found ``old``
        (see the module docstring). What it found for ``new`` holds by induction: every
        cone node is checked, and ``new``'s node comes before the node reading it now."""
        old_info, new_info = (findings.infos.get(self.names[v]) if self.names[v] else None for v in (old, new))
        if old_info is None or new_info is None or old_info.type != new_info.type:
            return False
        (old_node, old_index), (new_node, new_index) = self.producers[old], self.producers[new]
        if old_index == new_index and self._twins(old_node, new_node):
            return True  # the same computation: the same type and the same propagated data
        if old_node.op_type == "Constant" or new_node.op_type == "Constant":
            return False  # inference reads a Constant's data
        return not _may_carry_data(new_info)

    def _twins(self, first: ir.Node, second: ir.Node) -> bool:
        """Whether two cone nodes are of the same kind, read the very same values (as
        inference saw them) and have attributes that eliminate-common-subexpressions finds
        equal (``attributes_key``, ``same_tensors``)."""
        if (first.domain, first.op_type, first.overload) != (second.domain, second.op_type, second.overload):
            return False
        if self.nodes[first][0] != self.nodes[second][0]:
            return False
        key = attributes_key(first)
        return key is not None and key == attributes_key(second) and same_tensors(first, second)

    def _lifted(self, old: ir.Value, new: ir.Value) -> bool:
        """Whether the initializer ``new`` holds the tensor of the Constant that computed
        ``old``, under ``old``'s name, annotated (if at all) as that tensor."""
        tensor = self.constants[old]
        if new.const_value is not tensor or new.name != self.names[old]:
            return False
        return (new.shape is None or tuple(new.shape) == tuple(tensor.shape)) and new.dtype in (None, tensor.dtype)


def _may_carry_data(info: onnx.ValueInfoProto) -> bool:
    """Whether onnx's data propagation may give the value data: a tensor of rank 0 or 1 of
    any element type (a Cast carries a shape's data into float or bool), or one whose type
    or rank inference did not find."""
    if not info.type.HasField("tensor_type") or not info.type.tensor_type.HasField("shape"):
        return True
    return len(info.type.tensor_type.shape.dim) <= 1


def _constant_tensor(node: ir.Node) -> ir.TensorProtocol | None:
    """The tensor of a default-domain ``Constant`` whose one attribute is ``value``."""
    if node.op_type != "Constant" or node.domain not in _DEFAULT_DOMAINS or len(node.outputs) != 1:
        return None
    attribute = node.attributes.get("value")
    if len(node.attributes) != 1 or attribute is None or attribute.type != ir.AttributeType.TENSOR:
        return None
    return attribute.value


def _plain(model: ir.Model) -> bool:
    """No model functions and no node with a body in the main graph."""
    return not len(model.functions) and not any(optcc.ir.subgraphs(n) for n in model.graph)


def _model_facts(model: ir.Model) -> tuple:
    return (model.ir_version, tuple(sorted(model.opset_imports.items())))


class _Kept:
    """What fold-constants never changes but other passes may, as ``record`` found it: the
    IR version and opsets, the values Shape/Size read, and for the cone's nodes still in
    the graph (``nodes``, with the ``inputs`` each read) what ``_write_node`` writes, one
    after the other in ``flat`` (node ``i``'s part ends at ``ends[i]``)."""

    def __init__(self, model_facts: tuple, read: frozenset[ir.Value], nodes: list[ir.Node],
                 inputs: list[tuple], flat: list, ends: list[int]) -> None:
        self.model_facts = model_facts
        self.read = read
        self.nodes = nodes
        self.inputs = inputs  # what each node read when recorded
        self.flat = flat
        self.ends = ends

    def still_holds(self, model: ir.Model, snapshot: InferenceSnapshot) -> bool:
        """Whether none of it changed (a removed node, or an input replaced, is left to
        ``InferenceSnapshot.still_holds``)."""
        if _model_facts(model) != self.model_facts or not _plain(model):
            return False
        for node in model.graph:
            if _is_shape_op(node) and not all(v is None or v in self.read for v in node.inputs):
                return False  # a new Shape/Size reads a value inference was not asked about
        now: list = []
        start = 0
        for node, inputs, end in zip(self.nodes, self.inputs, self.ends):
            if node.graph is not None:
                if tuple(node.outputs) != snapshot.nodes[node][1]:
                    return False
                now.clear()
                _write_node(now, node, inputs, snapshot.names)
                if not _same(self.flat[start:end], now):
                    return False
            start = end
        return True


def remember(model: ir.Model, snapshot: InferenceSnapshot | None, findings: ShapeFindings | None) -> None:
    """Keep the last inference of the model's main graph with the graph (in its ``meta``,
    which is never serialized), for a later fold-constants call to ``recall``. Call it
    only while ``findings`` hold for the graph as it is (see ``InferenceSnapshot.record``)."""
    if snapshot is None or findings is None or snapshot.graph is None:
        model.graph.meta.pop(_META_KEY, None)
    else:
        snapshot.record(model)
        model.graph.meta[_META_KEY] = (snapshot, findings)


def recall(model: ir.Model) -> tuple[InferenceSnapshot | None, ShapeFindings | None]:
    """The inference ``remember`` kept for this graph, if any (check ``still_holds``)."""
    kept = model.graph.meta.get(_META_KEY)
    return (None, None) if kept is None else kept


def holding(model: ir.Model, snapshot: InferenceSnapshot | None,
            findings: ShapeFindings | None) -> tuple[InferenceSnapshot, ShapeFindings]:
    """``snapshot`` and ``findings`` while they still hold for the graph as it is
    (``InferenceSnapshot.still_holds``), else a new inference of it (``shape_findings``, the
    one fold-shapes runs)."""
    if snapshot is not None and findings is not None and snapshot.still_holds(model, findings):
        return snapshot, findings
    return InferenceSnapshot.of(model), shape_findings(model)
