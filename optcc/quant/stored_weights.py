"""Weights stored as integer levels keep that form where INT8 leaves them float.

A model may store a weight as ``W = Mul(Cast<float>(q), scale)`` with ``q`` an integer
constant (``optcc.ir.stored_levels``). INT8 folds ``W`` into a float32 constant to
quantize it (``prepare_float``); where the result reads it in float32 still (a layer the
fallback keeps float, an embedding table read by a Gather), that constant holds four
times the bytes the model stored. ``stored_weights`` records each such weight of a
model before the fold; ``restore_stored`` turns every float32 initializer of a result
that holds exactly a recorded weight's values back into its levels, Cast and Mul.

Exact: the Cast of 8- or 16-bit integers to float32 is exact and the Mul computes each
element as the same float32 product the fold stored (IEEE multiplication is correctly
rounded and commutative), so the graph computes the constant's values bit for bit. A
constant is restored only when its bytes equal the recorded product's (compared by
shape, then by a digest, then element by element).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from optcc import ir as oir

__all__ = ["StoredWeight", "stored_weights", "restore_stored"]


@dataclasses.dataclass(frozen=True)
class StoredWeight:
    """A weight stored as ``Mul(Cast<float>(levels), scale)``: its arrays and its value's digest."""

    levels: np.ndarray
    scale: np.ndarray
    digest: bytes  # of the float32 product's bytes

    def product(self) -> np.ndarray:
        return np.multiply(self.levels.astype(np.float32), self.scale, dtype=np.float32)


def _digest(array: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(array).data, digest_size=16).digest()


def stored_weights(model: ir.Model) -> list[StoredWeight]:
    """The weights ``model``'s main graph computes from stored integer levels."""
    found: list[StoredWeight] = []
    for node in model.graph:
        if node.op_type != "Mul" or node.domain not in ("", "ai.onnx") or len(node.outputs) != 1:
            continue
        chain = oir.stored_levels(node.outputs[0])
        if chain is None:
            continue
        _, levels_value, scale_value = chain
        levels, scale = oir.const_array(levels_value), oir.const_array(scale_value)
        if levels is None or scale is None:
            continue
        weight = StoredWeight(levels, scale, b"")
        found.append(dataclasses.replace(weight, digest=_digest(weight.product())))
    return found


def restore_stored(model: ir.Model, stored: Sequence[StoredWeight]) -> dict[str, int]:
    """Compute again from its levels each float32 initializer of ``model``'s main graph that
    holds exactly one of ``stored``'s weights, that nodes read (not a graph input or
    output) and whose levels and scale take fewer bytes, in place. Returns
    ``{"tensors": restored, "bytes_saved": float32 bytes less}``."""
    by_shape: dict[tuple[int, ...], list[StoredWeight]] = {}
    for weight in stored:
        by_shape.setdefault(tuple(np.broadcast_shapes(weight.levels.shape, weight.scale.shape)), []).append(weight)
    graph = model.graph
    inputs, outputs = set(graph.inputs), set(graph.outputs)
    restored = {"tensors": 0, "bytes_saved": 0}
    taken: set[str] | None = None  # the model's value names, read once a weight is restored
    for value in list(graph.initializers.values()):
        candidates = by_shape.get(tuple(value.shape or ())) if value.shape is not None else None
        if (not candidates or value.dtype != ir.DataType.FLOAT or value.const_value is None or not value.uses()
                or value in inputs or value in outputs):
            continue
        array = oir.mapped(value.const_value)
        digest = _digest(array)
        weight = next((w for w in candidates if w.digest == digest and np.array_equal(w.product(), array)), None)
        if weight is None or weight.levels.nbytes + weight.scale.nbytes >= array.nbytes:
            continue
        taken = oir.value_names(model) if taken is None else taken
        _replace(graph, value, weight, taken)
        restored["tensors"] += 1
        restored["bytes_saved"] += array.nbytes - weight.levels.nbytes - weight.scale.nbytes
    return restored


def _replace(graph: ir.Graph, value: ir.Value, weight: StoredWeight, taken: set[str]) -> None:
    """``value`` (an initializer) computed instead as ``Mul(Cast<float>(levels), scale)``,
    its name and readers kept; new names are new among ``taken``."""
    name = value.name or "weight"
    levels_name, scale_name, cast_name = (oir.unique_value_name(None, f"{name}_{part}", taken)
                                          for part in ("levels", "scale", "levels_float"))
    levels = ir.Value(name=levels_name, const_value=ir.tensor(weight.levels, name=levels_name))
    scale = ir.Value(name=scale_name, const_value=ir.tensor(weight.scale, name=scale_name))
    cast = ir.node("Cast", [levels], attributes={"to": ir.DataType.FLOAT}, name=cast_name)
    mul = ir.node("Mul", [cast.outputs[0], scale], name=f"{name}_dequantize")
    del graph.initializers[name]
    for given in (levels, scale):
        graph.register_initializer(given)
    value.replace_all_uses_with(mul.outputs[0])
    cast.outputs[0].name, cast.outputs[0].dtype = cast_name, ir.DataType.FLOAT
    cast.outputs[0].shape = ir.Shape(weight.levels.shape)
    mul.outputs[0].name, mul.outputs[0].dtype, mul.outputs[0].shape = name, ir.DataType.FLOAT, value.shape
    first = next(iter(graph), None)
    if first is None:
        graph.extend([cast, mul])
    else:
        graph.insert_before(first, [cast, mul])
