"""LiftConstantsPass: turn the main graph's Constant nodes into initializers.

Rewrite: ``y = Constant(value=T)`` (or ``value_float(s)``/``value_int(s)``/
``value_string(s)``) in the main graph becomes an initializer named ``y`` holding the same
tensor; the node is removed. Readers (in the main graph and in If/Loop/Scan bodies, which
see the main graph's initializers) keep reading the value of the same name.

With ``upgrade_legacy=True`` a model below IR version 4 is first moved to IR version 4:
its initializers stop being listed as graph inputs (those that nothing reads are dropped).
Below IR version 4 such inputs are constants that no caller can feed (onnxruntime does
not list them as inputs, and rejects a feed for one), so the callable interface is
unchanged; the pass manager's signature leaves such inputs out for the same reason.
onnxsim makes the same move.

Preconditions: IR version >= 4 (below it every initializer must also be a graph input,
which would change the model's interface); a default-domain Constant with one attribute
whose data is known (sparse tensors and attribute references stay nodes); its output not
a graph output (an initializer that is also an output is left to the exporter's form);
main graph only (functions have no initializers; bodies keep their Constants, which other
runtimes handle best).
Exact: an initializer and a Constant node hold the same tensor; no value changes.
"""

from __future__ import annotations

from collections.abc import Iterable

import onnx_ir as ir

import optcc

__all__ = ["LiftConstantsPass"]

_DEFAULT_DOMAINS = ("", "ai.onnx")


def _dims(tensor: ir.TensorProtocol) -> Iterable[int]:
    """The tensor's dims: a parsed tensor's read from its proto (its ``shape`` builds a
    Shape of them each time)."""
    return tensor.raw.dims if type(tensor) is ir.serde.TensorProtoTensor else tensor.shape


def _lift(graph: ir.Graph, node: ir.Node) -> bool:
    """Make the Constant's readers read a new initializer of its output's name holding its
    tensor (False: left as it is). The node, unread then, is left for the caller to remove."""
    output = node.outputs[0]
    if output.is_graph_output() or not output.name or output.name in graph.initializers:
        return False
    try:
        tensor = optcc.ir.const_tensor(output)
    except ValueError:  # sparse_value or a malformed Constant: leave it
        return False
    if tensor is None:  # an attribute reference (inside a function)
        return False
    name = output.name
    value = ir.Value(name=None, type=ir.TensorType(tensor.dtype), shape=ir.Shape(_dims(tensor)), const_value=tensor)
    output.replace_all_uses_with(value)
    output.name = None  # the name passes to the initializer
    value.name = name
    graph.register_initializer(value)
    return True


class LiftConstantsPass(optcc.Pass):
    """Store the main graph's Constant nodes as initializers (IR version >= 4)."""

    name = "lift-constants"
    numerics = "exact"

    def __init__(self, upgrade_legacy: bool = True) -> None:
        super().__init__()
        self.upgrade_legacy = upgrade_legacy

    def __repr__(self) -> str:
        return f"LiftConstantsPass(upgrade_legacy={self.upgrade_legacy})"

    def call(self, model: ir.Model) -> optcc.PassResult:
        stats: dict[str, int] = {}
        if int(model.ir_version or 0) < 4:
            if not self.upgrade_legacy:
                return optcc.PassResult(model, False, {})
            stats["unlisted_constant_inputs"] = optcc.ir.upgrade_legacy_ir(model)
        graph = model.graph
        lifted = [node for node in list(graph)
                  if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS
                  and len(node.outputs) == 1 and len(node.attributes) == 1 and _lift(graph, node)]
        if lifted:
            graph.remove(lifted, safe=True)  # one call: its checks and set-up once for all
            stats["lifted"] = len(lifted)
        return optcc.PassResult(model, bool(stats), stats)
