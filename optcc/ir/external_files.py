"""One read-only memory map per external-data file, open while any array over it lives.

Every map of a file counts the pages read through it in the process's resident memory
again: a session per check, each mapping the weights on its own, counts them once per
live session, and onnx-ir's own ``ExternalTensor.numpy()`` maps the whole file once per
tensor and keeps that map as long as the tensor. Here the tensors of one file (those a
load made, ``share_files``) hold one ``ExternalFile`` between them, and every read of
them (``mapped``) is a view of that file's one map. The views hold the map; the file
holds only a weak reference to it, so the map is unmapped when the last view goes (the
last session or pass reading the weights) and opened again by the next read.
"""

from __future__ import annotations

import mmap
import os
import weakref

import numpy as np
import onnx_ir as ir

from optcc.ir.walk import graphs

__all__ = ["ExternalFile", "FILE_KEY", "mapped", "share_files", "stored_bytes"]

FILE_KEY = "optcc.external_file"  # a tensor's metadata: the ExternalFile it is read through
# types whose elements are whole bytes: a view of the file is their array (the others are unpacked)
_WHOLE_BYTES = frozenset({
    ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.INT8, ir.DataType.UINT8,
    ir.DataType.INT16, ir.DataType.UINT16, ir.DataType.INT32, ir.DataType.UINT32, ir.DataType.INT64,
    ir.DataType.UINT64, ir.DataType.BOOL,
})


class ExternalFile:
    """An external-data file, mapped read-only while any view of it lives (the tensors
    handed to ``view`` are all of this one file)."""

    def __init__(self) -> None:
        self._map: weakref.ref[mmap.mmap] | None = None

    def is_mapped(self) -> bool:
        return self._map is not None and self._map() is not None

    def view(self, tensor: ir.ExternalTensor) -> np.ndarray:
        """``tensor``'s values, read-only, over this file's one map (no copy)."""
        dtype = np.dtype(tensor.dtype.numpy()).newbyteorder("<")
        offset = tensor.offset or 0
        opened = self._map() if self._map is not None else None
        if opened is None or len(opened) < offset + tensor.size * dtype.itemsize:  # a file grown since
            with open(tensor.path, "rb") as f:  # its folder is known once the load ends
                opened = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._map = weakref.ref(opened)
        flat = np.frombuffer(opened, dtype=dtype, count=tensor.size, offset=offset)
        return flat.reshape(tuple(tensor.shape.numpy()))


def mapped(tensor: ir.TensorProtocol) -> np.ndarray:
    """``tensor.numpy()``; an external tensor's without onnx-ir's map of its own: a view of
    its file's shared map (a tensor no load shared a file with gets one of its own, kept in
    its metadata)."""
    if not isinstance(tensor, ir.ExternalTensor) or tensor.dtype not in _WHOLE_BYTES or tensor.size == 0 \
            or tensor.raw is not None:
        return tensor.numpy()  # in memory, unpacked, empty, or already read through onnx-ir's map
    file = tensor.meta.get(FILE_KEY)
    if file is None:
        file = tensor.meta[FILE_KEY] = ExternalFile()
    return file.view(tensor)


def share_files(model: ir.Model) -> None:
    """Give the external initializers of ``model`` one ``ExternalFile`` per file (per
    location: one model's locations are relative to its one folder)."""
    files: dict[str, ExternalFile] = {}
    for graph in graphs(model):
        if not isinstance(graph, ir.Graph):
            continue
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                tensor.meta[FILE_KEY] = files.setdefault(os.path.normpath(tensor.location), ExternalFile())


def stored_bytes(tensor: ir.TensorProtocol) -> bytes:
    """``tensor.tobytes()``; an external tensor's (its bytes as the file stores them) read
    from its file, with no map of it left open."""
    if not isinstance(tensor, ir.ExternalTensor):
        return tensor.tobytes()
    with open(tensor.path, "rb") as f:
        f.seek(tensor.offset or 0)
        return f.read(tensor.length if tensor.length is not None else tensor.nbytes)
