"""optcc.rewrite.pattern: matching (commute, repeated variables, optional inputs, domains), the
driver's safety rules (outside readers, graph outputs, shared weights), name keeping,
every graph of the model (If bodies, functions), stats and the fixed-point cap."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper

import optcc
from optcc.infra.invariants import check_invariants, signature
from optcc.rewrite.pattern import Builder, Const, Match, Op, RewritePass, Rule, Var, apply_rules
from reference import (
    EXACT_RTOL,
    FUSION_RTOL,
    assert_close,
    expected_outputs,
    expected_outputs_float64,
    onnxruntime_outputs,
    random_feeds,
)


def _model(body: str, opset: int = 18, inits: dict[str, np.ndarray] | None = None,
           extra: str = "") -> ir.Model:
    proto = onnx.parser.parse_model(
        f'<ir_version: 9, opset_import: ["" : {opset}{extra}]>\n' + body
    )
    for name, array in (inits or {}).items():
        proto.graph.initializer.append(numpy_helper.from_array(array, name))
    return ir.from_proto(proto)


def _ops(model: ir.Model) -> dict[str, int]:
    return optcc.ir.op_histogram(model)


def _identity(m: Match, b: Builder) -> ir.Value:
    return b.op("Identity", m["x"])


NEG_NEG = Rule("neg-neg", Op("Neg", Op("Neg", Var("x"), name="inner")), _identity)


class NegNegPass(RewritePass):
    """Test pass: Neg(Neg(x)) -> Identity(x)."""

    name = "test-neg-neg"
    level = None
    numerics = "exact"
    rules = (NEG_NEG,)


def _check_numerics(original: ir.Model, rewritten: ir.Model, feeds: dict, kind: str = "exact") -> None:
    """The rewritten model on onnxruntime against the original by onnx's reference
    evaluator (in float64 for a fusion), within the tolerance of ``kind``."""
    if kind == "exact":
        want, rtol = expected_outputs(original, feeds), EXACT_RTOL
    else:
        want, rtol = expected_outputs_float64(original, feeds), FUSION_RTOL
    assert_close(onnxruntime_outputs(rewritten, feeds), want, rtol, what=f"rewritten vs original ({kind})")


def _checked(model: ir.Model, pass_: RewritePass) -> optcc.PassResult:
    original = model.clone()
    result = pass_(model)
    assert check_invariants(result.model, signature(original)) == []
    onnx.checker.check_model(ir.to_proto(result.model), full_check=True)
    assert "capped" not in result.stats, result.stats
    _check_numerics(original, result.model, random_feeds(original, {"x": [2, 3]}), pass_.numerics)
    assert not type(pass_)()(result.model).modified, "second run must be a no-op"
    return result


def test_rewrite_keeps_output_name_type_and_symbolic_dims() -> None:
    model = _model("g (float[N, 3] x) => (float[N, 3] y) { t = Neg(x) y = Neg(t) }")
    result = _checked(model, NegNegPass())
    assert _ops(result.model) == {"Identity": 1}
    assert result.stats == {"applied": {"neg-neg": 1}}
    out = result.model.graph.outputs[0]
    assert out.name == "y" and out.producer().op_type == "Identity"
    assert out.dtype == ir.DataType.FLOAT and str(out.shape[0]) == "N" and out.shape[1] == 3


def test_cascade_reaches_fixed_point() -> None:
    body = "g (float[N, 3] x) => (float[N, 3] y) { a = Neg(x) b = Neg(a) c = Neg(b) y = Neg(c) }"
    rule = Rule("neg-neg", Op("Neg", Op("Neg", Var("x"))), _identity)
    model = _model(body)
    stats = apply_rules(model, [rule])
    assert stats.applied["neg-neg"] == 2
    assert _ops(model) == {"Identity": 2}


def test_intermediate_with_outside_reader_is_rejected() -> None:
    model = _model(
        "g (float[N, 3] x) => (float[N, 3] y, float[N, 3] z) "
        "{ t = Neg(x) y = Neg(t) z = Relu(t) }"
    )
    result = _checked(model, NegNegPass())
    assert not result.modified
    assert _ops(result.model) == {"Neg": 2, "Relu": 1}
    assert result.stats["rejected"] == {"neg-neg": {"intermediate 't' has readers outside the match": 1}}


def test_intermediate_graph_output_is_rejected() -> None:
    model = _model("g (float[N, 3] x) => (float[N, 3] y, float[N, 3] t) { t = Neg(x) y = Neg(t) }")
    result = _checked(model, NegNegPass())
    assert not result.modified and _ops(result.model) == {"Neg": 2}
    assert result.stats["rejected"]["neg-neg"] == {"intermediate 't' is a graph output": 1}


def test_custom_domain_nodes_do_not_match() -> None:
    model = _model(
        "g (float[N, 3] x) => (float[N, 3] y) { t = custom.Neg(x) y = custom.Neg(t) }",
        extra=', "custom" : 1',
    )
    stats = apply_rules(model, [NEG_NEG])
    assert not stats.modified and _ops(model) == {"custom::Neg": 2}
    # A rule can opt in to a domain explicitly.
    rule = Rule("custom", Op("Neg", Op("Neg", Var("x"), domain="custom"), domain="custom"),
                _identity)
    assert apply_rules(model, [rule]).applied["custom"] == 1
    assert _ops(model) == {"Identity": 1}


def test_rewrites_inside_if_bodies_and_functions() -> None:
    body = """
    g (float[N, 3] x, bool c) => (float[N, 3] y, float[N, 3] z) {
        y = If(c) <
            then_branch = t1 () => (float[N, 3] o1) { a = Neg(x) o1 = Neg(a) },
            else_branch = t2 () => (float[N, 3] o2) { o2 = Relu(x) }
        >
        z = local.twice_neg(x)
    }
    <domain: "local", opset_import: ["" : 18]>
    twice_neg (p) => (q) { r = Neg(p) q = Neg(r) }
    """
    model = _model(body, extra=', "local" : 1')
    original = model.clone()
    stats = apply_rules(model, [NEG_NEG])
    assert stats.applied["neg-neg"] == 2
    assert _ops(model) == {"If": 1, "Identity": 2, "Relu": 1, "local::twice_neg": 1}
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    for cond in (True, False):
        feeds = {"x": np.random.default_rng(0).normal(size=(2, 3)).astype(np.float32),
                 "c": np.array(cond)}
        _check_numerics(original, model, feeds)


def _scale(m: Match, b: Builder) -> ir.Value:
    return b.op("Mul", m["x"], b.const(m.array("w") * 2, "w2"))


def test_exclusive_constant_shared_with_another_node_is_rejected() -> None:
    w = np.ones((3,), np.float32)
    rule = Rule("mul-relu", Op("Relu", Op("Mul", Var("x"), Const("w", exclusive=True))), _scale)
    shared = _model(
        "g (float[N, 3] x) => (float[N, 3] y, float[N, 3] z) "
        "{ t = Mul(x, w) y = Relu(t) z = Add(x, w) }",
        inits={"w": w},
    )
    stats = apply_rules(shared, [rule])
    assert not stats.modified and dict(stats.rejected["mul-relu"]) == {"shared weight 'w'": 1}
    alone = _model("g (float[N, 3] x) => (float[N, 3] y) { t = Mul(x, w) y = Relu(t) }",
                   inits={"w": w})
    stats = apply_rules(alone, [rule])
    assert stats.applied["mul-relu"] == 1
    # The old weight was read only by the match: it is gone; the new one has a fresh name.
    assert list(alone.graph.initializers) == ["w2"]


def test_commute_and_repeated_variables() -> None:
    rule = Rule("square", Op("Mul", Var("x"), Var("x")), lambda m, b: b.op("Pow", m["x"], b.const(np.float32(2), "two")))
    model = _model(
        "g (float[N, 3] x, float[N, 3] w) => (float[N, 3] y, float[N, 3] z) "
        "{ y = Mul(x, x) z = Mul(x, w) }"
    )
    stats = apply_rules(model, [rule])
    assert stats.applied["square"] == 1 and _ops(model) == {"Mul": 1, "Pow": 1}

    swapped = Rule("mul-const", Op("Mul", Var("x"), Const("c"), commute=True),
                   lambda m, b: b.op("Div", m["x"], b.const(1 / m.array("c"), "inv")))
    model = _model("g (float[N, 3] x) => (float[N, 3] y) { y = Mul(c, x) }",
                   inits={"c": np.full((3,), 2.0, np.float32)})
    original = model.clone()
    assert apply_rules(model, [swapped]).applied["mul-const"] == 1
    assert _ops(model) == {"Div": 1}
    _check_numerics(original, model, random_feeds(original, {"x": [2, 3]}))


def test_optional_inputs_and_extra_inputs() -> None:
    pattern = Op("Clip", Var("x"), Const("lo", optional=True), Const("hi", optional=True))
    seen: list[tuple[bool, bool]] = []

    def check(m: Match) -> str | None:
        seen.append((m.get("lo") is None, m.get("hi") is None))
        return "observed"

    model = _model(
        "g (float[N, 3] x) => (float[N, 3] a, float[N, 3] b) { a = Clip(x) b = Clip(x, lo) }",
        inits={"lo": np.array(0.0, np.float32)},
    )
    stats = apply_rules(model, [Rule("clip", pattern, _identity, check)])
    assert sorted(seen) == [(False, True), (True, True)]
    assert sum(stats.rejected["clip"].values()) == 2
    # A pattern with fewer inputs than the node has never matches it.
    short = Rule("clip1", Op("Clip", Var("x")), _identity)
    stats = apply_rules(model, [short])
    assert stats.applied["clip1"] == 1 and _ops(model) == {"Clip": 1, "Identity": 1}


def test_check_reason_counted_once_per_node() -> None:
    never = Rule("never", Op("Neg", Var("x")), _identity, lambda m: "not today")
    relu_abs = Rule("relu-abs", Op("Relu", Var("x")), lambda m, b: b.op("Abs", m["x"]))
    model = _model("g (float[N, 3] x) => (float[N, 3] y) { t = Relu(x) y = Neg(t) }")
    stats = apply_rules(model, [never, relu_abs])
    # The rewrite of Relu puts its reader Neg back on the worklist: seen twice, counted once.
    assert stats.applied["relu-abs"] == 1
    assert dict(stats.rejected["never"]) == {"not today": 1}


def test_cap_warns_and_is_reported() -> None:
    forever = Rule("relu-again", Op("Relu", Var("x")), lambda m, b: b.op("Relu", m["x"]))
    model = _model("g (float[N, 3] x) => (float[N, 3] y) { y = Relu(x) }")

    class Forever(RewritePass):
        """Test pass: rewrites Relu into Relu, forever."""

        name = "test-forever"
        rules = (forever,)

    with pytest.warns(RuntimeWarning, match="fixed point within 3 rounds"):
        result = Forever(max_iters=3)(model)
    assert result.stats["applied"] == {"relu-again": 3} and result.stats["capped"] == 1
    assert _ops(result.model) == {"Relu": 1} and result.model.graph.outputs[0].name == "y"


def test_rewrite_must_build_its_result() -> None:
    rule = Rule("bad", Op("Neg", Var("x")), lambda m, b: m["x"])
    model = _model("g (float[N, 3] x) => (float[N, 3] y) { y = Neg(x) }")
    with pytest.raises(ValueError, match="must return a value produced by a node it built"):
        apply_rules(model, [rule])


def test_operand_computed_inside_the_match_is_rejected() -> None:
    rule = Rule("add-neg", Op("Add", Op("Neg", Var("x"), name="n"), Var("y")), _identity)
    model = _model("g (float[N, 3] x) => (float[N, 3] z) { t = Neg(x) z = Add(t, t) }")
    stats = apply_rules(model, [rule])
    assert not stats.modified and "computed inside the match" in next(iter(stats.rejected["add-neg"]))


def test_helper_built_initializers_in_subgraph_and_function() -> None:
    rule = Rule("relu-scale", Op("Relu", Var("x")), _scale_by_two)
    body = """
    g (float[N, 3] x, bool c) => (float[N, 3] y, float[N, 3] z) {
        y = If(c) <
            then_branch = t1 () => (float[N, 3] o1) { o1 = Relu(x) },
            else_branch = t2 () => (float[N, 3] o2) { o2 = Neg(x) }
        >
        z = local.f(x)
    }
    <domain: "local", opset_import: ["" : 18]>
    f (p) => (q) { q = Relu(p) }
    """
    model = _model(body, extra=', "local" : 1')
    stats = apply_rules(model, [rule])
    assert stats.applied["relu-scale"] == 2
    assert _ops(model) == {"Constant": 1, "If": 1, "Mul": 2, "Neg": 1, "local::f": 1}
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    x = np.random.default_rng(1).normal(size=(2, 3)).astype(np.float32)
    import onnxruntime as ort

    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    y, z = session.run(None, {"x": x, "c": np.array(True)})
    np.testing.assert_allclose(y, 2 * x)
    np.testing.assert_allclose(z, 2 * x)


def _scale_by_two(m: Match, b: Builder) -> ir.Value:
    return b.op("Mul", m["x"], b.const(np.array(2.0, np.float32), "two"))


def test_static_rank_follows_producers_without_declared_shapes() -> None:
    from optcc.rewrite.pattern import static_rank

    model = ir.from_proto(onnx.parser.parse_model("""
    <ir_version: 9, opset_import: ["" : 17]>
    g (float[1, 3, 8, 8] x, float[1] y, float v) => (float o1, float o2, float u) {
        w = Constant<value = float[4, 3, 1, 1] {1,1,1,1,1,1,1,1,1,1,1,1}>()
        c = Conv(x, w)
        r = Relu(c)
        k = Concat<axis = 1>(r, c)
        a = Constant<value_ints = [0]>()
        s = Unsqueeze(k, a)
        z = Add(s, y)
        f = Flatten(k)
        n = Constant<value_ints = [2, -1, 2]>()
        q = Reshape(f, n)
        o1 = ReduceSum<keepdims = 0>(z)
        o2 = ReduceSum<keepdims = 0>(q)
        u0 = Relu(v)
        u = ReduceSum<keepdims = 0>(u0)
    }
    """))
    model.graph.inputs[2].shape = None  # "v": rank unknown
    values = {v.name: v for node in model.graph for v in node.outputs}
    memo: dict = {}
    ranks = {name: static_rank(values[name], memo) for name in ("c", "r", "k", "s", "z", "f", "q")}
    assert ranks == {"c": 4, "r": 4, "k": 4, "s": 5, "z": 5, "f": 2, "q": 3}
    # a graph input without a shape has no known rank, nor has what follows it
    assert static_rank(values["u0"]) is None


def test_static_rank_of_a_transpose_is_its_perms_length() -> None:
    """basic-pitch: Transpose(Sqrt(ReduceSum(x, [-1], keepdims=0)), [0, 2, 1]) has rank 3
    though the ReduceSum's rank is not traced; a Transpose without perm follows its input."""
    from onnx.reference import ReferenceEvaluator
    from optcc.rewrite.pattern import static_rank

    proto = onnx.parser.parse_model("""
    <ir_version: 9, opset_import: ["" : 17]>
    g (float[2, 3, 4, 5] v) => (float[2, 4, 3] t, float[4, 3, 2] u) {
        axes = Constant<value_ints = [-1]>()
        r = ReduceSum<keepdims = 0>(v, axes)
        q = Sqrt(r)
        t = Transpose<perm = [0, 2, 1]>(q)
        u = Transpose(r)
    }
    """)
    model = ir.from_proto(proto)
    for value in [model.graph.inputs[0], *model.graph.outputs]:
        value.shape = None  # nothing declared: only the producers tell
    t, u = model.graph.outputs
    assert static_rank(t) == 3 and static_rank(u) is None
    v = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32)
    assert [o.ndim for o in ReferenceEvaluator(proto).run(None, {"v": v})] == [3, 3]
