"""Type signatures of the ops the float16 rewrite may retype: standard ONNX ops (onnx's
schemas) and onnxruntime's fused float ops in ``com.microsoft`` (onnxruntime's own schemas).

``signature(domain, op_type, opset)`` gives, per formal input and output, its type string
(a type parameter such as ``T``, or a fixed type), and the types each parameter allows.
The rewrite converts a parameter only when it allows ``tensor(float16)``.

``CONTRIB_FLOAT_OPS`` lists the ``com.microsoft`` ops whose float type parameters carry
only the data they compute on (activations, weights, biases, additive masks): the same op
computes the same function with float16 there. Whether onnxruntime has a float16 kernel for
one on a provider is not assumed from the schema; ``optcc.fp16.support`` probes it. Other
contrib ops (quantized, packed or stateful ones) pass through untouched.
"""

from __future__ import annotations

import dataclasses
import functools

import onnx

__all__ = ["CONTRIB_FLOAT_OPS", "MS_DOMAIN", "Signature", "signature"]

MS_DOMAIN = "com.microsoft"
CONTRIB_FLOAT_OPS = frozenset({
    "Attention", "MultiHeadAttention", "GroupQueryAttention", "RotaryEmbedding",
    "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "EmbedLayerNormalization",
    "BiasGelu", "FastGelu", "Gelu", "QuickGelu", "BiasAdd", "BiasSoftmax",
    "FusedConv", "FusedMatMul",
})


@dataclasses.dataclass(frozen=True)
class Signature:
    """Formal inputs' and outputs' type strings (the last one repeats for variadics) and
    the allowed types of each type parameter."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    allowed: dict[str, frozenset[str]]


@functools.lru_cache(maxsize=1)
def _contrib() -> dict[str, Signature]:
    try:
        from onnxruntime.capi import _pybind_state
        schemas = _pybind_state.get_all_operator_schema()
    except (ImportError, AttributeError, RuntimeError):  # a build without schemas: none
        return {}
    found: dict[str, tuple[int, Signature]] = {}
    for s in schemas:
        if s.domain != MS_DOMAIN or s.name not in CONTRIB_FLOAT_OPS:
            continue
        sig = Signature(tuple(f.typeStr for f in s.inputs), tuple(f.typeStr for f in s.outputs),
                        {c.type_param_str: frozenset(c.allowed_type_strs) for c in s.type_constraints})
        if s.name not in found or s.since_version > found[s.name][0]:
            found[s.name] = (s.since_version, sig)
    return {name: sig for name, (_, sig) in found.items()}


def signature(domain: str, op_type: str, opset: int) -> Signature | str:
    """The op's signature, or why there is none to convert by."""
    if domain in ("", "ai.onnx"):
        try:
            schema = onnx.defs.get_schema(op_type, opset, "")
        except onnx.defs.SchemaError:
            return f"no schema for {op_type} at opset {opset}"
        return Signature(tuple(f.type_str for f in schema.inputs), tuple(f.type_str for f in schema.outputs),
                         {c.type_param_str: frozenset(c.allowed_type_strs) for c in schema.type_constraints})
    if domain == MS_DOMAIN and op_type in CONTRIB_FLOAT_OPS:
        sig = _contrib().get(op_type)
        return sig if sig is not None else f"onnxruntime has no schema for {domain}::{op_type}"
    return f"custom-domain op '{domain}::{op_type}' passes through untouched"
