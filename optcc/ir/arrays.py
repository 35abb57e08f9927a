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

import numpy as np
import onnx_ir as ir

__all__ = ["ARRAY_KEY", "KEEP_MAX_BYTES", "decoded", "fresh"]

ARRAY_KEY = "optcc.array"  # the tensor's meta entry: its decoded array, read-only
KEEP_MAX_BYTES = 1 << 16  # a larger array is kept only when the caller asks (``keep_large``)

_PROTO_TENSOR = ir.serde.TensorProtoTensor


def decoded(tensor: ir.TensorProtocol, *, keep_large: bool = False) -> np.ndarray:
    """``tensor.numpy()``. A parsed tensor's array is decoded once and shared, read-only,
    by every caller: those of at most ``KEEP_MAX_BYTES`` (any size with ``keep_large``)
    are kept in its metadata; a larger one is returned as decoded (writable) and not
    kept. Any other tensor's ``numpy()`` is returned as it is. Callers never write to the
    array."""
    if type(tensor) is not _PROTO_TENSOR:  # ``type``: isinstance checks of onnx-ir's classes are slow
        return tensor.numpy()
    meta = tensor.meta
    array = meta.data.get(ARRAY_KEY)  # the store's own dict: its Mapping methods are slow
    if array is None:
        array = np.asarray(tensor.numpy())
        if array.nbytes > KEEP_MAX_BYTES and not keep_large:
            return array
        array.flags.writeable = False
        meta[ARRAY_KEY] = array
    return array


def fresh(tensor: ir.TensorProtocol) -> np.ndarray:
    """``tensor.numpy()`` for a caller that may write to it: a parsed tensor with a kept
    decode (``decoded``) gives a copy of it, cheaper than decoding again; any other
    tensor gives what its ``numpy()`` does."""
    array = decoded(tensor)
    if type(tensor) is _PROTO_TENSOR and tensor.meta.data.get(ARRAY_KEY) is array:
        return array.copy()
    return array
