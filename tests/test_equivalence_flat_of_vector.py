"""A Reshape of a 1-D tensor to one dim returns it unchanged wherever it runs (to ``[-1]``
always), so the proof keys it as its input: eliminate-noops' removal of such a Reshape (a
shape vector built by Concat, then flattened, as the VoiceFilter-Lite export does) is
proved, where the vector is read as a shape (a Reshape's target) and as data (a Cast's
input). A Reshape to one dim of a 2-D tensor is not its input."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx.reference import ReferenceEvaluator

import optcc
from optcc.numerics.equivalence import prove_equivalent

_ORIGINAL = """
<ir_version: 8, opset_import: ["": 17]>
g (float[N, T, 4] x, float[T, 4] m) => (float[N, T, 4] y, float[Q] f, float[3] e) {
    minus = Constant<value = int64[1] {-1}>()
    one = Constant<value = int64[1] {1}>()
    three = Constant<value = int64[1] {3}>()
    s = Shape(x)
    t = Slice(s, one, three)
    c = Concat<axis = 0>(minus, t)
    target = Reshape(c, minus)
    y = Reshape(x, target)
    f = Reshape(m, minus)
    e = Cast<to = 1>(target)
}
"""

_CANDIDATE = """
<ir_version: 8, opset_import: ["": 17]>
g (float[N, T, 4] x, float[T, 4] m) => (float[N, T, 4] y, float[Q] f, float[3] e) {
    minus = Constant<value = int64[1] {-1}>()
    one = Constant<value = int64[1] {1}>()
    three = Constant<value = int64[1] {3}>()
    s = Shape(x)
    t = Slice(s, one, three)
    target = Concat<axis = 0>(minus, t)
    y = Reshape(x, target)
    f = Identity(m)
    e = Cast<to = 1>(target)
}
"""


def test_a_flattened_vector_is_its_input_and_a_flattened_matrix_is_not():
    original = onnx.parser.parse_model(_ORIGINAL)
    candidate = onnx.parser.parse_model(_CANDIDATE)
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    m = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    want = ReferenceEvaluator(original).run(None, {"x": x, "m": m})
    got = ReferenceEvaluator(candidate).run(None, {"x": x, "m": m})
    assert np.array_equal(want[0], got[0]) and np.array_equal(want[2], got[2]) and want[1].shape != got[1].shape
    proof = prove_equivalent(optcc.ir.load(original), optcc.ir.load(candidate))
    assert proof.outputs == {"y": True, "f": False, "e": True}
