"""Converting a model to another version of the default opset with onnx's version converter."""

from __future__ import annotations

import onnx
import onnx.version_converter
import onnx_ir as ir

from optcc.ir.legacy import upgrade_legacy_ir
from optcc.ir.saving import initializers_set_aside, serialize
from optcc.ir.walk import default_opset

__all__ = ["convert_opset", "upgrade_problem"]


def _ir_version_for(opset: int) -> int | None:
    """The IR version of the first onnx release carrying default opset ``opset``."""
    return next((ir_version for _, ir_version, release_opset, *_ in onnx.helper.VERSION_TABLE
                 if release_opset == opset), None)


def upgrade_problem(model: ir.Model, version: int) -> str | None:
    """Why ``model`` cannot be upgraded to ``version`` of the default opset (an older one:
    a model is never downgraded; one the installed onnx does not know), else None."""
    current, newest = default_opset(model), onnx.defs.onnx_opset_version()
    if version < current:
        return f"target opset {version} is older than the model's opset {current} (a model is never downgraded)"
    if version > newest:
        return f"target opset {version} is newer than the installed onnx supports ({newest})"
    return None


def convert_opset(model: ir.Model, version: int) -> None:
    """Convert ``model`` in place to ``version`` of the default opset with onnx's version
    converter, raising its error (the model then unchanged but for the IR 4 upgrade below,
    which keeps what it computes). The main graph's weights are
    handed to the converter as typed graph inputs (their data is never copied; no adapter
    reads a weight's values) and put back afterwards; the IR version is raised to what the
    opset needs (below IR 4, first to 4 by ``upgrade_legacy_ir``: initializers stop being
    listed as inputs, which from IR 4 on would make them inputs a caller may feed). The
    graph inputs and outputs that declared a shape keep it: the converter's shape inference
    would give an unknown dim a placeholder name (``unk__1``), which changes the interface
    (one that declared none gets the inferred shape, as before)."""
    if version == default_opset(model):
        return
    upgrade_legacy_ir(model)
    declared = {value.name: value.shape for value in (*model.graph.inputs, *model.graph.outputs)}
    with initializers_set_aside(model, lambda t: True) as aside:
        proto = serialize(model)
    tensors = {value.name: tensor for value, tensor in aside}
    listed = {i.name for i in proto.graph.input}
    kept = [t for t in proto.graph.initializer if t.name not in tensors]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    proto.graph.input.extend(onnx.helper.make_tensor_value_info(name, int(t.dtype), list(t.shape.dims))
                             for name, t in tensors.items() if name not in listed)
    converted = ir.serde.deserialize_model(onnx.version_converter.convert_version(proto, version))
    graph = converted.graph
    for value in list(graph.inputs):
        if value.name in tensors:
            if value.name not in listed:
                graph.inputs.remove(value)
            value.const_value = tensors[value.name]
            graph.register_initializer(value)
    for value in (*graph.inputs, *graph.outputs):
        if declared.get(value.name) is not None and not value.is_initializer():
            value.shape = declared[value.name]
    model.graph = graph
    model.ir_version = max(int(model.ir_version or 0), _ir_version_for(version) or 0)
