"""SimplifyReshapeTargetsPass: Reshape targets built from the input's own shape become constants.

The target's entries are read element by element, as fold-shapes follows a shape
computation (``shape_elements``: through ``Shape`` (start/end), ``Slice`` (constant, step 1
or more), ``Gather`` (constant indices), ``Concat``, ``Unsqueeze``/``Squeeze`` of one
element at axis 0, and ``Cast`` to int64 or int32): each is a constant, a static dim of
the tensor whose shape is read (declared, or found by onnx shape inference as fold-shapes
finds it: ``shape_findings``, needed once per call when a target left open reads the shape
of a tensor with none declared; the inference fold-constants kept with the graph is used
when it still holds, see ``shape_reuse``, and the one this call used is kept for
fold-constants in turn when it still holds after the call's rewrites), or a dim of some
tensor, unknown.

Rewrite (``shape-copy``): ``Reshape(x, Concat(p_0, p_1, ...))`` where every entry is
known, or a dim equal to ``x``'s dim at its position of the target (``Shape(x)[i:j]`` at
target positions ``i..j-1``, or a dim of another tensor that ``optcc.rewrite.same_dim``
traces to that of ``x``, e.g. the rows of a Gemm over ``Reshape(h, [0, k])`` and
``Shape(h)[0]``), becomes ``Reshape(x, c)`` with the known entries and ``0`` ("copy the
input's dim", allowzero=0) at those positions. A target that is no Concat (``Shape(h)``
itself, or a slice of it) is read as the one piece of such a Concat. Typical sources:
exporters writing ``x.reshape(x.shape[0], -1)`` as Shape->Slice->Concat->Reshape (the
Concat may be in int32, cast to int64 after), which keeps the batch dynamic, and a
GroupNorm restoring its input's shape with ``Reshape(n, Shape(h))``; the constant target
also makes the result's rank static for later fusions.

Rewrite (``inferred-dim``): ``Reshape(x, Concat(...))`` whose entries are all known and
positive but one (an unknown dim, or a piece annotated ``[1]``), becomes ``Reshape(x, c)``
with ``-1`` in that entry's place. Typical source: ``x.reshape(batch, 512, 256)`` with the
batch read from another tensor's shape (jax2tf, tf2onnx), or ``[batch, heads]`` read
together from a tensor whose heads are static.

Preconditions: default-domain ops; for ``shape-copy``, the Reshape without
``allowzero=1`` (0 must mean "copy"), and the ranks of ``x`` and of the tensors whose
``Shape`` is read are known (declared, or found by ``optcc.rewrite.static_rank``);
a Concat along axis 0; constant pieces of integer type. The shape subgraph stays for other
readers (eliminate-dead-nodes removes it when unused).

Why exact: a copied entry at target position ``k`` is ``x``'s dim ``k`` (read from ``x``'s
shape, or from a dim that each operator on the way copies, by its definition, from the
same source dim), which is what ``0`` copies, for every input (a dim of 0 included: both
give 0); a static dim is what the model's shapes declare for every input (the trust
fold-shapes gives them). For ``inferred-dim``: wherever the original runs, its target's
entries multiply to ``x``'s size, so the one unknown entry is that size over the product
of the other, positive, entries, which is what ``-1`` infers (with ``allowzero=1`` too: no
other entry is 0). One caveat of the Cast
recognition: a Cast of a shape to int32 and back is read as the shape itself; the two
differ only when an axis has 2**31 or more elements, where the original's int32 cast wraps
and its target is already meaningless.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

import optcc
from optcc.passes.eliminate_noops import constant_array, graph_opset
from optcc.passes.fold_shapes import FOLLOWED_OPS, ShapeFindings, shape_elements
from optcc.passes.shape_reuse import InferenceSnapshot, holding, recall, remember
from optcc.rewrite import same_dim

__all__ = ["SimplifyReshapeTargetsPass"]

_DEFAULT_DOMAINS = ("", "ai.onnx")


def _node(value: ir.Value | None) -> ir.Node | None:
    node = None if value is None else value.producer()
    return node if node is not None and node.domain in _DEFAULT_DOMAINS else None


def _ints(value: ir.Value | None) -> list[int] | None:
    array = constant_array(value) if value is not None else None
    if array is None or array.dtype.kind not in "iu":
        return None
    return [int(v) for v in array.reshape(-1)]


def _target_pieces(reshape: ir.Node) -> tuple[list[ir.Value | None], bool] | None:
    """The pieces that ``reshape``'s target joins (maybe in int32, cast back), and whether a
    Concat joins them; a target that is no Concat is its own one piece. None when the Concat
    joins along another axis than 0."""
    target = reshape.inputs[1]
    node = _node(target)
    if node is not None and node.op_type == "Cast" and node.attributes.get_int("to", 0) == ir.DataType.INT64.value:
        target, node = node.inputs[0], _node(node.inputs[0])  # a target assembled in int32 and cast back
    if node is None or node.op_type != "Concat":
        return [target], False
    if node.attributes.get_int("axis", 0) not in (0, -1):
        return None
    return list(node.inputs), True


def _reads_unshaped(value: ir.Value | None, depth: int = 0) -> bool:
    """Whether the shape computation of ``value`` reads the Shape of a tensor with no declared
    shape, the only case where onnx shape inference may know dims the model does not say."""
    node = _node(value)
    if node is None or depth > 16:
        return False
    if node.op_type == "Shape":
        return node.inputs[0] is not None and node.inputs[0].shape is None
    return node.op_type in FOLLOWED_OPS and any(_reads_unshaped(v, depth + 1) for v in node.inputs)


def _constant_target(reshape: ir.Node, ranks: dict, copy_allowed: bool,
                     shapes: dict[ir.Value, ir.Shape]) -> np.ndarray | None:
    x = reshape.inputs[0]
    joined = _target_pieces(reshape)
    if x is None or joined is None or None in joined[0]:
        return None
    pieces, concatenated = joined
    values: list[int] = []
    copied = False
    inferred = None  # the position of the one unknown entry
    for piece in pieces:
        constant = _ints(piece)
        if constant is not None:
            if not concatenated:
                return None  # already a constant target
            values.extend(constant)
            continue
        found = shape_elements(piece, shapes, False, ranks)
        if found is None or not found.vector:
            if inferred is not None or not concatenated or not _one_element(piece):
                return None
            inferred = len(values)
            values.append(-1)
            continue
        for element, source in zip(found.elements, found.sources):
            position = len(values)
            if copy_allowed and source is not None and same_dim(source[0], source[1], x, position, ranks):
                values.append(0)  # x's own dim there
                copied = True
            elif element is not None:
                values.append(element)  # a constant, or a static dim of the tensor read
            elif inferred is None:
                inferred = position
                values.append(-1)
            else:
                return None
    if inferred is not None:
        others = values[:inferred] + values[inferred + 1:]
        return np.array(values, dtype=np.int64) if not copied and all(v > 0 for v in others) else None
    return np.array(values, dtype=np.int64) if copied else None


def _one_element(piece: ir.Value) -> bool:
    """Whether ``piece`` (no shape computation ``shape_elements`` follows) is annotated ``[1]``."""
    return piece.shape is not None and list(piece.shape) == [1]


class SimplifyReshapeTargetsPass(optcc.Pass):
    """Replace Reshape targets built from the input's own shape by constants with 0 (copy),
    or with -1 for one unknown entry among positive constants."""

    name = "simplify-reshape-targets"
    numerics = "exact"
    triggers = frozenset({"Reshape"})

    def call(self, model: ir.Model) -> optcc.PassResult:
        model_opset = optcc.ir.default_opset(model)
        counts: dict[str, int] = {}
        # the static dims onnx shape inference finds for the tensors whose Shape is read, as
        # fold-shapes trusts them: inferred once a target left open reads an undeclared shape,
        # then kept for the call (no rewrite here changes a shape)
        shapes: dict[ir.Value, ir.Shape] | None = None
        inference: tuple[InferenceSnapshot, ShapeFindings] | None = None
        # new targets named against every value name of the model (collected when the first is
        # made): a body's never shadows an enclosing graph's
        constants = optcc.ir.ModelNames(model)
        for graph in optcc.ir.graphs(model):
            opset = graph_opset(graph, model_opset)
            if opset < 5:
                continue
            ranks: dict = {}  # static ranks: no rewrite here changes one
            for node in list(graph):
                if node.op_type != "Reshape" or node.domain not in _DEFAULT_DOMAINS or len(node.inputs) != 2:
                    continue
                # with allowzero=1 a 0 is a literal zero, not a copy
                literal_zeros = opset >= 14 and bool(node.attributes.get_int("allowzero", 0))
                target = _constant_target(node, ranks, copy_allowed=not literal_zeros, shapes=shapes or {})
                if target is None and shapes is None and _reads_unshaped(node.inputs[1]):
                    inference = holding(model, *recall(model))
                    shapes = inference[1].shapes
                    target = _constant_target(node, ranks, copy_allowed=not literal_zeros, shapes=shapes)
                if target is None:
                    continue
                copies = 0 in target  # shape-copy's targets hold a 0 (never under allowzero=1), inferred-dim's none
                node.replace_input_with(1, constants.constant_for(node, target, "target"))
                rule = "shape-copy" if copies else "inferred-dim"
                counts[rule] = counts.get(rule, 0) + 1
        if inference is not None and (not counts or inference[0].still_holds(model, *inference[1:])):
            # the inference holds for the graph as it is (nothing changed since, or only
            # targets it was not asked about: ``shape_reuse``), for fold-constants (or this
            # pass) to reuse while what changes later cannot alter it
            remember(model, *inference)
        return optcc.PassResult(model, bool(counts), dict(sorted(counts.items())))

