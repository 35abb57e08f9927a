"""Saving: atomic writes, external data when a model needs it, and large initializers
streamed from memory instead of copied into one protobuf."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from optcc.errors import BadInputError
from optcc.ir.loading import attributes_in_memory, in_memory
from optcc.ir.serialize_cached import CACHE_TENSOR_BYTES, model_parts, serialize_bytes, varint
from optcc.ir.walk import _tensor_nbytes, external_data_files, graphs, tensor_protos, uses_external_data, weight_bytes

# Protobuf refuses messages of 2 GiB; leave room for the graph structure itself.
PROTOBUF_LIMIT_BYTES = 2**31 - 1
EXTERNAL_DATA_THRESHOLD_BYTES = 1_800_000_000

# --------------------------------------------------------------------------- saving


# Models with at most this many bytes of weights are serialized from cached parts
# (``serialize_cached``); larger ones by onnx-ir directly, which holds their weights once.
CACHED_SERIALIZE_MAX_BYTES = 64 << 20


def serialize(model: ir.Model) -> onnx.ModelProto:
    """The model as a ModelProto (external tensors stay references to their files): the
    proto onnx-ir writes, parsed from the bytes ``serialize_bytes`` joins from cached parts
    when the weights are small (see CACHED_SERIALIZE_MAX_BYTES)."""
    if weight_bytes(model) <= CACHED_SERIALIZE_MAX_BYTES:
        return onnx.ModelProto.FromString(serialize_bytes(model))
    return ir.serde.serialize_model(model)


def serialize_dims_only(model: ir.Model, selects: Callable[[ir.TensorProtocol], bool]) -> bytes:
    """The serialized model with the main graph's initializers whose tensor ``selects``
    accepts written without their data: a TensorProto of the value's name, the tensor's
    dtype and dims (what shape inference reads of a weight). Cached parts where the model
    allows (``model_parts``), else onnx-ir's serializer while those initializers are set
    aside (``initializers_set_aside``), their dims written back into its proto; both write
    the same message. String tensors are always written whole."""
    parts = model_parts(model, dims_only=selects)
    if parts is not None:
        return parts.to_bytes()
    with initializers_set_aside(model, selects) as aside:
        proto = ir.serde.serialize_model(model)
    dims = {value.name: [int(d) for d in tensor.shape.dims] for value, tensor in aside}
    for initializer in proto.graph.initializer:
        if initializer.name in dims:  # the placeholder's dims and empty data: the tensor's dims, no data
            del initializer.dims[:]
            initializer.dims.extend(dims[initializer.name])
            initializer.ClearField("raw_data")
    return proto.SerializeToString()


def needs_external_data(model: ir.Model) -> bool:
    """External data is used when the model came with it or its weights near 2 GB."""
    return uses_external_data(model) or weight_bytes(model) > EXTERNAL_DATA_THRESHOLD_BYTES


def check_output_path(path: str | os.PathLike, input_path: str | os.PathLike | None = None,
                      input_files: Iterable[Path] | None = None, what: str = "output") -> Path:
    """Refuse an output path before any work is done: the input model itself or a file its
    weights are read from (writing either would destroy the input), a missing or
    unwritable folder, a directory, a path ending in a separator (a folder's name), a
    symbolic link or anything else that is not a regular file (the rename would replace
    it). Returns the path. ``input_files``: the resolved files the input model reads its
    weights from, when the caller already knows them (else the input model is loaded to
    find them, when the output exists). ``what`` names the file in the messages ("output",
    "report")."""
    out = Path(path)
    if out.is_dir():
        raise BadInputError(f"{what} path is a directory", out)
    text = os.fspath(path)
    if text.endswith(tuple(sep for sep in ("/", os.sep, os.altsep) if sep)):
        # Path() drops the separator: the file would be written under the folder's name
        raise BadInputError(f"{what} path '{text}' ends in a path separator, so it names a folder that does not "
                            "exist: give a file name (FOLDER/model.onnx, in an existing folder)", out)
    if input_path is not None and Path(input_path).is_file() and out.exists():
        if os.path.samefile(out, input_path):
            raise BadInputError(f"{what} path is the input model; refusing to overwrite it", out)
        if out.resolve() in (set(input_files) if input_files is not None else read_weight_files(input_path)):
            raise BadInputError(f"{what} path is '{out.name}', which the input model reads its weights from; "
                                "refusing to overwrite it", out)
    # the rename that writes the output replaces whatever is at the path: a link (not the
    # file it points to), a device such as /dev/null, a pipe
    if out.is_symlink():
        raise BadInputError(f"{what} path is a symbolic link; give the path of the file it points to", out)
    if out.exists() and not out.is_file():
        raise BadInputError(f"{what} path exists and is not a regular file (a device, a pipe or a socket); "
                            "refusing to replace it", out)
    folder = out.resolve().parent
    if not folder.is_dir():
        raise BadInputError(f"{what} folder does not exist", out)
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".{out.name}.", suffix=".probe")
    except OSError as e:
        raise BadInputError(f"{what} folder is not writable ({e.strerror or e})", out) from None
    os.close(fd)
    os.unlink(probe)
    return out


def read_weight_files(model_path: str | os.PathLike) -> set[Path]:
    """The external data files the model at ``model_path`` reads its weights from, read from
    its parse alone (each external tensor's location in the model's folder, resolved as
    ``external_data_files`` resolves a loaded model's; none when it cannot be parsed: its
    loading reports why). Nothing is built from it, so a large model is not loaded twice."""
    try:
        proto = onnx.load(os.fspath(model_path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not a model: loading it says why
        return set()
    folder = Path(model_path).resolve().parent
    return {(folder / entry.value).resolve() for tensor in tensor_protos(proto.graph)
            if tensor.data_location == onnx.TensorProto.EXTERNAL
            for entry in tensor.external_data if entry.key == "location" and entry.value}


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


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[str]:
    """A temporary file beside ``path`` (``create_temp_file``) for the block to write,
    renamed to ``path`` when the block ends and removed when it raises: ``path`` is either
    left as it was or replaced whole."""
    out = Path(path)
    tmp_name = create_temp_file(out.resolve().parent, out.name)
    try:
        yield tmp_name
        _moved(tmp_name, out)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


def _moved(source: str | os.PathLike, target: Path) -> None:
    """``source`` renamed over ``target`` (same folder); a file there that may not be
    replaced (immutable; another user's in a sticky folder) is a BadInputError naming it."""
    try:
        os.replace(source, target)
    except PermissionError as e:
        raise BadInputError(f"cannot replace the existing file ({e.strerror or e})", target) from None


def _save_with_data(model: ir.Model, out: Path, data_name: str, size_threshold_bytes: int) -> None:
    """The model and its external data file written in a staging folder beside ``out``,
    then moved into place, the model first: where its move fails nothing outside the
    staging folder has changed; where the data's move then fails, the model that was at
    ``out`` is put back (or the new one removed where it could not be kept), so ``out``
    never reads data written for another model. The staging folder goes either way."""
    folder = out.resolve().parent
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=f".{out.name}.", suffix=".staging"))
    try:
        staged, previous = staging / out.name, staging / ".previous"
        ir.save(model, staged, external_data=data_name, size_threshold_bytes=size_threshold_bytes)
        kept = False
        if out.exists():
            with contextlib.suppress(OSError):  # a link may be refused (protected_hardlinks): then nothing is kept
                os.link(out, previous)
                kept = True
        _moved(staged, out)
        try:
            if (staging / data_name).exists():  # no tensor at the threshold: no data file written
                _moved(staging / data_name, folder / data_name)
        except BaseException:
            if kept:
                os.replace(previous, out)
            else:
                out.unlink(missing_ok=True)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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
    file name beside the model; default ``<name>.data``).
    A failure leaves no partial output behind, and the files that were there as they were
    (``_save_with_data``).
    """
    out = check_output_path(path)
    if external_data is None:
        external_data = needs_external_data(model)
    folder = out.resolve().parent
    data_name = location or f"{out.name}.data"
    if Path(data_name).name != data_name or data_name in (".", "..") or data_name == out.name:
        raise BadInputError(f"external data location '{data_name}' must be a file name beside the model", out)
    if not external_data:
        with replacing(out) as tmp_name:
            _write_streamed(model, tmp_name)
        return
    if (folder / data_name).resolve() in external_data_files(model):
        raise BadInputError(
            f"would overwrite '{data_name}', the external data the model reads from; choose another output name", out)
    _save_with_data(model, out, data_name, size_threshold_bytes)


def save_proto(proto: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write ``proto`` (under 2 GB, no external data) atomically: a temporary file in the
    target folder, on disk before it is renamed to ``path``."""
    with replacing(check_output_path(path)) as tmp_name, open(tmp_name, "wb") as file:
        file.write(proto.SerializeToString())
        file.flush()
        os.fsync(file.fileno())


# dtypes whose raw_data is the NumPy array's little-endian bytes
RAW_DTYPES = frozenset({
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
            value.const_value = _placeholder(tensor)
        yield swapped
    finally:
        for value, tensor in swapped:
            value.const_value = tensor


_PLACEHOLDER_KEY = "optcc.set_aside.placeholder"


def _placeholder(tensor: ir.TensorProtocol) -> ir.Tensor:
    """An empty tensor of ``tensor``'s dtype and name: the same object each time a tensor
    is set aside (kept in its meta), so that its serialization is cached too."""
    meta = getattr(tensor, "meta", None)
    placeholder = None if meta is None else meta.data.get(_PLACEHOLDER_KEY)
    if placeholder is None:
        placeholder = ir.Tensor(np.zeros(0, dtype=tensor.dtype.numpy()))
        if meta is not None:
            meta.data[_PLACEHOLDER_KEY] = placeholder
    placeholder.name = tensor.name
    return placeholder


def _graph_initializer_field(tensor_start: bytes, extra: int = 0) -> bytes:
    """``ModelProto.graph (7) { GraphProto.initializer (5) { tensor } }`` up to the end of
    ``tensor_start``; ``extra`` more bytes of the tensor follow it in the file."""
    tensor_len = len(tensor_start) + extra
    graph_len = 1 + len(varint(tensor_len)) + tensor_len
    return b"\x3a" + varint(graph_len) + b"\x2a" + varint(tensor_len) + tensor_start


@contextlib.contextmanager
def external_tensors_in_memory(model: ir.Model) -> Iterator[None]:
    """Within the block, every tensor still read from an external data file (an
    initializer of any graph, a tensor attribute) is an in-memory copy, so that the model
    serialized holds the data itself and not a reference to the input's data file, which
    neither a model written elsewhere nor a session loaded from bytes or from a scratch
    folder has beside it. Restored on exit."""
    values: list[tuple[ir.Value, ir.TensorProtocol]] = []
    attributes: list[tuple[ir.Node, str, ir.Attr]] = []
    try:
        for graph in graphs(model):
            if not isinstance(graph, ir.Graph):
                continue
            for value in graph.initializers.values():
                if isinstance(value.const_value, ir.ExternalTensor):
                    values.append((value, value.const_value))
                    value.const_value = in_memory(value.const_value)
        attributes = attributes_in_memory(model)
        yield
    finally:
        for value, tensor in values:
            value.const_value = tensor
        for node, name, attr in attributes:
            node.attributes[name] = attr


def _write_streamed(model: ir.Model, path: str) -> None:
    """Write the model without ever holding a serialized copy of its large weights: the
    model without initializers, then one ``graph { initializer { ... } }`` fragment per
    initializer in order, a large one's raw_data written from the array's memory.
    Protobuf merges repeated occurrences of a message field, so the file parses to the
    same model as the one-piece serialization. Peak memory stays near the weights' own
    size instead of three times it (VGG-19 with 513 MB of folded weights: 2.2 GB before).
    An in-memory array of a raw dtype with no doc string or metadata is written from
    memory from ``CACHE_TENSOR_BYTES`` on: onnx-ir writes such a tensor as exactly that
    header (dims, data_type, name) and its little-endian bytes as raw_data, so the file
    has the same bytes with fewer copies."""

    def streamed(tensor: ir.TensorProtocol) -> bool:
        if type(tensor) is ir.Tensor and tensor.dtype in RAW_DTYPES and not tensor.doc_string \
                and not tensor.metadata_props:
            return _tensor_nbytes(tensor) > CACHE_TENSOR_BYTES
        if isinstance(tensor, ir.ExternalTensor):  # its data, read from its file, not a reference to it
            return tensor.dtype in RAW_DTYPES
        return tensor.dtype in RAW_DTYPES and tensor.nbytes >= STREAM_MIN_BYTES

    with initializers_set_aside(model, streamed) as aside, external_tensors_in_memory(model):
        parts = model_parts(model)
        if parts is not None:  # the bytes of the model's parts (see ``serialize_cached``)
            head = parts.to_bytes(initializers=False)
            initializers = parts.initializers
        else:
            proto = ir.serde.serialize_model(model)
            initializers = [(t.name, t.SerializeToString()) for t in proto.graph.initializer]
            del proto.graph.initializer[:]
            head = proto.SerializeToString()
            del proto
    big = {v.name: t for v, t in aside}
    with open(path, "wb") as f:
        f.write(head)
        del head
        for name, data in initializers:  # in order; the big ones are placeholders
            tensor = big.get(name)
            if tensor is None:
                f.write(_graph_initializer_field(data))
                continue
            array = np.ascontiguousarray(tensor.numpy())
            if array.dtype.byteorder == ">":
                array = array.astype(array.dtype.newbyteorder("<"))
            header = onnx.TensorProto(name=name, dims=list(array.shape),
                                      data_type=int(tensor.dtype)).SerializeToString()
            data = memoryview(array.reshape(-1).view(np.uint8))
            raw_field = b"\x4a" + varint(data.nbytes)  # TensorProto.raw_data (9)
            f.write(_graph_initializer_field(header + raw_field, extra=data.nbytes))
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
