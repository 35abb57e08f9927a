"""StoreConstantOutputsPass: a main-graph output that is a constant becomes an initializer.

Rewrite: ``y = Constant(value=T)`` (or ``value_float(s)``/``value_int(s)``), or
``y = Identity(c)`` with ``c`` an initializer, where ``y`` is an output of the main
graph, becomes an initializer named ``y`` holding the same tensor; the node is removed
(and ``c`` too when nothing else reads it). Other readers of ``y`` read the initializer.
This is the form onnxsim writes for outputs that fold completely (``Shape`` of a static
value, a shape subgraph).

Preconditions: IR version >= 4 (below it an initializer is also a graph input, which
would change the interface); main graph only (bodies and functions keep their nodes);
a default-domain node with a known tensor (no sparse value, no attribute reference);
``c`` is not a graph input (an overridable default is not a constant); ``y`` is no graph
input; the declaration of ``y`` (kept as it is) agrees with the tensor: the same dtype,
and the same rank with every static dim equal to the tensor's (a symbolic dim, named or
not, admits the tensor's; a contradicting declaration leaves the node).
Exact: the graph returns the same tensor under the same name, type and shape; no value
is computed differently.
"""

from __future__ import annotations

import onnx_ir as ir

import optcc

__all__ = ["StoreConstantOutputsPass"]

_DEFAULT_DOMAINS = ("", "ai.onnx")


def _tensor(node: ir.Node) -> ir.TensorProtocol | None:
    if node.domain not in _DEFAULT_DOMAINS or len(node.outputs) != 1:
        return None
    if node.op_type == "Identity" and len(node.inputs) == 1:
        source = node.inputs[0]
        if source is None or source.is_graph_input() or not source.is_initializer():
            return None
        return source.const_value
    if node.op_type == "Constant" and len(node.attributes) == 1:
        try:
            return optcc.ir.const_tensor(node.outputs[0])
        except ValueError:  # sparse_value or a malformed Constant
            return None
    return None


def _declaration_agrees(value: ir.Value, tensor: ir.TensorProtocol) -> bool:
    if value.dtype is not None and value.dtype != tensor.dtype:
        return False
    if value.shape is None:
        return True
    dims = tuple(value.shape)
    return len(dims) == len(tensor.shape) and all(
        not isinstance(d, int) or d == t for d, t in zip(dims, tensor.shape))


def _store(graph: ir.Graph, node: ir.Node) -> bool:
    output = node.outputs[0]
    if (not output.is_graph_output() or output.is_graph_input() or not output.name
            or output.name in graph.initializers):
        return False
    tensor = _tensor(node)
    if tensor is None or not _declaration_agrees(output, tensor):
        return False
    source = node.inputs[0] if node.op_type == "Identity" else None
    name = output.name
    value = ir.Value(
        name=None,
        type=output.type if output.type is not None else ir.TensorType(tensor.dtype),
        shape=output.shape if output.shape is not None else ir.Shape(tensor.shape),
        const_value=tensor, doc_string=output.doc_string,
        metadata_props=dict(output.metadata_props),
    )
    output.replace_all_uses_with(value, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    value.name = name
    graph.register_initializer(value)
    if source is not None and not source.uses() and not source.is_graph_output():
        graph.initializers.pop(source.name)
    return True


class StoreConstantOutputsPass(optcc.Pass):
    """Main-graph outputs made by Constant (or Identity of an initializer) become initializers."""

    name = "store-constant-outputs"
    numerics = "exact"

    def call(self, model: ir.Model) -> optcc.PassResult:
        if int(model.ir_version or 0) < 4:
            return optcc.PassResult(model, False, {})
        graph = model.graph
        stored = sum(_store(graph, node) for node in list(graph))
        stats = {"stored": stored} if stored else {}
        return optcc.PassResult(model, bool(stored), stats)
