"""``x + 0`` (integers), ``x + (-0.0)``, ``x - 0``, ``x * 1`` and ``x / 1`` return x bit for
bit (IEEE 754: signed zeros, infinities and NaN included) when the constant's shape leaves
x's as it is: the proof keys them as x, so eliminate-noops' removal of them is proved (a
T5 encoder's relative-position bucket computes ``n + 0`` in int64). ``x + (+0.0)`` turns
-0.0 into +0.0, and a constant of higher rank broadcasts x to a new shape: not proved."""

from __future__ import annotations

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator

import optcc
from optcc.numerics.equivalence import prove_equivalent

_OUTPUTS = "int64[N] a, float[N] b, float[N] c, float[N] d, float[N] e, float[N] p, float[1, N] q"

_ORIGINAL = f"""
<ir_version: 8, opset_import: ["": 17]>
g (int64[N] i, float[N] f) => ({_OUTPUTS}) {{
    zi = Constant<value = int64 {{0}}>()
    nz = Constant<value = float {{-0.0}}>()
    pz = Constant<value = float {{0.0}}>()
    one = Constant<value = float[1] {{1.0}}>()
    wide = Constant<value = float[1, 1] {{1.0}}>()
    a = Add(zi, i)
    b = Add(f, nz)
    c = Sub(f, pz)
    d = Mul(one, f)
    e = Div(f, one)
    p = Add(f, pz)
    q = Mul(f, wide)
}}
"""

_CANDIDATE = f"""
<ir_version: 8, opset_import: ["": 17]>
g (int64[N] i, float[N] f) => ({_OUTPUTS}) {{
    a = Identity(i)
    b = Identity(f)
    c = Identity(f)
    d = Identity(f)
    e = Identity(f)
    p = Identity(f)
    q = Identity(f)
}}
"""


def test_neutral_constants_are_proved_exactly_where_they_return_x():
    original, candidate = onnx.parser.parse_model(_ORIGINAL), onnx.parser.parse_model(_CANDIDATE)
    feeds = {"i": np.array([3, -4, 0], dtype=np.int64),
             "f": np.array([-0.0, 1.5, -np.inf, np.nan], dtype=np.float32)[:3]}
    feeds["f"][2] = -np.inf
    want = ReferenceEvaluator(original).run(None, feeds)
    got = ReferenceEvaluator(candidate).run(None, feeds)
    same = {name: a.shape == b.shape and a.tobytes() == b.tobytes()
            for name, a, b in zip("abcdepq", want, got)}
    assert same == {**dict.fromkeys("abcde", True), "p": False, "q": False}
    proof = prove_equivalent(optcc.ir.load(original), optcc.ir.load(candidate))
    assert proof.outputs == same
