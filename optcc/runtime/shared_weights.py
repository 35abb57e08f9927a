"""Sessions that read a model's weights from the arrays optcc already holds.

``light_proto(model)`` serializes an onnx-ir model with every large initializer left as
a placeholder (its name, type and shape, marked external, no data) and returns the
arrays behind them (made once per tensor read from a protobuf, which hands out a copy
of its bytes on every read); ``weighted_session(proto, weights)`` builds an onnxruntime session
from such a proto, handing it the arrays (``add_initializer`` without graph optimizations,
``add_external_initializers`` with them: see that function). Neither
the weights' bytes in a protobuf nor its serialized string are ever made: a probe of a
400 MB model costs its graph, not two more copies of its weights. The session computes
what a session of the full proto computes (the same initializers, the same kernels); it
keeps the arrays alive as long as it lives.

``content_digest(model)`` names what a session of ``model`` computes: a digest of that
graph and those arrays, so that outputs computed once can be found again for the same model.

``release_memory()`` (``optcc.ir.heap``) hands the C heap's free memory back to the
system: call it after dropping a large session.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import tempfile
from collections.abc import Callable, Mapping

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from optcc import ir as oir
from optcc.ir.heap import release_memory
from optcc.ir.saving import external_tensors_in_memory, initializers_set_aside
from optcc.runtime.providers import provider_entry

__all__ = ["MIN_SHARED_BYTES", "Serialized", "content_digest", "light_proto", "mark_external", "shareable",
           "weighted_session", "release_memory"]

MIN_SHARED_BYTES = 1024  # smaller initializers stay inside the proto
INLINE_MAX_BYTES = 4 << 20  # weighted_session copies weights up to this many bytes in all into the proto
_LOCATION = "optcc-shared-weight"
_SHAREABLE = frozenset({
    ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.INT8, ir.DataType.UINT8,
    ir.DataType.INT16, ir.DataType.UINT16, ir.DataType.INT32, ir.DataType.UINT32, ir.DataType.INT64,
    ir.DataType.UINT64, ir.DataType.BOOL,
})


def shareable(tensor: ir.TensorProtocol, min_bytes: int = MIN_SHARED_BYTES) -> bool:
    """Whether onnxruntime can take ``tensor``'s array as it is, and it is worth handing over."""
    return tensor.dtype in _SHAREABLE and tensor.nbytes >= min_bytes


def light_proto(model: ir.Model, *, min_bytes: int = MIN_SHARED_BYTES,
                array: Callable[[ir.TensorProtocol], np.ndarray] | None = None,
                ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """``model`` serialized with its main graph's initializers of ``min_bytes`` or more as
    data-less placeholders, and those initializers' arrays by name (``array(tensor)``;
    by default views, not copies, where the tensor allows). Feed both to
    ``weighted_session``."""
    with initializers_set_aside(model, functools.partial(shareable, min_bytes=min_bytes)) as aside, \
            external_tensors_in_memory(model):
        proto = oir.serialize(model)
    weights = {value.name: (array or _array)(tensor) for value, tensor in aside}
    shapes = {value.name: [int(d) for d in tensor.shape.numpy()] for value, tensor in aside}
    for init in proto.graph.initializer:
        if init.name in weights:
            mark_external(init, shapes[init.name], int(weights[init.name].nbytes))
    return proto, weights


def content_digest(model: ir.Model) -> str:
    """A SHA-256 digest of everything a session reads of ``model``: its graph as
    ``light_proto`` serializes it (the shareable initializers as placeholders naming their
    type and shape) and those initializers' bytes, in name order. Two models with the same
    digest run the same graph on the same weights."""
    proto, weights = light_proto(model)
    digest = hashlib.sha256(proto.SerializeToString(deterministic=True))
    for name in sorted(weights):
        array = np.ascontiguousarray(weights[name])
        digest.update(f"\0{name}\0{array.dtype.str}\0{array.shape}\0".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class Serialized:
    """A model's bytes, made for onnx's checker (``optcc.infra.invariants.checked``) and
    handed on to whoever loads the model next: the whole model when ``aside`` is empty;
    else the model with exactly its shareable main-graph initializers (``shareable``:
    value name, tensor) as the empty placeholders ``light_proto`` writes, so that
    ``light`` gives what ``light_proto`` gives without serializing the model again."""

    data: bytes
    aside: tuple[tuple[str, ir.TensorProtocol], ...] = ()

    def light(self) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
        """``light_proto(model)`` of the model these bytes are (``aside`` not empty)."""
        proto = onnx.ModelProto.FromString(self.data)
        weights = {name: _array(tensor) for name, tensor in self.aside}
        shapes = {name: [int(d) for d in tensor.shape.numpy()] for name, tensor in self.aside}
        for init in proto.graph.initializer:
            if init.name in weights:
                mark_external(init, shapes[init.name], int(weights[init.name].nbytes))
        return proto, weights


def _array(tensor: ir.TensorProtocol) -> np.ndarray:
    """The tensor's values: a tensor read from a protobuf hands out a new copy of its bytes
    on every read, so that copy is made once and kept (read-only) in the tensor's metadata
    while the tensor lives, whatever its size (a 400 MB model is copied once, not once per
    session)."""
    return np.asarray(oir.decoded(tensor, keep_large=True))


def mark_external(init: onnx.TensorProto, dims: list[int], nbytes: int) -> None:
    """Make ``init`` a placeholder whose data ``weighted_session`` supplies."""
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        init.ClearField(field)
    del init.dims[:]
    init.dims.extend(dims)
    init.data_location = onnx.TensorProto.EXTERNAL
    del init.external_data[:]
    for key, value in (("location", _LOCATION), ("offset", "0"), ("length", str(nbytes))):
        entry = init.external_data.add()
        entry.key, entry.value = key, value


def weighted_session(proto: onnx.ModelProto, weights: Mapping[str, np.ndarray], options: ort.SessionOptions,
                     provider: str = "CPUExecutionProvider") -> ort.InferenceSession:
    """A CPU session of ``proto`` whose placeholder initializers read ``weights`` (only
    those the proto still declares are handed over). Without graph optimizations
    onnxruntime takes them as user-owned initializers (``add_initializer``: no copy;
    pre-packing, and so the kernels and results, as with a full proto); with them, as
    external initializers (``add_external_initializers``): its optimizations compute
    wrong results around user-owned ones. Either way it loads the graph from a file (not
    from bytes, which would live beside onnxruntime's own parse of them while the session
    is built), its placeholders pointing into a sparse file never read; both are deleted
    once the session exists. Weights of at most ``INLINE_MAX_BYTES`` in all are instead copied
    into the proto, which is loaded from bytes (no files). ``proto`` is changed."""
    declared = {init.name: init for init in proto.graph.initializer
                if init.data_location == onnx.TensorProto.EXTERNAL and init.name in weights}
    arrays = {name: np.ascontiguousarray(weights[name]) for name in declared}
    if sum(a.nbytes for a in arrays.values()) <= INLINE_MAX_BYTES:
        for name, init in declared.items():  # a few small weights: copied inline, no files
            del init.external_data[:]
            init.data_location = onnx.TensorProto.DEFAULT
            init.raw_data = arrays[name].astype(arrays[name].dtype.newbyteorder("<"), copy=False).tobytes()
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=[provider_entry(provider)])
        session.optcc_weights = ()
        return session
    values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in arrays.items()}
    with tempfile.TemporaryDirectory(prefix="optcc-session-") as folder:
        offset = 0
        for name, init in declared.items():
            for entry in init.external_data:
                if entry.key == "location":
                    entry.value = _LOCATION
                elif entry.key == "offset":
                    entry.value = str(offset)
            offset += -(-arrays[name].nbytes // 4096) * 4096
        with open(os.path.join(folder, _LOCATION), "wb") as f:
            f.truncate(offset)  # sparse: no disk space; onnxruntime checks it exists, never reads it
        path = os.path.join(folder, "model.onnx")
        with open(path, "wb") as f:  # the serialized graph lives only while it is written
            f.write(proto.SerializeToString())
        if options.graph_optimization_level != ort.GraphOptimizationLevel.ORT_DISABLE_ALL:
            # onnxruntime's graph optimizations compute wrong results around user-owned
            # initializers (a Conv + BatchNormalization fusion reading one is off by ~60 in
            # onnxruntime 1.32); initializers it takes as external data it folds correctly
            options.add_external_initializers(list(values), list(values.values()))
        else:
            for name, value in values.items():
                options.add_initializer(name, value)
        session = ort.InferenceSession(path, options, providers=[provider_entry(provider)])
    session.optcc_weights = (arrays, values)  # onnxruntime reads them in place: they live as long as it
    return session
