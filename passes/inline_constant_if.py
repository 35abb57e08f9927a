"""InlineConstantIfPass: replace an If whose condition is a constant by the branch it takes.

Rewrite: ``outs = If(c)`` with ``c`` a constant (an initializer that is not a graph input,
or a Constant node) holding one boolean: the nodes of ``then_branch`` (``c`` true) or
``else_branch`` (``c`` false) move, in their order, into the enclosing graph just before
the If, every use of the If's k-th output reads the branch's k-th output instead, and the
If is removed. In every graph (main graph, functions, If/Loop/Scan bodies, inner graphs
first so an inlined branch holds no If left to inline).

Preconditions (otherwise the If stays): default domain; the taken branch has no inputs
and no initializers, as many outputs as the If, each produced by a node of the branch and
each a different value; an If output that is a graph output hands its name (and declared
type and shape) to the branch's value, as ``eliminate-identities`` does. Moved values and
nodes whose names are already used anywhere in the model get fresh ones (two inlined
branches may both define ``C``); the two branches' own names are free once the If is gone.

Exact: an If with a constant condition runs the taken branch's nodes on the same values;
run in the enclosing graph they are the same kernels on the same inputs (a branch reads
outer values by reference). The branch not taken computes nothing either way.
"""

from __future__ import annotations

import collections

import onnx_ir as ir

import optcc
from optcc.passes.eliminate_noops import bypass
from optcc.ir import const_array

__all__ = ["InlineConstantIfPass"]

_DEFAULT_DOMAINS = ("", "ai.onnx")


def _taken_branch(node: ir.Node) -> ir.Graph | None:
    if node.op_type != "If" or node.domain not in _DEFAULT_DOMAINS or not node.inputs or node.inputs[0] is None:
        return None
    condition = const_array(node.inputs[0])
    if condition is None or condition.size != 1 or condition.dtype != bool:
        return None
    attribute = node.attributes.get("then_branch" if bool(condition.reshape(-1)[0]) else "else_branch")
    if attribute is None or attribute.type != ir.AttributeType.GRAPH:
        return None
    branch = attribute.as_graph()
    outputs = list(branch.outputs)
    if branch.inputs or branch.initializers or len(outputs) != len(node.outputs):
        return None
    if len({id(v) for v in outputs}) != len(outputs):
        return None
    if any(v.producer() is None or v.producer().graph is not branch for v in outputs):
        return None
    return branch


def _fresh(name: str, names: collections.Counter[str]) -> str:
    """``name`` when no other value (or node) of the model uses it, else a fresh one."""
    if names[name] > 0:
        k = 1
        while names[f"{name}_inlined{k}"] > 0:
            k += 1
        name = f"{name}_inlined{k}"
    names[name] += 1
    return name


def _inline(node: ir.Node, branch: ir.Graph, names: collections.Counter[str],
            node_names: collections.Counter[str]) -> None:
    graph = node.graph
    assert graph is not None
    for sub in optcc.ir.subgraphs(node):  # both branches leave the model (one emptied)
        names.subtract(v.name for v in _values(sub) if v.name)
        node_names.subtract(n.name for n in sub if n.name)
    outputs = list(branch.outputs)
    branch.outputs.clear()
    for inner in list(branch):
        branch.remove(inner)
        graph.insert_before(node, inner)
        if inner.name:
            inner.name = _fresh(inner.name, node_names)
        for value in inner.outputs:
            if value.name:
                value.name = _fresh(value.name, names)
    for result, source in zip(list(node.outputs), outputs):
        handed = bypass(node, result, source)  # done outside the assert: it holds under -O too
        assert handed  # every source is an ordinary value of graph


class InlineConstantIfPass(optcc.Pass):
    """Inline the taken branch of an If with a constant condition.

    Preconditions and why it is exact: see the module docstring.
    """

    name = "inline-constant-if"
    numerics = "exact"
    triggers = frozenset({"If"})

    def call(self, model: ir.Model) -> optcc.PassResult:
        graph_likes = list(optcc.ir.graphs(model))
        if len(graph_likes) == 1:  # no bodies: no If with a branch to inline
            return optcc.PassResult(model, False, {})
        names = collections.Counter(v.name for g in optcc.ir.graphs(model) for v in _values(g) if v.name)
        node_names = collections.Counter(n.name for g in optcc.ir.graphs(model) for n in g if n.name)
        inlined = 0
        for graph in reversed(graph_likes):  # bodies before their parents
            for node in list(graph):
                if node.graph is not graph:
                    continue
                branch = _taken_branch(node)
                if branch is not None:
                    _inline(node, branch, names, node_names)
                    inlined += 1
        return optcc.PassResult(model, bool(inlined), {"inlined": inlined} if inlined else {})


def _values(graph: ir.Graph | ir.Function) -> list[ir.Value]:
    values = list(graph.inputs)
    if isinstance(graph, ir.Graph):
        values += list(graph.initializers.values())
    for node in graph:
        values += [v for v in node.outputs]
    return values
