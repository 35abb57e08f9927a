"""DeduplicateInitializersPass: keep one copy of initializers with identical contents.

Rewrite: an initializer with the same dtype, shape and bytes as an earlier one of its
graph, or of an enclosing graph (a body reads outer values by name), is removed and its
readers read the kept one. Graph inputs that are also initializers are never merged,
neither removed nor kept (a caller may override them), and neither are graph outputs.
A kept value of an enclosing graph is used only when its name is defined nowhere else
in the model, so name lookup from the body cannot find another value.

Reading weights: initializers are first grouped by (dtype, shape); only groups of two or
more are read, each tensor once to hash it (SHA-256 over its bytes; external data is
read through onnx-ir's memory map, never copied whole), and a hash match is confirmed
byte for byte before anything is removed.

onnx-ir's ``DeduplicateInitializersPass`` (default size limit 1024 elements) and
``DeduplicateHashedInitializersPass`` (reads every tensor, even those no other tensor
could equal) only deduplicate within each graph and log a warning for every initializer
that is a graph input (every one in older models); this pass does the cross-scope case
and stays quiet.

Exact: readers get a tensor with identical dtype, shape and bytes.
"""

from __future__ import annotations

import collections
import hashlib

import numpy as np
import onnx_ir as ir

import optcc

__all__ = ["DeduplicateInitializersPass"]


def _data(tensor: ir.TensorProtocol) -> np.ndarray:
    """The tensor's bytes as a flat uint8 array (a view where the storage allows)."""
    if tensor.dtype == ir.DataType.STRING:
        joined = b"".join(len(s).to_bytes(8, "little") + s for s in tensor.string_data())
        return np.frombuffer(joined, dtype=np.uint8)
    array = np.ascontiguousarray(tensor.numpy())
    return array.reshape(-1).view(np.uint8)


def _digest(tensor: ir.TensorProtocol) -> bytes:
    return hashlib.sha256(_data(tensor)).digest()


def _candidates(graph: ir.Graph) -> list[ir.Value]:
    return [
        v
        for v in graph.initializers.values()
        if v.const_value is not None and not v.is_graph_input() and not v.is_graph_output()
    ]


def _group(value: ir.Value) -> tuple[ir.DataType, tuple[int, ...]]:
    tensor = value.const_value
    assert tensor is not None
    return tensor.dtype, tuple(tensor.shape)


def _defined_names(model: ir.Model) -> collections.Counter[str]:
    names: collections.Counter[str] = collections.Counter()
    for graph in optcc.ir.graphs(model):
        names.update(v.name for v in graph.inputs if v.name)
        if isinstance(graph, ir.Graph):
            names.update(n for n, v in graph.initializers.items() if not v.is_graph_input())
        for node in graph:
            names.update(v.name for v in node.outputs if v.name)
    return names


def _enclosing_graphs(model: ir.Model) -> dict[int, list[ir.Graph]]:
    """For each graph (by id): itself and the graphs around it, innermost first (onnx-ir
    graphs do not link to the node that holds them, so the chains are built here)."""
    chains: dict[int, list[ir.Graph]] = {id(model.graph): [model.graph]}
    for graph in optcc.ir.graphs(model):  # parents come before their bodies
        outer = chains.get(id(graph), [])
        for node in graph:
            for body in optcc.ir.subgraphs(node):
                chains[id(body)] = [body, *outer]
    return chains


class DeduplicateInitializersPass(optcc.Pass):
    """Merge initializers with equal dtype, shape and bytes, across If/Loop/Scan scopes.

    Preconditions and how weights are read: see the module docstring.
    """

    name = "deduplicate-initializers"
    numerics = "exact"

    def call(self, model: ir.Model) -> optcc.PassResult:
        graphs = [g for g in optcc.ir.graphs(model) if isinstance(g, ir.Graph)]
        sizes = collections.Counter(_group(v) for g in graphs for v in _candidates(g))
        if len(graphs) == 1:  # no bodies: no enclosing scope, no shadowing to check
            names: collections.Counter[str] = collections.Counter()
            chains = {id(model.graph): [model.graph]}
        else:
            names = _defined_names(model)
            chains = _enclosing_graphs(model)
        kept: dict[int, dict[tuple[object, ...], ir.Value]] = {}  # id(graph) -> key -> value
        removed, saved = 0, 0
        for graph in graphs:  # enclosing graphs come before their bodies
            table = kept.setdefault(id(graph), {})
            for value in _candidates(graph):
                group = _group(value)
                if sizes[group] < 2:
                    continue
                key = (*group, _digest(value.const_value))
                match = self._find(key, value, chains.get(id(graph), [graph]), kept, names)
                if match is None:
                    table.setdefault(key, value)
                    continue
                value.replace_all_uses_with(match)
                del graph.initializers[value.name]
                removed += 1
                saved += int(value.const_value.nbytes)
        stats = {"initializers": removed, "bytes": saved} if removed else {}
        return optcc.PassResult(model, bool(removed), stats)

    @staticmethod
    def _find(
        key: tuple[object, ...],
        value: ir.Value,
        scopes: list[ir.Graph],
        kept: dict[int, dict[tuple[object, ...], ir.Value]],
        names: collections.Counter[str],
    ) -> ir.Value | None:
        for scope in scopes:
            match = kept.get(id(scope), {}).get(key)
            if match is None:
                continue
            if scope is not scopes[0] and names[match.name] != 1:
                continue  # another value of that name could shadow it inside the body
            assert match.const_value is not None and value.const_value is not None
            if np.array_equal(_data(match.const_value), _data(value.const_value)):
                return match
        return None
