"""The proof of equivalence sees through sink-layout-ops: an op that commutes with a layout
change, applied after one, is keyed as that layout change after the op with its constant
operand or pads carried back, so ``R(f(L(x)))`` and ``f'(x)`` get one key where ``R``
undoes ``L``; a Conv of a zero Pad is keyed as the Conv with the Pad's spatial pads
(fuse-pad's result). Every planted candidate that computes something else (a carried
constant one element off, a permutation that is not undone, pads on the wrong axis, a
Softmax over a moved axis, a Pad of another value) is left unproved, and onnx's reference
evaluator shows that it does differ; the proved ones agree with onnxruntime on the
original."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import optcc
from optcc.numerics.equivalence import prove_equivalent
from reference import FUSION_RTOL, assert_close, expected_outputs, onnxruntime_outputs, random_feeds
from test_sink_layout_ops import _madmom_unit

C = np.array([1.5, -2.0, 0.25], np.float32)  # one per axis 1 of x, axis 2 after the move


def _model(body: str, inits: dict[str, np.ndarray] | None = None, opset: int = 18) -> ir.Model:
    proto = onnx.parser.parse_model(f'<ir_version: 8, opset_import: ["" : {opset}]>\n' + body)
    for name, array in (inits or {}).items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    return ir.from_proto(onnx.shape_inference.infer_shapes(proto, strict_mode=True))


def _proved(original: ir.Model, candidate: ir.Model) -> bool:
    return prove_equivalent(original, candidate).complete


def _differs(original: ir.Model, candidate: ir.Model, shapes: dict[str, list[int]]) -> bool:
    feeds = random_feeds(ir.to_proto(original), shapes, seed=3)
    got, want = expected_outputs(ir.to_proto(candidate), feeds), expected_outputs(ir.to_proto(original), feeds)
    return any(a.shape != b.shape or not np.array_equal(a, b) for a, b in zip(got, want))


def _round_trip(middle: str) -> ir.Model:
    """``x`` moved to [N, W, C], ``middle`` (reading ``t``, making ``m``), moved back."""
    return _model(f"""
    agraph (float[2, 3, 5] x) => (float[A, B, D] y) {{
        t = Transpose <perm = [0, 2, 1]> (x)
        {middle}
        y = Transpose <perm = [0, 2, 1]> (m)
    }}""", {"c": C, "pads": np.array([0, 1, 0, 0, 2, 0], np.int64), "zero": np.array(0.0, np.float32)})


def _in_place(middle: str, carried: dict[str, np.ndarray]) -> ir.Model:
    """``middle`` (reading ``x``, making ``y``) in x's own layout."""
    return _model(f"""
    agraph (float[2, 3, 5] x) => (float[A, B, D] y) {{
        {middle}
    }}""", {"zero": np.array(0.0, np.float32), **carried})


def test_madmom_unit_is_proved_equal_after_sinking_and_after_o2():
    original = _madmom_unit()
    sunk = optcc.optimize(original.clone(), passes=["sink-layout-ops"], verify=False).model
    folded = optcc.optimize(sunk.clone(), level=2, verify=False).model
    assert optcc.ir.op_histogram(folded).get("Pad", 0) == 0  # the Pad went into the Conv
    assert _proved(original, sunk) and _proved(original, folded)
    proto = ir.to_proto(original)
    feeds = random_feeds(proto, {"x": [11, 9]}, seed=1)
    want = onnxruntime_outputs(proto, feeds)
    assert all(np.array_equal(a, b) for a, b in zip(onnxruntime_outputs(sunk, feeds), want))
    assert_close(onnxruntime_outputs(folded, feeds), want, FUSION_RTOL, what="-O2 after sinking vs the original")


def test_carried_constant_and_pads_are_proved_and_one_element_off_is_not():
    original = _round_trip("""a = Mul (t, c)
        p = Pad (a, pads, zero)
        m = Relu (p)""")
    carried = C.reshape(3, 1)
    pads = np.array([0, 0, 1, 0, 0, 2], np.int64)  # the padded axis 1 of [N, W, C] is x's axis 2
    body = """a = Mul (x, c)
        p = Pad (a, pads, zero)
        y = Relu (p)"""
    good = _in_place(body, {"c": carried, "pads": pads})
    assert _proved(original, good)
    assert not _differs(original, good, {"x": [2, 3, 5]})
    wrong = carried.copy()
    wrong[1, 0] = np.float32(-2.0000002)
    bad = _in_place(body, {"c": wrong, "pads": pads})
    assert _differs(original, bad, {"x": [2, 3, 5]}) and not _proved(original, bad)


def test_pads_on_the_wrong_axis_are_not_proved():
    original = _round_trip("""p = Pad (t, pads, zero)
        m = Relu (p)""")
    wrong = _in_place("""p = Pad (x, pads, zero)
        y = Relu (p)""", {"pads": np.array([0, 1, 0, 0, 2, 0], np.int64)})  # as the moved value had them
    assert _differs(original, wrong, {"x": [2, 3, 5]}) and not _proved(original, wrong)


def test_a_permutation_not_undone_is_not_proved():
    original = _model("""
    agraph (float[2, 3, 5] x) => (float[5, 2, 3] y) {
        t = Transpose <perm = [1, 2, 0]> (x)
        m = Relu (t)
        y = Transpose <perm = [1, 2, 0]> (m)
    }""")
    moved_once = _model("""
    agraph (float[2, 3, 5] x) => (float[5, 2, 3] y) {
        m = Relu (x)
        y = Transpose <perm = [2, 0, 1]> (m)
    }""")  # the perms compose to [2, 0, 1]: proved
    wrong = _model("""
    agraph (float[2, 3, 5] x) => (float[3, 5, 2] y) {
        m = Relu (x)
        y = Transpose <perm = [1, 2, 0]> (m)
    }""")
    assert _proved(original, moved_once)
    assert not _proved(original, wrong)


def test_softmax_over_a_moved_axis_is_not_proved():
    original = _round_trip("m = Softmax <axis = -1> (t)")
    wrong = _in_place("y = Softmax <axis = -1> (x)", {})
    assert _differs(original, wrong, {"x": [2, 3, 5]}) and not _proved(original, wrong)


def test_a_squeeze_the_original_does_not_run_is_not_assumed_by_the_candidate():
    """``Unsqueeze(Relu(Squeeze(x)))`` runs only where x's dim 1 is 1: a candidate keeping
    that pair is not proved equal to an original without it (nothing there shows the
    Squeeze runs), while the original with the pair does prove the candidate without it."""
    with_pair = _model("""
    agraph (float[2, 1, 5] x) => (float[2, 1, 5] y) <int64[1] a = {1}> {
        s = Squeeze (x, a)
        r = Relu (s)
        y = Unsqueeze (r, a)
    }""")
    without = _model("""
    agraph (float[2, 1, 5] x) => (float[2, 1, 5] y) {
        y = Relu (x)
    }""")
    assert _proved(with_pair, without)
    assert not _proved(without, with_pair)


@pytest.mark.parametrize("value, pads, proved", [
    (0.0, [0, 0, 1, 2, 0, 0, 3, 0], True),
    (-0.0, [0, 0, 1, 2, 0, 0, 3, 0], False),  # a pad of -0.0 is not the Conv's +0.0
    (1.0, [0, 0, 1, 2, 0, 0, 3, 0], False),
    (0.0, [1, 0, 1, 2, 0, 0, 3, 0], False),  # the batch padded
])
def test_a_conv_of_a_zero_pad_is_the_conv_with_those_pads(value: float, pads: list[int], proved: bool):
    inits = {"w": np.random.default_rng(5).standard_normal((2, 3, 2, 2)).astype(np.float32),
             "pads": np.array(pads, np.int64), "v": np.array(value, np.float32)}
    original = _model("""
    agraph (float[1, 3, 6, 6] x) => (float[N, 2, H, W] y) {
        p = Pad (x, pads, v)
        y = Conv <pads = [1, 0, 0, 1]> (p, w)
    }""", inits)
    fused = _model("""
    agraph (float[1, 3, 6, 6] x) => (float[1, 2, H, W] y) {
        y = Conv <pads = [2, 2, 3, 1]> (x, w)
    }""", {"w": inits["w"]})
    assert _proved(original, fused) == proved
    if proved:
        feeds = random_feeds(ir.to_proto(original), {"x": [1, 3, 6, 6]}, seed=2)
        assert_close(onnxruntime_outputs(fused, feeds), onnxruntime_outputs(ir.to_proto(original), feeds),
                     FUSION_RTOL, what="the Conv with the Pad's pads vs the original")


def test_a_constant_passed_through_an_identity_is_carried_too():
    """The candidate reads the constant itself (a scalar carries back unchanged), so the
    original's Identity of it is no fold to evaluate: it is read through the Identity."""
    scalar = {"s": np.array(2.5, np.float32)}
    original = _model("""
    agraph (float[2, 3, 5] x) => (float[A, B, D] y) {
        t = Transpose <perm = [0, 2, 1]> (x)
        k = Identity (s)
        m = Add (t, k)
        y = Transpose <perm = [0, 2, 1]> (m)
    }""", scalar)
    sunk = _in_place("y = Add (x, s)", scalar)
    assert _proved(original, sunk)
    assert not _differs(original, sunk, {"x": [2, 3, 5]})


def test_an_overridable_weight_of_a_padded_conv_is_no_constant():
    """Two graph inputs with the same default weight: a Conv of a Pad reading one is not the
    Conv reading the other (a caller may feed either)."""
    w = np.random.default_rng(5).standard_normal((2, 3, 2, 2)).astype(np.float32)
    inits = {"w1": w, "w2": w, "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)}
    body = """
    agraph (float[1, 3, 6, 6] x, float[2, 3, 2, 2] w1, float[2, 3, 2, 2] w2) => (float[1, 2, H, W] y) {{
        p = Pad (x, pads)
        y = Conv ({w})
    }}"""
    original, other = _model(body.format(w="p, w1"), inits), _model(body.format(w="p, w2"), inits)
    assert not _proved(original, other)


def test_max_before_opset_8_takes_inputs_of_one_shape_and_is_not_carried():
    # Max-6 does not broadcast: the original's constant has the transposed value's full shape,
    # and a constant carried back with its leading 1 dropped would make a candidate that
    # onnxruntime refuses (proved equal, it would have shipped)
    c = np.arange(15, dtype=np.float32).reshape(1, 3, 5)
    original = _model("""
    agraph (float[1, 5, 3] y) => (float[1, 5, 3] z) {
        t = Transpose <perm = [0, 2, 1]> (y)
        m = Max (t, c)
        z = Transpose <perm = [0, 2, 1]> (m)
    }""", {"c": c}, opset=7)
    candidate = _model("""
    agraph (float[1, 5, 3] y) => (float[1, 5, 3] z) { z = Max (y, c2) }""",
                       {"c2": np.ascontiguousarray(c[0].T)}, opset=7)
    assert not _proved(original, candidate)
    from optcc.passes.sink_layout_ops import SinkLayoutOpsPass
    assert not SinkLayoutOpsPass()(original.clone()).modified
    feeds = {"y": np.random.default_rng(0).standard_normal((1, 5, 3)).astype(np.float32)}
    with pytest.raises(Exception, match="same shape"):  # the candidate does not run
        onnxruntime_outputs(ir.to_proto(candidate), feeds)
    assert_close(onnxruntime_outputs(ir.to_proto(original), feeds),
                 [np.maximum(feeds["y"], np.transpose(c, (0, 2, 1)))], 0.0)


def test_pad_axes_naming_an_axis_twice_fit_no_pads():
    # onnxruntime refuses such a Pad; read as pads, the later entry would win
    assert optcc.ir.full_pads([1, 2, 3, 4], [2, 2], 4) is None
    assert optcc.ir.full_pads([1, 2, 3, 4], [2, -1], 4) == [0, 0, 1, 2, 0, 0, 3, 4]
