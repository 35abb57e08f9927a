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


def _already_sorted(model: ir.Model) -> bool:
    """Whether the sort would leave every node where it is, decided in one pass: a model
    without functions or bodies whose main graph defines every value before its use.
    onnx-ir's sort is stable (it pops the ready node latest in the current order first,
    from the outputs up), so on an order that is already topological it pops the nodes
    last to first and restores the same order."""
    return len(list(optcc.ir.graphs(model))) == 1 and optcc.ir.first_order_problem(model) is None


class NormalizeGraphPass(optcc.Pass):
    """Sort nodes topologically and give every node and value a unique name."""

    name = "normalize"
    numerics = "exact"

    def call(self, model: ir.Model) -> optcc.PassResult:
        sorted_ = False if _already_sorted(model) else TopologicalSortPass()(model).modified
        named = NameFixPass()(model).modified
        return optcc.PassResult(model, sorted_ or named, {"sorted": sorted_, "renamed": named})
