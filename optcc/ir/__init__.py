"""Thin helpers over onnx-ir: safe loading, atomic saving and the one walker every pass uses.

Nothing here is a second IR. A model is an ``onnx_ir.Model`` from load to save; these
functions add optcc's rules on top: untrusted files are validated before use, external
data may not point outside the model's folder, and output files appear atomically.
"""

from __future__ import annotations

import collections
import contextlib
import os
import secrets
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Union

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from optcc.errors import BadInputError, UnsafeInputError

__all__ = [
    "ModelSource",
    "load",
    "save",
    "graphs",
    "nodes",
    "op_histogram",
    "weight_bytes",
    "default_opset",
    "uses_external_data",
    "external_data_files",
    "unique_value_name",
    "ModelNames",
    "value_names",
    "const_tensor",
    "proto_graphs",
    "initializers_set_aside",
    "serialize",
    "inferred_dtypes",
    "upgrade_legacy_ir",
    "tensor_protos",
    "create_temp_file",
    "FILLED_INTERFACE_KEY",
]

ModelSource = Union[str, os.PathLike, bytes, onnx.ModelProto, ir.Model]

# Protobuf refuses messages of 2 GiB; leave room for the graph structure itself.
PROTOBUF_LIMIT_BYTES = 2**31 - 1
EXTERNAL_DATA_THRESHOLD_BYTES = 1_800_000_000

_ZIP_MAGIC = b"PK\x03\x04"
_NPY_MAGIC = b"\x93NUMPY"


# --------------------------------------------------------------------------- loading


def load(source: ModelSource) -> ir.Model:
    """Load and validate a model from a path, serialized bytes, a ModelProto or an ir.Model.

    Raises BadInputError (UnsafeInputError for security problems) with a one-line message
    naming the file. An ``ir.Model`` is returned as given (it is trusted: it came from code).
    """
    if isinstance(source, ir.Model):
        return source
    if isinstance(source, onnx.ModelProto):
        return _from_proto(source, base_dir=None, label="<ModelProto>")
    if isinstance(source, (bytes, bytearray, memoryview)):
        proto = _parse_bytes(bytes(source), "<bytes>")
        return _from_proto(proto, base_dir=None, label="<bytes>")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        proto = _read_model_file(path)
        return _from_proto(proto, base_dir=path.resolve().parent, label=str(path), path=path)
    raise BadInputError(
        f"cannot load a model from a {type(source).__name__}; "
        "give a path, bytes, onnx.ModelProto or onnx_ir.Model"
    )


def _read_model_file(path: Path) -> onnx.ModelProto:
    if not path.exists():
        raise BadInputError("no such file", path)
    if not path.is_file():
        raise BadInputError("not a file", path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BadInputError(f"cannot read: {e.strerror or e}", path) from None
    return _parse_bytes(data, str(path))


def _parse_bytes(data: bytes, label: str) -> onnx.ModelProto:
    if not data:
        raise BadInputError("empty file, not an ONNX model", label)
    if data.startswith(_ZIP_MAGIC):
        raise BadInputError("is a zip archive (an .npz?), not an ONNX model", label)
    if data.startswith(_NPY_MAGIC):
        raise BadInputError("is a NumPy .npy array, not an ONNX model", label)
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError):
        raise BadInputError(
            "not a valid ONNX protobuf (truncated or garbage bytes)", label
        ) from None
    if proto.ir_version <= 0 or not proto.HasField("graph"):
        raise BadInputError("not an ONNX model (no ir_version or no graph)", label)
    return proto


def _from_proto(
    proto: onnx.ModelProto, base_dir: Path | None, label: str, path: Path | None = None
) -> ir.Model:
    _check_versions(proto, label)
    has_external = _check_external_data(proto, base_dir, label)
    fills = _interface_fills(proto, label)
    originals = _apply_fills(proto, fills)
    try:
        if fills and has_external:
            # The checker can only resolve external data from the file, which lacks the
            # filled types; check the structure without the (already validated) weights.
            _check_structure(_without_weights(proto), label)
        else:
            # The checker resolves external data files against the model's folder, which
            # only a path gives it (their locations were validated just above).
            _check_structure(str(path) if has_external and path is not None else proto, label)
        try:
            model = ir.serde.deserialize_model(proto)
        except Exception as e:  # onnx-ir rejects some malformed protos the checker lets through
            raise BadInputError(f"malformed model: {_one_line(e)}", label) from None
    finally:
        _restore(proto, originals)  # a caller's ModelProto is never modified
    if fills:
        model.meta[FILLED_INTERFACE_KEY] = [note for _, _, note in fills]
    if base_dir is not None:
        ir.external_data.set_base_dir(model.graph, base_dir)
    _sort_or_reject_cycle(model, label)
    return model


# ------------------------------------------------------------ interface types

FILLED_INTERFACE_KEY = "optcc.filled_interface"
"""``model.meta`` key (in memory, never written) listing, one line each, the main-graph
inputs and outputs whose missing type or shape ``load`` filled in."""

_MAX_TRIED_RANK = 8


def _needs_fill(info: onnx.ValueInfoProto) -> bool:
    """A main-graph input/output onnx.checker rejects for a missing type or shape."""
    kind = info.type.WhichOneof("value")
    if kind is None:
        return True
    return kind == "tensor_type" and (
        not info.type.tensor_type.elem_type or not info.type.tensor_type.HasField("shape")
    )


def _interface_fills(
    proto: onnx.ModelProto, label: str
) -> list[tuple[str, onnx.TypeProto, str]]:
    """For each main-graph input or output without a type or shape (older and hand-built
    exports; onnxruntime runs them, onnx.checker refuses them): ``(where, type, note)``
    with the type onnx shape inference gives it. ``where`` is ``input:NAME`` or
    ``output:NAME``. An input gets the one rank for which strict shape inference of its
    consumers succeeds (dims left unknown); an output the inferred type, else the
    producing node's declared value_info. Raises BadInputError when no type can be found."""
    graph = proto.graph
    inputs = [v for v in graph.input if _needs_fill(v)]
    outputs = [v for v in graph.output if _needs_fill(v)]
    if not inputs and not outputs:
        return []
    weights = {t.name: t for t in graph.initializer}
    light = _without_weights(proto)
    fills: list[tuple[str, onnx.TypeProto, str]] = []
    for info in inputs:
        if info.name in weights:  # below IR 4 a weight may be listed as an input
            t = weights[info.name]
            fill = onnx.helper.make_tensor_type_proto(t.data_type, list(t.dims))
            fills.append(_fill("input", info.name, fill, "from its initializer"))
            continue
        elem = info.type.tensor_type.elem_type if info.type.HasField("tensor_type") else 0
        if not elem:
            raise BadInputError(
                f"invalid ONNX model: graph input '{info.name}' has no element type", label
            )
        ranks = [r for r in range(_MAX_TRIED_RANK + 1) if _rank_fits(light, info.name, elem, r)]
        if len(ranks) != 1:
            fitting = f"ranks {ranks} all fit" if ranks else "no rank fits"
            raise BadInputError(
                f"graph input '{info.name}' declares no shape, and its rank cannot be inferred "
                f"from its consumers ({fitting}); add the shape to the model",
                label,
            )
        fill = onnx.helper.make_tensor_type_proto(elem, [None] * ranks[0])
        fills.append(_fill("input", info.name, fill, "(rank from shape inference)"))
    if outputs:
        for where, fill, _ in fills:
            _set_type(light, where, fill)
        inferred = _inferred_types(light)
        declared = {v.name: v.type for v in graph.value_info}
        declared.update({v.name: v.type for v in graph.input if not _needs_fill(v)})
        declared.update({
            n: onnx.helper.make_tensor_type_proto(t.data_type, list(t.dims)) for n, t in weights.items()
        })
        for info in outputs:
            fill, source = inferred.get(info.name), "shape inference"
            if fill is None or not _complete(fill):
                fill, source = declared.get(info.name), "its producer's value_info"
            if fill is None or not _complete(fill):
                raise BadInputError(
                    f"invalid ONNX model: graph output '{info.name}' has no type or shape, and "
                    "shape inference cannot find one",
                    label,
                )
            fill = _without_placeholder_dims(fill)
            fills.append(_fill("output", info.name, fill, f"from {source}"))
    return fills


def _fill(kind: str, name: str, fill: onnx.TypeProto, how: str) -> tuple[str, onnx.TypeProto, str]:
    return f"{kind}:{name}", fill, f"{kind} '{name}': {_type_text(fill)} {how}"


def _without_placeholder_dims(t: onnx.TypeProto) -> onnx.TypeProto:
    """The type with shape inference's invented dim names (``unk__N``) made unknown."""
    t = onnx.TypeProto.FromString(t.SerializeToString())
    for dim in t.tensor_type.shape.dim:
        if dim.dim_param.startswith("unk__"):
            dim.ClearField("dim_param")
    return t


def _complete(t: onnx.TypeProto) -> bool:
    return (t.HasField("tensor_type") and bool(t.tensor_type.elem_type)
            and t.tensor_type.HasField("shape"))


def _type_text(t: onnx.TypeProto) -> str:
    tt = t.tensor_type
    dims = ",".join(
        str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim
    )
    return f"{onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name}[{dims}]"


def _rank_fits(light: onnx.ModelProto, name: str, elem: int, rank: int) -> bool:
    trial = onnx.ModelProto()
    trial.CopyFrom(light)
    _set_type(trial, f"input:{name}", onnx.helper.make_tensor_type_proto(elem, [None] * rank))
    try:
        onnx.shape_inference.infer_shapes(trial, strict_mode=True)
    except Exception:  # noqa: BLE001 - any inference error rules the rank out
        return False
    return True


def _inferred_types(light: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - best effort; the caller reports what stays missing
        return {}
    graph = inferred.graph
    return {v.name: v.type for v in (*graph.value_info, *graph.output, *graph.input)
            if v.type.WhichOneof("value") is not None}


def _set_type(proto: onnx.ModelProto, where: str, fill: onnx.TypeProto) -> None:
    kind, name = where.split(":", 1)
    for info in proto.graph.input if kind == "input" else proto.graph.output:
        if info.name == name:
            info.type.CopyFrom(fill)


def _apply_fills(
    proto: onnx.ModelProto, fills: list[tuple[str, onnx.TypeProto, str]]
) -> list[tuple[str, onnx.TypeProto]]:
    originals = []
    for where, fill, _ in fills:
        kind, name = where.split(":", 1)
        for info in proto.graph.input if kind == "input" else proto.graph.output:
            if info.name == name:
                saved = onnx.TypeProto()
                saved.CopyFrom(info.type)
                originals.append((where, saved))
        _set_type(proto, where, fill)
    return originals


def _restore(proto: onnx.ModelProto, originals: list[tuple[str, onnx.TypeProto]]) -> None:
    for where, saved in originals:
        _set_type(proto, where, saved)


def _without_weights(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the model whose main-graph initializers are graph inputs of the same
    type and shape (no weight data copied): enough for type inference and the checker's
    structural rules."""
    light = onnx.ModelProto()
    for field, value in proto.ListFields():
        if field.name != "graph":
            _copy_field(light, field, value)
    graph = light.graph
    for field, value in proto.graph.ListFields():
        if field.name not in ("initializer", "sparse_initializer"):
            _copy_field(graph, field, value)
    listed = {v.name for v in graph.input}
    for t in proto.graph.initializer:
        if t.name not in listed:
            graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    for sparse in proto.graph.sparse_initializer:
        if sparse.values.name not in listed:
            graph.input.append(
                onnx.helper.make_tensor_value_info(
                    sparse.values.name, sparse.values.data_type, list(sparse.dims)
                )
            )
    return light


def _copy_field(target, field, value) -> None:  # noqa: ANN001 - protobuf descriptors
    slot = getattr(target, field.name)
    if hasattr(slot, "extend"):  # a repeated field
        slot.extend(value)
    elif field.message_type is not None:
        slot.CopyFrom(value)
    else:
        setattr(target, field.name, value)


def _check_versions(proto: onnx.ModelProto, label: str) -> None:
    if proto.ir_version > onnx.IR_VERSION:
        raise BadInputError(
            f"IR version {proto.ir_version} is newer than this onnx ({onnx.__version__}) "
            f"supports (<= {onnx.IR_VERSION}); upgrade onnx",
            label,
        )
    default = [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    if not default:
        # A model made only of other domains' ops (e.g. ai.onnx.ml) needs no '' import.
        if _uses_default_domain(proto):
            raise BadInputError(
                "uses ONNX operators but has no opset import for the default domain ('')",
                label,
            )
        return
    newest = onnx.defs.onnx_opset_version()
    if default[0] > newest:
        raise BadInputError(
            f"opset {default[0]} is newer than this onnx ({onnx.__version__}) supports "
            f"(<= {newest}); upgrade onnx",
            label,
        )


def proto_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """A serialized graph and every If/Loop/Scan body inside it, parents first (the
    ``graphs`` walker's counterpart for protos)."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from proto_graphs(attr.g)
            for sub in attr.graphs:
                yield from proto_graphs(sub)


def _node_protos(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every NodeProto of a graph and of its subgraphs."""
    for g in proto_graphs(graph):
        yield from g.node


def _uses_default_domain(proto: onnx.ModelProto) -> bool:
    graphs_ = [proto.graph, *(onnx.GraphProto(node=f.node) for f in proto.functions)]
    return any(
        node.domain in ("", "ai.onnx") for graph in graphs_ for node in _node_protos(graph)
    )


def tensor_protos(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of a graph and its subgraphs: initializers and tensor attributes."""
    for g in proto_graphs(graph):
        yield from g.initializer
        for sparse in g.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        for node in g.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors


def _check_external_data(proto: onnx.ModelProto, base_dir: Path | None, label: str) -> bool:
    """Validate every external data reference; True when the model has any."""
    graphs_ = [proto.graph] + [
        onnx.GraphProto(node=f.node) for f in proto.functions
    ]
    found = False
    for graph in graphs_:
        for tensor in tensor_protos(graph):
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = {e.key: e.value for e in tensor.external_data}
            _check_external_location(tensor.name, info, base_dir, label)
            found = True
    return found


def _check_external_location(
    tensor_name: str, info: dict[str, str], base_dir: Path | None, label: str
) -> None:
    location = info.get("location", "")
    if not location:
        raise BadInputError(f"tensor '{tensor_name}' has external data with no location", label)
    if base_dir is None:
        raise BadInputError(
            f"tensor '{tensor_name}' stores its data in external file '{location}'; "
            "load the model from its path so the file can be found",
            label,
        )
    if os.path.isabs(location) or location.startswith(("/", "\\")) or ":" in location:
        raise UnsafeInputError(
            f"refusing external data path '{location}' of tensor '{tensor_name}': "
            "absolute paths are not allowed",
            label,
        )
    root = base_dir.resolve()
    target = (root / location).resolve()  # resolves '..' and symlinks
    if target != root and root not in target.parents:
        raise UnsafeInputError(
            f"refusing external data path '{location}' of tensor '{tensor_name}': "
            "it points outside the model's folder",
            label,
        )
    if not target.is_file():
        raise BadInputError(
            f"external data file '{location}' of tensor '{tensor_name}' is missing", label
        )
    try:
        end = int(info.get("offset", 0) or 0) + int(info.get("length", 0) or 0)
    except ValueError:
        raise BadInputError(
            f"tensor '{tensor_name}' has a non-numeric external data offset/length", label
        ) from None
    if end > target.stat().st_size:
        raise BadInputError(
            f"external data file '{location}' is shorter than tensor '{tensor_name}' needs "
            "(truncated?)",
            label,
        )


def _check_structure(proto: onnx.ModelProto | str, label: str) -> None:
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        message = _one_line(e)
        if "topologically sorted" in message:
            return  # normalized after deserialization (or reported there as a cycle)
        raise BadInputError(f"invalid ONNX model: {message}", label) from None
    except Exception as e:  # the checker raises plain errors on some malformed input
        raise BadInputError(f"invalid ONNX model: {_one_line(e)}", label) from None


def _sort_or_reject_cycle(model: ir.Model, label: str) -> None:
    """Put nodes in topological order; a graph that cannot be sorted has a cycle or a
    node input that nothing defines."""
    problem = first_order_problem(model)
    if problem is None:
        return
    try:
        model.graph.sort()
        for fn in model.functions.values():
            fn.sort()
    except Exception:
        pass
    problem = first_order_problem(model)
    if problem is not None:
        raise BadInputError(f"invalid graph: {problem}", label)


def first_order_problem(model: ir.Model) -> str | None:
    """The first use-before-definition in any graph of the model, or None when every node
    input is defined (by a graph input, an initializer, an earlier node or an outer scope)."""
    for graph in (model.graph, *model.functions.values()):
        problem = _order_problem(graph, frozenset())
        if problem:
            return problem
    return None


def _order_problem(graph: ir.Graph | ir.Function, outer: frozenset[ir.Value]) -> str | None:
    defined = set(outer)
    defined.update(graph.inputs)
    if isinstance(graph, ir.Graph):
        defined.update(graph.initializers.values())
    for node in graph:
        for value in node.inputs:
            if value is not None and value not in defined:
                what = "a cycle" if value.producer() is not None else "an undefined value"
                return (
                    f"node '{node.name}' ({node.op_type}) reads '{value.name}' before it is "
                    f"defined ({what})"
                )
        for attr in node.attributes.values():
            for sub in _attr_graphs(attr):
                problem = _order_problem(sub, frozenset(defined))
                if problem:
                    return problem
        defined.update(node.outputs)
    for value in graph.outputs:
        if value not in defined:
            return f"graph output '{value.name}' is not defined"
    return None


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:300] + ("..." if len(text) > 300 else "")


# --------------------------------------------------------------------------- walking


def _attr_graphs(attr: ir.Attr | ir.RefAttr) -> list[ir.Graph]:
    if attr.type == ir.AttributeType.GRAPH:
        return [attr.as_graph()]
    if attr.type == ir.AttributeType.GRAPHS:
        return list(attr.as_graphs())
    return []


_GRAPH_TYPES = (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)


# default-domain ops that take graph attributes; any other default-domain op has none
_SUBGRAPH_OPS = frozenset({"If", "Loop", "Scan", "SequenceMap"})


def subgraphs(node: ir.Node) -> list[ir.Graph]:
    """The If/Loop/Scan (or custom) bodies held directly by a node's attributes."""
    if node.op_type not in _SUBGRAPH_OPS and node.domain in ("", "ai.onnx"):
        return []
    attrs = node.attributes
    if not attrs:
        return []
    return [g for attr in attrs.values() if attr.type in _GRAPH_TYPES for g in _attr_graphs(attr)]


def graphs(model: ir.Model) -> Iterator[ir.Graph | ir.Function]:
    """Every graph-like of a model: the main graph, each model-local function, and every
    If/Loop/Scan body inside them (depth first, parents before their bodies).

    This is the one walker passes use; iterate a graph's nodes with ``list(graph)`` when
    the pass mutates it.
    """

    def walk(graph: ir.Graph | ir.Function) -> Iterator[ir.Graph | ir.Function]:
        yield graph
        for node in list(graph):
            for sub in subgraphs(node):
                yield from walk(sub)

    yield from walk(model.graph)
    for function in list(model.functions.values()):
        yield from walk(function)


def nodes(model: ir.Model) -> Iterator[ir.Node]:
    """Every node of every graph-like of the model (see ``graphs``)."""
    for graph in graphs(model):
        yield from graph


def op_histogram(model: ir.Model) -> dict[str, int]:
    """Node counts keyed by op type ("domain::op" for non-default domains), sorted by name."""
    counts = collections.Counter(
        f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
        for n in nodes(model)
    )
    return dict(sorted(counts.items()))


def _tensor_nbytes(tensor: ir.TensorProtocol | None) -> int:
    if tensor is None:
        return 0
    try:
        return int(tensor.nbytes)
    except Exception:
        return 0


def weight_bytes(model: ir.Model) -> int:
    """Bytes held by initializers and Constant-node tensors in every graph."""
    total = 0
    for graph in graphs(model):
        if isinstance(graph, ir.Graph):
            total += sum(_tensor_nbytes(v.const_value) for v in graph.initializers.values())
        for node in graph:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                value = node.attributes.get("value")
                if value is not None and value.type == ir.AttributeType.TENSOR:
                    total += _tensor_nbytes(value.value)  # as_tensor() isinstance-checks a Protocol: slow
    return total


def default_opset(model: ir.Model) -> int:
    """The model's opset version for the default ONNX domain."""
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0)))


def _external_tensors(model: ir.Model) -> Iterator[ir.ExternalTensor]:
    for graph in graphs(model):
        if isinstance(graph, ir.Graph):
            for value in graph.initializers.values():
                if isinstance(value.const_value, ir.ExternalTensor):
                    yield value.const_value


def uses_external_data(model: ir.Model) -> bool:
    """Whether any initializer's data lives in an external file."""
    return any(True for _ in _external_tensors(model))


def external_data_files(model: ir.Model) -> set[Path]:
    """The resolved paths of the external data files the model's tensors read from."""
    return {
        Path(t.base_dir, t.location).resolve() for t in _external_tensors(model) if t.base_dir
    }


def value_names(scope: ir.Model | ir.Graph | ir.Function) -> set[str]:
    """Every value name defined in ``scope`` (a model: all its graphs; a graph or function:
    it and the bodies nested in it)."""
    if isinstance(scope, ir.Model):
        graph_likes = list(graphs(scope))
    else:
        graph_likes, stack = [], [scope]
        while stack:
            g = stack.pop()
            graph_likes.append(g)
            stack.extend(sub for node in g for sub in subgraphs(node))
    taken: set[str] = set()
    for g in graph_likes:
        taken.update(v.name for v in g.inputs if v.name)
        if isinstance(g, ir.Graph):
            taken.update(g.initializers)
        for node in g:
            taken.update(v.name for v in node.outputs if v.name)
    return taken


def unique_value_name(
    scope: ir.Model | ir.Graph | ir.Function | None, base: str, taken: set[str] | None = None
) -> str:
    """A value name based on ``base`` not used in ``scope`` (pass the model to be safe
    across all graphs). With ``taken`` (from ``value_names``), that set is used and the
    new name added to it, so repeated calls do not rescan the model."""
    if taken is None and scope is None:
        raise ValueError("unique_value_name needs a scope or a set of taken names")
    names = value_names(scope) if taken is None else taken
    name, i = base, 0
    while name in names:
        i += 1
        name = f"{base}_{i}"
    names.add(name)
    return name


class ModelNames:
    """The value and node names in use anywhere in a model (collected once), handing out
    fresh ones: ``base``, else ``base_1``, ``base_2``, ..."""

    def __init__(self, model: ir.Model) -> None:
        self.values = value_names(model)
        self.nodes = {node.name for node in nodes(model) if node.name}

    def value(self, base: str) -> str:
        """A value name no graph of the model uses (now taken)."""
        return unique_value_name(None, base, self.values)

    def node(self, base: str) -> str:
        """A node name no graph of the model uses (now taken)."""
        return unique_value_name(None, base, self.nodes)


# --------------------------------------------------------------------------- saving


def serialize(model: ir.Model) -> onnx.ModelProto:
    """The model as a ModelProto (external tensors stay references to their files)."""
    return ir.serde.serialize_model(model)


def upgrade_legacy_ir(model: ir.Model) -> int:
    """Move a model below IR version 4 to 4, in place: initializers are no longer graph
    inputs (those that nothing reads are dropped). Below IR 4 such inputs are constants no
    caller can feed (onnxruntime does not list them), so the interface is unchanged; from
    IR 4 on, a pass may add initializers without listing them as inputs. Returns how many
    inputs were unlisted (0 for a model at IR 4 or above, which is left alone)."""
    if int(model.ir_version or 0) >= 4:
        return 0
    graph = model.graph
    constant_inputs = [v for v in graph.inputs if v.is_initializer()]
    for value in constant_inputs:
        graph.inputs.remove(value)
        if not value.uses() and not value.is_graph_output():
            graph.initializers.pop(value.name)
    model.ir_version = 4
    return len(constant_inputs)


def inferred_dtypes(model: ir.Model) -> dict[str, ir.DataType]:
    """Element types of the values of the main graph and its If/Loop/Scan bodies, as
    declared or as onnx type inference finds them (best effort: values it cannot type are
    left out). Inference runs only when a node output is undeclared, on a serialized copy
    whose weights are graph inputs of the same type and shape, so no weight data is
    copied."""
    bodies = [g for g in graphs(model) if isinstance(g, ir.Graph)]
    declared = [v for g in bodies for v in (*g.inputs, *(o for node in g for o in node.outputs))]
    types = {v.name: v.dtype for v in declared if v.name and v.dtype is not None}
    if all(v.name in types for v in declared if v.name):
        return types
    with initializers_set_aside(model, lambda t: True) as aside:
        proto = serialize(model)
    shapes = {value.name: (tensor.dtype, tensor.shape) for value, tensor in aside}
    inputs = {v.name for v in proto.graph.input}
    kept = [t for t in proto.graph.initializer if t.name not in shapes]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    for name, (dtype, shape) in shapes.items():
        if name not in inputs:
            proto.graph.input.append(onnx.helper.make_tensor_value_info(name, int(dtype), list(shape.dims)))
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
    except Exception:  # noqa: BLE001 - best effort: the declared types remain
        return types
    for graph in proto_graphs(inferred.graph):
        for info in (*graph.value_info, *graph.output, *graph.input):
            elem = info.type.tensor_type.elem_type if info.type.HasField("tensor_type") else 0
            if elem and info.name not in types:
                types[info.name] = ir.DataType(elem)
    return types


def needs_external_data(model: ir.Model) -> bool:
    """External data is used when the model came with it or its weights near 2 GB."""
    return uses_external_data(model) or weight_bytes(model) > EXTERNAL_DATA_THRESHOLD_BYTES


def check_output_path(path: str | os.PathLike, input_path: str | os.PathLike | None = None) -> Path:
    """Refuse an output path before any work is done: the input itself, a missing or
    unwritable folder, a directory. Returns the path."""
    out = Path(path)
    if out.is_dir():
        raise BadInputError("output path is a directory", out)
    if input_path is not None and Path(input_path).exists() and out.exists():
        if os.path.samefile(out, input_path):
            raise BadInputError("output path is the input model; refusing to overwrite it", out)
    folder = out.resolve().parent
    if not folder.is_dir():
        raise BadInputError("output folder does not exist", out)
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".{out.name}.", suffix=".probe")
    except OSError as e:
        raise BadInputError(f"output folder is not writable ({e.strerror or e})", out) from None
    os.close(fd)
    os.unlink(probe)
    return out


def create_temp_file(folder: str | os.PathLike, name: str, suffix: str = ".tmp") -> str:
    """Create an empty hidden file ``.<name>.<random><suffix>`` in ``folder`` and return
    its path. Unlike ``tempfile.mkstemp`` (always mode 0600) the file gets the mode the
    user's umask gives new files, so the output renamed from it is readable as usual."""
    for _ in range(100):
        candidate = os.path.join(folder, f".{name}.{secrets.token_hex(6)}{suffix}")
        try:
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return candidate
    raise FileExistsError(f"cannot create a temporary file in {folder}")


def save(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    size_threshold_bytes: int = 1024,
    location: str | None = None,
) -> None:
    """Write the model atomically: a temporary file in the target folder, then a rename.

    With external data (automatic when the model was loaded with it or its weights are
    near 2 GB), the tensors of at least ``size_threshold_bytes`` go to ``location`` (a
    file name beside the model; default ``<name>.data``), written first, also atomically.
    A failure leaves no partial output behind.
    """
    out = check_output_path(path)
    if external_data is None:
        external_data = needs_external_data(model)
    folder = out.resolve().parent
    tmp_name = create_temp_file(folder, out.name)
    data_name = location or f"{out.name}.data"
    if Path(data_name).name != data_name or data_name in (".", "..") or data_name == out.name:
        raise BadInputError(f"external data location '{data_name}' must be a file name beside the model", out)
    try:
        if external_data:
            if (folder / data_name).resolve() in external_data_files(model):
                raise BadInputError(
                    f"would overwrite '{data_name}', the external data the model reads from; "
                    "choose another output name",
                    out,
                )
            ir.save(model, tmp_name, external_data=data_name, size_threshold_bytes=size_threshold_bytes)
        else:
            _write_streamed(model, tmp_name)
        os.replace(tmp_name, out)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


# dtypes whose raw_data is the NumPy array's little-endian bytes
_RAW_DTYPES = frozenset({
    ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE,
    ir.DataType.INT8, ir.DataType.INT16, ir.DataType.INT32, ir.DataType.INT64,
    ir.DataType.UINT8, ir.DataType.UINT16, ir.DataType.UINT32, ir.DataType.UINT64, ir.DataType.BOOL,
})
STREAM_MIN_BYTES = 1 << 20  # initializers at least this large are written straight from memory


@contextlib.contextmanager
def initializers_set_aside(
    model: ir.Model, selects: Callable[[ir.TensorProtocol], bool], *, bodies: bool = False
) -> Iterator[list[tuple[ir.Value, ir.TensorProtocol]]]:
    """Within the block, the main graph's (with ``bodies``, every graph's) initializers
    whose tensor ``selects`` accepts hold empty tensors of their dtype, so that
    serializing the model copies none of their data; yields the (value, tensor) pairs set
    aside and restores them on exit. String tensors are never set aside."""
    swapped: list[tuple[ir.Value, ir.TensorProtocol]] = []
    graphs_ = [g for g in graphs(model) if isinstance(g, ir.Graph)] if bodies else [model.graph]
    try:
        for value in (v for g in graphs_ for v in g.initializers.values()):
            tensor = value.const_value
            if tensor is None or tensor.dtype == ir.DataType.STRING or not selects(tensor):
                continue
            swapped.append((value, tensor))
            value.const_value = ir.Tensor(np.zeros(0, dtype=tensor.dtype.numpy()), name=tensor.name)
        yield swapped
    finally:
        for value, tensor in swapped:
            value.const_value = tensor


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _graph_initializer_field(tensor_start: bytes, extra: int = 0) -> bytes:
    """``ModelProto.graph (7) { GraphProto.initializer (5) { tensor } }`` up to the end of
    ``tensor_start``; ``extra`` more bytes of the tensor follow it in the file."""
    tensor_len = len(tensor_start) + extra
    graph_len = 1 + len(_varint(tensor_len)) + tensor_len
    return b"\x3a" + _varint(graph_len) + b"\x2a" + _varint(tensor_len) + tensor_start


def _write_streamed(model: ir.Model, path: str) -> None:
    """Write the model without ever holding a serialized copy of its large weights: the
    model without initializers, then one ``graph { initializer { ... } }`` fragment per
    initializer in order, a large one's raw_data written from the array's memory.
    Protobuf merges repeated occurrences of a message field, so the file parses to the
    same model as the one-piece serialization. Peak memory stays near the weights' own
    size instead of three times it (VGG-19 with 513 MB of folded weights: 2.2 GB before)."""

    def streamed(tensor: ir.TensorProtocol) -> bool:
        return (not isinstance(tensor, ir.ExternalTensor) and tensor.dtype in _RAW_DTYPES
                and tensor.nbytes >= STREAM_MIN_BYTES)

    with initializers_set_aside(model, streamed) as aside:
        proto = serialize(model)
    big = {v.name: t for v, t in aside}
    initializers = list(proto.graph.initializer)  # in order; the big ones are placeholders
    del proto.graph.initializer[:]
    with open(path, "wb") as f:
        f.write(proto.SerializeToString())
        del proto
        for initializer in initializers:
            tensor = big.get(initializer.name)
            if tensor is None:
                f.write(_graph_initializer_field(initializer.SerializeToString()))
                continue
            array = np.ascontiguousarray(tensor.numpy())
            if array.dtype.byteorder == ">":
                array = array.astype(array.dtype.newbyteorder("<"))
            header = onnx.TensorProto(name=initializer.name, dims=list(array.shape),
                                      data_type=int(tensor.dtype)).SerializeToString()
            data = memoryview(array.reshape(-1).view(np.uint8))
            raw_field = b"\x4a" + _varint(data.nbytes)  # TensorProto.raw_data (9)
            f.write(_graph_initializer_field(header + raw_field, extra=data.nbytes))
            f.write(data)
        f.flush()
        os.fsync(f.fileno())


_CONSTANT_LISTS = {
    "value_float": np.float32, "value_floats": np.float32,
    "value_int": np.int64, "value_ints": np.int64,
    "value_string": np.bytes_, "value_strings": np.bytes_,
}


def const_tensor(value: ir.Value) -> ir.TensorProtocol | None:
    """The constant tensor behind a value (initializer or default-domain Constant output),
    else None. Unlike ``ir.convenience.get_const_tensor`` it renames nothing and skips the
    Protocol isinstance checks that made it a hot spot; a malformed Constant raises
    ValueError."""
    if value.const_value is not None:
        return value.const_value
    node = value.producer()
    if node is None or node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return None
    if len(node.attributes) != 1 or len(node.outputs) != 1:
        raise ValueError(f"Constant node '{node.name}' must have one attribute and one output")
    attr_name, attr = next(iter(node.attributes.items()))
    if attr.is_ref():
        return None
    if attr_name == "value" and attr.type == ir.AttributeType.TENSOR:
        return attr.value
    if attr_name in _CONSTANT_LISTS:
        array = np.array(attr.value, dtype=_CONSTANT_LISTS[attr_name])
        return ir.StringTensor(array) if array.dtype.kind == "S" else ir.Tensor(array)
    raise ValueError(f"Constant node '{node.name}' has unsupported attribute '{attr_name}'")


def as_numpy(value: ir.Value) -> np.ndarray | None:
    """The constant array behind a value (initializer or Constant output), else None."""
    tensor = const_tensor(value)
    return None if tensor is None else tensor.numpy()
