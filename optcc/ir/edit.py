"""Editing helpers: fresh value and node names, constants as tensors, and the legacy-IR
and dtype facts passes need before they rewrite."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import onnx
import onnx_ir as ir

from optcc.ir.arrays import fresh
from optcc.ir.saving import initializers_set_aside, serialize
from optcc.ir.walk import graphs, nodes, proto_graphs, subgraphs

def value_names(scope: ir.Model | ir.Graph | ir.Function) -> set[str]:
    """Every value name defined in ``scope`` (a model: all its graphs; a graph or function:
    it and the bodies nested in it)."""
    if isinstance(scope, ir.Model):
        graph_likes = list(graphs(scope))
    else:
        graph_likes, stack = [], [scope]
        while stack:
            g = stack.pop()
            graph_likes.append(g)
            stack.extend(sub for node in g for sub in subgraphs(node))
    taken: set[str] = set()
    for g in graph_likes:
        taken.update(v.name for v in g.inputs if v.name)
        if isinstance(g, ir.Graph):
            taken.update(g.initializers)
        for node in g:
            taken.update(v.name for v in node.outputs if v.name)
    return taken


def unique_value_name(
    scope: ir.Model | ir.Graph | ir.Function | None, base: str, taken: set[str] | None = None
) -> str:
    """A value name based on ``base`` not used in ``scope`` (pass the model to be safe
    across all graphs). With ``taken`` (from ``value_names``), that set is used and the
    new name added to it, so repeated calls do not rescan the model."""
    if taken is None and scope is None:
        raise ValueError("unique_value_name needs a scope or a set of taken names")
    names = value_names(scope) if taken is None else taken
    name, i = base, 0
    while name in names:
        i += 1
        name = f"{base}_{i}"
    names.add(name)
    return name


def unique_prefix(names: Iterable[str], base: str) -> str:
    """``base``, else ``base_1``, ``base_2``, ...: a prefix none of ``names`` starts with, so
    every name made by extending it is new among them."""
    names = list(names)
    prefix, i = base, 0
    while any(name.startswith(prefix) for name in names):
        i += 1
        prefix = f"{base}_{i}"
    return prefix


def constant_before(model: ir.Model, before: ir.Node, array: np.ndarray, base: str,
                    taken: set[str] | None = None) -> ir.Value:
    """A Constant node holding ``array``, inserted just before ``before`` (a node of any
    graph of ``model``) and named after it (``<node>_<base>``, a name no graph of the model
    holds: a graph does not know the graphs enclosing it, and a body's name that an
    enclosing graph also holds would shadow it); its output, typed and shaped. ``taken``:
    ``value_names(model)``, kept by a caller that inserts many (the new name is added to
    it), so the model is not scanned again for each."""
    graph = before.graph
    assert graph is not None
    name = unique_value_name(model, f"{before.name or before.op_type}_{base}", taken)
    const = ir.Node("", "Constant", [], [ir.AttrTensor("value", ir.Tensor(array, name=name))],
                    num_outputs=1, name=name)
    const.outputs[0].name = name
    const.outputs[0].type = ir.TensorType(ir.DataType.from_numpy(array.dtype))
    const.outputs[0].shape = ir.Shape(array.shape)
    graph.insert_before(before, const)
    return const.outputs[0]


def constant_for(model: ir.Model, reader: ir.Node, array: np.ndarray, base: str,
                 taken: set[str] | None = None) -> ir.Value:
    """A constant holding ``array`` for ``reader`` to read, named as ``constant_before``
    names it: in the main graph of a model of IR version 4 or later, an initializer of that
    name holding that tensor (what lift-constants makes of a main-graph Constant node, so
    that no later lift changes it); elsewhere (a body or function, or below IR version 4,
    where every initializer is also a graph input) the Constant node ``constant_before``
    inserts (lift-constants may still lift a body's). ``taken``: as ``constant_before``'s."""
    graph = reader.graph
    if graph is not model.graph or initializers_are_constant(model):
        return constant_before(model, reader, array, base, taken)
    name = unique_value_name(model, f"{reader.name or reader.op_type}_{base}", taken)
    tensor = ir.Tensor(array, name=name)
    value = ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=ir.Shape(array.shape), const_value=tensor)
    graph.register_initializer(value)
    return value


class ModelNames:
    """The value and node names in use anywhere in a model, handing out fresh ones
    (``base``, else ``base_1``, ``base_2``, ...) and constants named against them
    (``constant_for``). Both sets are collected when first needed (a pass that names
    nothing scans nothing), then kept with the names handed out here added; valid while
    the names made elsewhere in the meantime are only names the model already held."""

    def __init__(self, model: ir.Model) -> None:
        self._model = model
        self._values: set[str] | None = None
        self._nodes: set[str] | None = None

    @property
    def values(self) -> set[str]:
        """The value names in use (``value_names``), this object's own included."""
        self._collect()
        assert self._values is not None
        return self._values

    @property
    def nodes(self) -> set[str]:
        """The node names in use, this object's own included."""
        self._collect()
        assert self._nodes is not None
        return self._nodes

    def value(self, base: str) -> str:
        """A value name no graph of the model uses (now taken)."""
        return unique_value_name(None, base, self.values)

    def node(self, base: str) -> str:
        """A node name no graph of the model uses (now taken)."""
        return unique_value_name(None, base, self.nodes)

    def constant_for(self, reader: ir.Node, array: np.ndarray, base: str) -> ir.Value:
        """``constant_for(model, reader, array, base)``, its name now taken (the Constant
        node's too, where one holds it: named as its output)."""
        value = constant_for(self._model, reader, array, base, self.values)
        producer = value.producer()
        if producer is not None and producer.name:
            self.nodes.add(producer.name)
        return value

    def _collect(self) -> None:
        if self._values is None:
            self._values = value_names(self._model)
            self._nodes = {node.name for node in nodes(self._model) if node.name}


def initializers_are_constant(model: ir.Model) -> bool:
    """Whether initializers listed as graph inputs are constants: below IR version 4 every
    initializer had to be listed as an input, so (as in onnxruntime) it is not overridable;
    from IR version 4 on, listing it as an input means a caller may feed another value."""
    return int(model.ir_version or 0) < 4


def overridable_inputs(model: ir.Model) -> list[ir.Value]:
    """The main graph's inputs that hold a default a caller may replace: those with an
    initializer, from IR version 4 on (below it they are constants,
    ``initializers_are_constant``)."""
    if initializers_are_constant(model):
        return []
    return [v for v in model.graph.inputs if v.is_initializer()]


def is_constant(value: ir.Value, *, inputs_constant: bool = False) -> bool:
    """Whether the value is a constant (cheap: no tensor data is read): an initializer (one
    that is also a graph input only with ``inputs_constant``, see
    ``initializers_are_constant``) or a default-domain Constant node's output. The one rule
    every pass and analysis uses: a value a caller may feed is never a constant."""
    if value.is_initializer():
        return value.const_value is not None and (inputs_constant or not value.is_graph_input())
    if value.is_graph_input():
        return False
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant" and producer.domain in ("", "ai.onnx")


def const_array(value: ir.Value | None, *, inputs_constant: bool = False,
                decode: Callable[[ir.TensorProtocol], np.ndarray] | None = None) -> np.ndarray | None:
    """The data of a constant value (see ``is_constant``); None for anything else (an
    omitted input too). ``decode`` reads a tensor's array (default ``fresh``; a caller may cache it)."""
    if value is None or not is_constant(value, inputs_constant=inputs_constant):
        return None
    decode = decode or fresh
    if value.is_initializer():
        return decode(value.const_value)
    try:
        tensor = const_tensor(value)
        return None if tensor is None else decode(tensor)
    except Exception:  # noqa: BLE001 - sparse or malformed Constant: not a usable constant
        return None


INFERENCE_KEEPS_ELEMENTS = 1024  # inferred_dtypes copies tensors this small into its inference copy


def inferred_dtypes(model: ir.Model) -> dict[str, ir.DataType]:
    """Element types of the values of the main graph and its If/Loop/Scan bodies, as
    declared, as an initializer's tensor holds them, or as onnx type inference finds them
    (best effort: values it cannot type are left out). Inference runs only when a node
    output is undeclared, on a serialized copy whose weights are graph inputs of the same
    type and shape, so no weight data is copied; tensors of at most
    ``INFERENCE_KEEPS_ELEMENTS`` values stay as they are, since inference reads some of them
    (an empty Resize ``scales`` means "not given": as a graph input it stops inference there)."""
    bodies = [g for g in graphs(model) if isinstance(g, ir.Graph)]
    declared = [v for g in bodies for v in (*g.inputs, *(o for node in g for o in node.outputs))]
    types = {v.name: v.const_value.dtype for g in bodies for v in g.initializers.values()
             if v.name and v.const_value is not None}
    types.update((v.name, v.dtype) for v in declared if v.name and v.dtype is not None)
    if all(v.name in types for v in declared if v.name):
        return types
    with initializers_set_aside(model, lambda t: t.size > INFERENCE_KEEPS_ELEMENTS) as aside:
        proto = serialize(model)
    shapes = {value.name: (tensor.dtype, tensor.shape) for value, tensor in aside}
    inputs = {v.name for v in proto.graph.input}
    kept = [t for t in proto.graph.initializer if t.name not in shapes]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    for name, (dtype, shape) in shapes.items():
        if name not in inputs:
            proto.graph.input.append(onnx.helper.make_tensor_value_info(name, int(dtype), list(shape.dims)))
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
    except Exception:  # noqa: BLE001 - best effort: the declared types remain
        return types
    for graph in proto_graphs(inferred.graph):
        for info in (*graph.value_info, *graph.output, *graph.input):
            elem = info.type.tensor_type.elem_type if info.type.HasField("tensor_type") else 0
            if elem and info.name not in types:
                types[info.name] = ir.DataType(elem)
    return types


_CONSTANT_LISTS = {
    "value_float": np.float32, "value_floats": np.float32,
    "value_int": np.int64, "value_ints": np.int64,
    "value_string": np.bytes_, "value_strings": np.bytes_,
}


def const_tensor(value: ir.Value) -> ir.TensorProtocol | None:
    """The constant tensor behind a value (initializer or default-domain Constant output),
    else None. Unlike ``ir.convenience.get_const_tensor`` it renames nothing and skips the
    Protocol isinstance checks that made it a hot spot; a malformed Constant raises
    ValueError."""
    if value.const_value is not None:
        return value.const_value
    node = value.producer()
    if node is None or node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return None
    attributes = node.attributes.data  # the UserDict's own dict: its Mapping views are slow here
    if len(attributes) != 1 or len(node.outputs) != 1:
        raise ValueError(f"Constant node '{node.name}' must have one attribute and one output")
    attr_name, attr = next(iter(attributes.items()))
    if attr.is_ref():
        return None
    if attr_name == "value" and attr.type == ir.AttributeType.TENSOR:
        return attr.value
    if attr_name in _CONSTANT_LISTS:
        array = np.array(attr.value, dtype=_CONSTANT_LISTS[attr_name])
        return ir.StringTensor(array) if array.dtype.kind == "S" else ir.Tensor(array)
    raise ValueError(f"Constant node '{node.name}' has unsupported attribute '{attr_name}'")


def as_numpy(value: ir.Value) -> np.ndarray | None:
    """The constant array behind a value (initializer or Constant output), else None."""
    tensor = const_tensor(value)
    return None if tensor is None else fresh(tensor)  # a parsed tensor's: a copy of its one decode
