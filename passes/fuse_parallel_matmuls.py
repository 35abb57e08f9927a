"""FuseParallelMatMulsPass: MatMuls of one input by constant weights become one MatMul
and a Split (onnx/optimizer's ``fuse_qkv``).

Rewrite: ``y_i = MatMul(a, W_i)`` for ``i = 1..n`` (n >= 2, the same value ``a``) becomes
``y = MatMul(a, Concat(W_1, ..., W_n, axis=1))`` and ``y_1, ..., y_n = Split(y, axis=-1,
[N_1, ..., N_n])``: n nodes become 2 and the weights are the same bytes in one tensor.

Preconditions: default-domain ops in a graph that can hold initializers (not a
function body); each ``W_i`` a 2-D float initializer ``[K, N_i]`` that is no graph input
(not overridable), read by that MatMul only, with the same ``K`` and dtype as the
others; ``a`` of known rank >= 2 (a 1-D ``a`` drops the last axis, and Split needs it).
MatMuls whose result is a graph output are fine: the Split produces the same values.

Only narrow weights are merged: ``N_i < 16``. onnxruntime's CPU SGEMM (MLAS, x86
AVX/FMA3) computes 16 float columns per pass and pads a packed constant weight to a
multiple of 16 columns, so a narrower MatMul pays for 16 columns on its own and the merged
one fills them. A weight at least that wide already runs at full speed alone: merged,
nothing is computed faster, and the Split copies every element of the result once more
(onnxruntime writes each Split output to its own buffer), so Q/K/V projections of a
transformer (``N_i`` = hidden size) run slower merged, at every row count.

Numerics ("fusion"): ``y[..., j]`` is the dot product of the same row of ``a`` with the
same column of the same weights, so the result is exact in real arithmetic; only a
kernel that picks its accumulation order by the matrix's width could round differently
(onnxruntime's CPU MatMul gives the same bits).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

import optcc
from optcc.rewrite import static_rank

__all__ = ["FuseParallelMatMulsPass"]

_DEFAULT_DOMAINS = ("", "ai.onnx")
_FLOATS = (ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
# Columns one pass of onnxruntime's CPU SGEMM computes (and pads packed weights to); wider weights stay apart.
_KERNEL_COLUMNS = 16


def _weight(node: ir.Node) -> np.ndarray | None:
    """The weight of ``MatMul(a, W)`` when it may be moved into a concatenation: narrower
    than one kernel pass."""
    w = node.inputs[1]
    if (w is None or not w.is_initializer() or w.is_graph_input() or w.is_graph_output()
            or w.const_value is None or len(w.uses()) != 1 or w.dtype not in _FLOATS):
        return None
    shape = w.const_value.shape  # read before the data: a wide weight is never loaded
    return w.const_value.numpy() if len(shape) == 2 and shape[1] < _KERNEL_COLUMNS else None


def _groups(graph: ir.Graph) -> list[list[tuple[ir.Node, np.ndarray]]]:
    """MatMuls reading the same ``a`` with movable weights of one K and dtype, in graph
    order, two or more per group."""
    groups: dict[tuple[int, int, str], list[tuple[ir.Node, np.ndarray]]] = {}
    ranks: dict[ir.Value, int | None] = {}
    for node in graph:
        if (node.op_type != "MatMul" or node.domain not in _DEFAULT_DOMAINS or len(node.inputs) != 2
                or node.inputs[0] is None or len(node.outputs) != 1):
            continue
        a = node.inputs[0]
        array = _weight(node)
        if array is None:
            continue
        rank = static_rank(a, ranks)
        if rank is None or rank < 2:
            continue
        groups.setdefault((id(a), array.shape[0], str(array.dtype)), []).append((node, array))
    return [group for group in groups.values() if len(group) >= 2]


def _fuse(graph: ir.Graph, group: list[tuple[ir.Node, np.ndarray]], names: optcc.ir.ModelNames,
          opset: int) -> None:
    nodes = [node for node, _ in group]
    a = nodes[0].inputs[0]
    widths = [int(array.shape[1]) for _, array in group]
    weight = ir.Value(name=names.value(f"{nodes[0].inputs[1].name}_fused"),
                      const_value=ir.tensor(np.concatenate([array for _, array in group], axis=1)))
    weight.name = weight.const_value.name = weight.name
    graph.register_initializer(weight)
    matmul = ir.Node("", "MatMul", [a, weight], num_outputs=1, name=names.node(f"{nodes[0].name}_fused"))
    matmul.outputs[0].name = names.value(f"{nodes[0].outputs[0].name}_fused")
    matmul.outputs[0].type = nodes[0].outputs[0].type  # the dtype; None stays undeclared
    if opset >= 13:
        sizes = ir.Value(name=names.value(f"{matmul.outputs[0].name}_split"),
                         const_value=ir.tensor(np.array(widths, dtype=np.int64)))
        sizes.const_value.name = sizes.name
        graph.register_initializer(sizes)
        split = ir.Node("", "Split", [matmul.outputs[0], sizes], [ir.AttrInt64("axis", -1)],
                        num_outputs=len(nodes), name=names.node(f"{nodes[0].name}_split"))
    else:
        split = ir.Node("", "Split", [matmul.outputs[0]],
                        [ir.AttrInt64("axis", -1), ir.AttrInt64s("split", widths)],
                        num_outputs=len(nodes), name=names.node(f"{nodes[0].name}_split"))
    first = nodes[0]
    graph.insert_before(first, [matmul, split])
    for node, new in zip(nodes, split.outputs):
        old = node.outputs[0]
        new.name = names.value(f"{old.name}_part")
        if old.is_graph_output():
            old_name, old_type, old_shape = old.name, old.type, old.shape
            old.replace_all_uses_with(new, replace_graph_outputs=True)
            new.name, new.type, new.shape = old_name, old_type, old_shape
        else:
            new.type, new.shape = old.type, old.shape
            old.replace_all_uses_with(new)
        old_weight = node.inputs[1]
        graph.remove(node, safe=True)
        graph.initializers.pop(old_weight.name, None)


class FuseParallelMatMulsPass(optcc.Pass):
    """Fuse MatMuls of one input by constant weights into one MatMul and a Split.

    Rewrite, preconditions and numerics: see the module docstring.
    """

    name = "fuse-parallel-matmuls"
    numerics = "fusion"

    def call(self, model: ir.Model) -> optcc.PassResult:
        opset = optcc.ir.default_opset(model)
        names: optcc.ir.ModelNames | None = None
        fused = 0
        for graph in optcc.ir.graphs(model):
            if not isinstance(graph, ir.Graph):
                continue
            for group in _groups(graph):
                names = names or optcc.ir.ModelNames(model)
                _fuse(graph, group, names, opset)
                fused += len(group)
        return optcc.PassResult(model, bool(fused), {"matmuls-fused": fused} if fused else {})
