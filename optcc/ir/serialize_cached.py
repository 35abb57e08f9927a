"""The serialized model, byte for byte what onnx-ir writes, assembled from the cached
bytes of the nodes, value annotations and small tensors that did not change since the
last serialization.

Why: a run serializes the same model several times (shape inference in every
fold-constants round, onnx's checker on the result, the save), and onnx-ir's serializer
costs microseconds per node and per value annotation although most of them have not
changed since the last time.

``model_parts(model)`` returns the model's serialization in parts (``Parts``): each
node's, value annotation's and initializer's message bytes, and the few model- and
graph-level fields. Joined (``Parts.to_bytes``), they are exactly
``onnx_ir.serde.serialize_model(model).SerializeToString()``: protobuf writes a message's
fields in field-number order and a repeated field's elements in order, each element as
its tag, its length and its bytes, and that is how the parts are joined (tests compare
the bytes).

How a cached part stays exact: each object's bytes are kept in that object's ``meta``
with the key they were written from, and reused only when the object's key is the same
now. The key holds every field the bytes are written from:

- node: name, op_type, domain, overload, doc_string, metadata_props, input and output
  names, and its attribute objects (by identity: an ``ir.Attr``'s value cannot be
  reassigned, and onnx-ir stores lists as tuples; their names and doc strings are part of
  the key). A node whose TENSOR attributes hold in-memory tensors of at most
  ``CACHE_TENSOR_BYTES`` (a Constant's or ConstantOfShape's value) is cached with each
  such tensor's name, doc_string and metadata_props in its key (what can change under the
  attribute; the data cannot); nodes with larger or other tensors (the cache would hold a
  second copy of their data), TENSORS or sparse attributes are not cached, nor nodes with
  type attributes (a type's dtype can be set);
- value annotation: name, tensor type (the object by identity, its dtype and
  denotation; other types are not cached), dims, dim denotations, doc_string,
  metadata_props;
- in-memory tensor of at most ``CACHE_TENSOR_BYTES``: its name, doc_string and
  metadata_props (onnx-ir tensors are immutable; the bytes live in the tensor's meta).

A part that is not cached is written in one of these ways, each giving onnx-ir's bytes:
a parsed tensor of a plain numeric type as its own TensorProto's bytes (what onnx-ir's
copy of that message serializes to); an in-memory array tensor, a tensor-typed value
annotation and a node whose attributes are plain scalars, lists, strings or in-memory
tensors by encoding their protobuf fields directly (``_array_bytes``,
``_tensor_value_info``, ``_plain_node``: the fields onnx-ir sets, in field-number order,
as protobuf writes them); every other part by onnx-ir's serializer.

Models outside the plain case get ``None`` from ``model_parts`` (callers then use
onnx-ir's serializer): model-local functions, subgraph or reference attributes (a body's
contents can change under an unchanged attribute object), quantization annotations,
multi-device configurations.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from collections.abc import Callable
from typing import Any

import onnx
import onnx_ir as ir

from optcc.ir.packed_attributes import PackedAttr
from optcc.ir.walk import _tensor_nbytes

__all__ = ["Parts", "model_parts", "serialize_bytes", "varint", "CACHE_TENSOR_BYTES"]

CACHE_TENSOR_BYTES = 4096

_NODE_KEY = "optcc.serialized.node"
_VALUE_KEY = "optcc.serialized.value"
_TENSOR_KEY = "optcc.serialized.tensor"
_DIMS_ONLY_KEY = "optcc.serialized.dims_only"
_QUANTIZATION_KEY = "quant_parameter_tensor_names"  # onnx-ir's meta key for quantization annotations

_UNCACHED_ATTRIBUTES = frozenset({
    ir.AttributeType.TENSORS,
    ir.AttributeType.SPARSE_TENSOR, ir.AttributeType.SPARSE_TENSORS,
    ir.AttributeType.TYPE_PROTO, ir.AttributeType.TYPE_PROTOS,  # a type object's dtype can be set
})
_GRAPH_ATTRIBUTES = frozenset({ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS})
_TENSOR = ir.AttributeType.TENSOR
_INT, _FLOAT, _STRING = ir.AttributeType.INT, ir.AttributeType.FLOAT, ir.AttributeType.STRING
_INTS, _FLOATS, _STRINGS = ir.AttributeType.INTS, ir.AttributeType.FLOATS, ir.AttributeType.STRINGS
_INT64_MIN = -(1 << 63)
_PACK_FLOAT = struct.Struct("<f").pack
_INT64_END = 1 << 63
_SYMBOLIC = ir.SymbolicDim
_CACHED_TENSOR_TYPES = (ir.Tensor, ir.serde.TensorProtoTensor)
_PROTO_BYTES_DTYPES = frozenset(int(t) for t in (
    ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.INT8, ir.DataType.UINT8,
    ir.DataType.INT16, ir.DataType.UINT16, ir.DataType.INT32, ir.DataType.UINT32, ir.DataType.INT64,
    ir.DataType.UINT64, ir.DataType.BOOL))

# field numbers (onnx.proto)
_MODEL_GRAPH = 7
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_INPUT, _GRAPH_OUTPUT, _GRAPH_VALUE_INFO = 1, 5, 11, 12, 13


class _Unsupported(Exception):
    """The model is outside the plain case: onnx-ir serializes it."""


def varint(n: int) -> bytes:
    """``n`` as a protobuf varint (7 bits a byte, low first)."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


_ONE_BYTE = [bytes((n,)) for n in range(128)]  # the varints below 128


def _length(n: int) -> bytes:
    return _ONE_BYTE[n] if n < 128 else varint(n)


# the tags of the message fields the parts write often
_NODE_TAG, _INPUT_TAG, _OUTPUT_TAG, _VALUE_INFO_TAG, _INITIALIZER_TAG = (
    varint(number << 3 | 2) for number in (_GRAPH_NODE, _GRAPH_INPUT, _GRAPH_OUTPUT, _GRAPH_VALUE_INFO,
                                           _GRAPH_INITIALIZER))
_GRAPH_TAG = varint(_MODEL_GRAPH << 3 | 2)


@dataclasses.dataclass
class Parts:
    """A model's serialization in parts, in field-number order.

    ``head``: the ModelProto fields before ``graph`` (numbers 1-6); ``tail``: those after
    it (opset_import, metadata_props). In the GraphProto: ``nodes`` (field 1, each
    element's bytes), ``name`` (field 2, encoded), ``initializers`` ((name, TensorProto
    bytes) of field 5, in order), ``rest`` (fields 10 and up, encoded)."""

    head: bytes
    nodes: list[bytes]
    name: bytes
    initializers: list[tuple[str, bytes]]
    rest: bytes
    tail: bytes

    def graph_bytes(self, initializers: bool = True) -> bytes:
        return b"".join(self._graph_pieces(initializers))

    def to_bytes(self, initializers: bool = True) -> bytes:
        """The ModelProto's bytes (without the graph's initializers when asked), joined
        once: a tensor's bytes are copied into the result and nowhere else."""
        pieces = self._graph_pieces(initializers)
        size = sum(map(len, pieces))
        return b"".join([self.head, _GRAPH_TAG, _length(size), *pieces, self.tail])

    def _graph_pieces(self, initializers: bool) -> list[bytes]:
        """The GraphProto's bytes in pieces; a length-delimited element as its tag and
        length, then its bytes."""
        pieces = [_NODE_TAG + _length(len(node)) + node for node in self.nodes]
        pieces.append(self.name)
        if initializers:
            for _, tensor in self.initializers:
                pieces.append(_INITIALIZER_TAG + _length(len(tensor)))
                pieces.append(tensor)
        pieces.append(self.rest)
        return pieces


def serialize_bytes(model: ir.Model) -> bytes:
    """``onnx_ir.serde.serialize_model(model).SerializeToString()``, from cached parts
    where the model allows."""
    parts = model_parts(model)
    return parts.to_bytes() if parts is not None else ir.serde.serialize_model(model).SerializeToString()


def model_parts(model: ir.Model, dims_only: Callable[[ir.TensorProtocol], bool] | None = None) -> Parts | None:
    """The model's serialization in parts (see ``Parts``); None outside the plain case
    (see the module docstring). Like onnx-ir's serializer, it names each initializer's
    tensor after its value.

    ``dims_only``: the main graph's initializers whose tensor it accepts are written as a
    TensorProto of their value's name, the tensor's dtype and dims, and no data (what shape
    inference reads of a weight); their tensor's name is left as it is. The bytes are then
    no longer onnx-ir's."""
    if len(model.functions) or getattr(model, "device_configurations", ()):
        return None
    head = onnx.ModelProto()
    head.ir_version = model.ir_version
    if model.producer_name:
        head.producer_name = model.producer_name
    if model.producer_version:
        head.producer_version = model.producer_version
    if model.domain:
        head.domain = model.domain
    if model.model_version:
        head.model_version = model.model_version
    if model.doc_string:
        head.doc_string = model.doc_string
    tail = onnx.ModelProto()
    for domain, version in model.opset_imports.items():
        tail.opset_import.add(domain=domain, version=version)
    _string_map_into(tail.metadata_props, model.metadata_props)
    try:
        return _graph_parts(model.graph, head.SerializeToString(), tail.SerializeToString(), dims_only)
    except _Unsupported:
        return None


def _string_map_into(entries: Any, mapping: dict[str, str]) -> None:
    for key in sorted(mapping):
        entries.add(key=key, value=mapping[key])


def _graph_parts(graph: ir.Graph, head: bytes, tail: bytes,
                 dims_only: Callable[[ir.TensorProtocol], bool] | None = None) -> Parts:
    """What ``onnx_ir.serde.serialize_graph_into`` writes for ``graph``, in parts (the
    tensors ``dims_only`` accepts without their data: see ``model_parts``)."""
    inputs = []
    for value in graph.inputs:
        _no_quantization(value)
        data = _value_info(value)
        inputs.append(_INPUT_TAG + _length(len(data)) + data)
    input_names = {v.name for v in graph.inputs}
    infos: list[bytes] = []
    initializers: list[tuple[str, bytes]] = []
    for value in graph.initializers.values():
        _no_quantization(value)
        if value.name not in input_names and _annotated(value):
            data = _value_info(value)
            infos.append(_VALUE_INFO_TAG + _length(len(data)) + data)
        tensor = value.const_value
        if tensor is None:
            continue  # onnx-ir writes no initializer for it either (and warns)
        if dims_only is not None and tensor.dtype != ir.DataType.STRING and dims_only(tensor):
            initializers.append((value.name, _dims_only(tensor, value.name)))
            continue
        tensor.name = value.name  # as onnx-ir's serializer does
        initializers.append((value.name, _tensor(tensor)))
    nodes: list[bytes] = []
    for node in graph:
        nodes.append(_node(node))
        for output in node.outputs:
            if output.is_graph_output():
                continue
            _no_quantization(output)
            if _annotated(output):
                data = _value_info(output)
                infos.append(_VALUE_INFO_TAG + _length(len(data)) + data)
    outputs = []
    for value in graph.outputs:
        _no_quantization(value)
        data = _value_info(value)
        outputs.append(_OUTPUT_TAG + _length(len(data)) + data)
    name = onnx.GraphProto(name=graph.name).SerializeToString() if graph.name else b""
    doc = onnx.GraphProto(doc_string=graph.doc_string).SerializeToString() if graph.doc_string else b""
    metadata = onnx.GraphProto()
    _string_map_into(metadata.metadata_props, graph.metadata_props)
    # fields 10 (doc_string), 11 (input), 12 (output), 13 (value_info), 16 (metadata_props)
    rest = b"".join([doc, *inputs, *outputs, *infos, metadata.SerializeToString()])
    return Parts(head, nodes, name, initializers, rest, tail)


def _no_quantization(value: ir.Value) -> None:
    if value.meta.data.get(_QUANTIZATION_KEY):  # the UserDict's own dict: its Mapping methods are slow
        raise _Unsupported


def _annotated(value: ir.Value) -> bool:
    """Whether onnx-ir writes a value_info for the value (``_should_create_value_info_for_value``)."""
    if value.shape is None and value.type is None and not value.metadata_props and not value.doc_string:
        return False
    return bool(value.name)


def _node(node: ir.Node) -> bytes:
    if getattr(node, "device_configurations", ()):
        raise _Unsupported
    attributes = tuple(node.attributes.data.values())
    metadata = node.metadata_props
    key = (
        node.name, node.op_type, node.domain, node.overload, node.doc_string,
        tuple(sorted(metadata.items())) if metadata else (),
        tuple(["" if v is None else v.name for v in node.inputs]),
        tuple([v.name for v in node.outputs]),
        tuple([id(a) for a in attributes]),
        tuple([(a.name, a.doc_string, _tensor_fields(a.value) if a.type == _TENSOR else ()) for a in attributes]),
    )
    meta = node.meta.data
    cached = meta.get(_NODE_KEY)
    if cached is not None and cached[0] == key:
        # the same attribute objects as when the bytes were cached, and an attribute's type,
        # reference and value are fixed when it is made: they passed the checks below then
        return cached[1]
    cacheable = True
    for attr in attributes:
        if attr.type in _GRAPH_ATTRIBUTES or attr.ref_attr_name is not None:
            raise _Unsupported
        if attr.type in _UNCACHED_ATTRIBUTES or attr.type == _TENSOR and not _small_in_memory(attr.value):
            cacheable = False
    if not cacheable:
        return ir.serde.serialize_node(node).SerializeToString()
    data = _plain_node(node, attributes, metadata)
    if data is None:
        data = ir.serde.serialize_node(node).SerializeToString()
    meta[_NODE_KEY] = (key, data, attributes)  # the attributes stay referenced: their ids stay theirs
    return data


def _signed_int64(n: int) -> bytes | None:
    """An int64 field's varint (a negative one as its 64-bit two's complement, ten
    bytes); None outside int64."""
    if 0 <= n < 128:
        return _ONE_BYTE[n]
    if not _INT64_MIN <= n < _INT64_END:
        return None
    return varint(n & 0xFFFFFFFFFFFFFFFF)


def _float32(x: float) -> bytes | None:
    """A float field's 4 little-endian bytes (the value rounded to float32, as protobuf
    stores a Python float); None for an infinity, a NaN or a value float32 cannot hold."""
    if type(x) is not float or not math.isfinite(x):
        return None
    try:
        return _PACK_FLOAT(x)
    except OverflowError:
        return None


def _attribute(attr: ir.Attr) -> bytes | None:
    """The AttributeProto bytes onnx-ir writes for an INT, FLOAT, STRING (of a str), INTS,
    FLOATS, STRINGS or TENSOR (of an in-memory tensor) attribute without doc string:
    ``name`` (1), the value (``f`` 2 as float32, ``i`` 3, ``s`` 4 as UTF-8, ``t`` 5 as
    ``_tensor`` writes it, or one unpacked element per item of ``floats`` 7, ``ints`` 8,
    ``strings`` 9), then ``type`` (20); None for any other (onnx-ir writes it)."""
    if type(attr) is PackedAttr and attr.as_packed:
        return attr.serialized  # what onnx-ir writes for it, by construction
    kind, value = attr.type, attr.value
    if attr.doc_string or type(attr.name) is not str:
        return None
    pieces = [_field(b"\x0a", attr.name.encode())]
    if kind == _INT:
        number = _signed_int64(value) if type(value) is int else None
        if number is None:
            return None
        pieces += (b"\x18", number)
    elif kind == _FLOAT:
        number = _float32(value)
        if number is None:
            return None
        pieces += (b"\x15", number)
    elif kind == _STRING:
        if type(value) is not str:
            return None
        pieces.append(_field(b"\x22", value.encode()))
    elif kind == _INTS:
        for item in value:
            number = _signed_int64(item) if type(item) is int else None
            if number is None:
                return None
            pieces += (b"\x40", number)
    elif kind == _FLOATS:
        for item in value:
            number = _float32(item)
            if number is None:
                return None
            pieces += (b"\x3d", number)
    elif kind == _STRINGS:
        for item in value:
            if type(item) is not str:
                return None
            pieces.append(_field(b"\x4a", item.encode()))
    elif kind == _TENSOR and type(value) in _CACHED_TENSOR_TYPES:
        pieces.append(_field(b"\x2a", _tensor(value)))  # the TensorProto onnx-ir writes for it
    else:
        return None
    pieces += (b"\xa0\x01", _ONE_BYTE[int(kind)])
    return b"".join(pieces)


def _plain_node(node: ir.Node, attributes: tuple[ir.Attr, ...], metadata: Any) -> bytes | None:
    """The NodeProto bytes ``onnx_ir.serde.serialize_node`` writes for a node without
    metadata whose attributes ``_attribute`` writes: ``input`` (1; "" for a missing one),
    ``output`` (2; without trailing unnamed ones), ``name`` (3), ``op_type`` (4),
    ``attribute`` (5), ``doc_string`` (6), ``domain`` (7) and ``overload`` (8), each string
    only when not empty (``op_type`` always), in field-number order as protobuf writes them;
    None otherwise (onnx-ir writes it)."""
    if metadata:
        return None
    pieces = []
    for value in node.inputs:
        name = "" if value is None else value.name
        if type(name) is not str:
            return None
        pieces.append(_field(b"\x0a", name.encode()))
    outputs = node.outputs
    named = len(outputs)
    while named and not outputs[named - 1].name:
        named -= 1
    for value in outputs[:named]:
        name = value.name
        if type(name) is not str:
            return None
        pieces.append(_field(b"\x12", name.encode()))
    strings = (node.name, node.op_type, node.doc_string, node.domain, node.overload)
    if any(s is not None and type(s) is not str for s in strings):
        return None
    name, op_type, doc_string, domain, overload = strings
    if name:
        pieces.append(_field(b"\x1a", name.encode()))
    pieces.append(_field(b"\x22", op_type.encode()))
    for attr in attributes:
        data = _attribute(attr)
        if data is None:
            return None
        pieces.append(_field(b"\x2a", data))
    if doc_string:
        pieces.append(_field(b"\x32", doc_string.encode()))
    if domain:
        pieces.append(_field(b"\x3a", domain.encode()))
    if overload:
        pieces.append(_field(b"\x42", overload.encode()))
    return b"".join(pieces)


def _tensor_fields(tensor: ir.TensorProtocol | None) -> tuple:
    """What can change in a tensor attribute's tensor (its data cannot: onnx-ir tensors
    are immutable): its name, doc_string and metadata_props."""
    if tensor is None:
        return ()
    metadata = tensor.metadata_props
    return tensor.name, tensor.doc_string, tuple(sorted(metadata.items())) if metadata else ()


def _small_in_memory(tensor: ir.TensorProtocol) -> bool:
    """Whether a node with this tensor in an attribute may be cached: an in-memory tensor
    (``type``: isinstance checks of onnx-ir's classes are slow) of at most ``CACHE_TENSOR_BYTES``."""
    return type(tensor) in _CACHED_TENSOR_TYPES and _tensor_nbytes(tensor) <= CACHE_TENSOR_BYTES


def _value_info(value: ir.Value) -> bytes:
    type_ = value.type
    if type_ is not None and type(type_) is not ir.TensorType:
        return ir.serde.serialize_value(value).SerializeToString()  # sequence/optional/sparse: not cached
    shape = value.shape
    if shape is None:
        dims: Any = None
        denotations: Any = None
    else:
        dims = shape.dims
        denotation = shape.get_denotation
        denotations = tuple([denotation(i) for i in range(len(dims))])
    metadata = value.metadata_props
    key = (
        value.name, id(type_), None if type_ is None else (type_.dtype, type_.denotation), dims, denotations,
        value.doc_string, tuple(sorted(metadata.items())) if metadata else (),
    )
    meta = value.meta.data
    cached = meta.get(_VALUE_KEY)
    if cached is not None and cached[0] == key:
        return cached[1]
    data = None
    if type_ is not None and type(type_.dtype) is ir.DataType and not type_.denotation and not metadata \
            and not value.doc_string and type(value.name) is str and (denotations is None or not any(denotations)):
        data = _tensor_value_info(value.name, type_.dtype, dims)
    if data is None:
        data = ir.serde.serialize_value(value).SerializeToString()
    meta[_VALUE_KEY] = (key, data, type_)  # the type stays referenced: its id stays its own
    return data


def _int64(n: int) -> bytes:
    """A non-negative int64 field's varint."""
    return _ONE_BYTE[n] if n < 128 else varint(n)


def _field(tag: bytes, data: bytes) -> bytes:
    """A length-delimited field: its tag, the data's length as a varint, the data."""
    return tag + _length(len(data)) + data


def _tensor_value_info(name: str, dtype: ir.DataType, dims: Any) -> bytes | None:
    """The ValueInfoProto bytes ``onnx_ir.serde.serialize_value`` writes for a value of
    ``name`` and a tensor type of ``dtype`` with neither denotation, doc string nor metadata,
    of shape ``dims`` (None: no shape; dims without denotations): ``name`` (field 1) then
    ``type`` (2) holding ``tensor_type`` (1) with ``elem_type`` (1) and, when the shape is
    known, ``shape`` (2; present though empty for a scalar) with one ``dim`` (1) per dim:
    ``dim_value`` (1) for an int, ``dim_param`` (2) for a named symbolic dim, nothing for an
    unnamed one; fields in number order, as protobuf writes them. None for a negative dim
    or one of any other kind (onnx-ir writes those)."""
    tensor = b"\x08" + _int64(int(dtype))
    if dims is not None:
        pieces = []
        for dim in dims:
            if type(dim) is int and 0 <= dim < _INT64_END:
                pieces.append(_field(b"\x0a", b"\x08" + _int64(dim)))
            elif type(dim) is _SYMBOLIC:
                param = dim.value
                pieces.append(b"\x0a\x00" if param is None else _field(b"\x0a", _field(b"\x12", param.encode())))
            else:
                return None
        tensor += _field(b"\x12", b"".join(pieces))
    return _field(b"\x0a", name.encode()) + _field(b"\x12", _field(b"\x0a", tensor))


def _dims_only(tensor: ir.TensorProtocol, name: str | None) -> bytes:
    """A TensorProto of ``name``, the tensor's dtype and dims, without data, kept in the
    tensor's meta with the name it was written for (tensors are immutable)."""
    meta = getattr(tensor, "meta", None)
    cached = None if meta is None else meta.data.get(_DIMS_ONLY_KEY)
    if cached is not None and cached[0] == name:
        return cached[1]
    proto = onnx.TensorProto(data_type=int(tensor.dtype), dims=[int(d) for d in tensor.shape.dims])
    if name:
        proto.name = name
    data = proto.SerializeToString()
    if meta is not None:
        meta.data[_DIMS_ONLY_KEY] = (name, data)
    return data


def _tensor(tensor: ir.TensorProtocol) -> bytes:
    # in-memory tensors only (``type``: isinstance checks of onnx-ir's classes are slow)
    if type(tensor) not in _CACHED_TENSOR_TYPES:
        return ir.serde.serialize_tensor(tensor).SerializeToString()
    metadata = tensor.metadata_props
    if _tensor_nbytes(tensor) > CACHE_TENSOR_BYTES:  # written each time: not kept beside its data
        return _proto_bytes(tensor, metadata) or _array_bytes(tensor, metadata) \
            or ir.serde.serialize_tensor(tensor).SerializeToString()
    key = (tensor.name, tensor.doc_string, tuple(sorted(metadata.items())) if metadata else ())
    meta = tensor.meta.data
    cached = meta.get(_TENSOR_KEY)
    if cached is not None and cached[0] == key:
        return cached[1]
    data = _proto_bytes(tensor, metadata) or _array_bytes(tensor, metadata) \
        or ir.serde.serialize_tensor(tensor).SerializeToString()
    meta[_TENSOR_KEY] = (key, data)
    return data


def _array_bytes(tensor: ir.TensorProtocol, metadata: dict[str, str]) -> bytes | None:
    """The TensorProto bytes onnx-ir writes for an in-memory ``ir.Tensor`` of a type other
    than STRING without metadata or doc string: ``dims`` (1, unpacked), ``data_type`` (2),
    ``name`` (8) when not empty and ``raw_data`` (9) holding ``tobytes()`` (present though
    empty), in field-number order; the data copied once into the result (onnx-ir's message
    copies it twice more). None for any other tensor."""
    if type(tensor) is not ir.Tensor or metadata or tensor.doc_string:
        return None
    dtype = tensor.dtype
    if type(dtype) is not ir.DataType or dtype == ir.DataType.STRING:
        return None
    pieces = []
    for dim in tensor.shape.numpy():
        pieces += (b"\x08", _int64(int(dim)))
    pieces += (b"\x10", _int64(int(dtype)))
    name = tensor.name
    if name:
        pieces.append(_field(b"\x42", name.encode()))
    data = tensor.tobytes()
    pieces += (b"\x4a", _length(len(data)), data)
    return b"".join(pieces)


def _proto_bytes(tensor: ir.TensorProtocol, metadata: dict[str, str]) -> bytes | None:
    """A parsed tensor of a plain numeric type without metadata or doc string: its own
    TensorProto's bytes, which are what onnx-ir's copy of that message writes, without the
    copy. None for any other tensor."""
    if type(tensor) is ir.serde.TensorProtoTensor and not metadata and not tensor.doc_string \
            and tensor.raw.data_type in _PROTO_BYTES_DTYPES:
        return tensor.raw.SerializeToString()
    return None
