"""Fix the shapes of a model's graph inputs (onnxsim's ``--overwrite-input-shape``).

Only the graph inputs' declared shapes are edited; every node output's shape is then
inferred again from them (onnx shape inference with data propagation), so constant
folding can specialise on the now-static sizes. The edit refuses what would change the
model's meaning instead of fixing it: an unknown input, a different rank, or a size that
contradicts a static dimension the model already declares.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import onnx
import onnx_ir as ir

from optcc import ir as oir
from optcc.errors import BadInputError

__all__ = ["overwrite_input_shapes", "check_input_shapes"]

_SET_ASIDE_BYTES = 4096  # weights larger than this are not copied for inference (shape constants are)


def overwrite_input_shapes(
    model: ir.Model, shapes: Mapping[str, Sequence[int]], *, label: str | None = None
) -> ir.Model:
    """Give the graph inputs named in ``shapes`` those static shapes, in place, and
    re-infer the shapes of every value that depends on them. Returns ``model``.

    Raises BadInputError (naming ``label``, the model's file) when a name is not a graph
    input, the rank differs from the declared one, a size is not positive, a size
    contradicts a static dimension, or shape inference finds the model inconsistent with
    the new shapes. On error the model is left as it was.
    """
    planned = check_input_shapes(model, shapes, label=label)
    inputs = {v.name: v for v in model.graph.inputs}
    saved = {v: v.shape for g in _bodies(model) for v in _node_outputs(g)}
    saved.update({v: v.shape for v in model.graph.inputs})
    for name, shape in planned.items():
        inputs[name].shape = shape
    for value in saved:
        if value.producer() is not None:
            value.shape = None  # stale: re-inferred below
    try:
        inferred = _infer(model)
    except Exception as error:  # noqa: BLE001 - onnx raises several types
        for value, shape in saved.items():
            value.shape = shape
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BadInputError(f"the model is inconsistent with the fixed input shapes: {first[:300]}", label) from None
    for value, old in saved.items():
        if value.producer() is None:
            continue
        found = inferred.get(value.name) if value.name else None
        value.shape = found[1] if found is not None else old
        if found is not None and value.dtype is None and found[0]:
            value.dtype = ir.DataType(found[0])  # a shape without a type is not written to the file
    return model


def check_input_shapes(
    model: ir.Model, shapes: Mapping[str, Sequence[int]], *, label: str | None = None
) -> dict[str, ir.Shape]:
    """The static shapes ``shapes`` gives the graph inputs, checked against the model:
    BadInputError (naming ``label``) for an unknown input, a different rank, a size that
    is not positive or one that contradicts a static dimension."""
    inputs = {v.name: v for v in model.graph.inputs}
    planned: dict[str, ir.Shape] = {}
    for name, dims in shapes.items():
        value = inputs.get(name)
        if value is None:
            known = ", ".join(inputs) or "none"
            raise BadInputError(f"no such graph input '{name}' (inputs: {known})", label)
        sizes = [int(d) for d in dims]
        if not sizes and value.shape is not None and value.shape.rank() != 0:
            raise BadInputError(f"no sizes given for input '{name}'", label)
        if any(d <= 0 for d in sizes):
            raise BadInputError(f"input '{name}': sizes must be positive, got {sizes}", label)
        if value.shape is not None:
            if value.shape.rank() != len(sizes):
                raise BadInputError(
                    f"input '{name}' has rank {value.shape.rank()} ({_text(value.shape)}), "
                    f"but {len(sizes)} sizes were given", label)
            for axis, (old, new) in enumerate(zip(value.shape.dims, sizes)):
                if isinstance(old, int) and old >= 0 and old != new:
                    raise BadInputError(
                        f"input '{name}' axis {axis} is fixed at {old} in the model; cannot make it {new}", label)
        planned[name] = ir.Shape(sizes)

    return planned


def _bodies(model: ir.Model) -> list[ir.Graph]:
    return [g for g in oir.graphs(model) if isinstance(g, ir.Graph)]


def _node_outputs(graph: ir.Graph) -> list[ir.Value]:
    return [o for node in graph for o in node.outputs]


def _text(shape: ir.Shape) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) else (d.value or "?") for d in shape.dims) + "]"


def _infer(model: ir.Model) -> dict[str, tuple[int, ir.Shape]]:
    """Element types (0: unknown) and shapes onnx shape inference (strict, with data
    propagation) finds for the named values of every graph; large weights become typed
    graph inputs so none is copied."""
    with oir.initializers_set_aside(model, lambda t: t.nbytes > _SET_ASIDE_BYTES) as aside:
        proto = oir.serialize(model)
    aside_names = {value.name: tensor for value, tensor in aside}
    kept = [t for t in proto.graph.initializer if t.name not in aside_names]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    listed = {v.name for v in proto.graph.input}
    for name, tensor in aside_names.items():
        if name not in listed:
            proto.graph.input.append(onnx.helper.make_tensor_value_info(name, int(tensor.dtype), list(tensor.shape.dims)))
    inferred = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    found: dict[str, tuple[int, ir.Shape]] = {}
    for graph in oir.proto_graphs(inferred.graph):
        for info in (*graph.value_info, *graph.output):
            if not info.type.HasField("tensor_type") or not info.type.tensor_type.HasField("shape"):
                continue
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                    for d in info.type.tensor_type.shape.dim]
            found[info.name] = (info.type.tensor_type.elem_type, ir.Shape(dims))
    return found
