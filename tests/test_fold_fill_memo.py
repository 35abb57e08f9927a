"""fold-constants evaluates a ConstantOfShape fill once per folder and serves later waves
(which ask again for fills kept for their size) from what it found, keyed by the shape
value and ``value`` attribute it read: a fill kept in every wave is computed once and
stays a node; a fill whose shape is itself folded in the first wave is computed from the
folded shape. Results are checked with onnx's reference evaluator against numpy."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.reference
import onnx_ir as ir

import optcc.passes.fold_constants as fold_constants
from optcc.passes.fold_constants import FoldConstantsPass
from calls import first_arguments


def _fold(text: str, monkeypatch, **options) -> tuple[onnx.ModelProto, onnx.ModelProto, int]:
    """(original, folded, fills computed)."""
    proto = onnx.parser.parse_model(text)
    model = ir.from_proto(proto)
    with monkeypatch.context() as patch:
        computed = first_arguments(patch, fold_constants._GraphFolder, "_new_fill")
        FoldConstantsPass(**options)(model)
    return proto, ir.to_proto(model), len(computed)


def test_fills_kept_for_their_size_are_computed_once(monkeypatch):
    """Two fills of 16 and 32 bytes (each freeing its 8-byte shape) grow the model by
    8 + 24 = 32 > 28 bytes together, so both stay nodes; a free fold in the same wave
    makes the folder retry them in a second wave, which reads the kept fills instead of
    computing them again."""
    text = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[4] x, float[8] z) => (float[4] y, float[8] w, float[2] n) {
    sa = Constant <value = int64[1] {4}> ()
    sb = Constant <value = int64[1] {8}> ()
    a = ConstantOfShape <value = float[1] {1.5}> (sa)
    b = ConstantOfShape <value = float[1] {-2.0}> (sb)
    y = Add(x, a)
    w = Add(z, b)
    c = Constant <value = float[2] {1.0, -3.0}> ()
    n = Neg(c)
}"""
    proto, folded, computed = _fold(text, monkeypatch, max_growth_bytes=28)
    assert [n.op_type for n in folded.graph.node].count("ConstantOfShape") == 2
    assert "Neg" not in [n.op_type for n in folded.graph.node]
    assert computed == 2
    x = np.random.default_rng(0).standard_normal(4).astype(np.float32)
    z = np.random.default_rng(1).standard_normal(8).astype(np.float32)
    got = onnx.reference.ReferenceEvaluator(folded).run(None, {"x": x, "z": z})
    np.testing.assert_array_equal(got[0], x + np.float32(1.5))
    np.testing.assert_array_equal(got[1], z + np.float32(-2.0))
    np.testing.assert_array_equal(got[2], np.array([-1.0, 3.0], np.float32))


def test_a_fill_reads_its_shape_once_that_is_folded(monkeypatch):
    """The fill's shape is computed (Abs) in the first wave, so the fill is evaluated in
    the second from the new initializer, and folds to the kernel's values."""
    text = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[3,2] x) => (float[3,2] y) {
    s0 = Constant <value = int64[2] {-3, -2}> ()
    s = Abs(s0)
    f = ConstantOfShape <value = float[1] {7.0}> (s)
    y = Add(x, f)
}"""
    proto, folded, computed = _fold(text, monkeypatch)
    assert [n.op_type for n in folded.graph.node] == ["Add"]
    assert computed == 1
    x = np.random.default_rng(2).standard_normal((3, 2)).astype(np.float32)
    got = onnx.reference.ReferenceEvaluator(folded).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, x + np.float32(7.0))
    np.testing.assert_array_equal(got, onnx.reference.ReferenceEvaluator(proto).run(None, {"x": x})[0])
