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


class NormalizeGraphPass(optcc.Pass):
    """Sort nodes topologically and give every node and value a unique name."""

    name = "normalize"
    numerics = "exact"

    def call(self, model: ir.Model) -> optcc.PassResult:
        sorted_ = TopologicalSortPass()(model).modified
        named = NameFixPass()(model).modified
        return optcc.PassResult(model, sorted_ or named, {"sorted": sorted_, "renamed": named})
