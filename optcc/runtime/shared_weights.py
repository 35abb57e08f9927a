"""Sessions that read a model's weights from the arrays optcc already holds.

``light_proto(model)`` serializes an onnx-ir model with every large initializer left as
a placeholder (its name, type and shape, marked external, no data) and returns the
arrays behind them; ``weighted_session(proto, weights)`` builds an onnxruntime session
from such a proto, handing it the arrays through ``add_external_initializers``. Neither
the weights' bytes in a protobuf nor its serialized string are ever made: a probe of a
400 MB model costs its graph, not two more copies of its weights. The session computes
what a session of the full proto computes (the same initializers, the same kernels); it
keeps the arrays alive as long as it lives.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from optcc import ir as oir
from optcc.ir.saving import initializers_set_aside

__all__ = ["MIN_SHARED_BYTES", "light_proto", "mark_external", "weighted_session"]

MIN_SHARED_BYTES = 1024  # smaller initializers stay inside the proto
_LOCATION = "optcc-shared-weight"
_SHAREABLE = frozenset({
    ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.INT8, ir.DataType.UINT8,
    ir.DataType.INT16, ir.DataType.UINT16, ir.DataType.INT32, ir.DataType.UINT32, ir.DataType.INT64,
    ir.DataType.UINT64, ir.DataType.BOOL,
})


def _shareable(tensor: ir.TensorProtocol) -> bool:
    return tensor.dtype in _SHAREABLE and tensor.nbytes >= MIN_SHARED_BYTES


def light_proto(model: ir.Model) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """``model`` serialized with its main graph's large initializers as data-less
    placeholders, and those initializers' arrays by name (views, not copies, where the
    tensor allows). Feed both to ``weighted_session``."""
    with initializers_set_aside(model, _shareable) as aside:
        proto = oir.serialize(model)
    weights = {value.name: np.asarray(tensor.numpy()) for value, tensor in aside}
    shapes = {value.name: [int(d) for d in tensor.shape.numpy()] for value, tensor in aside}
    for init in proto.graph.initializer:
        if init.name in weights:
            mark_external(init, shapes[init.name], int(weights[init.name].nbytes))
    return proto, weights


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


def weighted_session(proto: onnx.ModelProto, weights: Mapping[str, np.ndarray], options: ort.SessionOptions
                     ) -> ort.InferenceSession:
    """A CPU session of ``proto`` whose placeholder initializers read ``weights`` (only
    those the proto still declares are handed over)."""
    declared = {init.name for init in proto.graph.initializer if init.data_location == onnx.TensorProto.EXTERNAL}
    names = [name for name in weights if name in declared]
    arrays = [np.ascontiguousarray(weights[name]) for name in names]
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
    if names:
        options.add_external_initializers(names, values)
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    session.optcc_weights = (arrays, values)  # onnxruntime may read them in place: they live as long as it
    return session
