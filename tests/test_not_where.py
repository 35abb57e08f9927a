"""Boolean rules: ``Where(Not(c), x, y)`` -> ``Where(c, y, x)`` and ``Not(Not(x))`` -> ``x``
(merge-consecutive), ``And(x, x)`` / ``Or(x, x)`` -> ``x`` (eliminate-noops). Each is
checked against onnx's reference evaluator and onnxruntime on the original (bit for bit),
with the negative cases: a shared Not, a Not that is a graph output, graph input to graph
output, different operands, symbolic dims."""

from __future__ import annotations

import onnx
import onnx_ir as ir
import pytest

import optcc
from exact_pass_checks import run_exact_pass
from fixtures import peer_suites
from optcc.passes.eliminate_noops import EliminateNoOpsPass
from optcc.passes.merge_consecutive import MergeConsecutivePass
from reference import EXACT_RTOL, assert_close, expected_outputs, random_feeds


def _model(body: str, opset: int = 17) -> ir.Model:
    proto = onnx.parser.parse_model(f'<ir_version: 8, opset_import: ["" : {opset}]>\n' + body)
    return ir.from_proto(onnx.shape_inference.infer_shapes(proto, strict_mode=True))


def _ops(model: ir.Model) -> dict[str, int]:
    return optcc.ir.op_histogram(model)


def _run(pass_type: type, model: ir.Model) -> optcc.PassResult:
    return run_exact_pass(pass_type, model, random_feeds(ir.to_proto(model), seed=1))


def test_where_of_not_swaps_branches_with_symbolic_broadcast():
    model = _model("""
    agraph (bool[N, 1] c, float[1, M] x, float[N, M] y) => (float[N, M] z) {
        n = Not (c)
        z = Where (n, x, y)
    }""")
    result = _run(MergeConsecutivePass, model)
    assert result.stats == {"not-where": 1}
    assert _ops(result.model) == {"Where": 1}
    where = next(iter(result.model.graph))
    assert [v.name for v in where.inputs] == ["c", "y", "x"]


def test_where_of_shared_not_keeps_the_not():
    model = _model("""
    agraph (bool[4] c, float[4] x, float[4] y) => (float[4] z, bool[4] m) {
        n = Not (c)
        z = Where (n, x, y)
        m = And (n, c)
    }""")
    result = _run(MergeConsecutivePass, model)
    assert _ops(result.model) == {"Not": 1, "Where": 1, "And": 1}


def test_where_of_not_that_is_a_graph_output_keeps_the_not():
    model = _model("""
    agraph (bool[4] c, float[4] x, float[4] y) => (float[4] z, bool[4] n) {
        n = Not (c)
        z = Where (n, x, y)
    }""")
    result = _run(MergeConsecutivePass, model)
    assert _ops(result.model) == {"Not": 1, "Where": 1}
    assert [v.name for v in result.model.graph.outputs] == ["z", "n"]


def test_where_without_not_is_left_alone():
    model = _model("""
    agraph (bool[4] c, float[4] x, float[4] y) => (float[4] z) {
        a = Abs (x)
        z = Where (c, a, y)
    }""")
    assert not MergeConsecutivePass()(model).modified


def test_double_not_vanishes_unless_input_to_output():
    model = _model("""
    agraph (bool[N] a, bool[N] b) => (bool[N] z, bool[N] w) {
        c = And (a, b)
        n = Not (c)
        z = Not (n)
        m = Not (a)
        w = Not (m)
    }""")
    result = _run(MergeConsecutivePass, model)
    # z is c renamed; w = Not(Not(a)) stays: a graph input cannot take an output's name.
    assert result.stats == {"not-not": 1}
    assert _ops(result.model) == {"And": 1, "Not": 2}


def test_and_or_of_one_value_vanish():
    model = _model("""
    agraph (bool[N, 3] a, bool[N, 3] b) => (bool[N, 3] z) {
        c = Xor (a, b)
        d = And (c, c)
        e = Or (d, d)
        z = Or (e, a)
    }""")
    result = _run(EliminateNoOpsPass, model)
    assert result.stats == {"and-or": 2}
    assert _ops(result.model) == {"Xor": 1, "Or": 1}


def test_and_of_different_values_or_input_to_output_stays():
    model = _model("""
    agraph (bool[4] a, bool[4] b) => (bool[4] z, bool[4] w) {
        z = And (a, b)
        w = Or (a, a)
    }""")
    assert not EliminateNoOpsPass()(model).modified


def test_suite_rewrite_where():
    """onnx/optimizer's test_rewrite_where: 6 nodes -> 4 at -O2 (onnxoptimizer: 5)."""
    entry = {e.name: e for e in peer_suites.build_models()}.get("test_rewrite_where")
    if entry is None:
        pytest.skip("onnx/optimizer's suite file is not cached")
    result = optcc.optimize(entry.model, level=2, verify=False)
    assert len(result.model.graph.node) == 4
    assert {n.op_type for n in result.model.graph.node} == {"Where", "Sign"}
    feeds = random_feeds(entry.model, seed=2)
    assert_close(expected_outputs(result.model, feeds), expected_outputs(entry.model, feeds), EXACT_RTOL)
