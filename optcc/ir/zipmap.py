"""Trailing ZipMap nodes set apart from a model and put back after it is optimized.

A classifier exported by skl2onnx or onnxmltools ends in ``ai.onnx.ml`` ZipMap nodes: each
turns a float tensor of class probabilities into a sequence of maps, a graph output whose
type onnx-ir cannot represent. ``detach_zipmaps`` splits such a model into the part before
the ZipMaps (each ZipMap's input made a graph output: a tensor optimized and verified like
any other) and the ZipMaps themselves; ``DetachedZipMaps.attach`` puts them back, unchanged,
onto the optimized part, so the result has the original's outputs, in the original order.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import onnx
import onnx_ir as ir

from optcc.errors import BadInputError
from optcc.ir.loading import MapTypedError, ModelSource, load, map_typed_value
from optcc.ir.packed_attributes import ML_DOMAIN
from optcc.ir.walk import tensor_protos


@dataclasses.dataclass(frozen=True)
class DetachedZipMaps:
    """The ZipMap nodes taken off a model, with what putting them back needs."""

    nodes: tuple[onnx.NodeProto, ...]
    outputs: tuple[onnx.ValueInfoProto, ...]  # every graph output of the original, in order
    ml_opset: int  # the original's ai.onnx.ml opset version

    @property
    def inputs(self) -> list[str]:
        """The tensors the ZipMaps read: graph outputs of the part set apart from them."""
        return [node.input[0] for node in self.nodes]

    def attach(self, core: onnx.ModelProto) -> onnx.ModelProto:
        """``core`` (the optimized part, modified in place) with the ZipMaps put back: its
        nodes followed by the ZipMaps, the original's graph outputs in their order (each
        other output as ``core`` types it now), the ai.onnx.ml opset imported. The result
        passes onnx's checker."""
        zipped = {node.output[0] for node in self.nodes}
        kept = {info.name: info for info in core.graph.output}
        missing = [info.name for info in self.outputs if info.name not in zipped and info.name not in kept]
        missing += [name for name in self.inputs if name not in kept]
        if missing:
            raise ValueError(f"the optimized model lost the outputs {missing}: the ZipMaps cannot be put back")
        outputs = [info if info.name in zipped else kept[info.name] for info in self.outputs]
        copies = [onnx.ValueInfoProto() for _ in outputs]
        for copy, info in zip(copies, outputs):
            copy.CopyFrom(info)
        del core.graph.output[:]
        core.graph.output.extend(copies)
        core.graph.node.extend(self.nodes)
        if not any(entry.domain == ML_DOMAIN for entry in core.opset_import):
            core.opset_import.append(onnx.helper.make_opsetid(ML_DOMAIN, self.ml_opset))
        onnx.checker.check_model(core)
        return core


def load_apart(source: ModelSource, load_source: Callable[[ModelSource], ir.Model] = load,
               ) -> tuple[ir.Model, DetachedZipMaps | None]:
    """``load_source(source)`` and None; for a model whose only maps are its trailing ZipMaps'
    outputs, the part before them (``detach_zipmaps``, loaded from its bytes, a problem in it
    named as the source's) and those ZipMaps."""
    try:
        return load_source(source), None
    except MapTypedError as error:
        detached = detach_zipmaps(error.proto)
        if detached is None:
            raise
        core, zipmaps = detached
    data = core.SerializeToString()  # loaded outside the handler: the error, and the parse it holds, gone
    del core
    try:
        return load(data), zipmaps
    except BadInputError as error:  # the part before the ZipMaps: its problem is the source's
        label = str(source) if isinstance(source, (str, os.PathLike)) else None
        raise BadInputError(str(error).removeprefix(f"{error.path}: "), label) from None


def check_same_zipmaps(a: DetachedZipMaps | None, b: DetachedZipMaps | None, label: str | None = None) -> None:
    """BadInputError (naming ``label``, B's) unless two models set apart the same ZipMap
    nodes, or neither any: then comparing the tensors they read compares their outputs."""
    if (a and a.nodes) != (b and b.nodes):
        raise BadInputError("the ZipMap outputs differ: each model's ZipMap nodes must be the same", label)


def detach_zipmaps(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, DetachedZipMaps] | None:
    """The model without its trailing ZipMaps, and those ZipMaps; None when ``proto`` has
    none to set apart, or when a map or sequence type would remain without them (another
    node reads a ZipMap's output, a map is a graph input, a ZipMap feeds a ZipMap), or when
    its weights are stored in external data files (the part set apart is a ModelProto, which
    has no folder to find them in). ``proto`` is not modified (the part is a copy)."""
    graph = proto.graph
    outputs = {info.name for info in graph.output}
    read = {name for node in graph.node for name in node.input}
    trailing = [node for node in graph.node
                if node.op_type == "ZipMap" and node.domain == ML_DOMAIN and len(node.output) == 1
                and node.output[0] in outputs and node.output[0] not in read and len(node.input) == 1]
    if not trailing or _has_external_data(proto):
        return None
    zipped = {node.output[0] for node in trailing}
    if any(node.input[0] in zipped for node in trailing):
        return None
    detached = DetachedZipMaps(
        nodes=tuple(_copied(node) for node in trailing),
        outputs=tuple(_copied(info) for info in graph.output),
        ml_opset=next((entry.version for entry in proto.opset_import if entry.domain == ML_DOMAIN), 1),
    )
    typed = {info.name: info for info in (*graph.input, *graph.value_info, *graph.output)}
    added = []  # the tensors the ZipMaps read, each once, that are not graph outputs already
    for node in trailing:
        name = node.input[0]
        if name not in outputs - zipped and name not in (info.name for info in added):
            added.append(_tensor_info(name, typed.get(name), _class_count(node)))
    interface = onnx.GraphProto(input=graph.input, output=[info for info in graph.output if info.name not in zipped],
                                value_info=[info for info in graph.value_info if info.name not in zipped])
    if map_typed_value(onnx.ModelProto(graph=interface)) is not None:
        return None  # a map the ZipMaps do not account for
    core = onnx.ModelProto()
    core.CopyFrom(proto)
    _delete(core.graph.node, lambda node: node.op_type == "ZipMap" and node.output[0] in zipped)
    _delete(core.graph.output, lambda info: info.name in zipped)
    _delete(core.graph.value_info, lambda info: info.name in zipped)
    core.graph.output.extend(added)
    return core, detached


def _delete(field, condition) -> None:  # noqa: ANN001 - a repeated protobuf field, a test of its items
    """Delete the items of ``field`` that ``condition`` holds for, in place (the others are
    neither copied nor moved out of the message)."""
    for index in reversed([i for i, item in enumerate(field) if condition(item)]):
        del field[index]


def _has_external_data(proto: onnx.ModelProto) -> bool:
    """Whether a tensor of the model (an initializer or a tensor attribute, in any graph) is
    stored in an external data file."""
    return any(tensor.data_location == onnx.TensorProto.EXTERNAL for tensor in tensor_protos(proto.graph))


def _tensor_info(name: str, known: onnx.ValueInfoProto | None, classes: int) -> onnx.ValueInfoProto:
    """A graph output for the tensor a ZipMap of ``classes`` labels reads: its declared
    type, else float32 ``[N, classes]`` (what ZipMap reads from a classifier)."""
    if known is not None and known.type.tensor_type.HasField("shape"):
        return _copied(known)
    return onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [None, classes])


def _class_count(node: onnx.NodeProto) -> int:
    """The number of class labels a ZipMap names."""
    return next(len(attr.ints) or len(attr.strings) for attr in node.attribute
                if attr.name in ("classlabels_int64s", "classlabels_strings"))


def _copied(message):  # noqa: ANN001, ANN202 - any protobuf message: a copy of its own
    copy = type(message)()
    copy.CopyFrom(message)
    return copy
