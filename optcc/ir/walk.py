"""Walking a model: its graphs and functions, nodes, serialized graphs and tensors, and
facts about them (op counts, weight bytes, opset, external data, node order)."""

from __future__ import annotations

import collections
import math
import operator
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType

import onnx
import onnx_ir as ir

def proto_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """A serialized graph and every If/Loop/Scan body inside it, parents first (the
    ``graphs`` walker's counterpart for protos)."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from proto_graphs(attr.g)
            for sub in attr.graphs:
                yield from proto_graphs(sub)


def _node_protos(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every NodeProto of a graph and of its subgraphs."""
    for g in proto_graphs(graph):
        yield from g.node


def tensor_protos(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of a graph and its subgraphs: initializers and tensor attributes,
    graph by graph in ``proto_graphs``' order, each attribute read once."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    bodies: list[onnx.GraphProto] = []
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            if attr.tensors:  # (an empty repeated field is false: no iterator made for it)
                yield from attr.tensors
            if attr.HasField("g"):
                bodies.append(attr.g)
            if attr.graphs:
                bodies.extend(attr.graphs)
    for body in bodies:
        yield from tensor_protos(body)


def first_order_problem(model: ir.Model) -> str | None:
    """The first use-before-definition in any graph of the model, or None when every node
    input is defined (by a graph input, an initializer, an earlier node or an outer scope)."""
    for graph in (model.graph, *model.functions.values()):
        problem = _order_problem(graph, frozenset())
        if problem:
            return problem
    return None


def _order_problem(graph: ir.Graph | ir.Function, outer: frozenset[ir.Value | None]) -> str | None:
    defined: set[ir.Value | None] = set(outer)
    defined.add(None)  # an omitted optional input: always "defined"
    defined.update(graph.inputs)
    if isinstance(graph, ir.Graph):
        defined.update(graph.initializers.data.values())  # the UserDict's own dict: its Mapping methods are slow
    add = defined.update
    bodies = may_hold_bodies(graph)  # else no node needs the body test
    for node in graph:
        inputs = node.inputs
        if not defined.issuperset(inputs):
            for value in inputs:
                if value is not None and value not in defined:
                    what = "a cycle" if value.producer() is not None else "an undefined value"
                    return (
                        f"node '{node.name}' ({node.op_type}) reads '{value.name}' before it is "
                        f"defined ({what})"
                    )
        if bodies and (node.op_type in _SUBGRAPH_OPS or node.domain not in _DEFAULT_DOMAINS):
            for sub in subgraphs(node):
                problem = _order_problem(sub, frozenset(defined))
                if problem:
                    return problem
        add(node.outputs)
    for value in graph.outputs:
        if value not in defined:
            return f"graph output '{value.name}' is not defined"
    return None


# --------------------------------------------------------------------------- walking


def _attr_graphs(attr: ir.Attr | ir.RefAttr) -> list[ir.Graph]:
    if attr.type == ir.AttributeType.GRAPH:
        return [attr.as_graph()]
    if attr.type == ir.AttributeType.GRAPHS:
        return list(attr.as_graphs())
    return []


_GRAPH_TYPES = (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
_DEFAULT_DOMAINS = ("", "ai.onnx")


# default-domain ops that take graph attributes; any other default-domain op has none
_SUBGRAPH_OPS = frozenset({"If", "Loop", "Scan", "SequenceMap"})


def subgraphs(node: ir.Node) -> list[ir.Graph]:
    """The If/Loop/Scan (or custom) bodies held directly by a node's attributes."""
    if node.op_type not in _SUBGRAPH_OPS and node.domain in _DEFAULT_DOMAINS:
        return []
    attrs = node.attributes
    if not attrs:
        return []
    return [g for attr in attrs.values() if attr.type in _GRAPH_TYPES for g in _attr_graphs(attr)]


_BOX_VALUE, _OP_TYPE, _DOMAIN = (operator.attrgetter(name) for name in ("value", "_op_type", "_domain"))
_DEFAULT_DOMAIN_SET = frozenset(_DEFAULT_DOMAINS)


def _unordered_nodes(graph: ir.Graph | ir.Function) -> list[ir.Node]:
    """The graph's nodes in no particular order, for facts that need none (op counts,
    whether some node holds a body), read from onnx-ir's node set in C loops: walking the
    graph costs a Python step per node, and the pass manager's bookkeeping reads these
    facts after every pass. Falls back to the walk where that set is not what it reads."""
    try:
        nodes = list(map(_BOX_VALUE, graph._nodes._value_ids_to_boxes.values()))  # type: ignore[union-attr]
    except AttributeError:
        return list(graph)
    if len(nodes) != len(graph) or None in nodes:
        return list(graph)
    return nodes


def may_hold_bodies(graph: ir.Graph | ir.Function) -> bool:
    """Whether some node of ``graph`` may hold a body (see ``subgraphs``); False lets a
    walk of its nodes skip the per-node test."""
    return _may_hold_bodies(_unordered_nodes(graph))


def _may_hold_bodies(nodes: list[ir.Node]) -> bool:
    """Whether one of ``nodes`` may hold a body (see ``subgraphs``), tested in C loops."""
    try:
        return not (_SUBGRAPH_OPS.isdisjoint(map(_OP_TYPE, nodes))
                    and _DEFAULT_DOMAIN_SET.issuperset(map(_DOMAIN, nodes)))
    except AttributeError:
        return True


def graphs(model: ir.Model) -> Iterator[ir.Graph | ir.Function]:
    """Every graph-like of a model: the main graph, each model-local function, and every
    If/Loop/Scan body inside them (depth first, parents before their bodies).

    This is the one walker passes use; iterate a graph's nodes with ``list(graph)`` when
    the pass mutates it.
    """

    def walk(graph: ir.Graph | ir.Function) -> Iterator[ir.Graph | ir.Function]:
        yield graph
        # only nodes that may hold a body (see ``subgraphs``), listed once the caller is
        # done with ``graph``: one cheap test per node, no call
        if not may_hold_bodies(graph):
            return
        holders = [node for node in graph
                   if node.op_type in _SUBGRAPH_OPS or node.domain not in _DEFAULT_DOMAINS]
        for node in holders:
            for sub in subgraphs(node):
                yield from walk(sub)

    yield from walk(model.graph)
    for function in list(model.functions.values()):
        yield from walk(function)


def holds_op_type(model: ir.Model, op_types: frozenset[str]) -> bool:
    """Whether a node of any graph-like of the model (any domain) has one of ``op_types``,
    read from onnx-ir's node sets in C loops (``_unordered_nodes``), or node by node where a
    node lacks the attribute those loops read."""
    for graph in graphs(model):
        nodes = _unordered_nodes(graph)
        try:
            if not op_types.isdisjoint(map(_OP_TYPE, nodes)):
                return True
        except AttributeError:
            if any(n.op_type in op_types for n in nodes):
                return True
    return False


def nodes(model: ir.Model) -> Iterator[ir.Node]:
    """Every node of every graph-like of the model (see ``graphs``)."""
    for graph in graphs(model):
        yield from graph


def ancestors(values: Iterable[ir.Value | None]) -> set[ir.Node]:
    """Every node that some of ``values`` depends on (their producers included)."""
    seen: set[ir.Node] = set()
    stack = [v for v in values if v is not None]
    while stack:
        producer = stack.pop().producer()
        if producer is not None and producer not in seen:
            seen.add(producer)
            stack.extend(v for v in producer.inputs if v is not None)
    return seen


# ONNX type constraints a value's element type follows from: ops whose output has the
# type of their data input (input 0), ops whose every input has the output's type, and ops
# whose output is bool
_TYPE_OF_DATA_INPUT = frozenset({"Slice", "Unsqueeze", "Squeeze", "Reshape", "Transpose", "Identity", "Flatten",
                                 "Expand", "Tile", "Pad", "Gather", "Split", "Relu", "Sigmoid", "Softmax", "Neg",
                                 "Tanh", "Exp", "Log", "Sqrt", "Abs", "LeakyRelu", "Clip", "Erf",
                                 "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
                                 "BatchNormalization", "InstanceNormalization", "LayerNormalization",
                                 "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "Resize"})
_TYPE_OF_EVERY_INPUT = frozenset({"Add", "Sub", "Mul", "Div", "MatMul", "Gemm", "Concat", "Conv", "ConvTranspose"})
# ops whose outputs after the first have another type (indices, statistics): their first only
_FIRST_OUTPUT_TYPED = frozenset({"MaxPool", "BatchNormalization", "LayerNormalization"})
_BOOL_RESULT = frozenset({"Not", "And", "Or", "Xor", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual"})
_INT64_RESULT = frozenset({"Shape", "Size", "NonZero", "ArgMax", "ArgMin"})  # int64 in every opset
ELEMENT_TYPE_DEPTH = 64  # producers followed back to find an undeclared value's element type


def element_type(value: ir.Value | None, depth: int = 0) -> ir.DataType | None:
    """A value's element type: declared, else its constant's, else the one ONNX's type
    constraints fix from its default-domain producer (followed back ``ELEMENT_TYPE_DEPTH``
    producers at most): a Cast's ``to``; a ConstantOfShape's ``value`` tensor's (float32
    without one); bool for a comparison or logical op; int64 for Shape, Size, NonZero,
    ArgMax and ArgMin; the data input's (input 0) for a data-movement, unary, pooling,
    normalization or reduction op (the first output only where later ones are indices or
    statistics); any input's for an op whose inputs all share the output's type (Conv's
    among them). None where none of these says."""
    if value is None:
        return None
    if value.dtype is not None:
        return value.dtype
    if value.const_value is not None:
        return value.const_value.dtype
    node = value.producer()
    if node is None or depth >= ELEMENT_TYPE_DEPTH or node.domain not in ("", "ai.onnx"):
        return None
    op = node.op_type
    if op == "Cast":
        to = node.attributes.get("to")
        return ir.DataType(to.as_int()) if to is not None and to.type == ir.AttributeType.INT else None
    if op == "ConstantOfShape":
        fill = node.attributes.get("value")
        if fill is None:
            return ir.DataType.FLOAT
        return fill.as_tensor().dtype if fill.type == ir.AttributeType.TENSOR else None
    if op in _BOOL_RESULT:
        return ir.DataType.BOOL
    if op in _INT64_RESULT:
        return ir.DataType.INT64
    if op in _FIRST_OUTPUT_TYPED and value.index() != 0:
        return None
    inputs = node.inputs[:1] if op in _TYPE_OF_DATA_INPUT else node.inputs if op in _TYPE_OF_EVERY_INPUT else ()
    for source in inputs:
        found = element_type(source, depth + 1)
        if found is not None:
            return found
    return None


def op_histogram(model: ir.Model) -> dict[str, int]:
    """Node counts keyed by op type ("domain::op" for non-default domains), sorted by name."""
    counts = collections.Counter(
        f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
        for n in nodes(model)
    )
    return dict(sorted(counts.items()))


def _fixed_itemsize(dtype: ir.DataType) -> float | None:
    try:
        return None if dtype == ir.DataType.STRING else dtype.itemsize
    except Exception:  # noqa: BLE001 - UNDEFINED and the like have no size
        return None


# itemsize by TensorProto data type (None: no fixed size)
_ITEMSIZE: Mapping[int, float | None] = MappingProxyType({int(t): _fixed_itemsize(t) for t in ir.DataType})


_TENSOR_PROTO_TENSOR = ir.serde.TensorProtoTensor
_TENSOR = ir.Tensor


_NBYTES_KEY = "optcc.nbytes"


def _tensor_nbytes(tensor: ir.TensorProtocol | None) -> int:
    """The tensor's ``nbytes`` (0 when it has none), kept in its metadata: onnx-ir tensors
    are immutable and clones share them, so the manager's summary after every pass reads
    it again instead of recomputing it."""
    if tensor is None:
        return 0
    meta = getattr(tensor, "meta", None)
    if meta is None:
        return _compute_nbytes(tensor)
    kept = meta.data  # the MetadataStore's own dict: its Mapping methods are slow (the key is never invalidated)
    nbytes = kept.get(_NBYTES_KEY)
    if nbytes is None:
        nbytes = kept[_NBYTES_KEY] = _compute_nbytes(tensor)
    return nbytes


def _compute_nbytes(tensor: ir.TensorProtocol) -> int:
    kind = type(tensor)
    if kind is _TENSOR_PROTO_TENSOR:
        # what its ``nbytes`` computes, read from the proto without building a Shape
        proto = tensor.raw
        itemsize = _ITEMSIZE.get(proto.data_type)
        if itemsize is not None:
            return int(math.ceil(itemsize * math.prod(proto.dims)))
    elif kind is _TENSOR:
        # what its ``nbytes`` computes (dtype.itemsize times the static shape's size)
        itemsize = _ITEMSIZE.get(tensor.dtype)
        if itemsize is not None:
            try:
                return int(math.ceil(itemsize * math.prod(tensor.shape.numpy())))
            except Exception:
                return 0
    try:
        return int(tensor.nbytes)
    except Exception:
        return 0


def weight_bytes(model: ir.Model) -> int:
    """Bytes held by initializers and Constant-node tensors in every graph."""
    return sum(_graph_weight_bytes(graph) for graph in graphs(model))


def _graph_weight_bytes(graph: ir.Graph | ir.Function, constants: bool = True,
                        nodes: list[ir.Node] | None = None) -> int:
    """Bytes of the graph's initializers, and of its Constant nodes' tensors unless
    ``constants`` is False (the caller knows it has none); ``nodes``: the graph's nodes,
    in any order, when the caller has them."""
    # the UserDicts' own dicts: their Mapping methods are slow
    total = sum(_tensor_nbytes(v.const_value) for v in graph.initializers.data.values()) \
        if isinstance(graph, ir.Graph) else 0
    if not constants:
        return total
    for node in graph if nodes is None else nodes:
        if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS:
            value = node.attributes.data.get("value")
            if value is not None and value.type == ir.AttributeType.TENSOR:
                total += _tensor_nbytes(value.value)  # as_tensor() isinstance-checks a Protocol: slow
    return total


def histogram_and_weight_bytes(model: ir.Model) -> tuple[dict[str, int], int]:
    """``op_histogram(model)`` and ``weight_bytes(model)`` in one walk of the graphs."""
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for graph in graphs(model):
        nodes = _unordered_nodes(graph)
        try:  # every node in the default domain (the common case): counted by op type in C
            plain = _DEFAULT_DOMAIN_SET.issuperset(map(_DOMAIN, nodes))
        except AttributeError:
            plain = False
        if plain:
            ops = collections.Counter(map(_OP_TYPE, nodes))
        else:
            ops = collections.Counter(
                n.op_type if n.domain in _DEFAULT_DOMAINS else f"{n.domain}::{n.op_type}" for n in nodes)
        counts.update(ops)
        total += _graph_weight_bytes(graph, constants="Constant" in ops, nodes=nodes)
    return dict(sorted(counts.items())), total


def default_opset(model: ir.Model) -> int:
    """The model's opset version for the default ONNX domain."""
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0)))


def _external_tensors(model: ir.Model) -> Iterator[ir.ExternalTensor]:
    for graph in graphs(model):
        if isinstance(graph, ir.Graph):
            for value in graph.initializers.values():
                if isinstance(value.const_value, ir.ExternalTensor):
                    yield value.const_value


def uses_external_data(model: ir.Model) -> bool:
    """Whether any initializer's data lives in an external file."""
    return any(True for _ in _external_tensors(model))


def external_data_files(model: ir.Model) -> set[Path]:
    """The resolved paths of the external data files the model's tensors read from."""
    return {
        Path(t.base_dir, t.location).resolve() for t in _external_tensors(model) if t.base_dir
    }
