"""One decoded array per parsed tensor.

A tensor read from a protobuf (``onnx_ir.serde.TensorProtoTensor``) decodes its proto on
every ``numpy()`` call: values stored in a repeated field (``float_data``,
``int64_data``, ...) become a new array each time. Exporters such as PaddlePaddle's store
every Constant that way, and the passes, the deduplication and the equivalence proof each
read those tensors, several times per run. ``decoded`` decodes such a tensor once and
keeps the array, read-only, in the tensor's metadata while the tensor lives: onnx-ir
tensors are immutable (a rewrite makes a new tensor) and clones share them, so the kept
array always holds the tensor's values.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from optcc.ir.external_files import mapped

__all__ = ["ARRAY_KEY", "KEEP_MAX_BYTES", "decoded", "filled_view", "fresh", "repeated_values", "share_decoded"]

ARRAY_KEY = "optcc.array"  # the tensor's meta entry: its decoded array, read-only
KEEP_MAX_BYTES = 1 << 16  # a larger array is kept only when the caller asks (``keep_large``)

_PROTO_TENSOR = ir.serde.TensorProtoTensor


def decoded(tensor: ir.TensorProtocol, *, keep_large: bool = False) -> np.ndarray:
    """``tensor.numpy()``. A parsed tensor's array is decoded once and shared, read-only,
    by every caller: those of at most ``KEEP_MAX_BYTES`` (any size with ``keep_large``)
    are kept in its metadata; a larger one is returned as decoded (writable) and not
    kept. An external tensor's values are a view of its file's shared map
    (``external_files.mapped``); any other tensor's ``numpy()`` is returned as it is. Callers never write to the
    array."""
    if type(tensor) is not _PROTO_TENSOR:  # ``type``: isinstance checks of onnx-ir's classes are slow
        return mapped(tensor)
    meta = tensor.meta
    array = meta.data.get(ARRAY_KEY)  # the store's own dict: its Mapping methods are slow
    if array is None:
        array = _from_repeated_field(tensor.raw)
        if array is None:
            array = np.asarray(tensor.numpy())
        if array.nbytes > KEEP_MAX_BYTES and not keep_large:
            return array
        array.flags.writeable = False
        meta[ARRAY_KEY] = array
    return array


# the repeated field holding a tensor's values for these types, and the array's dtype
_REPEATED = {
    onnx.TensorProto.FLOAT: ("float_data", np.dtype("<f4")),
    onnx.TensorProto.INT64: ("int64_data", np.dtype("<i8")),
    onnx.TensorProto.DOUBLE: ("double_data", np.dtype("<f8")),
}
_ITERATED_MAX = 16  # fields of at most this many values are read element by element (``_from_repeated_field``)
_VALUE_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def repeated_values(proto: onnx.TensorProto) -> tuple[Any, np.dtype] | None:
    """For a FLOAT, INT64 or DOUBLE tensor whose values are in the repeated field of its
    type (``float_data``, ``int64_data``, ``double_data``) and nowhere else (no raw_data,
    no other value field, not external): that field and the little-endian dtype of its
    values. Then ``numpy()`` and ``tobytes()`` both read that field. None otherwise."""
    entry = _REPEATED.get(proto.data_type)
    if entry is None:
        return None
    name, dtype = entry
    values = getattr(proto, name)
    if not values or proto.HasField("raw_data") or proto.data_location == onnx.TensorProto.EXTERNAL:
        return None
    for other in _VALUE_FIELDS:
        if other != name and len(getattr(proto, other)):
            return None
    return values, dtype


def _from_repeated_field(proto: onnx.TensorProto) -> np.ndarray | None:
    """What ``numpy()`` returns for a tensor of ``repeated_values``, read as it reads it,
    without the checks it makes for other types; None for any other tensor."""
    found = repeated_values(proto)
    if found is None:
        return None
    values, dtype = found
    count = len(values)
    # the same elements either way: each field value as a Python number, cast to ``dtype``;
    # ``fromiter`` skips ``np.array``'s look at the container, its cost on a short field
    array = np.fromiter(values, dtype, count) if count <= _ITERATED_MAX else np.array(values, dtype=dtype)
    return array.reshape(tuple(proto.dims))


def share_decoded(tensor: ir.TensorProtocol, array: np.ndarray) -> None:
    """Keep ``array``, read-only, as parsed ``tensor``'s decoded array (what ``decoded``
    returns for it from then on) when ``decoded`` would keep one and none is kept yet.
    ``array`` must be what the tensor decodes to: the caller decoded it from a tensor
    that stores the same element type, dims and values."""
    if type(tensor) is not _PROTO_TENSOR or array.nbytes > KEEP_MAX_BYTES or array.flags.writeable:
        return
    data = tensor.meta.data
    if ARRAY_KEY not in data:
        data[ARRAY_KEY] = array


def fresh(tensor: ir.TensorProtocol) -> np.ndarray:
    """``tensor.numpy()`` for a caller that may write to it: a parsed tensor with a kept
    decode (``decoded``) gives a copy of it, cheaper than decoding again; any other
    tensor gives what its ``numpy()`` does."""
    array = decoded(tensor)
    if type(tensor) is _PROTO_TENSOR and tensor.meta.data.get(ARRAY_KEY) is array:
        return array.copy()
    return array


def filled_view(element: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A read-only array of ``shape`` whose every element is ``element``'s one value, held
    once: a view of it with every stride 0, which is what
    ``np.broadcast_to(element.reshape(()), shape)`` returns, made by the array constructor
    (NumPy's broadcast_to costs several times more). A shape the constructor refuses goes
    to broadcast_to, which decides as it always did."""
    one = element.reshape(())
    try:
        view = np.ndarray(shape, one.dtype, one, 0, (0,) * len(shape))
    except (ValueError, TypeError):
        return np.broadcast_to(one, shape)
    view.setflags(write=False)
    return view
