"""FoldShapesPass: replace Shape/Size of statically shaped values by constants.

Rewrite: ``s = Shape(x)`` (``start``/``end`` honoured) and ``n = Size(x)`` become int64
constants when every dimension they read is a static integer. A shape computation is
followed element by element (``shape_elements``: Gather, Slice with positive steps,
Concat, Cast to int32/int64, Unsqueeze/Squeeze of one element, over Shape and integer
constants): any of those ops reading it whose every element is a static dim or a
constant becomes a constant of its type, even if other dims are symbolic (partial
folding: ``Gather(Shape(x), i)`` of a static dim, or ``x.shape[-2:]``, folds while the
batch stays dynamic).
Shapes come from the model's own annotations merged with onnx shape inference run on a
serialized copy, so nothing inferred is committed to the model (graph input/output declarations
and value annotations stay as they were).
Preconditions: default-domain nodes; the dimensions read are integers after inference.
A symbolic dimension is never replaced by a number, nor is a legacy negative ``dim_value``
(``float[3,-1]``, accepted by onnx.checker and onnxruntime as "unknown").
Where the constant goes: an initializer in the main graph (the value keeps its name); a
``Constant`` node in If/Loop/Scan bodies and functions, and for any graph output (which
keeps its name, declared type and shape).
Exact: a tensor's shape does not depend on its values; the constant is what the node
returns for every input the declared shapes admit.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Iterator
import logging
import math

import numpy as np
import onnx
import onnx_ir as ir

import optcc
from optcc.ir import const_array, initializers_are_constant
from optcc.rewrite import static_rank

__all__ = [
    "FoldShapesPass",
    "fold_shapes",
    "materialize",
    "remove_if_dead",
    "infer_shapes",
    "shape_findings",
    "ShapeFindings",
    "SHAPE_OPS",
    "FOLLOWED_OPS",
]

logger = logging.getLogger(__name__)

_DEFAULT_DOMAINS = ("", "ai.onnx")
SHAPE_OPS = frozenset({"Shape", "Size"})
Dims = tuple  # of int | ir.SymbolicDim


def _is_default(node: ir.Node) -> bool:
    return node.domain in _DEFAULT_DOMAINS


def infer_shapes(model: ir.Model, values: Iterable[ir.Value] | None = None,
                 annotations: bool = True) -> dict[ir.Value, ir.Shape]:
    """Shapes onnx shape inference finds for ``values`` (default: the values Shape/Size
    nodes read), from a serialized copy (the model itself is not touched). Value names are
    unique in a model, so results map back by name; values inference cannot shape are left out.
    ``annotations=False``: the copy keeps no value_info, so every dim of the result is derived
    in this one run from the graph's inputs and weights."""
    return _infer(model, values, annotations).shapes


@dataclasses.dataclass
class ShapeFindings:
    """One run of shape inference: ``shapes`` of the values asked for, and ``infos``, the
    inferred value_info of every value by its name then (empty when inference failed)."""

    shapes: dict[ir.Value, ir.Shape]
    infos: dict[str, onnx.ValueInfoProto]


def shape_findings(model: ir.Model) -> ShapeFindings:
    """``infer_shapes(model)``, with every value's inferred value_info."""
    return _infer(model, None, True)


def _infer(model: ir.Model, values: Iterable[ir.Value] | None, annotations: bool) -> ShapeFindings:
    wanted: dict[str, ir.Value] = {v.name: v for v in values or () if v is not None and v.name}
    for node in optcc.ir.nodes(model) if values is None else ():
        if node.op_type in ("Shape", "Size") and _is_default(node) and node.inputs:
            source = node.inputs[0]
            if source is not None and source.name:
                wanted[source.name] = source
    if not wanted:
        return ShapeFindings({}, {})
    try:
        data: bytes | onnx.ModelProto = optcc.ir.serialize_dims_only(model, _blanked)
        if not annotations:
            data = onnx.ModelProto.FromString(data)
            for graph in optcc.ir.proto_graphs(data.graph):
                del graph.value_info[:]
        inferred = onnx.shape_inference.infer_shapes(data, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is best effort; declared shapes remain
        logger.debug("shape inference failed", exc_info=True)
        return ShapeFindings({}, {})
    shapes: dict[ir.Value, ir.Shape] = {}
    infos: dict[str, onnx.ValueInfoProto] = {}
    for info in _value_infos(inferred.graph, bodies=_has_bodies(model)):
        infos[info.name] = info
        value = wanted.get(info.name)
        if value is not None and info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
            shapes[value] = ir.Shape([
                d.dim_value if d.HasField("dim_value") and d.dim_value >= 0
                else ir.SymbolicDim(d.dim_param or None)
                for d in info.type.tensor_type.shape.dim
            ])
    return ShapeFindings(shapes, infos)


_FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                          onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE})


_ITEMSIZE = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.BFLOAT16: 2,
             onnx.TensorProto.DOUBLE: 8}
_BLANK_BYTES = 1024


def _blanked(tensor: ir.TensorProtocol) -> bool:
    """Whether the copy given to shape inference holds this main-graph initializer without
    its data: a float tensor of more than ``_BLANK_BYTES`` (by its dims).
    Inference reads such a tensor's type and dims only (data propagation reads small
    shape-like tensors), and copying megabytes of weights cost more than the inference."""
    kind = type(tensor)  # the common kinds first: isinstance checks of onnx-ir's classes are slow
    if kind is ir.serde.TensorProtoTensor:
        proto = tensor.raw
        if proto.data_type not in _FLOAT_TYPES or proto.data_location == onnx.TensorProto.EXTERNAL:
            return False
        # its data in raw_data or in float_data/int32_data (exporters write both): the
        # size its dims give, read from the proto (``nbytes`` builds a Shape)
        return math.prod(proto.dims) * _ITEMSIZE[proto.data_type] > _BLANK_BYTES
    if int(tensor.dtype) not in _FLOAT_TYPES or (kind is not ir.Tensor and isinstance(tensor, ir.ExternalTensor)):
        return False
    return tensor.nbytes > _BLANK_BYTES


def _has_bodies(model: ir.Model) -> bool:
    """Whether the main graph holds If/Loop/Scan (or custom) bodies: then the serialized
    main graph holds them too."""
    return any(graph is not model.graph and not isinstance(graph, ir.Function) for graph in optcc.ir.graphs(model))


def _value_infos(graph: onnx.GraphProto, bodies: bool = True) -> Iterator[onnx.ValueInfoProto]:
    """The value infos of a serialized graph and, with ``bodies``, of the bodies inside it."""
    for g in optcc.ir.proto_graphs(graph) if bodies else (graph,):
        yield from g.input
        yield from g.value_info
        yield from g.output


def _known(dim: object) -> object:
    """A dim as an int only when it is a static size; a legacy negative ``dim_value``
    (``float[3,-1]``, which onnx-ir reads as the int -1) means "unknown", not a size."""
    if isinstance(dim, int) and dim < 0:
        return ir.SymbolicDim(None)
    return dim


def _static_shape(value: ir.Value, inferred: dict[ir.Value, ir.Shape]) -> Dims | None:
    """The best known dims of ``value`` (ints where static, SymbolicDim otherwise)."""
    candidates = [value.shape, inferred.get(value)]
    best: Dims | None = None
    for shape in candidates:
        if shape is None:
            continue
        dims = tuple(_known(d) for d in shape.dims)
        if best is None or sum(isinstance(d, int) for d in dims) > sum(isinstance(d, int) for d in best):
            if best is not None and len(best) != len(dims):
                return None  # conflicting ranks: trust nothing
            best = dims
    return best


def _shape_slice(node: ir.Node, dims: Dims) -> Dims:
    rank = len(dims)
    start = node.attributes.get_int("start", 0)
    end = node.attributes.get_int("end", rank)
    return dims[slice(start, end)]  # Python slicing clamps exactly as the ONNX spec says


def _fold_value(
    node: ir.Node, inferred: dict[ir.Value, ir.Shape], inputs_constant: bool
) -> np.ndarray | None:
    """The constant a Shape/Size node computes, or None (a Gather of a Shape: ``_fold_followed``)."""
    if node.op_type in ("Shape", "Size") and len(node.inputs) == 1 and node.inputs[0] is not None:
        dims = _static_shape(node.inputs[0], inferred)
        if dims is None:
            return None
        if node.op_type == "Size":
            return np.array(int(np.prod(dims)), dtype=np.int64) if all(isinstance(d, int) for d in dims) else None
        selected = _shape_slice(node, dims)
        if not all(isinstance(d, int) for d in selected):
            return None
        return np.array(selected, dtype=np.int64)
    return None


MAX_SHAPE_ELEMENTS = 64  # elements a shape computation may hold to be followed
# the ops ``shape_elements`` follows a shape computation through
FOLLOWED_OPS = frozenset({"Gather", "Slice", "Concat", "Cast", "Unsqueeze", "Squeeze"})
_INT_TYPES = {ir.DataType.INT64.value: np.int64, ir.DataType.INT32.value: np.int32}


@dataclasses.dataclass(frozen=True)
class ShapeElements:
    """A small integer shape computation, element by element (in C order): each an int
    where it is known (a static dim or a constant), None where not; its dims (``()`` a
    scalar, ``(n,)`` a shape-like vector; more only from a Gather's indices); its type."""

    elements: list[int | None]
    dims: tuple[int, ...]
    dtype: type
    from_shape: bool = False  # some element was read from a Shape node
    # per element, the tensor and axis whose dim it is (None: a constant's element)
    sources: list[tuple[ir.Value, int] | None] = dataclasses.field(default_factory=list)

    @property
    def scalar(self) -> bool:
        return self.dims == ()

    @property
    def vector(self) -> bool:
        return len(self.dims) == 1


def shape_elements(value: ir.Value | None, inferred: dict[ir.Value, ir.Shape], inputs_constant: bool,
                   ranks: dict | None = None, depth: int = 0) -> ShapeElements | None:
    """``value`` as a ``ShapeElements``, followed through Shape, int32/int64 constants,
    Gather (axis 0 of a vector, constant indices of any rank in range), Slice (axis 0,
    constant starts/ends, positive steps), Concat (axis 0), Cast to int32/int64, and
    Unsqueeze/Squeeze of one element at axis 0; None for any other value. A Shape's
    dims: its input's annotation merged with ``inferred``, else (with ``ranks``, a
    ``static_rank`` memo) its input's rank alone, every dim unknown."""
    if value is None or depth > 16:
        return None
    array = const_array(value, inputs_constant=inputs_constant)
    if array is not None:
        if array.dtype.type not in (np.int64, np.int32) or array.ndim > 1 or array.size > MAX_SHAPE_ELEMENTS:
            return None
        return ShapeElements([int(v) for v in array.reshape(-1)], array.shape, array.dtype.type,
                             sources=[None] * array.size)
    node = value.producer()
    if node is None or not _is_default(node) or len(node.outputs) != 1 or not node.inputs or node.inputs[0] is None:
        return None
    op = node.op_type
    if op == "Shape":
        source = node.inputs[0]
        dims = _static_shape(source, inferred)
        if dims is None and ranks is not None:
            rank = static_rank(source, ranks)
            dims = None if rank is None else (None,) * rank
        if dims is None:
            return None
        selected = [d if isinstance(d, int) else None for d in _shape_slice(node, dims)]
        axes = _shape_slice(node, tuple(range(len(dims))))
        return ShapeElements(selected, (len(selected),), np.int64, from_shape=True,
                             sources=[(source, axis) for axis in axes])
    inner = shape_elements(node.inputs[0], inferred, inputs_constant, ranks, depth + 1)
    if inner is None:
        return None
    elements, sources = inner.elements, inner.sources
    if op == "Cast":
        to = _INT_TYPES.get(node.attributes.get_int("to", 0))
        fits = all(e is None or -(1 << 31) <= e < (1 << 31) for e in elements)
        return None if to is None or (to is np.int32 and not fits) else dataclasses.replace(inner, dtype=to)
    if op == "Gather" and inner.vector and node.attributes.get_int("axis", 0) in (0, -1) and len(node.inputs) == 2:
        indices = const_array(node.inputs[1], inputs_constant=inputs_constant)
        if indices is None or indices.dtype.kind not in "iu" or indices.size > MAX_SHAPE_ELEMENTS:
            return None
        flat = [int(i) for i in indices.reshape(-1)]
        if any(not -len(elements) <= i < len(elements) for i in flat):
            return None  # out of range: the runtime's error to raise
        return dataclasses.replace(inner, elements=[elements[i] for i in flat], dims=indices.shape,
                                   sources=[sources[i] for i in flat])
    if op == "Slice" and inner.vector and len(node.inputs) >= 3:
        given = list(node.inputs[1:5]) + [None] * (4 - len(node.inputs[1:5]))
        starts, ends, axes, steps = (None if v is None else const_array(v, inputs_constant=inputs_constant)
                                     for v in given)
        axes = np.zeros(1, np.int64) if given[2] is None else axes
        steps = np.ones(1, np.int64) if given[3] is None else steps
        if any(a is None or a.dtype.kind not in "iu" or a.size != 1 for a in (starts, ends, axes, steps)):
            return None
        if int(axes.reshape(-1)[0]) not in (0, -1) or int(steps.reshape(-1)[0]) < 1:
            return None  # Python's slicing clamps as ONNX does for positive steps
        start, end, step = (int(a.reshape(-1)[0]) for a in (starts, ends, steps))
        sliced = elements[start:end:step]
        return dataclasses.replace(inner, elements=sliced, dims=(len(sliced),), sources=sources[start:end:step])
    if op == "Concat" and node.attributes.get_int("axis", 0) in (0, -1):
        joined: list[int | None] = []
        joined_sources: list[tuple[ir.Value, int] | None] = []
        from_shape = False
        for piece in node.inputs:
            found = shape_elements(piece, inferred, inputs_constant, ranks, depth + 1)
            if found is None or not found.vector or found.dtype is not inner.dtype:
                return None
            joined.extend(found.elements)
            joined_sources.extend(found.sources)
            from_shape |= found.from_shape
        if len(joined) > MAX_SHAPE_ELEMENTS:
            return None
        return ShapeElements(joined, (len(joined),), inner.dtype, from_shape, joined_sources)
    if op in ("Unsqueeze", "Squeeze") and len(elements) == 1:
        if "axes" in node.attributes:
            axes_found: object = node.attributes.get_ints("axes", None)
        else:
            axes_found = const_array(node.inputs[1], inputs_constant=inputs_constant) if len(node.inputs) > 1 else None
        if axes_found is None or [int(a) for a in np.asarray(axes_found).reshape(-1)] not in ([0], [-1]):
            return None
        if op == "Unsqueeze" and inner.scalar:
            return dataclasses.replace(inner, dims=(1,))
        if op == "Squeeze" and inner.dims == (1,):
            return dataclasses.replace(inner, dims=())
    return None


def _shape_followers(model: ir.Model) -> set[ir.Node]:
    """The default-domain ``FOLLOWED_OPS`` nodes that read a Shape's output directly or
    through other such nodes (readers in bodies included): the only nodes for which
    ``shape_elements`` can find an element read from a Shape (``from_shape``), since it
    follows inputs through those ops alone. Folding only replaces values by constants,
    so the set found before folding still holds every node that could fold."""
    found: set[ir.Node] = set()
    frontier = [node.outputs[0] for node in optcc.ir.nodes(model)
                if node.op_type == "Shape" and _is_default(node) and len(node.outputs) == 1]
    while frontier:
        for use in frontier.pop().uses():
            reader = use.node
            if reader not in found and reader.op_type in FOLLOWED_OPS and _is_default(reader):
                found.add(reader)
                frontier.extend(reader.outputs)
    return found


def _fold_followed(node: ir.Node, inferred: dict[ir.Value, ir.Shape], inputs_constant: bool) -> np.ndarray | None:
    """The constant a node of ``FOLLOWED_OPS`` computes from a shape when every element is
    known (``shape_elements``), in its output's type."""
    found = shape_elements(node.outputs[0], inferred, inputs_constant)
    if found is None or not found.from_shape or any(e is None for e in found.elements):
        return None  # (constants alone: fold-constants' business)
    return np.array(found.elements, dtype=found.dtype).reshape(found.dims)


def materialize(
    graph: ir.Graph | ir.Function, value: ir.Value, array: np.ndarray, *, as_initializer: bool
) -> ir.Value:
    """Make the uses (and graph-output role) of node output ``value`` read the constant
    ``array`` instead. The producer stays (remove it with ``remove_if_dead``).

    With ``as_initializer`` (the main graph, IR version >= 4) and not a graph output: a new
    initializer that takes the value's name once the producer is removed (``remove_if_dead``
    renames it). Otherwise a Constant node is inserted before the producer; a graph output
    keeps its name, declared type and shape.
    Returns the new value.
    """
    producer = value.producer()
    assert producer is not None
    # ir.Tensor directly for numeric arrays: ir.tensor() isinstance-checks Protocols (slow)
    tensor = ir.Tensor(array) if array.dtype.kind in "biuf" else ir.tensor(array)
    dtype = tensor.dtype
    is_output = value.is_graph_output()
    if as_initializer and isinstance(graph, ir.Graph) and not is_output:
        new = ir.Value(name=None, type=ir.TensorType(dtype), shape=ir.Shape(array.shape), const_value=tensor)
        new.meta["optcc.fold.name"] = value.name
        value.replace_all_uses_with(new)
        return new
    out = ir.Value(
        name=None,
        type=value.type if is_output and value.type is not None else ir.TensorType(dtype),
        shape=value.shape if is_output and value.shape is not None else ir.Shape(array.shape),
    )
    const = ir.Node(
        "", "Constant", inputs=[], attributes=[ir.AttrTensor("value", tensor)], outputs=[out],
        name=f"folded_{value.name}" if value.name else None,
    )
    out.meta["optcc.fold.name"] = value.name
    graph.insert_before(producer, const)
    value.replace_all_uses_with(out, replace_graph_outputs=True)
    return out


def remove_if_dead(graph: ir.Graph | ir.Function, node: ir.Node, replacements: list[ir.Value]) -> bool:
    """Remove ``node`` when no output is used any more, name the ``replacements`` made by
    ``materialize`` after the values they replaced (registering main-graph initializers),
    and drop the Constant nodes and initializers that fed only ``node``."""
    if any(v.uses() or v.is_graph_output() for v in node.outputs):
        return False
    inputs = [v for v in node.inputs if v is not None]
    graph.remove(node, safe=True)
    for value in node.outputs:
        value.name = None  # free the name for its replacement
    for new in replacements:
        if "optcc.fold.name" not in new.meta:
            continue
        # The replaced value's name: unique in the model, so free now. Never empty: the
        # values folded are read, graph outputs or a node's sole output, which onnx's checker
        # (at load) requires named, and onnx-ir names every value a pass adds unnamed.
        new.name = new.meta.pop("optcc.fold.name")
        if new.const_value is not None and new.producer() is None:
            new.const_value.name = new.name
            graph.register_initializer(new)
    for value in inputs:
        _drop_dead_constant(value)
    return True


def _drop_dead_constant(value: ir.Value) -> None:
    if value.uses() or value.is_graph_output() or value.is_graph_input():
        return
    if value.is_initializer() and value.graph is not None and value.name in value.graph.initializers:
        del value.graph.initializers[value.name]
        return
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and _is_default(producer):
        owner = producer.graph
        if owner is not None and not any(v.uses() or v.is_graph_output() for v in producer.outputs):
            owner.remove(producer, safe=True)


def fold_shapes(model: ir.Model, inferred: dict[ir.Value, ir.Shape] | None = None) -> collections.Counter[str]:
    """Fold Shape/Size/Gather-of-Shape nodes in every graph; returns counts by op type.
    ``inferred``: what ``infer_shapes(model)`` returns (default: run it now)."""
    folded: collections.Counter[str] = collections.Counter()
    has_shape_ops = optcc.ir.holds_op_type(model, SHAPE_OPS) and any(
        n.op_type in SHAPE_OPS and _is_default(n) for n in optcc.ir.nodes(model))
    if not has_shape_ops:
        return folded
    if inferred is None:
        inferred = infer_shapes(model)
    inputs_constant = initializers_are_constant(model)
    followers = _shape_followers(model)
    for graph in optcc.ir.graphs(model):
        for node in list(graph):
            if not _is_default(node) or node.op_type not in ("Shape", "Size", "Gather", *FOLLOWED_OPS):
                continue
            if node.graph is None or len(node.outputs) != 1:
                continue  # removed already (a Shape feeding a folded Gather)
            array = _fold_value(node, inferred, inputs_constant)
            if array is None and node in followers:
                array = _fold_followed(node, inferred, inputs_constant)
            if array is None:
                continue
            output = node.outputs[0]
            if output.dtype is not None and output.dtype != ir.DataType.from_numpy(array.dtype):
                continue
            new = materialize(graph, output, array, as_initializer=graph is model.graph and not inputs_constant)
            source = node.inputs[0]
            remove_if_dead(graph, node, [new])
            folded[node.op_type] += 1
            shape_node = source.producer() if source is not None else None
            if node.op_type == "Gather" and shape_node is not None and shape_node.graph is graph:
                remove_if_dead(graph, shape_node, [])
    return folded


class FoldShapesPass(optcc.Pass):
    """Replace Shape/Size of statically shaped values, and shape computations whose every
    element is static, by constants."""

    name = "fold-shapes"
    # No level of its own: fold-constants runs this folding first in every round (the -O
    # pipelines reach it that way); the pass exists for ``--passes fold-shapes`` alone.
    numerics = "exact"

    def call(self, model: ir.Model) -> optcc.PassResult:
        folded = fold_shapes(model)
        return optcc.PassResult(model, bool(folded), {"folded": dict(sorted(folded.items()))} if folded else {})
