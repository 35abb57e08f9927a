"""MergeConsecutivePass: Transpose chains, Squeeze/Unsqueeze pairs and Reshape chains
collapse when exact, and stay when the first node is shared, a graph output, of a custom
domain, or (Reshape) when the second target copies a dim with 0."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import optcc
from optcc.passes.eliminate_noops import EliminateNoOpsPass
from optcc.passes.lift_constants import LiftConstantsPass
from optcc.passes.merge_consecutive import MergeConsecutivePass
from exact_pass_checks import ort_outputs, run_exact_pass
from reference import EXACT_RTOL, assert_close, expected_outputs, random_feeds


def _model(body: str, opset: int = 17, infer: bool = True) -> ir.Model:
    proto = onnx.parser.parse_model(f'<ir_version: 8, opset_import: ["" : {opset}]>\n' + body)
    if infer:
        proto = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    return ir.from_proto(proto)


def _run(model: ir.Model, feeds: dict[str, np.ndarray] | None = None) -> optcc.PassResult:
    return run_exact_pass(MergeConsecutivePass, model, feeds)


def _ops(model: ir.Model) -> dict[str, int]:
    return optcc.ir.op_histogram(model)


def _computing_ops(model: ir.Model) -> dict[str, int]:
    """``_ops`` without the Constant nodes that hold rewritten targets."""
    return {op: n for op, n in _ops(model).items() if op != "Constant"}


def _perms(model: ir.Model) -> list[list[int]]:
    return [list(n.attributes["perm"].as_ints()) for n in model.graph if n.op_type == "Transpose"]


def test_transpose_pairs_compose_or_vanish():
    model = _model("""
    agraph (float[2, 3, 4] x) => (float[4, 3, 2] y, float[2, 3, 4] z, float[2, 3, 4] w, float[3, 4, 2] v) {
        a = Transpose<perm = [1, 0, 2]>(x)
        b = Transpose<perm = [2, 0, 1]>(a)
        y = Neg(b)
        c = Transpose<perm = [1, 2, 0]>(x)
        d = Transpose<perm = [2, 0, 1]>(c)
        z = Neg(d)
        e = Transpose(x)
        f = Transpose(e)
        w = Neg(f)
        g = Transpose<perm = [2, 1, 0]>(x)
        h = Transpose<perm = [1, 2, 0]>(g)
        i = Transpose<perm = [0, 2, 1]>(h)
        v = Neg(i)
    }
    """)
    result = _run(model)
    assert _ops(result.model) == {"Neg": 4, "Transpose": 2}
    assert _perms(result.model) == [[2, 1, 0], [1, 2, 0]]
    assert result.stats == {"transpose-transpose": 5}


def test_shared_first_transpose_is_kept():
    model = _model("""
    agraph (float[2, 3, 4] x) => (float[4, 3, 2] y, float[3, 2, 4] z, float[2, 3, 4] w) {
        a = Transpose<perm = [1, 0, 2]>(x)
        b = Transpose<perm = [2, 0, 1]>(a)
        y = Neg(b)
        z = Neg(a)
        c = Transpose<perm = [1, 0, 2]>(a)
        w = Neg(c)
    }
    """)
    result = _run(model)
    # b is not merged (a has other readers, merging would add work); c undoes a, so it
    # goes and reads x, while a stays for b and z.
    assert _ops(result.model) == {"Neg": 3, "Transpose": 2}
    assert result.stats == {"transpose-transpose": 1}
    assert _perms(result.model) == [[1, 0, 2], [2, 0, 1]]


def test_graph_output_in_the_middle_of_a_chain_is_kept():
    model = _model("""
    agraph (float[2, 3, 4] x) => (float[3, 2, 4] a, float[4, 3, 2] y) {
        a = Transpose<perm = [1, 0, 2]>(x)
        b = Transpose<perm = [2, 0, 1]>(a)
        y = Neg(b)
    }
    """)
    result = MergeConsecutivePass()(model)
    assert not result.modified
    assert _perms(result.model) == [[1, 0, 2], [2, 0, 1]]


def test_chain_ending_in_a_graph_output_hands_the_name_over():
    model = _model("""
    agraph (float[N, 3] x) => (float[N, 3] y, float[N, 3] z) {
        r = Relu(x)
        t = Transpose(r)
        y = Transpose(t)
        u = Transpose(x)
        z = Transpose(u)
    }
    """)
    result = _run(model)
    # y: Relu's output takes the name y. z would hand its name to the graph input x.
    assert _ops(result.model) == {"Relu": 1, "Transpose": 2}
    graph = result.model.graph
    assert [v.name for v in graph.outputs] == ["y", "z"]
    assert graph.outputs[0].producer().op_type == "Relu"
    assert [str(d) for d in graph.outputs[0].shape] == ["N", "3"]


def test_squeeze_unsqueeze_pairs_collapse():
    model = _model("""
    agraph (float[N, 1, 4, 1] x, float[N, 4] s) => (float[N, 1, 4, 1] y, float[N, 4] z, float[N, 4, 1, 1] v)
        <int64[2] a13 = {1, 3}, int64[2] neg = {-1, 1}, int64[1] a1 = {1}, int64[1] m1 = {-1}> {
        x0 = Neg(x)
        p = Squeeze(x0, a13)
        y = Unsqueeze(p, neg)
        s0 = Neg(s)
        q = Unsqueeze(s0, a1)
        z = Squeeze(q, a1)
        o = Squeeze(x0, a1)
        v = Unsqueeze(o, m1)
    }
    """, opset=13)
    result = _run(model)
    # v re-inserts the unit axis at the end, not where it was: it stays.
    assert result.stats == {"squeeze-unsqueeze": 1, "unsqueeze-squeeze": 1}
    assert _ops(result.model) == {"Neg": 2, "Squeeze": 1, "Unsqueeze": 1}
    assert [v.name for v in result.model.graph.outputs] == ["y", "z", "v"]


def test_squeeze_unsqueeze_with_axes_attributes_before_opset_13():
    model = _model("""
    agraph (float[2, 1, 4] x, float[N, 1, 4] d) => (float[2, 1, 4] y, float[N, 1, 4] z, float[N, 1, 4] w) {
        p = Squeeze<axes = [-2]>(x)
        q = Unsqueeze<axes = [1]>(p)
        y = Neg(q)
        r = Squeeze<axes = [1]>(d)
        s = Unsqueeze<axes = [1]>(r)
        z = Neg(s)
        t = Squeeze(d)
        u = Unsqueeze<axes = [1]>(t)
        w = Neg(u)
    }
    """, opset=11)
    result = _run(model)
    # A Squeeze without axes on a dynamic shape (N may be 1) is not provable: it stays.
    assert result.stats == {"squeeze-unsqueeze": 2}
    assert _ops(result.model) == {"Neg": 3, "Squeeze": 1, "Unsqueeze": 1}


def test_negative_dims_written_for_dynamic_ones_count_as_unknown():
    """Squeeze without axes after Unsqueeze: if the -1 dim is 1 at run time it is squeezed
    too, so the pair is not a no-op."""
    graph = helper.make_graph(
        [
            helper.make_node("Unsqueeze", ["x", "zero"], ["u"]),
            helper.make_node("Squeeze", ["u"], ["s"]),
            helper.make_node("Neg", ["s"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [helper.make_tensor("zero", TensorProto.INT64, [1], [0])],
        value_info=[helper.make_tensor_value_info("u", TensorProto.FLOAT, [1, -1, 4])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    model = ir.from_proto(proto)
    assert not MergeConsecutivePass()(model).modified
    x = np.ones((1, 4), np.float32)
    assert ort_outputs(model, {"x": x})[0].shape == (4,), "the pair is not the identity"


def test_reshape_chains_merge_with_the_second_targets_copies_resolved():
    model = _model("""
    agraph (float[2, 3, 4] x) => (float[6, 4] y, float[4, 6] z, float[24] w)
        <int64[3] s432 = {4, 3, 2}, int64[2] s_m1 = {-1, 4}, int64[2] s_zero = {0, -1}, int64[1] flat = {-1}> {
        a = Reshape(x, s432)
        b = Reshape(a, s_m1)
        y = Neg(b)
        c = Reshape(x, s432)
        d = Reshape(c, s_zero)
        z = Neg(d)
        e = Reshape(x, s432)
        f = Reshape(e, s432)
        g = Reshape(f, flat)
        w = Neg(g)
    }
    """)
    result = _run(model)
    assert result.stats == {"reshape-reshape": 4}
    assert _computing_ops(result.model) == {"Neg": 3, "Reshape": 3}
    merged = next(n for n in result.model.graph if n.outputs[0].name == "d")
    assert merged.inputs[0].name == "x", "the 0 copied the intermediate dim 4, which s432 fixed"
    assert optcc.ir.as_numpy(merged.inputs[1]).tolist() == [4, -1]


def test_merging_a_zero_copy_target_as_it_is_would_be_wrong():
    """Why copies are resolved: Reshape(Reshape(x, [4, 3, 2]), [0, -1]) is [4, 6], while
    Reshape(x, [0, -1]) is [2, 12] (onnxoptimizer merges it so); the merge writes the 4
    that the first target fixed."""
    text = """
    agraph (float[2, 3, 4] x) => (float[A, B] y) <int64[3] s432 = {4, 3, 2}, int64[2] s_zero = {0, -1}> {
        a = Reshape(x, s432)
        y = Reshape(a, s_zero)
    }
    """
    model = _model(text, infer=False)
    naive = _model(text.replace("a = Reshape(x, s432)\n        y = Reshape(a, s_zero)",
                                "y = Reshape(x, s_zero)"), infer=False)
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    assert ort_outputs(model, {"x": x})[0].shape == (4, 6)
    assert ort_outputs(naive, {"x": x})[0].shape == (2, 12)
    result = _run(model, {"x": x})
    assert result.stats == {"reshape-reshape": 1} and _computing_ops(result.model) == {"Reshape": 1}
    assert ort_outputs(result.model, {"x": x})[0].shape == (4, 6)


def test_copies_of_inferred_or_copied_dims_in_a_reshape_chain():
    """A 0 copying the intermediate dim that the first target inferred (-1) keeps the
    chain; one copying a dim the first target itself copied (0) stays a copy of x's dim."""
    model = _model("""
    agraph (float[N, 3, 4] x) => (float[A, B] y, float[C, D] z)
        <int64[2] s_inferred = {-1, 4}, int64[2] s_zero = {0, -1}, int64[3] s_copy = {0, 12, 1}> {
        a = Reshape(x, s_inferred)
        y = Reshape(a, s_zero)
        b = Reshape(x, s_copy)
        z = Reshape(b, s_zero)
    }
    """, infer=False)
    x = np.arange(48, dtype=np.float32).reshape(4, 3, 4)
    result = _run(model, {"x": x})
    assert result.stats == {"reshape-reshape": 1} and _computing_ops(result.model) == {"Reshape": 3}
    merged = next(n for n in result.model.graph if n.outputs[0].name == "z")
    assert merged.inputs[0].name == "x" and optcc.ir.as_numpy(merged.inputs[1]).tolist() == [0, -1]
    assert ort_outputs(result.model, {"x": x})[1].shape == (4, 12)


def test_reshape_allowzero_merges_and_a_runtime_target_stays():
    model = _model("""
    agraph (float[2, 0, 3] x, float[2, 3, 4] v, int64[2] t) => (float[3, 0, 2] y, float[A, B] z)
        <int64[2] s60 = {6, 0}, int64[3] s302 = {3, 0, 2}, int64[3] s432 = {4, 3, 2}> {
        a = Reshape<allowzero = 1>(x, s60)
        y = Reshape<allowzero = 1>(a, s302)
        b = Reshape(v, s432)
        z = Reshape(b, t)
    }
    """, infer=False)
    feeds = {
        "x": np.zeros((2, 0, 3), np.float32),
        "v": np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32),
        "t": np.array([3, 8], np.int64),
    }
    result = _run(model, feeds)
    # allowzero=1 makes the 0 literal: merged. A runtime target may hold a 0: kept.
    assert result.stats == {"reshape-reshape": 1}
    assert _ops(result.model) == {"Reshape": 3}


def test_shared_first_reshape_is_kept():
    model = _model("""
    agraph (float[2, 3, 4] x) => (float[6, 4] y, float[4, 3, 2] z) <int64[3] s432 = {4, 3, 2}, int64[2] s64 = {6, 4}> {
        a = Reshape(x, s432)
        y = Reshape(a, s64)
        z = Neg(a)
    }
    """)
    result = MergeConsecutivePass()(model)
    assert not result.modified


def test_custom_domain_ops_are_untouched():
    model = ir.from_proto(onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17, "custom" : 1]>
    agraph (float[2, 3] x) => (float[2, 3] y) {
        a = custom.Transpose<perm = [1, 0]>(x)
        b = Transpose<perm = [1, 0]>(a)
        y = custom.Transpose<perm = [1, 0]>(b)
    }
    """))
    result = MergeConsecutivePass()(model)
    assert not result.modified
    assert _ops(result.model) == {"Transpose": 1, "custom::Transpose": 2}


@pytest.mark.parametrize("cond", [True, False])
def test_chains_inside_if_bodies_merge(cond: bool):
    shape43 = helper.make_tensor("shape43", TensorProto.INT64, [2], [4, 3])
    shape34 = helper.make_tensor("shape34", TensorProto.INT64, [2], [3, 4])
    then_g = helper.make_graph(
        [
            helper.make_node("Transpose", ["x"], ["t1"], perm=[1, 0]),
            helper.make_node("Transpose", ["t1"], ["t2"], perm=[1, 0]),
            helper.make_node("Neg", ["t2"], ["t_out"]),
        ],
        "then", [], [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [3, 4])],
    )
    else_g = helper.make_graph(
        [
            helper.make_node("Reshape", ["x", "shape43"], ["e1"]),
            helper.make_node("Reshape", ["e1", "shape34"], ["e2"]),
            helper.make_node("Abs", ["e2"], ["e_out"]),
        ],
        "else", [], [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [3, 4])],
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4]),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])],
        [shape43, shape34],
    )
    model = ir.from_proto(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    )
    x = np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32)
    result = _run(model, {"x": x, "c": np.array(cond)})
    assert result.stats == {"transpose-transpose": 1, "reshape-reshape": 1}
    assert _ops(result.model) == {"Abs": 1, "If": 1, "Neg": 1, "Reshape": 1}


def test_with_noop_elimination_through_optimize():
    model = _model("""
    agraph (float[2, 3, 4] x) => (float[2, 3, 4] y) <int64[2] s = {6, 4}, int64[3] back = {2, 3, 4}> {
        a = Reshape(x, s)
        b = Reshape(a, back)
        c = Transpose<perm = [0, 2, 1]>(b)
        d = Transpose<perm = [0, 2, 1]>(c)
        y = Relu(d)
    }
    """)
    original = model.clone()
    result = optcc.optimize(
        model, passes=[MergeConsecutivePass(), EliminateNoOpsPass()], verify=True
    )
    assert optcc.ir.op_histogram(result.ir_model) == {"Relu": 1}
    assert result.report.verification is not None  # it ran; the numbers are judged below
    feeds = random_feeds(original)
    got = ort_outputs(result.ir_model, feeds)
    assert_close(got, expected_outputs(original, feeds), EXACT_RTOL, what="optimized vs onnx reference evaluator")
    for want, out in zip(ort_outputs(original, feeds), got):
        assert want.tobytes() == out.tobytes(), "merging and removing no-ops must be bit-exact"


def _reference_equal(original: ir.Model, result: ir.Model, feeds: dict[str, np.ndarray]) -> None:
    """Bit-for-bit equal outputs under onnx's reference evaluator (independent of ort)."""
    from onnx.reference import ReferenceEvaluator

    want = ReferenceEvaluator(ir.to_proto(original)).run(None, feeds)
    got = ReferenceEvaluator(ir.to_proto(result)).run(None, feeds)
    for a, b in zip(want, got):
        assert a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
        if a.dtype.kind == "f":
            assert np.array_equal(np.signbit(a), np.signbit(b))


_CHAINS = """
agraph (float[2, 3, 4] x, float[2, 5, 4] w) => (float[1, 1, 2, 1, 3, 4, 1] y, float[2, 1, 4] r,
        int64[2] sh, float[2, 16, 4] c, float[3] q)
  <int64[2] a1 = {0, -1}, int64[2] a2 = {1, 3}, int64[1] ra = {1}, int64[1] s0 = {1}, int64[1] e0 = {100},
   int64[2] u01 = {0, 2}, int64[1] z0 = {0}> {
    u = Unsqueeze(x, a1)
    y = Unsqueeze(u, a2)
    red = ReduceMean<keepdims = 0>(x, ra)
    r = Unsqueeze(red, ra)
    s = Shape(x)
    sh = Slice(s, s0, e0)
    c1 = Concat<axis = 1>(x, w)
    c2 = Concat<axis = -2>(x, w)
    c = Concat<axis = 1>(c1, c2)
    g = ReduceMax<keepdims = 0>(x, u01)
    gu = Unsqueeze(g, z0)
    q0 = Squeeze(gu, z0)
    q = Identity(q0)
}"""


def test_same_kind_pairs_concats_reduce_unsqueeze_and_shape_slices_merge():
    """Regression for onnx/optimizer's fuse_consecutive_unsqueezes / _concats /
    _reduce_unsqueeze and eliminate_slice_after_shape cases."""
    model = _model(_CHAINS, opset=18)
    original = model.clone()
    result = _run(model)
    assert result.stats == {"unsqueeze-unsqueeze": 1, "reduce-unsqueeze": 1, "slice-shape": 1,
                            "concat-concat": 1, "unsqueeze-squeeze": 1}
    hist = _ops(result.model)
    assert hist["Concat"] == 1 and hist["Unsqueeze"] == 1 and "Slice" not in hist
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32),
             "w": np.random.default_rng(1).standard_normal((2, 5, 4)).astype(np.float32)}
    _reference_equal(original, result.model, feeds)


@pytest.mark.parametrize("opset", [11, 13])
def test_squeeze_squeeze_merges_with_axes_in_the_outer_rank(opset):
    axes_in = opset >= 13
    body = f"""
    agraph (float[1, 2, 1, 3, 1] x) => (float[2, 3] y) {'<int64[1] a = {0}, int64[2] b = {1, -1}>' if axes_in else ''} {{
        t = Squeeze{'' if axes_in else '<axes = [0]>'}(x{', a' if axes_in else ''})
        y = Squeeze{'' if axes_in else '<axes = [1, 3]>'}(t{', b' if axes_in else ''})
    }}"""
    body = body.replace("<axes = [1, 3]>", "<axes = [1, -1]>")
    model = _model(body, opset=opset)
    original = model.clone()
    result = _run(model)
    assert result.stats == {"squeeze-squeeze": 1} and _ops(result.model)["Squeeze"] == 1
    _reference_equal(original, result.model, {"x": np.arange(6, dtype=np.float32).reshape(1, 2, 1, 3, 1)})


def test_chains_with_shared_or_output_intermediates_or_other_axes_stay():
    model = _model("""
    agraph (float[2, 3, 4] x) => (float[2, 3, 4, 1, 1] y, float[2, 3, 4, 1] u,
            float[2, 4, 1] r, float[2, 15, 4] c, float[2, 3, 8] c3)
      <int64[1] a = {3}, int64[1] ra = {1}, int64[1] rb = {2}> {
        u = Unsqueeze(x, a)
        y = Unsqueeze(u, a)
        red = ReduceMean<keepdims = 0>(x, ra)
        r = Unsqueeze(red, rb)
        c2 = Concat<axis = 1>(x, x)
        c = Concat<axis = 1>(c2, x, c2)
        c1 = Concat<axis = 1>(x, x)
        c3 = Concat<axis = 2>(c1, c1)
    }""", opset=18, infer=False)
    original = model.clone()
    result = MergeConsecutivePass()(model)
    # u is a graph output, the reduced and unsqueezed axes differ, c1 is on another axis;
    # c2, read twice by the same Concat and by nothing else, is spliced in at both places
    assert result.stats == {"concat-concat": 1}
    assert [len(n.inputs) for n in result.model.graph if n.op_type == "Concat"] == [5, 2, 2]
    feeds = {"x": np.random.default_rng(2).standard_normal((2, 3, 4)).astype(np.float32)}
    _reference_equal(original, result.model, feeds)


def test_flatten_of_a_matrix_is_removed():
    model = ir.from_proto(onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 13]>
    agraph (float[N, 4] x, float[2, 3, 4] z) => (float[N, 4] y, float[2, 12] w) {
        t = Flatten<axis = 1>(x)
        y = Relu(t)
        w = Flatten(z)
    }"""))
    result = run_exact_pass(EliminateNoOpsPass, model, {"x": np.ones((3, 4), np.float32), "z": np.ones((2, 3, 4), np.float32)})
    assert result.stats == {"flatten": 1} and _ops(result.model)["Flatten"] == 1


def test_idempotent_pairs_and_slices_on_disjoint_axes_merge():
    """Regression for onnx/optimizer's eliminate_consecutive_idempotent_ops and
    fuse_consecutive_slices; a Slice pair on the same axis and a shared Relu stay."""
    model = _model("""
    agraph (float[1, 3, 8, 8] x) => (float[1, 3, 8, 8] z, float[1, 3, 4, 2] s, float[1, 3, 2, 8] t, float[1, 3, 8, 8] r)
      <int64[1] zero = {0}, int64[1] two = {2}, int64[1] three = {3}, int64[1] eight = {8}, int64[1] four = {4}, int64[1] one = {1}> {
        a = Sign(x)
        b = Sign(a)
        z = Sign(b)
        s1 = Slice(x, zero, eight, two, two)
        s = Slice(s1, one, eight, three, four)
        t1 = Slice(x, zero, four, two, one)
        t = Slice(t1, zero, two, two, one)
        r = Relu(x)
    }""", opset=13)
    original = model.clone()
    result = _run(model)
    assert result.stats == {"idempotent": 2, "slice-slice": 1}
    hist = _ops(result.model)
    assert hist["Sign"] == 1 and hist["Slice"] == 3
    x = np.random.default_rng(3).standard_normal((1, 3, 8, 8)).astype(np.float32)
    x[0, 0, 0, :3] = [0.0, -0.0, np.nan]
    _reference_equal(original, result.model, {"x": x})


def test_flatten_with_axis_zero_of_a_unit_batch_is_removed():
    """Regression for onnx/optimizer's test_nop_flatten_axis0_graph_output."""
    model = _model("""
    agraph (float[1, 10] x, float[1, 10] y, float[2, 10] w) => (float[1, 10] b, float[1, 20] v) {
        a = Add(x, y)
        b = Flatten<axis = 0>(a)
        v = Flatten<axis = 0>(w)
    }""", opset=13)
    result = run_exact_pass(EliminateNoOpsPass, model)
    assert result.stats == {"flatten": 1} and _ops(result.model) == {"Add": 1, "Flatten": 1}


def test_reshape_of_a_squeeze_unsqueeze_or_flatten_reads_its_input():
    """basic-pitch (tf2onnx conv1d): Unsqueeze(-3) -> Reshape is one Reshape; Squeeze and
    Flatten keep the element order too, so a Reshape after them reads x."""
    model = _model("""
    agraph (float[N, 12, 2] x, float[2, 1, 12] v, float[2, 3, 4] u) => (float[A, 4, 6] y, float[4, 6] z, float[3, 8] w)
        <int64[1] ax = {-3}, int64[3] s_out = {-1, 4, 6}, int64[1] ax1 = {1},
         int64[2] s46 = {4, 6}, int64[2] s38 = {3, 8}> {
        b = Unsqueeze(x, ax)
        y = Reshape(b, s_out)
        c = Squeeze(v, ax1)
        z = Reshape(c, s46)
        d = Flatten<axis = 2>(u)
        w = Reshape(d, s38)
    }
    """, infer=False)
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((3, 12, 2)).astype(np.float32),
             "v": rng.standard_normal((2, 1, 12)).astype(np.float32),
             "u": rng.standard_normal((2, 3, 4)).astype(np.float32)}
    result = _run(model, feeds)
    assert result.stats == {"reshape-of-view": 3}
    assert _computing_ops(result.model) == {"Reshape": 3}
    y, z, w = ort_outputs(result.model, feeds)
    assert np.array_equal(y, feeds["x"].reshape(-1, 4, 6))
    assert np.array_equal(z, feeds["v"].reshape(4, 6)) and np.array_equal(w, feeds["u"].reshape(3, 8))


def test_reshape_copying_a_dim_of_a_view_or_sharing_it_stays():
    """Reshape(Unsqueeze(x, [0]), [0, -1]) copies the unit dim (-> [1, 6]); read from x the
    0 would copy 2 (-> [2, 3]): kept. A view with another reader is kept too."""
    text = """
    agraph (float[2, 3] x) => (float[A, B] y, float[6] z, float[1, 2, 3] t)
        <int64[1] ax = {0}, int64[2] s_zero = {0, -1}, int64[1] flat = {-1}> {
        a = Unsqueeze(x, ax)
        y = Reshape(a, s_zero)
        b = Unsqueeze(x, ax)
        z = Reshape(b, flat)
        t = Neg(b)
    }
    """
    model = _model(text, infer=False)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert ort_outputs(model, {"x": x})[0].shape == (1, 6)
    result = _run(model, {"x": x})
    assert not result.modified and _ops(result.model) == {"Unsqueeze": 2, "Reshape": 2, "Neg": 1}
    assert ort_outputs(result.model, {"x": x})[0].shape == (1, 6)


@pytest.mark.parametrize("opset", [11, 17])
def test_unsqueeze_of_a_reshape_is_one_reshape(opset):
    """basic-pitch (tf2onnx stack): Unsqueeze(Reshape(x, [-1, 172, 36]), [3]) is
    Reshape(x, [-1, 172, 36, 1]); negative axes count in the output rank."""
    axes_in = 'int64[1] ax = {3}, int64[1] ax_neg = {-3},' if opset >= 13 else ""
    unsq = (lambda v, a: f"Unsqueeze({v}, {a})") if opset >= 13 else (
        lambda v, a: f"Unsqueeze<axes = [{ {'ax': 3, 'ax_neg': -3}[a]}]>({v})")
    model = _model(f"""
    agraph (float[N, 12, 6] x) => (float[A, 4, 18, 1] y, float[B, 1, 4, 18] z)
        <{axes_in} int64[3] s = {{-1, 4, 18}}> {{
        a = Reshape(x, s)
        y = {unsq("a", "ax")}
        b = Reshape(x, s)
        z = {unsq("b", "ax_neg")}
    }}
    """, opset=opset, infer=False)
    x = np.random.default_rng(1).standard_normal((2, 12, 6)).astype(np.float32)
    result = _run(model, {"x": x})
    assert result.stats == {"unsqueeze-of-reshape": 2}
    assert _computing_ops(result.model) == {"Reshape": 2}
    y, z = ort_outputs(result.model, {"x": x})
    assert np.array_equal(y, x.reshape(2, 4, 18, 1)) and np.array_equal(z, x.reshape(2, 1, 4, 18))


def test_unsqueeze_of_a_copying_runtime_or_shared_reshape_stays():
    """A 0 in the target copies x's dim at its position, which the inserted axis would
    move; a runtime target is unknown; a Reshape with another reader stays."""
    model = _model("""
    agraph (float[2, 3, 4] x, int64[2] t) => (float[A, B, C] y, float[D, E, F] z, float[1, 6, 4] w, float[6, 4] r)
        <int64[1] ax = {0}, int64[2] s_zero = {0, -1}, int64[2] s64 = {6, 4}> {
        a = Reshape(x, s_zero)
        y = Unsqueeze(a, ax)
        b = Reshape(x, t)
        z = Unsqueeze(b, ax)
        c = Reshape(x, s64)
        w = Unsqueeze(c, ax)
        r = Neg(c)
    }
    """, infer=False)
    feeds = {"x": np.arange(24, dtype=np.float32).reshape(2, 3, 4), "t": np.array([4, 6], np.int64)}
    result = _run(model, feeds)
    assert not result.modified and _ops(result.model) == {"Reshape": 3, "Unsqueeze": 3, "Neg": 1}


def test_reshape_of_a_transpose_that_moves_only_unit_axes_reads_its_input():
    """A dynamo-exported unidirectional LSTM: Y [seq, 1, batch, hidden] ->
    Transpose [0, 2, 1, 3] (the unit num_directions axis moves, the element order stays)
    -> Reshape [seq, 0, hidden]. The Reshape reads Y; its 0 copied the batch, now at
    another position of its input, so it becomes -1 (the one entry left open, the others
    positive). A 0 whose dim the Transpose leaves in place stays 0."""
    model = _model("""
    agraph (float[5, 1, B, 8] h, float[B, 1, 6] u) => (float[5, B, 8] y, float[B, 6] z)
        <int64[3] s = {5, 0, 8}, int64[2] s2 = {0, 6}> {
        t = Transpose<perm = [0, 2, 1, 3]>(h)
        y = Reshape(t, s)
        v = Transpose<perm = [0, 2, 1]>(u)
        z = Reshape(v, s2)
    }
    """)
    rng = np.random.default_rng(0)
    feeds = {"h": rng.standard_normal((5, 1, 3, 8)).astype(np.float32),
             "u": rng.standard_normal((3, 1, 6)).astype(np.float32)}
    result = _run(model, feeds)
    assert result.stats == {"reshape-of-view": 2}
    assert _computing_ops(result.model) == {"Reshape": 2}
    targets = [optcc.ir.as_numpy(n.inputs[1]).tolist() for n in result.model.graph if n.op_type == "Reshape"]
    assert targets == [[5, -1, 8], [0, 6]]
    y, z = ort_outputs(result.model, feeds)
    assert np.array_equal(y, feeds["h"].transpose(0, 2, 1, 3).reshape(5, 3, 8))
    assert np.array_equal(z, feeds["u"].reshape(3, 6))


def test_reshape_of_a_transpose_that_reorders_data_or_copies_open_dims_stays():
    """Transposes that move an axis not known to be 1 reorder the elements (or may); a copy
    to move beside another copy or a -1 leaves no single entry to infer."""
    text = """
    agraph (float[2, 3, 4] x, float[5, 1, B, 8] h, float[A, 1, B, 8] g, float[5, C, B, 8] k)
        => (float[24] y, float[5, B, 8] p, float[A, B, 8] q, float[5, B, 8] r, float[5, B, C, 8] w)
        <int64[1] flat = {-1}, int64[3] two = {0, 0, 8}, int64[3] open = {-1, 0, 8},
         int64[3] s = {5, 0, 8}, int64[4] s4 = {5, 0, 0, 8}> {
        t = Transpose<perm = [0, 2, 1]>(x)
        y = Reshape(t, flat)
        a = Transpose<perm = [0, 2, 1, 3]>(h)
        p = Reshape(a, two)
        b = Transpose<perm = [0, 2, 1, 3]>(g)
        q = Reshape(b, open)
        c = Transpose<perm = [0, 2, 1, 3]>(k)
        r = Reshape(c, s)
        d = Transpose<perm = [0, 2, 1, 3]>(k)
        w = Reshape(d, s4)
    }
    """
    model = _model(text, infer=False)
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((2, 3, 4)).astype(np.float32),
             "h": rng.standard_normal((5, 1, 3, 8)).astype(np.float32),
             "g": rng.standard_normal((5, 1, 3, 8)).astype(np.float32),
             "k": rng.standard_normal((5, 1, 3, 8)).astype(np.float32)}
    result = _run(model, feeds)
    assert not result.modified and _computing_ops(result.model) == {"Transpose": 5, "Reshape": 5}


def test_new_main_graph_constants_are_initializers_that_lift_constants_leaves_alone():
    """The merged axes, target and Slice parameters are main-graph initializers: no Constant
    node is left for lift-constants to lift (another round of the exact fixpoint). The
    Slices leave their steps out: the merged one gets them."""
    model = _model("""
    agraph (float[2, 3, 4] x) => (float[1, 1, 2, 3, 4] y, float[1, 24] r, float[1, 2, 4] s)
      <int64[1] a = {0}, int64[3] t1 = {1, 6, 4}, int64[2] t2 = {0, -1},
       int64[1] b0 = {0}, int64[1] e0 = {1}, int64[1] ax0 = {0}, int64[1] b1 = {1}, int64[1] e1 = {3}, int64[1] ax1 = {1}> {
        u = Unsqueeze(x, a)
        y = Unsqueeze(u, a)
        v = Reshape(x, t1)
        r = Reshape(v, t2)
        p = Slice(x, b0, e0, ax0)
        s = Slice(p, b1, e1, ax1)
    }""", opset=13)
    result = _run(model)
    assert result.stats == {"unsqueeze-unsqueeze": 1, "reshape-reshape": 1, "slice-slice": 1}
    assert "Constant" not in _ops(result.model)
    assert {"Unsqueeze_axes", "Reshape_target", "Slice_slice"} <= set(result.model.graph.initializers)
    assert not LiftConstantsPass()(result.model).modified
