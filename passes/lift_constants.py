"""LiftConstantsPass: turn the Constant nodes of the main graph and of its bodies into
main-graph initializers.

Rewrite: ``y = Constant(value=T)`` (or ``value_float(s)``/``value_int(s)``/
``value_string(s)``) in the main graph, or in an If/Loop/Scan body nested in it, becomes a
main-graph initializer named ``y`` holding the same tensor; the node is removed. Readers
(in the main graph and in the bodies, which see the main graph's initializers as outer-scope
values) keep reading the value of the same name.

With ``upgrade_legacy=True`` a model below IR version 4 is first moved to IR version 4:
its initializers stop being listed as graph inputs (those that nothing reads are dropped).
Below IR version 4 such inputs are constants that no caller can feed (onnxruntime does
not list them as inputs, and rejects a feed for one), so the callable interface is
unchanged; the pass manager's signature leaves such inputs out for the same reason.
onnxsim makes the same move.

Preconditions: IR version >= 4 (below it every initializer must also be a graph input,
which would change the model's interface); a default-domain Constant with one attribute
whose data is known (sparse tensors and attribute references stay nodes); its output not
an output of its own graph (an initializer that is also an output is left to the exporter's
form; a body's output must be computed in the body); a body Constant's name given to no
other value of the model (sibling bodies may reuse a name, which one main-graph name cannot
hold for both); functions and their bodies are left alone (they see no initializers), and
so are graphs held by custom-domain ops (their runtime may run them apart from the outer
scope).
Exact: an initializer and a Constant node hold the same tensor, and a body reads an
outer-scope value as it reads its own (a Loop body's Constant holds the same tensor at
every iteration); no value changes.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator

import onnx_ir as ir

import optcc

__all__ = ["LiftConstantsPass"]

_DEFAULT_DOMAINS = ("", "ai.onnx")
# ops whose bodies read outer-scope values by the ONNX spec
_SCOPED_OPS = frozenset({"If", "Loop", "Scan"})


def _dims(tensor: ir.TensorProtocol) -> Iterable[int]:
    """The tensor's dims: a parsed tensor's read from its proto (its ``shape`` builds a
    Shape of them each time)."""
    return tensor.raw.dims if type(tensor) is ir.serde.TensorProtoTensor else tensor.shape


def _scopes(graph: ir.Graph, scoped_only: bool = True) -> Iterator[ir.Graph]:
    """``graph`` and every If/Loop/Scan body nested in it, parents first (a custom op's
    graphs may run where the outer scope is not seen: they are not entered unless
    ``scoped_only`` is False, which walks every graph nested in ``graph``)."""
    yield graph
    for node in graph:
        if not scoped_only or node.op_type in _SCOPED_OPS and node.domain in _DEFAULT_DOMAINS:
            for body in optcc.ir.subgraphs(node):
                yield from _scopes(body, scoped_only)


def _defined(graph: ir.Graph) -> Iterator[ir.Value]:
    """The values ``graph`` itself defines: its inputs, initializers and node outputs."""
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph:
        yield from node.outputs


def _lift(graph: ir.Graph, node: ir.Node) -> bool:
    """Make the Constant's readers read a new initializer of ``graph`` (the main graph) of its
    output's name holding its tensor (False: left as it is). The node, unread then, is left
    for the caller to remove."""
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
    """Store the Constant nodes of the main graph and its bodies as main-graph initializers
    (IR version >= 4)."""

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
        main = model.graph
        scopes = list(_scopes(main))
        # names that more than one value of the main graph and every graph nested in it (a custom
        # op's too) holds: no main-graph initializer can take them
        counts = collections.Counter(value.name for graph in _scopes(main, scoped_only=False)
                                     for value in _defined(graph)) if len(scopes) > 1 else {}
        lifted = 0
        for graph in scopes:
            nodes = [node for node in list(graph)
                     if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS
                     and len(node.outputs) == 1 and len(node.attributes) == 1
                     and (graph is main or counts[node.outputs[0].name] == 1) and _lift(main, node)]
            if nodes:
                graph.remove(nodes, safe=True)  # one call: its checks and set-up once for all
                lifted += len(nodes)
        if lifted:
            stats["lifted"] = lifted
        return optcc.PassResult(model, bool(stats), stats)
