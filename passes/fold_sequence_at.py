"""FoldSequenceAtPass: an element read back from a sequence just built is the tensor put there.

Rewrite: ``y = SequenceAt(SequenceConstruct(x_0, ..., x_{n-1}), k)`` with ``k`` a constant
becomes ``x_k`` (``x_{k+n}`` for a negative ``k``): every use of ``y`` reads it, and the
SequenceConstruct goes once nothing else reads the sequence (eliminate-dead-nodes). This
is what onnxscript's optimizer does with ``SequenceAt`` after constant folding.

Preconditions: default-domain ops in any graph; ``k`` a scalar (or one-element) integer
initializer that is not a graph input (an overridable default is not a constant) or a
Constant node's output; ``-n <= k < n`` (out of range is the runtime's error to raise,
left as it is). When ``y`` is a graph output, ``x_k`` takes its name only where it is an
ordinary value of the same graph (``eliminate_noops.bypass``); otherwise the node stays.

Why exact: SequenceConstruct stores its inputs in order without changing them and
SequenceAt returns the tensor at the position ``k`` (counted from the back when negative),
so ``y`` holds ``x_k``'s elements, dtype and shape bit for bit.
"""

from __future__ import annotations

import onnx_ir as ir

import optcc
from optcc.passes.eliminate_noops import bypass, constant_array

__all__ = ["FoldSequenceAtPass"]

_DEFAULT_DOMAINS = ("", "ai.onnx")


def _element(node: ir.Node) -> ir.Value | None:
    """The SequenceConstruct input that the SequenceAt ``node`` returns, or None."""
    if len(node.inputs) != 2 or None in node.inputs or len(node.outputs) != 1:
        return None
    construct = node.inputs[0].producer()
    if construct is None or construct.op_type != "SequenceConstruct" or construct.domain not in _DEFAULT_DOMAINS:
        return None
    position = constant_array(node.inputs[1])
    if position is None or position.dtype.kind not in "iu" or position.size != 1:
        return None
    elements = list(construct.inputs)
    k = int(position.reshape(-1)[0])
    if not -len(elements) <= k < len(elements):
        return None
    return elements[k]


class FoldSequenceAtPass(optcc.Pass):
    """Replace ``SequenceAt(SequenceConstruct(x_0, ...), k)`` (constant ``k``) by ``x_k``.

    Rewrite, preconditions and why it is exact: see the module docstring.
    """

    name = "fold-sequence-at"
    numerics = "exact"
    triggers = frozenset({"SequenceAt"})

    def call(self, model: ir.Model) -> optcc.PassResult:
        folded = 0
        for graph in optcc.ir.graphs(model):
            for node in list(graph):
                if node.op_type != "SequenceAt" or node.domain not in _DEFAULT_DOMAINS:
                    continue
                element = _element(node)
                if element is not None and bypass(node, node.outputs[0], element):
                    folded += 1
        return optcc.PassResult(model, bool(folded), {"folded": folded} if folded else {})
