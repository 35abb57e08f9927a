"""When fold-constants may reuse a shape inference instead of running it again.

``InferenceSnapshot.of(model)`` records the main graph as shape inference saw it (each
node's inputs and outputs, the outputs' names). ``still_holds(model, findings)`` says
whether inference run on the model now would find the same shapes for every value a
Shape/Size node read then, so that shape folding may use ``findings`` again. It holds
when, in the ancestors of those values (their "cone", as recorded) and in the Shape/Size
nodes themselves:

- every node is still in the main graph with the same inputs, or was removed with none
  of its outputs read any more (a fold, or a dead constant); or
- a node's input was replaced by an initializer that inference cannot tell from the value
  it replaced: inference had found that value's exact static dims and elem type, which
  the initializer has; it is not an int32/int64 tensor of rank 0 or 1 (the only
  initializers onnx's data propagation reads); and the node is of a kind whose shape
  inference reads its inputs' types and dims only (``DATA_BLIND_OPS``).

Inference derives a value's type from its ancestors alone (nodes outside the cone do not
reach it), and a node whose inputs look the same to inference gets the same output
types, so by induction every recorded value gets the same shape. Only models without
functions and subgraphs (no captured values) qualify; anything else never reuses.
"""

from __future__ import annotations

import onnx_ir as ir

import optcc
from optcc.passes.fold_shapes import ShapeFindings

__all__ = ["InferenceSnapshot", "DATA_BLIND_OPS"]

_DEFAULT_DOMAINS = ("", "ai.onnx")
# default-domain ops whose shape inference reads no input's data, only types and dims
# (onnx's data propagation runs for some of them, e.g. Add, but on int32/int64 tensors of
# rank 0 or 1 only, which never count as unchanged below)
DATA_BLIND_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Max", "Min", "Conv", "ConvTranspose", "MatMul", "Gemm",
    "BatchNormalization", "InstanceNormalization", "LayerNormalization", "PRelu",
})
_SHAPE_LIKE = frozenset({ir.DataType.INT32, ir.DataType.INT64})


class InferenceSnapshot:
    """The main graph as one shape inference saw it (see the module docstring)."""

    def __init__(self, graph: ir.Graph | None, nodes: dict[ir.Node, tuple[tuple, tuple]],
                 names: dict[ir.Value, str | None]) -> None:
        self.graph = graph  # None: the model does not qualify
        self.nodes = nodes
        self.names = names

    @classmethod
    def of(cls, model: ir.Model) -> InferenceSnapshot:
        graph = model.graph
        if len(model.functions) or any(optcc.ir.subgraphs(n) for n in graph):
            return cls(None, {}, {})
        nodes = {node: (tuple(node.inputs), tuple(node.outputs)) for node in graph}
        names = {value: value.name for _, outputs in nodes.values() for value in outputs}
        return cls(graph, nodes, names)

    def still_holds(self, model: ir.Model, findings: ShapeFindings) -> bool:
        """Whether inference now would find ``findings.shapes`` again (see the module docstring)."""
        if self.graph is None or model.graph is not self.graph or not findings.infos:
            return False
        for node in self._cone():
            inputs, outputs = self.nodes[node]
            if node.graph is None:  # removed: nothing may read what it computed
                if any(v.uses() or v.is_graph_output() for v in outputs):
                    return False
                continue
            if node.graph is not self.graph:
                return False
            now = tuple(node.inputs)
            if now == inputs:
                continue
            if len(now) != len(inputs) or node.domain not in _DEFAULT_DOMAINS or node.op_type not in DATA_BLIND_OPS:
                return False
            for old, new in zip(inputs, now):
                if old is not new and not self._looks_the_same(old, new, findings):
                    return False
        return True

    def _cone(self) -> set[ir.Node]:
        """The Shape/Size nodes recorded and the recorded ancestors of what they read."""
        producer = {value: node for node, (_, outputs) in self.nodes.items() for value in outputs}
        cone = {n for n in self.nodes if n.op_type in ("Shape", "Size") and n.domain in _DEFAULT_DOMAINS}
        stack = [v for n in cone for v in self.nodes[n][0]]
        while stack:
            node = producer.get(stack.pop())
            if node is not None and node not in cone:
                cone.add(node)
                stack.extend(self.nodes[node][0])
        return cone

    def _looks_the_same(self, old: ir.Value | None, new: ir.Value | None, findings: ShapeFindings) -> bool:
        """Whether inference reads the initializer ``new`` as it read the value ``old``."""
        if old is None or new is None or old not in self.names:
            return False
        tensor = new.const_value
        if not new.is_initializer() or new.is_graph_input() or tensor is None:
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
        return not (tensor.dtype in _SHAPE_LIKE and len(dims) <= 1)
