"""EliminateDeadNodesPass: remove what no graph output depends on.

Rewrite: nodes whose outputs are unused (in every graph, function and If/Loop/Scan body,
uses from inside bodies counted), unused trailing optional outputs, unused initializers
(of the main graph and of bodies), model-local functions no node calls, and opset
imports no node uses. onnx-ir's ``RemoveUnusedNodesPass``, ``RemoveUnusedFunctionsPass``
and ``RemoveUnusedOpsetsPass`` do the work (tests/test_passes_elimination.py shows they
are correct on the cases that matter); this pass adds body initializers and stats.
A model without bodies or functions in which every node is needed and nothing else
would change (``_all_needed``) is left as it is without running them.
Preconditions: none. Graph inputs and outputs are never removed.
Exact: removed nodes computed values nothing reads; ONNX ops have no side effects.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import (
    RemoveUnusedFunctionsPass,
    RemoveUnusedNodesPass,
    RemoveUnusedOpsetsPass,
)

import optcc


def _remove_unused_body_initializers(model: ir.Model) -> int:
    removed = 0
    for graph in optcc.ir.graphs(model):
        if graph is model.graph or not isinstance(graph, ir.Graph):
            continue  # the main graph's initializers are handled by RemoveUnusedNodesPass
        for value in list(graph.initializers.values()):
            if not (value.uses() or value.is_graph_output() or value.is_graph_input()):
                del graph.initializers[value.name]
                removed += 1
    return removed


def _drop_detached_uses(model: ir.Model) -> int:
    """Forget uses by nodes no longer in the model (e.g. inside the body of a removed If),
    so values read only there count as dead."""
    graph_likes = list(optcc.ir.graphs(model))
    if len(graph_likes) == 1:
        # no bodies, no functions: a node is in the model exactly when it is in the main
        # graph (a removed node's graph is None, a detached body's node belongs to it)
        main = model.graph
        is_live = lambda node: node.graph is main  # noqa: E731
    else:
        live = set(optcc.ir.nodes(model))
        is_live = live.__contains__
    dropped = 0
    for graph in graph_likes:
        values = [*graph.inputs, *(v for n in graph for v in n.outputs)]
        if isinstance(graph, ir.Graph):
            values += list(graph.initializers.values())
        for value in values:
            for use in list(value.uses()):
                if not is_live(use.node):
                    use.node.replace_input_with(use.idx, None)
                    dropped += 1
    return dropped


def _opsets_all_used(model: ir.Model) -> bool:
    """Whether ``RemoveUnusedOpsetsPass`` has nothing to remove, decided without a walk:
    without functions it keeps the default domain and every domain a node uses."""
    return not model.functions and all(domain == "" for domain in model.opset_imports)


def _counts(graph_likes: list[ir.Graph | ir.Function]) -> tuple[int, int]:
    """Nodes and initializers in these graphs."""
    return (sum(len(g) for g in graph_likes),
            sum(len(g.initializers) for g in graph_likes if isinstance(g, ir.Graph)))


def _all_needed(graph: ir.Graph) -> bool:
    """Whether ``RemoveUnusedNodesPass`` would leave ``graph`` (a model's only graph-like)
    exactly as it is and no use is detached: every node has outputs, each named and read
    by a node of the graph or a graph output; no node ends with an omitted input; no
    BatchNormalization has a ``training_mode`` attribute (which it may drop); every
    initializer is read or is a graph input or output. One walk, no schema lookups."""
    outputs = frozenset(graph.outputs)

    def live(value: ir.Value) -> bool:
        uses = value.uses()
        return all(use.node.graph is graph for use in uses) and (bool(uses) or value in outputs)

    if not all(live(v) or not v.uses() for v in graph.inputs):
        return False  # a graph input read by a detached node
    for node in graph:
        node_outputs = node.outputs
        if not node_outputs:
            return False
        for value in node_outputs:
            if not value.name or not live(value):
                return False
        inputs = node.inputs
        if inputs and inputs[-1] is None:
            return False
        if node.op_type == "BatchNormalization" and "training_mode" in node.attributes:
            return False
    for value in graph.initializers.values():
        if not (live(value) or (value.is_graph_input() and not value.uses())):
            return False
    return True


class EliminateDeadNodesPass(optcc.Pass):
    """Remove unused nodes, initializers, functions and opset imports, in every graph."""

    name = "eliminate-dead-nodes"
    numerics = "exact"

    def call(self, model: ir.Model) -> optcc.PassResult:
        graph_likes = list(optcc.ir.graphs(model))
        nodes_before, inits_before = _counts(graph_likes)
        functions_before = len(model.functions)
        opsets_before = len(model.opset_imports)
        if len(graph_likes) == 1 and not model.functions and _all_needed(model.graph):
            modified = False  # what the removal passes would find: nothing
        else:
            modified = RemoveUnusedNodesPass()(model).modified
            while _drop_detached_uses(model):
                modified |= RemoveUnusedNodesPass()(model).modified
        if model.functions:  # with none there is nothing to remove
            modified |= RemoveUnusedFunctionsPass()(model).modified
        if not _opsets_all_used(model):
            modified |= RemoveUnusedOpsetsPass()(model).modified
        body_inits = _remove_unused_body_initializers(model)
        modified |= bool(body_inits)
        nodes_after, inits_after = _counts(list(optcc.ir.graphs(model)))
        stats = {
            "nodes": nodes_before - nodes_after,
            "initializers": inits_before - inits_after,
            "functions": functions_before - len(model.functions),
            "opset_imports": opsets_before - len(model.opset_imports),
        }
        return optcc.PassResult(model, modified, {k: v for k, v in stats.items() if v})
