"""EliminateDeadNodesPass: remove what no graph output depends on.

Rewrite: nodes whose outputs are unused (in every graph, function and If/Loop/Scan body,
uses from inside bodies counted), unused trailing optional outputs, unused initializers
(of the main graph and of bodies), model-local functions no node calls, and opset
imports no node uses. onnx-ir's ``RemoveUnusedNodesPass``, ``RemoveUnusedFunctionsPass``
and ``RemoveUnusedOpsetsPass`` do the work (tests/test_passes_elimination.py shows they
are correct on the cases that matter); this pass adds body initializers and stats.
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


def _counts(model: ir.Model) -> tuple[int, int]:
    """Nodes and initializers in every graph of the model (one walk)."""
    graph_likes = list(optcc.ir.graphs(model))
    return (sum(len(g) for g in graph_likes),
            sum(len(g.initializers) for g in graph_likes if isinstance(g, ir.Graph)))


class EliminateDeadNodesPass(optcc.Pass):
    """Remove unused nodes, initializers, functions and opset imports, in every graph."""

    name = "eliminate-dead-nodes"
    numerics = "exact"

    def call(self, model: ir.Model) -> optcc.PassResult:
        nodes_before, inits_before = _counts(model)
        functions_before = len(model.functions)
        opsets_before = len(model.opset_imports)
        modified = RemoveUnusedNodesPass()(model).modified
        while _drop_detached_uses(model):
            modified |= RemoveUnusedNodesPass()(model).modified
        if model.functions:  # with none there is nothing to remove
            modified |= RemoveUnusedFunctionsPass()(model).modified
        if not _opsets_all_used(model):
            modified |= RemoveUnusedOpsetsPass()(model).modified
        body_inits = _remove_unused_body_initializers(model)
        modified |= bool(body_inits)
        nodes_after, inits_after = _counts(model)
        stats = {
            "nodes": nodes_before - nodes_after,
            "initializers": inits_before - inits_after,
            "functions": functions_before - len(model.functions),
            "opset_imports": opsets_before - len(model.opset_imports),
        }
        return optcc.PassResult(model, modified, {k: v for k, v in stats.items() if v})
