"""CancelTransposePairsPass: a Transpose pair that cancels becomes one Identity.

Rewrite: ``z = Transpose(Transpose(x, p1), p2)`` with ``p1[p2[i]] == i`` for every ``i``
(default perms: the reversal of the rank, so two of them always cancel) becomes
``z = Identity(x)``, the first Transpose removed. ``merge-consecutive`` already removes
such pairs where ``x`` can take over ``z``'s uses or name; this covers the pair it must
leave, ``z`` a graph output that ``x`` cannot take the name of (a graph input, an
initializer, another graph output, a value of an enclosing graph), where an Identity
is the least that keeps the output.

Preconditions: default-domain Transposes in any graph; the first one's output read by
the second only and no graph output (else nothing is saved: it stays); a default perm
needs the rank of ``x``, ``y`` or ``z``.

Why exact: composing the two transpositions gives the identity permutation, so ``z``
holds the elements of ``x`` at the same positions in the same shape; Identity copies
them bit for bit.
"""

from __future__ import annotations

import onnx_ir as ir

import optcc
from optcc.passes.eliminate_noops import remove_if_dead
from optcc.passes.merge_consecutive import transpose_perm

__all__ = ["CancelTransposePairsPass"]

_DEFAULT_DOMAINS = ("", "ai.onnx")


def _transpose(node: ir.Node | None) -> bool:
    return (node is not None and node.op_type == "Transpose" and node.domain in _DEFAULT_DOMAINS
            and len(node.inputs) == 1 and node.inputs[0] is not None and len(node.outputs) == 1)


def _cancels(first: ir.Node, second: ir.Node) -> bool:
    values = (first.inputs[0], first.outputs[0], second.outputs[0])
    rank = next((v.shape.rank() for v in values if v.shape is not None), None)
    p1, p2 = transpose_perm(first, rank), transpose_perm(second, rank)
    if p1 is None or p2 is None or len(p1) != len(p2) or sorted(p1) != list(range(len(p1))):
        return False
    return sorted(p2) == sorted(p1) and [p1[i] for i in p2] == list(range(len(p1)))


class CancelTransposePairsPass(optcc.Pass):
    """Turn ``Transpose(Transpose(x, p1), p2)`` with ``p1 . p2`` the identity into
    ``Identity(x)``.

    Rewrite, preconditions and why it is exact: see the module docstring.
    """

    name = "cancel-transpose-pairs"
    numerics = "exact"
    triggers = frozenset({"Transpose"})

    def call(self, model: ir.Model) -> optcc.PassResult:
        count = 0
        for graph in optcc.ir.graphs(model):
            for node in list(graph):
                if node.graph is None or not _transpose(node):
                    continue
                first = node.inputs[0].producer()
                if not _transpose(first) or first.graph is not node.graph:
                    continue
                y = first.outputs[0]
                if y.is_graph_output() or any(use.node is not node for use in y.uses()):
                    continue
                if not _cancels(first, node):
                    continue
                node.op_type = "Identity"
                node.attributes.pop("perm", None)
                node.replace_input_with(0, first.inputs[0])
                remove_if_dead(first)
                count += 1
        return optcc.PassResult(model, bool(count), {"cancelled": count} if count else {})
