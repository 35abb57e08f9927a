"""EliminateIdentitiesPass: remove Identity nodes and inference-mode Dropout.

Rewrite: ``y = Identity(x)`` and ``y = Dropout(x)`` (no mask output used; training mode
absent or a constant false; opset < 7 only with ``is_test=1``) are removed and every use
of ``y`` reads ``x`` instead, inside If/Loop/Scan bodies too.
When ``y`` is an output of its graph, ``x`` takes the name ``y`` instead, but only if
``x`` is produced by a node of that same graph and is neither a graph input, an
initializer nor another graph output; otherwise the node stays, because renaming would
change the model's interface or a value of an enclosing graph. (onnx-ir's
``IdentityEliminationPass`` renames in those cases; tests show the breakage.)
Exact: Identity and inference Dropout copy their input unchanged.
"""

from __future__ import annotations

import onnx_ir as ir

import optcc
from optcc.passes.eliminate_noops import bypass


def _is_inference_dropout(node: ir.Node, opset: int) -> bool:
    if len(node.outputs) > 1 and (node.outputs[1].uses() or node.outputs[1].is_graph_output()):
        return False  # the mask is read
    if opset < 7:
        is_test = node.attributes.get("is_test")
        return is_test is not None and is_test.type == ir.AttributeType.INT and is_test.as_int() == 1
    if len(node.inputs) >= 3 and node.inputs[2] is not None:
        if node.inputs[2].is_graph_input():
            return False  # a default the caller can override
        training = optcc.ir.as_numpy(node.inputs[2])
        return training is not None and training.size == 1 and not bool(training.item())
    return True


def _is_copy(node: ir.Node, opset: int) -> bool:
    if node.domain not in ("", "ai.onnx") or not node.inputs or node.inputs[0] is None:
        return False
    if node.op_type == "Identity":
        return len(node.outputs) == 1
    if node.op_type == "Dropout":
        return _is_inference_dropout(node, opset)
    return False


class EliminateIdentitiesPass(optcc.Pass):
    """Remove Identity and inference-mode Dropout nodes."""

    name = "eliminate-identities"
    numerics = "exact"
    triggers = frozenset({"Identity", "Dropout"})

    def call(self, model: ir.Model) -> optcc.PassResult:
        opset = optcc.ir.default_opset(model)
        removed: dict[str, int] = {}
        for graph in optcc.ir.graphs(model):
            for node in list(graph):
                if _is_copy(node, opset) and bypass(node, node.outputs[0], node.inputs[0]):
                    removed[node.op_type] = removed.get(node.op_type, 0) + 1
        return optcc.PassResult(model, bool(removed), removed)
