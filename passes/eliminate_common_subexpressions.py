"""EliminateCommonSubexpressionsPass: compute each distinct expression once per graph.

Rewrite: within one graph (the main graph, each function, each If/Loop/Scan body), a
node with the same op (domain, type, overload), the same input values, the same number
of outputs and equal attributes as an earlier node is removed; its outputs' readers read
the earlier node's outputs (readers inside bodies included). Nodes are visited in
topological order, so chains of duplicates collapse in one run.

Attribute equality is exact: floats compare by their float32 bits (``0.0`` and ``-0.0``
differ, as they do in results), tensors by dtype, shape and bytes (Constant nodes of any
size), reference attributes (in functions) by the name they refer to.

Never merged: nondeterministic ops (RandomUniform, RandomNormal, their ``Like`` forms,
Multinomial, Bernoulli, Dropout), ops outside the default domain (custom ops and
function calls may be stateful or random: passed through untouched), nodes with
subgraph, sparse-tensor or type attributes (If/Loop/Scan themselves; their bodies are
still visited). A duplicate whose output is a graph output stays unless the kept node's
output can take its name (it is not already a graph output); the declared type and dims
of the output are kept.

onnx-ir's ``CommonSubexpressionEliminationPass`` is not used: it only visits the main
graph, merges Bernoulli and ``ai.onnx``-spelled random ops, and treats
``value_float=0.0`` and ``-0.0`` as equal (tests/test_cse_dedup.py shows each).

Exact: ONNX ops other than the excluded ones are pure functions of their inputs and
attributes, so the duplicate computed the very same values.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable

import numpy as np
import onnx_ir as ir

import optcc

__all__ = ["EliminateCommonSubexpressionsPass", "attributes_key", "same_tensors"]

_DEFAULT_DOMAINS = ("", "ai.onnx")
NONDETERMINISTIC_OPS = frozenset(
    {
        "RandomUniform",
        "RandomNormal",
        "RandomUniformLike",
        "RandomNormalLike",
        "Multinomial",
        "Bernoulli",
        "Dropout",
    }
)


_UNSET = object()


class _NotComparable(Exception):
    """The node has an attribute CSE does not compare."""


def _tensor_data(tensor: ir.TensorProtocol, dtype: ir.DataType | None = None) -> bytes:
    if (tensor.dtype if dtype is None else dtype) == ir.DataType.STRING:
        return b"".join(len(s).to_bytes(8, "little") + s for s in tensor.string_data())
    return tensor.tobytes()


_KEY_META = "optcc.cse.tensor_key"
_WHOLE_BYTES = 64  # tensors of at most this many bytes are keyed by their bytes themselves
_PROTO_TENSOR = ir.serde.TensorProtoTensor


def _tensor_key(tensor: ir.TensorProtocol) -> Hashable:
    """dtype, shape, and the bytes (at most ``_WHOLE_BYTES``) or their SHA-256; kept in
    the tensor's metadata (tensors are never modified in place, so it stays true)."""
    meta = tensor.meta.data  # the store's own dict: its Mapping methods are slow
    key = meta.get(_KEY_META)
    if key is None:
        proto = tensor.raw if type(tensor) is _PROTO_TENSOR else None
        if proto is not None:  # dtype and dims read from its proto (``shape`` builds a Shape)
            dtype, dims = ir.DataType(proto.data_type), tuple(proto.dims)
        else:
            dtype, dims = tensor.dtype, tuple(tensor.shape)
        if proto is not None and optcc.ir.repeated_values(proto) is not None:
            # its ``tobytes()``, from its decoded array (decoded once per tensor, for every reader)
            data = optcc.ir.decoded(tensor).tobytes()
        else:
            data = _tensor_data(tensor, dtype)
        whole = len(data) <= _WHOLE_BYTES
        key = ("tensor", dtype, dims, whole, data if whole else hashlib.sha256(data).digest())
        meta[_KEY_META] = key
    return key


def _attribute_key(attr: ir.Attr | ir.RefAttr) -> Hashable:
    if attr.is_ref():
        return ("ref", attr.ref_attr_name, attr.type)
    kind = attr.type
    if kind == ir.AttributeType.FLOAT:
        return ("f", np.float32(attr.value).tobytes())
    if kind == ir.AttributeType.FLOATS:
        return ("fs", np.asarray(attr.value, dtype=np.float32).tobytes())
    if kind in (ir.AttributeType.INT, ir.AttributeType.STRING):
        return (kind.name, attr.value)
    if kind in (ir.AttributeType.INTS, ir.AttributeType.STRINGS):
        return (kind.name, tuple(attr.value))
    if kind == ir.AttributeType.TENSOR:
        return _tensor_key(attr.value)  # as_tensor() isinstance-checks a Protocol: slow
    if kind == ir.AttributeType.TENSORS:
        return tuple(_tensor_key(t) for t in attr.value)
    raise _NotComparable(kind.name)


def _head_key(node: ir.Node) -> Hashable | None:
    """The node's op and inputs, or None when it must not be merged. Attributes are
    compared only between nodes of equal heads (``attributes_key``)."""
    if node.domain not in _DEFAULT_DOMAINS or node.op_type in NONDETERMINISTIC_OPS:
        return None
    if not node.outputs:
        return None
    return (node.op_type, node.overload, len(node.outputs), tuple(map(id, node.inputs)))


def attributes_key(node: ir.Node) -> Hashable | None:
    """The node's attributes (None: an attribute CSE does not compare)."""
    try:
        return tuple(sorted((k, _attribute_key(a)) for k, a in node.attributes.items()))
    except _NotComparable:
        return None


def _tensors(attr: ir.Attr) -> list[ir.TensorProtocol]:
    return [attr.value] if attr.type == ir.AttributeType.TENSOR else list(attr.value)


def same_tensors(a: ir.Node, b: ir.Node) -> bool:
    """Byte-for-byte check of tensor attributes of two nodes whose attribute keys are
    equal (keys of large tensors are digests; those of small ones are their bytes)."""
    for name, attr in a.attributes.items():
        if attr.is_ref() or attr.type not in (ir.AttributeType.TENSOR, ir.AttributeType.TENSORS):
            continue
        for x, y in zip(_tensors(attr), _tensors(b.attributes[name])):
            if x is y or _tensor_key(x)[3]:
                continue  # the same tensor, or keys (equal here) that hold the bytes themselves
            if _tensor_data(x) != _tensor_data(y):
                return False
    return True


def _replace(node: ir.Node, kept: ir.Node) -> bool:
    """Point the readers of ``node``'s outputs at ``kept``'s and remove ``node``; False
    (nothing changed) when a graph output of ``node`` cannot be handed over."""
    pairs = list(zip(node.outputs, kept.outputs))
    if any(old.is_graph_output() and new.is_graph_output() for old, new in pairs):
        return False
    renames = []
    for old, new in pairs:
        if old.is_graph_output():
            renames.append((new, old.name, old.type, old.shape))
        old.replace_all_uses_with(new, replace_graph_outputs=True)
    assert node.graph is not None
    node.graph.remove(node, safe=True)
    for new, name, type_, shape in renames:
        new.name = name
        new.type = type_ or new.type
        new.shape = shape if shape is not None else new.shape
    return True


def _eliminate(graph: ir.Graph | ir.Function, merged: dict[str, int]) -> None:
    # head -> [node, attributes key or _UNSET], earlier nodes first; a node's attributes
    # key is computed only once another node has its head (most nodes have none).
    seen: dict[Hashable, list[list]] = {}
    for node in list(graph):
        head = _head_key(node)
        if head is None:
            continue
        group = seen.get(head)
        if group is None:
            seen[head] = [[node, _UNSET]]
            continue
        key = attributes_key(node)
        if key is None:
            continue
        for entry in group:
            if entry[1] is _UNSET:
                entry[1] = attributes_key(entry[0])
        kept = next((entry[0] for entry in group if entry[1] is not None and entry[1] == key), None)
        if kept is None:
            group.append([node, key])
        elif same_tensors(node, kept) and _replace(node, kept):
            merged[node.op_type] = merged.get(node.op_type, 0) + 1


class EliminateCommonSubexpressionsPass(optcc.Pass):
    """Merge nodes that compute the same thing from the same inputs, in every graph.

    What is never merged and why the rewrite is exact: see the module docstring.
    """

    name = "eliminate-common-subexpressions"
    numerics = "exact"

    def call(self, model: ir.Model) -> optcc.PassResult:
        merged: dict[str, int] = {}
        for graph in optcc.ir.graphs(model):
            _eliminate(graph, merged)
        return optcc.PassResult(model, bool(merged), merged)
