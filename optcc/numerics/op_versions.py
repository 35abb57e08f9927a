"""Which versions of a default-domain operator compute the same function.

A node's key in the equivalence proof (``optcc.numerics.equivalence``) names the
operator's definition: ``definition`` gives that name for a node of a model importing
``opset``. Two nodes resolving to the same schema (``since_version``) share one
definition. ``SAME_FUNCTION`` lists the newer schemas that define, for every node an
older one accepts, the function that older one computes, where ``condition`` holds on the
node's attributes; each entry was read against the operator changelog of the installed
onnx (schema docs, attributes, inputs and type constraints):

- types added in a newer version (bfloat16, small integers) do not matter: a node of the
  older version has one of the older types, computed alike;
- an attribute or optional input added with a default that keeps the older behaviour
  (MaxPool's ``ceil_mode`` and ``dilations``, AveragePool 19's ``dilations``, Gemm's
  optional ``C``, Reshape's ``allowzero``, Shape's ``start``/``end``, Pad 18's ``axes``)
  is keyed as written: a node that sets it differs from one that does not, and so is not
  proved; a value an attribute could not take before (Pad 19's ``wrap`` mode) is never on
  an older node;
- a negative axis, undefined before a version and counted from the back after it:
  only a node whose axis is absent or not negative (``_axis_from_front``);
- padding whose description changed (``auto_pad``'s SAME modes, ``ceil_mode``'s rounding
  of the last window, the pads ConvTranspose's ``output_shape`` implies): only explicit
  padding without ceil mode (``_explicit_padding``) or output shape.

Not listed, so keyed apart across versions: every change that can give another value
for a node an older version accepts (Softmax 13 is taken along one axis, not over the
input coerced to 2-D, and its axis defaults to -1, not 1: the proof keys Softmax and
LogSoftmax 1 and 11 by their own rule), versions that drop a type an older one accepted
(Erf 13 has no integer inputs), versions whose changelog defines what was undefined before
(Clip 13 with ``min > max``, Cast 13's conversion rules, Floor 13 on special values), and
versions whose description was rewritten (Slice 13's clamping, Resize 18 and 19). Other
domains, operators onnx has no schema for, and opsets newer than the installed onnx knows
are keyed by the opset version the model imports, as before.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import onnx

__all__ = ["SAME_FUNCTION", "SameFunction", "definition", "schema_version"]

Attributes = Mapping[str, Any]  # attribute name -> its value (an int, a string, a list...)


def _explicit_padding(attributes: Attributes) -> bool:
    """``auto_pad`` absent or NOTSET, and ``ceil_mode`` absent or 0."""
    return attributes.get("auto_pad", "NOTSET") == "NOTSET" and attributes.get("ceil_mode", 0) == 0


def _explicit_transposed_padding(attributes: Attributes) -> bool:
    """``_explicit_padding``, and no ``output_shape`` (the pads it implies were described anew)."""
    return _explicit_padding(attributes) and "output_shape" not in attributes


def _axis_from_front(attributes: Attributes) -> bool:
    """``axis`` absent or not negative."""
    axis = attributes.get("axis", 0)
    return isinstance(axis, int) and axis >= 0


@dataclasses.dataclass(frozen=True)
class SameFunction:
    """The schema versions of ``op`` that compute one function on the nodes the oldest of
    them accepts, where ``condition`` (None: always) holds on a node's attributes."""

    op: str
    versions: tuple[int, ...]
    condition: Callable[[Attributes], bool] | None = None


SAME_FUNCTION: tuple[SameFunction, ...] = (
    # element-wise: the newer versions add types only
    SameFunction("Relu", (6, 13, 14)),
    SameFunction("LeakyRelu", (6, 16)),
    SameFunction("Sigmoid", (6, 13)),
    SameFunction("HardSigmoid", (6, 22)),
    SameFunction("HardSwish", (14, 22)),
    SameFunction("Elu", (6, 22)),
    SameFunction("Softplus", (1, 22)),
    SameFunction("Tanh", (6, 13)),
    SameFunction("Exp", (6, 13)),
    SameFunction("Log", (6, 13)),
    SameFunction("Sqrt", (6, 13)),
    SameFunction("Reciprocal", (6, 13)),
    SameFunction("Abs", (6, 13)),
    SameFunction("Neg", (6, 13)),
    SameFunction("Add", (7, 13, 14)),
    SameFunction("Sub", (7, 13, 14)),
    SameFunction("Mul", (7, 13, 14)),
    SameFunction("Div", (7, 13, 14)),
    SameFunction("Pow", (12, 13, 15)),
    SameFunction("Sum", (8, 13)),
    SameFunction("Max", (8, 12, 13)),
    SameFunction("Min", (8, 12, 13)),
    SameFunction("Equal", (7, 11, 13, 19)),
    SameFunction("Less", (7, 9, 13)),
    SameFunction("Greater", (7, 9, 13)),
    SameFunction("Where", (9, 16)),
    SameFunction("Clip", (11, 12)),
    # products and layers: types added; Gemm 11 makes C optional (a node of 9 has one);
    # AveragePool 19 adds dilations (absent: 1); 22 (bfloat16) describes ceil mode's last
    # window anew, which explicit padding without ceil mode never has
    SameFunction("MatMul", (9, 13)),
    SameFunction("Gemm", (7, 9, 11, 13)),
    SameFunction("Conv", (1, 11, 22), _explicit_padding),
    SameFunction("ConvTranspose", (1, 11, 22), _explicit_transposed_padding),
    SameFunction("MaxPool", (8, 10, 11, 12, 22), _explicit_padding),
    SameFunction("AveragePool", (7, 10, 11, 19, 22), _explicit_padding),
    SameFunction("GlobalAveragePool", (1, 22)),
    SameFunction("GlobalMaxPool", (1, 22)),
    SameFunction("InstanceNormalization", (6, 22)),
    SameFunction("LRN", (1, 13)),
    # data movement: types added; Reshape 14's allowzero defaults to the older behaviour;
    # Pad 18 adds an optional axes input (absent: every axis) and 19 the wrap mode
    SameFunction("Transpose", (1, 13, 21, 23, 24, 25)),
    SameFunction("Reshape", (5, 13, 14, 19, 21, 23, 24, 25)),
    SameFunction("Shape", (1, 13, 15, 19, 21, 23, 24, 25)),
    SameFunction("Squeeze", (13, 21, 23, 24, 25)),
    SameFunction("Unsqueeze", (13, 21, 23, 24, 25)),
    SameFunction("Identity", (1, 13, 14, 16, 19, 21, 23, 24, 25)),
    SameFunction("ConstantOfShape", (9, 20, 21, 23, 24, 25)),
    SameFunction("Expand", (8, 13)),
    SameFunction("Tile", (6, 13)),
    SameFunction("Gather", (11, 13)),
    SameFunction("Pad", (11, 13, 18, 19, 21, 23, 24, 25)),
    SameFunction("Concat", (4, 11, 13), _axis_from_front),
    SameFunction("Flatten", (9, 11, 13, 21, 23, 24, 25), _axis_from_front),
)

_BY_OP: dict[str, SameFunction] = {entry.op: entry for entry in SAME_FUNCTION}


def schema_version(domain: str, op: str, opset: int) -> int | None:
    """The ``since_version`` of the schema ``op`` has in ``opset`` of ``domain``; None when
    the installed onnx has none."""
    try:
        return onnx.defs.get_schema(op, opset, domain).since_version
    except onnx.defs.SchemaError:
        return None


def definition(domain: str, op: str, opset: int) -> tuple[tuple[str, int], Callable[[Attributes], bool] | None,
                                                       tuple[str, int]]:
    """What a node of ``op`` in a model importing ``opset`` of ``domain`` computes, as keys:
    nodes with equal keys (and equal attributes and inputs) compute the same function.
    ``(key, condition, same)``: a node's key is ``same`` where ``condition`` holds on its
    attributes, else ``key`` (no condition: always ``key``)."""
    # an opset newer than the installed onnx's may have changed the operator since its last schema here
    newest = onnx.defs.onnx_opset_version() if domain == "" else 0
    since = schema_version(domain, op, opset) if domain == "" and opset <= newest else None
    if since is None:
        return ("opset", opset), None, ("opset", opset)
    own = ("schema", since)
    entry = _BY_OP.get(op) if domain == "" else None
    if entry is None or since not in entry.versions:
        return own, None, own
    same = ("same", entry.versions[0])
    return (same, None, same) if entry.condition is None else (own, entry.condition, same)

