"""Loading untrusted model files: validated before use, external data kept inside the
model's folder, nodes in topological order."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Union

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from optcc.errors import BadInputError, UnsafeInputError
from optcc.ir.collector import LARGE_MODEL_BYTES, collector_paused
from optcc.ir.external_files import mapped, share_files
from optcc.ir.heap import release_memory
from optcc.ir.legacy import upgrade_legacy_ir
from optcc.ir.packed_attributes import packed_for_load, put_packed
from optcc.ir.interface import (FILLED_INTERFACE_KEY, _apply_fills, _interface_fills, _restore, negative_dims_unknown,
                                without_weights)
from optcc.ir.walk import _node_protos, first_order_problem, graphs, nodes, tensor_protos


ModelSource = Union[str, os.PathLike, bytes, onnx.ModelProto, ir.Model]

_ZIP_MAGIC = b"PK\x03\x04"
_NPY_MAGIC = b"\x93NUMPY"


# --------------------------------------------------------------------------- loading


class MapTypedError(BadInputError):
    """The model has a value whose type holds maps, which onnx-ir cannot represent;
    ``proto``: the model as parsed (a caller's ModelProto is that ModelProto)."""

    def __init__(self, message: str, path: object | None, proto: onnx.ModelProto) -> None:
        super().__init__(message, path)
        self.proto = proto


def load(source: ModelSource) -> ir.Model:
    """Load and validate a model from a path, serialized bytes, a ModelProto or an ir.Model.

    Raises BadInputError (UnsafeInputError for security problems) with a one-line message
    naming the file. An ``ir.Model`` is returned as given (it is trusted: it came from code).
    """
    if isinstance(source, ir.Model):
        return source
    if isinstance(source, onnx.ModelProto):
        return _from_proto(source, base_dir=None, label="<ModelProto>", owned=False)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        proto, verdict = _checked_parse(data, "<bytes>")
        model = _from_proto(proto, base_dir=None, label="<bytes>", verdict=verdict)
        del proto
        _release_after(len(data))  # the parse, freed in C, is not held as the work on the model begins
        return model
    if isinstance(source, (str, os.PathLike)):
        return load_keeping_parse(source, keep=False)[0]
    raise BadInputError(
        f"cannot load a model from a {type(source).__name__}; "
        "give a path, bytes, onnx.ModelProto or onnx_ir.Model"
    )


def load_keeping_parse(path: str | os.PathLike, keep: bool = True) -> tuple[ir.Model, onnx.ModelProto | None]:
    """``load(path)``, and with ``keep`` the file's parse the model was built from, where
    loading left it as the file holds it (no interface type filled in, no legacy initializer
    moved, no attribute packed): what parsing the file again without its external data gives.
    None otherwise."""
    path = Path(path)
    stamp = _stamp(path)
    data = _read_model_file(path)
    size = len(data)
    proto, verdict = _checked_parse(data, str(path))
    del data  # parsed: not held while the model is built
    unchanged: list[bool] = []
    model = _from_proto(proto, base_dir=path.resolve().parent, label=str(path), path=path, stamp=stamp,
                        verdict=verdict, unchanged=unchanged)
    if keep and unchanged:
        return model, proto
    del proto
    _release_after(size)  # the parse, freed in C, is not held as the work on the model begins
    return model, None


def _read_model_file(path: Path) -> bytes:
    if not path.exists():
        raise BadInputError("no such file", path)
    if not path.is_file():
        raise BadInputError("not a file", path)
    try:
        return path.read_bytes()
    except OSError as e:
        raise BadInputError(f"cannot read: {e.strerror or e}", path) from None


@dataclasses.dataclass(frozen=True)
class _Verdict:
    """What onnx's checker said of the very bytes a model was parsed from: ``error`` is
    the BadInputError its rejection raises (None: accepted)."""

    error: BadInputError | None

    def apply(self) -> None:
        if self.error is not None:
            raise self.error


def _checked_parse(data: bytes, label: str) -> tuple[onnx.ModelProto, _Verdict]:
    """``data`` parsed, and the checker's verdict on ``data``, taken before the parse and
    raised only where ``_from_proto`` checks the model: the checker's own parse is gone
    before this one is made, so that at most two copies of the weights (the bytes and one
    parse) are held at once, and the checker never reads the file again."""
    _refuse_other_formats(data, label)
    try:
        _check_structure(data, label)
        verdict = _Verdict(None)
    except BadInputError as error:
        # kept without its traceback and context, whose frames would hold ``data`` alive
        error.__context__ = error.__cause__ = None
        verdict = _Verdict(error.with_traceback(None))
    _release_after(len(data))  # the checker's parse, freed in C, is not held beside the parse made next
    return _parse_bytes(data, label), verdict


def _release_after(size: int) -> None:
    """``release_memory`` after a parse of ``size`` bytes is dropped, when it was large (a
    small one leaves little in the heap to hand back)."""
    if size >= LARGE_MODEL_BYTES:
        release_memory()


def _refuse_other_formats(data: bytes, label: str) -> None:
    if not data:
        raise BadInputError("empty file, not an ONNX model", label)
    if data.startswith(_ZIP_MAGIC):
        raise BadInputError("is a zip archive (an .npz?), not an ONNX model", label)
    if data.startswith(_NPY_MAGIC):
        raise BadInputError("is a NumPy .npy array, not an ONNX model", label)


def _parse_bytes(data: bytes, label: str) -> onnx.ModelProto:
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


def _stamp(path: Path) -> tuple[int, ...] | None:
    """What identifies the file's contents: device, inode, size and modification time."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class _UndefinedInputFilter(logging.Filter):
    """Drops onnx-ir's warnings that a node reads a value no scope defines (and, in a body,
    its caveat about the scope of the value it makes up): the load's validation
    (``_sort_or_reject_cycle``) refuses such a graph with its own one-line error."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return "cannot be found in any scope" not in message and \
            not message.startswith("Caveat: The value is created in the subgraph")


@contextlib.contextmanager
def _undefined_inputs_unlogged() -> Iterator[None]:
    """onnx-ir's serde logger without its undefined-input warning, for the ``with`` block only."""
    serde_logger = logging.getLogger(ir.serde.__name__)
    undefined_filter = _UndefinedInputFilter()
    serde_logger.addFilter(undefined_filter)
    try:
        yield
    finally:
        serde_logger.removeFilter(undefined_filter)


def _from_proto(
    proto: onnx.ModelProto, base_dir: Path | None, label: str, path: Path | None = None,
    stamp: tuple[int, ...] | None = None, verdict: _Verdict | None = None, unchanged: list[bool] | None = None,
    owned: bool = True,
) -> ir.Model:
    """The model of ``proto`` (parsed from the file ``path``; ``verdict``: the checker's on
    the bytes it was parsed from, when given), checked and validated. ``unchanged``: a list given by a caller that keeps
    ``proto``; True is appended when ``proto`` is left as parsed (no fill, no legacy move, no
    attribute packed). A proto not ``owned`` (a caller's) is left as it was; an owned one
    may lose what the model took from it (its packed attributes' elements)."""
    _check_versions(proto, label)
    has_external = _check_external_data(proto, base_dir, label)
    fills = _interface_fills(proto, label)
    originals = _apply_fills(proto, fills)
    ir_version = proto.ir_version
    unlisted = _unlisted_legacy_initializers(proto)
    if unlisted:  # checked as the IR 4 model it is moved to just below: the rule it breaks is gone there
        proto.ir_version = 4
    try:
        if (fills or unlisted) and has_external:
            # The checker can only resolve external data from the file, which lacks the
            # filled types; check the structure without the (already validated) weights.
            _check_structure(without_weights(proto), label)
        elif verdict is not None and not fills and not unlisted and not has_external:
            verdict.apply()  # the very bytes parsed: the checker need not read the file again
        elif path is not None and not fills and not unlisted:
            # The checker reads the file itself: it resolves external data files against
            # the model's folder (their locations were validated just above). The file
            # must be the one just parsed.
            _check_structure(str(path), label)
            if stamp is None or _stamp(path) != stamp:
                raise BadInputError("the file changed while it was being loaded", label)
        else:
            _check_structure(proto, label)
        proto.ir_version = ir_version
        try:
            # builds the model's objects only (large ml attributes packed: ``packed_attributes``)
            with collector_paused(), packed_for_load(proto, restore=not owned) as packed, _undefined_inputs_unlogged():
                model = ir.serde.deserialize_model(proto)
                put_packed(model, packed)
            _own_tensors(model)
            share_files(model)
            if unlisted:
                upgrade_legacy_ir(model)
        except Exception as e:  # onnx-ir rejects some malformed protos the checker lets through
            mapped = map_typed_value(proto)
            if mapped is not None:
                raise MapTypedError(f"'{mapped}' holds maps, a type optcc cannot represent (only ZipMap "
                                    "nodes that end the graph are set apart and put back); export without "
                                    "them (skl2onnx: options={'zipmap': False})", label, proto) from None
            raise BadInputError(f"malformed model: {_one_line(e)}", label) from None
    finally:
        proto.ir_version = ir_version
        _restore(proto, originals)  # a caller's ModelProto is never modified
    notes = [note for _, _, note in fills] + negative_dims_unknown(model)
    if notes:
        model.meta[FILLED_INTERFACE_KEY] = notes
    if base_dir is not None and has_external:  # no external tensor: no base folder to set
        ir.external_data.set_base_dir(model.graph, base_dir)
        attributes_in_memory(model)
    _sort_or_reject_cycle(model, label)
    if unchanged is not None and not fills and not unlisted and not packed:
        unchanged.append(True)
    return model


# dtypes whose raw_data is exactly the NumPy array's little-endian bytes, with that array's dtype
_PLAIN_DTYPES = {
    int(dtype): dtype
    for dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.INT8, ir.DataType.UINT8,
                  ir.DataType.INT16, ir.DataType.UINT16, ir.DataType.INT32, ir.DataType.UINT32, ir.DataType.INT64,
                  ir.DataType.UINT64, ir.DataType.BOOL)
}
_PLAIN_RAW = {number: dtype.numpy().newbyteorder("<") for number, dtype in _PLAIN_DTYPES.items()}
# the TensorProto fields an in-memory tensor writes back (a name only when not empty), as
# the descriptors ``ListFields`` returns (one object per field: compared by identity)
_TENSOR_FIELDS = onnx.TensorProto.DESCRIPTOR.fields_by_name
_PLAIN_FIELDS = frozenset(_TENSOR_FIELDS[name] for name in ("name", "dims", "data_type", "raw_data"))
_NAME_FIELD, _RAW_DATA_FIELD = _TENSOR_FIELDS["name"], _TENSOR_FIELDS["raw_data"]


def _plain_raw_data(proto: onnx.TensorProto) -> bytes | None:
    """The tensor's ``raw_data`` when it is set and no field outside ``_PLAIN_FIELDS`` is,
    its type is in ``_PLAIN_RAW`` and its name, when set, is not empty; else None. Read
    from ``ListFields`` (a singular field listed when set, a repeated one when not empty),
    which copies ``raw_data`` once: the copy the array is made from."""
    if proto.data_type not in _PLAIN_RAW or not proto.HasField("raw_data"):
        return None
    raw = None
    for descriptor, value in proto.ListFields():
        if descriptor not in _PLAIN_FIELDS or descriptor is _NAME_FIELD and not value:
            return None
        if descriptor is _RAW_DATA_FIELD:
            raw = value
    return raw


def _owned(tensor: ir.TensorProtocol) -> ir.TensorProtocol:
    """``tensor`` detached from the parsed protobuf: a tensor read from a protobuf keeps
    the whole parsed model alive (protobuf's arena) and hands out a new copy of its bytes
    on every read. A plain tensor stored as ``raw_data`` with no other field set becomes
    an in-memory array (it serializes to the same TensorProto); any other keeps its
    representation in a TensorProto of its own."""
    if type(tensor) is not ir.TensorProtoTensor and not isinstance(tensor, ir.TensorProtoTensor):
        return tensor  # (``type`` first: an isinstance check of onnx-ir's classes is slow)
    proto = tensor.raw
    raw = _plain_raw_data(proto)
    if raw is not None:
        # a read-only view of the one copy of the bytes, reshaped to the dims: exactly the
        # raw_data, as ``tensor.numpy()`` reads it (a length that does not fit the dims
        # raises); its dtype is the one ``tensor.dtype`` gives, read from the table
        number = proto.data_type
        array = np.frombuffer(raw, dtype=_PLAIN_RAW[number]).reshape(proto.dims[:])  # a slice: a list of ints
        return ir.Tensor(array, dtype=_PLAIN_DTYPES[number], name=proto.name or None)
    alone = onnx.TensorProto()
    alone.MergeFrom(proto)  # into an empty message: a copy of every field (upb's CopyFrom is several times slower)
    return ir.TensorProtoTensor(alone)


_TENSOR_ATTRIBUTES = frozenset({ir.AttributeType.TENSOR, ir.AttributeType.TENSORS})


def _tensor_attributes(node: ir.Node) -> list[tuple[str, ir.Attr]]:
    """The node's TENSOR and TENSORS attributes with their names, listed before any is
    replaced (read from the UserDict's own dict: its Mapping views are slow)."""
    return [(name, attr) for name, attr in node.attributes.data.items() if attr.type in _TENSOR_ATTRIBUTES]


def attributes_in_memory(model: ir.Model) -> list[tuple[ir.Node, str, ir.Attr]]:
    """Read every tensor attribute stored in an external data file (a Constant's value,
    saved with onnx's convert_attribute) into memory, and return the attributes replaced
    (node, name, the attribute as it was) for a caller that restores them. Initializers
    read from the file are handed to the checker and to onnxruntime as they are
    (``light_proto``); an attribute would be serialized as a reference to the data file,
    which no scratch copy of the model, nor a model saved elsewhere, has beside it."""
    replaced = []
    for node in nodes(model):
        for name, attr in _tensor_attributes(node):
            if attr.type == ir.AttributeType.TENSOR and isinstance(attr.value, ir.ExternalTensor):
                node.attributes[name] = ir.AttrTensor(name, in_memory(attr.value), doc_string=attr.doc_string)
            elif attr.type == ir.AttributeType.TENSORS and any(isinstance(t, ir.ExternalTensor) for t in attr.value):
                node.attributes[name] = ir.AttrTensors(
                    name, [in_memory(t) if isinstance(t, ir.ExternalTensor) else t for t in attr.value],
                    doc_string=attr.doc_string)
            else:
                continue
            replaced.append((node, name, attr))
    return replaced


def in_memory(tensor: ir.ExternalTensor) -> ir.Tensor:
    """An in-memory copy of a tensor read from an external data file (through its file's
    shared map, ``external_files``: no map of the file stays open for it)."""
    return ir.Tensor(mapped(tensor).copy(), dtype=tensor.dtype, name=tensor.name, doc_string=tensor.doc_string)


def _own_tensors(model: ir.Model) -> None:
    """Detach every initializer and tensor attribute from the parsed protobuf
    (``_owned``), so that the model holds its weights once and the protobuf is freed
    when its parser lets it go."""
    for graph in graphs(model):
        if isinstance(graph, ir.Graph):
            for value in graph.initializers.values():
                if value.const_value is not None:
                    value.const_value = _owned(value.const_value)
        for node in graph:
            for name, attr in _tensor_attributes(node):
                if attr.type == ir.AttributeType.TENSOR:
                    node.attributes[name] = ir.AttrTensor(name, _owned(attr.value), doc_string=attr.doc_string)
                elif attr.type == ir.AttributeType.TENSORS:
                    node.attributes[name] = ir.AttrTensors(name, [_owned(t) for t in attr.value],
                                                           doc_string=attr.doc_string)


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


def _uses_default_domain(proto: onnx.ModelProto) -> bool:
    graphs_ = [proto.graph, *(onnx.GraphProto(node=f.node) for f in proto.functions)]
    return any(
        node.domain in ("", "ai.onnx") for graph in graphs_ for node in _node_protos(graph)
    )


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


def _unlisted_legacy_initializers(proto: onnx.ModelProto) -> bool:
    """Whether the model is below IR version 4 yet has initializers it does not list as
    graph inputs (as IR 3 requires). onnxruntime runs such a model with every initializer
    a constant, which is what ``upgrade_legacy_ir`` makes of it."""
    if proto.ir_version >= 4:
        return False
    listed = {v.name for v in proto.graph.input}
    return any(t.name not in listed for t in proto.graph.initializer)


def _check_structure(proto: onnx.ModelProto | str | bytes, label: str) -> None:
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


def map_typed_value(proto: onnx.ModelProto) -> str | None:
    """The name of the first graph input, output or annotated value whose type holds a map."""
    def holds_map(type_: onnx.TypeProto) -> bool:
        kind = type_.WhichOneof("value")
        if kind == "map_type":
            return True
        inner = {"sequence_type": lambda: type_.sequence_type.elem_type,
                 "optional_type": lambda: type_.optional_type.elem_type}.get(kind or "")
        return inner is not None and holds_map(inner())

    graph = proto.graph
    for info in (*graph.input, *graph.output, *graph.value_info):
        if holds_map(info.type):
            return info.name
    return None


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:300] + ("..." if len(text) > 300 else "")
