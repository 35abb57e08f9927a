"""The part of a graph from one of its nodes on, as a model of its own.

A graph's nodes are in topological order, so the nodes from position ``start`` on read
only graph inputs, initializers, values computed among them, and the values the nodes
before ``start`` computed (the cut's ``frontier``). ``suffix`` makes those nodes a model
whose inputs are the graph inputs they read and that frontier: fed the values a run of the
whole model computed, it computes what the whole model computes from ``start`` on,
without the nodes before it.
"""

from __future__ import annotations

from collections.abc import Mapping

import onnx

__all__ = ["cuttable", "frontier", "suffix"]


def cuttable(proto: onnx.ModelProto) -> bool:
    """Whether every value a node of the main graph reads is one of its inputs: no node
    holds a subgraph (which can read the outer graph's values by name)."""
    return not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                   for node in proto.graph.node for a in node.attribute)


def frontier(proto: onnx.ModelProto, start: int) -> list[str]:
    """The values the nodes before position ``start`` compute that the nodes from ``start``
    on read, in the order first read (``cuttable`` models)."""
    before = {o for node in proto.graph.node[:start] for o in node.output if o}
    return list(dict.fromkeys(x for node in proto.graph.node[start:] for x in node.input if x in before))


def suffix(proto: onnx.ModelProto, start: int, types: Mapping[str, int]) -> onnx.ModelProto:
    """A model of the nodes of ``proto`` from position ``start`` on (``cuttable`` models):
    its inputs are the graph inputs those nodes read and the cut's ``frontier`` (each of
    element type ``types[name]``, any shape), its initializers those they read, its
    outputs the graph outputs they compute."""
    graph = proto.graph
    nodes = graph.node[start:]
    read = {x for node in nodes for x in node.input if x}
    computed = {o for node in nodes for o in node.output if o}
    cut = onnx.ModelProto()
    cut.CopyFrom(proto)  # the model's metadata and opsets; its graph is rebuilt below
    del cut.graph.node[:], cut.graph.input[:], cut.graph.output[:], cut.graph.initializer[:], cut.graph.value_info[:]
    cut.graph.node.extend(nodes)
    cut.graph.input.extend(v for v in graph.input if v.name in read)
    cut.graph.input.extend(onnx.helper.make_tensor_value_info(name, types[name], None)
                           for name in frontier(proto, start))
    cut.graph.initializer.extend(i for i in graph.initializer if i.name in read)
    cut.graph.output.extend(v for v in graph.output if v.name in computed)
    return cut
