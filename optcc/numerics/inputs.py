"""Inputs for running a model: generated feeds that fit the model, and checks of given ones.

Generated per dtype: floats standard-normal, integers in a small non-negative range, and
integers used as Gather indices bounded by the size they index when that is static.
Dynamic dimensions take the sizes given by name, else 1 for the first axis and
``DEFAULT_DYNAMIC_DIM`` for the others.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from optcc.errors import BadInputError

__all__ = ["DEFAULT_DYNAMIC_DIM", "generate_inputs", "check_feeds"]

DEFAULT_DYNAMIC_DIM = 64  # size chosen for a dynamic dimension other than the first


def _dim_sizes(model: ir.Model, shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
    symbols: dict[str, int] = {}
    result = {}
    for value in model.graph.inputs:
        if value.name in shapes:
            result[value.name] = tuple(int(d) for d in shapes[value.name])
            if value.shape is not None:
                for dim, size in zip(value.shape, result[value.name]):
                    if isinstance(dim, ir.SymbolicDim) and dim.value:
                        symbols.setdefault(dim.value, size)
    for value in model.graph.inputs:
        if value.name in result:
            continue
        if value.shape is None:
            raise BadInputError(
                f"input '{value.name}' has no shape; give one with --input-shape {value.name}:D1,D2,..."
            )
        dims = []
        for axis, dim in enumerate(value.shape):
            if isinstance(dim, int) and dim >= 0:
                dims.append(dim)
            elif dim.value and dim.value in symbols:
                dims.append(symbols[dim.value])
            else:
                size = 1 if axis == 0 else DEFAULT_DYNAMIC_DIM
                if dim.value:
                    symbols[dim.value] = size
                dims.append(size)
        result[value.name] = tuple(dims)
    return result


def _index_bound(value: ir.Value) -> int | None:
    """For an integer input used as Gather indices, the size of the axis it indexes."""
    bounds = []
    for use in value.uses():
        node, index = use.node, use.idx
        if node.op_type in ("Gather", "GatherElements") and index == 1:
            data = node.inputs[0]
            axis = node.attributes.get_int("axis", 0)
            if data is not None and data.shape is not None and data.shape.rank() > 0:
                dim = data.shape[axis % data.shape.rank()]
                if isinstance(dim, int):
                    bounds.append(dim)
    return min(bounds) if bounds else None


def generate_inputs(
    model: ir.Model,
    shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    samples: int = 1,
    seed: int = 0,
) -> list[dict[str, np.ndarray]]:
    """Realistic random feeds for the model's graph inputs (see the module docstring)."""
    rng = np.random.default_rng(seed)
    sizes = _dim_sizes(model, shapes or {})
    feeds_list = []
    for _ in range(samples):
        feeds = {}
        for value in model.graph.inputs:
            if value.is_initializer():
                continue
            feeds[value.name] = _random_array(value, sizes[value.name], rng)
        feeds_list.append(feeds)
    return feeds_list


def _random_array(value: ir.Value, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if value.dtype is None:
        raise BadInputError(f"input '{value.name}' is not a tensor; pass inputs explicitly")
    dtype = value.dtype
    if dtype.is_floating_point():
        return rng.standard_normal(shape).astype(dtype.numpy())
    if dtype == ir.DataType.BOOL:
        return rng.integers(0, 2, shape).astype(bool)
    if dtype.is_integer():
        high = _index_bound(value) or 4
        return rng.integers(0, high, shape).astype(dtype.numpy())
    raise BadInputError(
        f"input '{value.name}' has dtype {dtype.name}, which optcc cannot generate; "
        "pass inputs explicitly"
    )


def check_feeds(model: ir.Model, feeds: Mapping[str, np.ndarray], label: str = "inputs") -> None:
    """Refuse feeds whose names, ranks or dtypes do not fit the model's graph inputs."""
    expected = {v.name: v for v in model.graph.inputs}
    missing = sorted(n for n, v in expected.items() if n not in feeds and not v.is_initializer())
    extra = sorted(set(feeds) - set(expected))
    if missing or extra:
        raise BadInputError(
            f"{label} do not match the model's inputs: missing {missing}, unexpected {extra}"
        )
    for name, array in feeds.items():
        value = expected[name]
        if not isinstance(array, np.ndarray) or array.dtype == object:
            raise BadInputError(f"{label}: '{name}' is not a numeric array")
        if value.dtype is not None and array.dtype != value.dtype.numpy():
            raise BadInputError(
                f"{label}: '{name}' has dtype {array.dtype}, the model expects "
                f"{value.dtype.numpy()}"
            )
        if value.shape is not None:
            if array.ndim != value.shape.rank():
                raise BadInputError(
                    f"{label}: '{name}' has shape {array.shape}, the model expects rank "
                    f"{value.shape.rank()}"
                )
            for dim, size in zip(value.shape, array.shape):
                if isinstance(dim, int) and dim >= 0 and dim != size:
                    raise BadInputError(
                        f"{label}: '{name}' has shape {array.shape}, the model expects "
                        f"{[d if isinstance(d, int) else d.value for d in value.shape]}"
                    )
