"""The proof of equivalence (optcc.numerics.equivalence) keys a constant of a sub-byte type
(int4, uint4) by its values. ml_dtypes holds such a type one value per byte and
reads the low bits; a view of int8 levels as int4 (how weight-only quantization stores its
levels) keeps the sign's bits above them. Two equal tensors, one held that way and one
made by a conversion (the low bits alone), must get one key, so that the proof sees that
a model and its copy with the other tensor compute the same thing; a tensor that differs
in one value must not. onnx's reference evaluator confirms which pairs are equal."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx.reference import ReferenceEvaluator

import optcc
from optcc.numerics.equivalence import SMALL_TENSOR_ELEMENTS, prove_equivalent

ROWS, COLS = 64, 48  # more elements than SMALL_TENSOR_ELEMENTS: keyed from the array, not the packed bytes
assert ROWS * COLS > SMALL_TENSOR_ELEMENTS

_TEXT = f"""
<ir_version: 10, opset_import: ["" : 21]>
g (float[2, {ROWS}] x) => (float[2, {COLS}] y) <float s = {{0.5}}> {{
    w = DequantizeLinear(q, s)
    y = MatMul(x, w)
}}"""

_KINDS = {
    "int4": (ml_dtypes.int4, onnx.TensorProto.INT4, np.int8, -8, 8),
    "uint4": (ml_dtypes.uint4, onnx.TensorProto.UINT4, np.uint8, 0, 16),
}


def _levels(kind: str, seed: int = 0) -> np.ndarray:
    _, _, wide, low, high = _KINDS[kind]
    levels = np.random.default_rng(seed).integers(low, high, (ROWS, COLS)).astype(wide)
    if kind == "uint4":  # bits set above the low nibble, as a wider value's view may hold them
        levels |= np.uint8(0xF0) * (np.arange(levels.size).reshape(levels.shape) % 2).astype(np.uint8)
    return levels


def _model(kind: str, weight: np.ndarray) -> ir.Model:
    """The model with its weight ``q`` held as ``weight`` (an array of the sub-byte type)."""
    dtype, number, *_ = _KINDS[kind]
    text = _TEXT.replace("<float s", f"<{onnx.helper.tensor_dtype_to_string(number).split('.')[-1].lower()}"
                         f"[{ROWS}, {COLS}] q = {{{', '.join(['0'] * ROWS * COLS)}}}, float s")
    model = optcc.ir.load(onnx.parser.parse_model(text))
    model.graph.initializers["q"].const_value = ir.Tensor(weight, dtype=ir.DataType(number))
    return model


def _outputs(model: ir.Model) -> np.ndarray:
    x = np.random.default_rng(1).standard_normal((2, ROWS)).astype(np.float32)
    return ReferenceEvaluator(optcc.ir.serialize(model)).run(None, {"x": x})[0]


@pytest.mark.parametrize("kind", list(_KINDS))
def test_equal_sub_byte_tensors_held_as_a_view_or_converted_are_one_constant(kind: str) -> None:
    levels = _levels(kind)
    dtype = _KINDS[kind][0]
    viewed, converted = levels.view(dtype), levels.astype(dtype)
    assert not np.array_equal(viewed.view(np.uint8), converted.view(np.uint8))  # other bytes held...
    original, candidate = _model(kind, viewed), _model(kind, converted)
    assert prove_equivalent(original, _model(kind, viewed.copy())).complete  # held alike: proved at any rate
    np.testing.assert_array_equal(_outputs(candidate), _outputs(original))  # ...for the same values
    assert prove_equivalent(original, candidate).complete
    assert prove_equivalent(_model(kind, converted), _model(kind, viewed)).complete


@pytest.mark.parametrize("kind", list(_KINDS))
def test_a_sub_byte_tensor_with_one_other_value_is_not_proved(kind: str) -> None:
    levels = _levels(kind)
    dtype = _KINDS[kind][0]
    other = levels.copy()
    held = other.view(np.uint8)
    held[3, 5] = (int(held[3, 5]) & 0xF0) | ((int(held[3, 5]) + 1) & 0x0F)  # another low nibble, the same bits above
    original, candidate = _model(kind, levels.view(dtype)), _model(kind, other.view(dtype))
    assert not np.array_equal(_outputs(candidate), _outputs(original))
    assert not prove_equivalent(original, candidate).complete
