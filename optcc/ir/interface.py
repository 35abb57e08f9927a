"""Graph inputs and outputs without a type or shape (older and hand-built exports): the
types shape inference gives them, so the model written passes onnx's checker; and declared
shapes whose rank shape inference contradicts, in a graph that declares a rank-0 output
(Paddle's ``FLOAT[]`` on outputs of rank 2-4): made unknown, so it passes the checker's
full check too."""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnx_ir as ir

from optcc.errors import BadInputError

# ------------------------------------------------------------ interface types

FILLED_INTERFACE_KEY = "optcc.filled_interface"
"""``model.meta`` key (in memory, never written) listing, one line each, the main-graph
inputs and outputs whose missing type or shape ``load`` filled in, and the declared shapes
it made unknown."""

_MAX_TRIED_RANK = 8


def interface_float_type(model: ir.Model) -> str:
    """"float16" for a model whose float graph inputs and outputs are all float16, else "float32"."""
    floats = {value.dtype for value in (*model.graph.inputs, *model.graph.outputs)
              if value.dtype is not None and value.dtype.is_floating_point()}
    return "float16" if floats == {ir.DataType.FLOAT16} else "float32"


def _needs_fill(info: onnx.ValueInfoProto) -> bool:
    """A main-graph input/output onnx.checker rejects for a missing type or shape."""
    kind = info.type.WhichOneof("value")
    if kind is None:
        return True
    return kind == "tensor_type" and (
        not info.type.tensor_type.elem_type or not info.type.tensor_type.HasField("shape")
    )


def _interface_fills(
    proto: onnx.ModelProto, label: str
) -> list[tuple[str, onnx.TypeProto, str]]:
    """For each main-graph input or output without a type or shape (older and hand-built
    exports; onnxruntime runs them, onnx.checker refuses them): ``(where, type, note)``
    with the type onnx shape inference gives it. ``where`` is ``input:NAME`` or
    ``output:NAME``. An input gets the one rank for which strict shape inference of its
    consumers succeeds (dims left unknown); an output the inferred type, else the
    producing node's declared value_info. Raises BadInputError when no type can be found."""
    graph = proto.graph
    inputs = [v for v in graph.input if _needs_fill(v)]
    outputs = [v for v in graph.output if _needs_fill(v)]
    if not inputs and not outputs and not any(map(_rank0, graph.output)):
        return []
    weights = {t.name: t for t in graph.initializer}
    light = without_weights(proto)
    fills: list[tuple[str, onnx.TypeProto, str]] = []
    for info in inputs:
        if info.name in weights:  # below IR 4 a weight may be listed as an input
            t = weights[info.name]
            fill = onnx.helper.make_tensor_type_proto(t.data_type, list(t.dims))
            fills.append(_fill("input", info.name, fill, "from its initializer"))
            continue
        elem = info.type.tensor_type.elem_type if info.type.HasField("tensor_type") else 0
        if not elem:
            raise BadInputError(
                f"invalid ONNX model: graph input '{info.name}' has no element type", label
            )
        ranks = [r for r in range(_MAX_TRIED_RANK + 1) if _rank_fits(light, info.name, elem, r)]
        if len(ranks) != 1:
            fitting = f"ranks {ranks} all fit" if ranks else "no rank fits"
            raise BadInputError(
                f"graph input '{info.name}' declares no shape, and its rank cannot be inferred "
                f"from its consumers ({fitting}); add the shape to the model",
                label,
            )
        fill = onnx.helper.make_tensor_type_proto(elem, [None] * ranks[0])
        fills.append(_fill("input", info.name, fill, "(rank from shape inference)"))
    for where, fill, _ in fills:
        _set_type(light, where, fill)
    unfilled = {v.name for v in outputs}
    fills.extend(_contradicted(light, [v for v in graph.output if v.name not in unfilled], graph.value_info))
    if outputs:
        inferred = _inferred_types(light)
        declared = {v.name: v.type for v in graph.value_info}
        declared.update({v.name: v.type for v in graph.input if not _needs_fill(v)})
        declared.update({
            n: onnx.helper.make_tensor_type_proto(t.data_type, list(t.dims)) for n, t in weights.items()
        })
        for info in outputs:
            fill, source = inferred.get(info.name), "shape inference"
            if fill is None or not _complete(fill):
                fill, source = declared.get(info.name), "its producer's value_info"
            if fill is None or not _complete(fill):
                raise BadInputError(
                    f"invalid ONNX model: graph output '{info.name}' has no type or shape, and "
                    "shape inference cannot find one",
                    label,
                )
            fill = _without_placeholder_dims(fill)
            fills.append(_fill("output", info.name, fill, f"from {source}"))
    return fills


def _contradicted(
    light: onnx.ModelProto, outputs: list[onnx.ValueInfoProto], value_info: list[onnx.ValueInfoProto]
) -> list[tuple[str, onnx.TypeProto, str]]:
    """Fills for the declared ``outputs`` and ``value_info`` (main graph) whose rank is
    not the one shape inference finds from the graph alone (declarations set aside), when
    an output is declared rank 0 (Paddle's ``FLOAT[]``; scalar value_infos are common, and
    elsewhere a load does not pay for this shape inference):
    onnxruntime runs such a model, onnx.checker's full check refuses it. An output keeps
    its dtype and gets the inferred rank, every dim unknown (a graph output needs a shape;
    the rank is all that is proved against the declaration); a value_info keeps its dtype
    and loses its shape. Nothing changes where inference finds no rank."""
    if not any(map(_rank0, outputs)):
        return []
    declared = [(f"output:{v.name}", v) for v in outputs] + [(f"value_info:{v.name}", v) for v in value_info]
    declared = [(where, v) for where, v in declared
                if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")]
    bare = onnx.ModelProto()
    bare.CopyFrom(light)
    del bare.graph.value_info[:]
    for info in bare.graph.output:
        if info.type.HasField("tensor_type"):
            info.type.tensor_type.ClearField("shape")
    inferred = _inferred_types(bare)
    fills = []
    for where, info in declared:
        found = inferred.get(info.name)
        if found is None or not found.HasField("tensor_type") or not found.tensor_type.HasField("shape"):
            continue
        rank, dims = len(found.tensor_type.shape.dim), info.type.tensor_type.shape.dim
        if rank == len(dims):
            continue
        kind, name = where.split(":", 1)
        output = kind == "output"
        fill = onnx.helper.make_tensor_type_proto(info.type.tensor_type.elem_type, [None] * rank if output else None)
        fills.append((where, fill, f"{kind} '{name}': declared {_type_text(info.type)}, shape inference gives rank "
                                   f"{rank}: {_type_text(fill) if output else 'shape dropped'}"))
    return fills


def _rank0(info: onnx.ValueInfoProto) -> bool:
    t = info.type.tensor_type if info.type.HasField("tensor_type") else None
    return t is not None and t.HasField("shape") and not t.shape.dim


def negative_dims_unknown(model: ir.Model) -> list[str]:
    """Make the negative dims declared on ``model``'s graph inputs and outputs unknown
    (Paddle's ``-1`` for a free axis: ONNX has no negative sizes, and onnx.checker's full
    check refuses one where shape inference knows the size); one note per value changed."""
    notes = []
    for kind, values in (("input", model.graph.inputs), ("output", model.graph.outputs)):
        for value in values:
            shape = value.shape
            if shape is not None and any(isinstance(d, int) and d < 0 for d in shape):
                value.shape = ir.Shape([None if isinstance(d, int) and d < 0 else d for d in shape])
                notes.append(f"{kind} '{value.name}': declared {_dims_text(shape)}, written "
                             f"{_dims_text(value.shape)} (negative dims made unknown)")
    return notes


_NEGATIVE_NOTE = re.compile(r"(?P<kind>input|output) '(?P<name>.*)': declared (?P<declared>\[.*?\]), "
                            r"written (?P<written>\[.*?\]) \(negative dims made unknown\)")


def notes_as_written(notes: list[str], model: ir.Model) -> list[str]:
    """``notes`` (``negative_dims_unknown``'s among them) with the "written" shape of each
    graph input and output taken from ``model`` as it is now (its input shapes overwritten,
    and its outputs' inferred again, since the load)."""
    shapes = {("input", value.name): value.shape for value in model.graph.inputs}
    shapes.update({("output", value.name): value.shape for value in model.graph.outputs})
    written = []
    for note in notes:
        match = _NEGATIVE_NOTE.fullmatch(note)
        shape = shapes.get((match["kind"], match["name"])) if match else None
        if shape is not None and match and _dims_text(shape) != match["written"]:
            note = (f"{match['kind']} '{match['name']}': declared {match['declared']}, written {_dims_text(shape)} "
                    "(input shape overwritten)")
        written.append(note)
    return written


def _dims_text(shape: ir.Shape) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) else (d.value or "?") for d in shape) + "]"


def _fill(kind: str, name: str, fill: onnx.TypeProto, how: str) -> tuple[str, onnx.TypeProto, str]:
    return f"{kind}:{name}", fill, f"{kind} '{name}': {_type_text(fill)} {how}"


def _without_placeholder_dims(t: onnx.TypeProto) -> onnx.TypeProto:
    """The type with shape inference's invented dim names (``unk__N``) made unknown."""
    t = onnx.TypeProto.FromString(t.SerializeToString())
    for dim in t.tensor_type.shape.dim:
        if dim.dim_param.startswith("unk__"):
            dim.ClearField("dim_param")
    return t


def _complete(t: onnx.TypeProto) -> bool:
    return (t.HasField("tensor_type") and bool(t.tensor_type.elem_type)
            and t.tensor_type.HasField("shape"))


def _type_text(t: onnx.TypeProto) -> str:
    tt = t.tensor_type
    dims = ",".join(
        str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim
    )
    return f"{onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name}[{dims}]"


def _rank_fits(light: onnx.ModelProto, name: str, elem: int, rank: int) -> bool:
    trial = onnx.ModelProto()
    trial.CopyFrom(light)
    _set_type(trial, f"input:{name}", onnx.helper.make_tensor_type_proto(elem, [None] * rank))
    try:
        onnx.shape_inference.infer_shapes(trial, strict_mode=True)
    except Exception:  # noqa: BLE001 - any inference error rules the rank out
        return False
    return True


def _inferred_types(light: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - best effort; the caller reports what stays missing
        return {}
    graph = inferred.graph
    return {v.name: v.type for v in (*graph.value_info, *graph.output, *graph.input)
            if v.type.WhichOneof("value") is not None}


def _infos(proto: onnx.ModelProto, kind: str):  # noqa: ANN202 - a repeated protobuf field
    """The main graph's value infos of ``kind``: input, output or value_info."""
    return getattr(proto.graph, kind)


def _set_type(proto: onnx.ModelProto, where: str, fill: onnx.TypeProto) -> None:
    kind, name = where.split(":", 1)
    for info in _infos(proto, kind):
        if info.name == name:
            info.type.CopyFrom(fill)


def _apply_fills(
    proto: onnx.ModelProto, fills: list[tuple[str, onnx.TypeProto, str]]
) -> list[tuple[str, onnx.TypeProto]]:
    originals = []
    for where, fill, _ in fills:
        kind, name = where.split(":", 1)
        for info in _infos(proto, kind):
            if info.name == name:
                saved = onnx.TypeProto()
                saved.CopyFrom(info.type)
                originals.append((where, saved))
        _set_type(proto, where, fill)
    return originals


def _restore(proto: onnx.ModelProto, originals: list[tuple[str, onnx.TypeProto]]) -> None:
    for where, saved in originals:
        _set_type(proto, where, saved)


def without_weights(proto: onnx.ModelProto, keep_elements: int = 0) -> onnx.ModelProto:
    """A copy of the model whose main-graph initializers are graph inputs of the same
    type and shape (no weight data copied): enough for type inference and the checker's
    structural rules. Initializers of at most ``keep_elements`` elements (shape-like
    constants that shape inference reads) stay initializers."""
    light = onnx.ModelProto()
    for field, value in proto.ListFields():
        if field.name != "graph":
            _copy_field(light, field, value)
    graph = light.graph
    for field, value in proto.graph.ListFields():
        if field.name not in ("initializer", "sparse_initializer"):
            _copy_field(graph, field, value)
    listed = {v.name for v in graph.input}
    for t in proto.graph.initializer:
        if int(np.prod(t.dims)) <= keep_elements and t.data_location != onnx.TensorProto.EXTERNAL:
            graph.initializer.append(t)
        elif t.name not in listed:
            graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    for sparse in proto.graph.sparse_initializer:
        if sparse.values.name not in listed:
            graph.input.append(
                onnx.helper.make_tensor_value_info(
                    sparse.values.name, sparse.values.data_type, list(sparse.dims)
                )
            )
    return light


def _copy_field(target, field, value) -> None:  # noqa: ANN001 - protobuf descriptors
    slot = getattr(target, field.name)
    if hasattr(slot, "extend"):  # a repeated field
        slot.extend(value)
    elif field.message_type is not None:
        slot.CopyFrom(value)
    else:
        setattr(target, field.name, value)
