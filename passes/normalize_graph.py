"""NormalizeGraphPass: topological order and a unique name for every node and value.

Rewrite: nodes of every graph and function are stably sorted into topological order
(onnx-ir's ``TopologicalSortPass``); unnamed nodes and values get unique names and
duplicated node names are made unique (onnx-ir's ``NameFixPass``).
Preconditions: none (a graph with a cycle is refused at load time).
Exact: only order and names change; every node computes what it did.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import NameFixPass, TopologicalSortPass

import optcc


def _already_named(graph: ir.Graph) -> bool:
    """Whether onnx-ir's NameFixPass would rename nothing in ``graph``, the model's only
    graph (no functions, no bodies): its nodes all have names of their own, as do its
    values (graph inputs and outputs, initializers, node inputs and outputs). That pass
    names only an unnamed node or value, and renames only the second holder of a name
    used twice in one scope, which such a graph is."""
    values = {*graph.inputs, *graph.outputs, *graph.initializers.values()}
    node_names = set()
    for node in graph:
        name = node.name
        if not name or name in node_names:
            return False  # the first unnamed or repeated node name: no need to read further
        node_names.add(name)
        values.update(node.inputs)
        values.update(node.outputs)
    values.discard(None)  # an omitted optional input
    value_names = [v.name for v in values]
    return all(value_names) and len(set(value_names)) == len(value_names)


class NormalizeGraphPass(optcc.Pass):
    """Sort nodes topologically and give every node and value a unique name."""

    name = "normalize"
    numerics = "exact"

    def call(self, model: ir.Model) -> optcc.PassResult:
        one_graph = len(list(optcc.ir.graphs(model))) == 1  # no functions, no bodies
        # onnx-ir's sort is stable (it pops the ready node latest in the current order first,
        # from the outputs up): on a graph already in topological order it changes nothing
        sorted_ = False if one_graph and optcc.ir.first_order_problem(model) is None \
            else TopologicalSortPass()(model).modified
        named = False if one_graph and _already_named(model.graph) else NameFixPass()(model).modified
        return optcc.PassResult(model, sorted_ or named, {"sorted": sorted_, "renamed": named})
