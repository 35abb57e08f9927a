"""LiftConstantsPass: Constant nodes of the main graph and of its If/Loop bodies become
main-graph initializers of the same name (value and list attributes); graph outputs, body
outputs, names that sibling bodies share, function bodies and custom ops' graphs are left
alone; a model below
IR version 4 is moved to IR 4 (initializers no longer listed as inputs) unless
``upgrade_legacy=False``."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

import optcc
from optcc.passes.lift_constants import LiftConstantsPass
from exact_pass_checks import run_exact_pass
from reference import EXACT_RTOL, assert_close, expected_outputs, onnxruntime_outputs


def _model(body: str, ir_version: int = 8) -> ir.Model:
    header = f'<ir_version: {ir_version}, opset_import: ["" : 17]>\n'
    return ir.from_proto(onnx.parser.parse_model(header + body))


def _ops(model: ir.Model) -> dict[str, int]:
    return optcc.ir.op_histogram(model)


def test_constants_and_body_constants_become_initializers_and_graph_outputs_stay_nodes() -> None:
    model = _model("""
    g (float[2, 3] x, bool c) => (float[2, 3] y, float[3] k, float[2, 3] z) {
        a = Constant<value = float[3] {1.0, 2.0, 3.0}>()
        s = Constant<value_float = 0.5>()
        n = Constant<value_ints = [2, 3]>()
        k = Constant<value = float[3] {4.0, 5.0, 6.0}>()
        t = Add(x, a)
        u = Mul(t, s)
        y = Reshape(u, n)
        z = If(c) <
            then_branch = g1 () => (float[2, 3] o1) {
                b = Constant<value = float[3] {7.0, 8.0, 9.0}>()
                o1 = Add(x, b)
            },
            else_branch = g2 () => (float[2, 3] o2) { o2 = Sub(x, a) }
        >
    }
    """)
    result = run_exact_pass(LiftConstantsPass, model)
    assert result.stats == {"lifted": 4}
    graph = result.model.graph
    assert sorted(graph.initializers) == ["a", "b", "n", "s"]
    assert graph.initializers["n"].const_value.numpy().tolist() == [2, 3]
    assert graph.initializers["s"].const_value.numpy().dtype == np.float32
    assert graph.initializers["b"].const_value.numpy().tolist() == [7.0, 8.0, 9.0]
    # the graph output is still a node
    assert _ops(result.model) == {"Add": 2, "Constant": 1, "If": 1, "Mul": 1, "Reshape": 1, "Sub": 1}
    assert [v.name for v in graph.outputs] == ["y", "k", "z"]


def _legacy_model() -> ir.Model:
    w = numpy_helper.from_array(np.arange(3, dtype=np.float32), "w")
    unused = numpy_helper.from_array(np.array([3], np.int64), "unused")
    nodes = [helper.make_node("Constant", [], ["a"], value=numpy_helper.from_array(
                 np.ones(3, np.float32))),
             helper.make_node("Add", ["x", "a"], ["t"]), helper.make_node("Mul", ["t", "w"], ["y"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3]),
              helper.make_tensor_value_info("w", TensorProto.FLOAT, [3]),
              helper.make_tensor_value_info("unused", TensorProto.INT64, [1])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])]
    graph = helper.make_graph(nodes, "g", inputs, outputs, [w, unused])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=3)
    return ir.from_proto(proto)


def test_ir_version_3_is_left_alone_without_upgrade_legacy() -> None:
    result = LiftConstantsPass(upgrade_legacy=False)(_legacy_model())
    assert not result.modified and _ops(result.model) == {"Add": 1, "Constant": 1, "Mul": 1}
    assert [v.name for v in result.model.graph.inputs] == ["x", "w", "unused"]


def test_upgrade_legacy_moves_to_ir_version_4_without_constant_inputs() -> None:
    model = _legacy_model()
    original = model.clone()
    result = LiftConstantsPass(upgrade_legacy=True)(model)
    assert result.stats == {"unlisted_constant_inputs": 2, "lifted": 1}
    out = result.model
    assert out.ir_version == 4 and [v.name for v in out.graph.inputs] == ["x"]
    assert sorted(out.graph.initializers) == ["a", "w"]  # "unused" is dropped
    assert _ops(out) == {"Add": 1, "Mul": 1}
    onnx.checker.check_model(ir.to_proto(out), full_check=True)
    feeds = {"x": np.array([1.0, -2.0, 0.5], np.float32)}
    assert_close(onnxruntime_outputs(out, feeds), expected_outputs(original, feeds), EXACT_RTOL,
                 what="upgraded model vs onnx reference evaluator on the original")
    assert not LiftConstantsPass(upgrade_legacy=True)(out).modified


def test_the_pipeline_keeps_the_upgrade_the_callable_interface_is_unchanged() -> None:
    proto = ir.to_proto(_legacy_model())
    feeds = {"x": np.array([1.0, -2.0, 0.5], np.float32)}
    result = optcc.optimize(proto, level=1, inputs=feeds)
    statuses = [r.status for r in result.report.passes if r.name == "lift-constants"]
    assert statuses[0] == "changed", result.report.passes
    assert result.ir_model.ir_version == 4 and [v.name for v in result.ir_model.graph.inputs] == ["x"]
    assert result.report.verification["status"] == "passed"
    assert_close(onnxruntime_outputs(result.model, feeds), expected_outputs(proto, feeds), EXACT_RTOL,
                 what="-O1 result vs onnx reference evaluator on the original")


def _branch_feeds(x: np.ndarray) -> list[dict[str, np.ndarray]]:
    return [{"x": x, "c": np.array(flag)} for flag in (True, False)]


def test_body_constants_under_a_shared_name_or_a_body_output_stay_nodes() -> None:
    # both branches define "b" (legal: sibling scopes), and the else branch returns its Constant
    text = """
    g (float[3] x, bool c) => (float[3] y, float[3] z) {
        y = If(c) <
            then_branch = g1 () => (float[3] o1) {
                b = Constant<value = float[3] {7.0, 8.0, 9.0}>()
                o1 = Add(x, b)
            },
            else_branch = g2 () => (float[3] o2) {
                b = Constant<value = float[3] {1.0, 2.0, 3.0}>()
                o2 = Mul(x, b)
            }
        >
        z = If(c) <
            then_branch = g3 () => (float[3] o3) {
                k = Constant<value = float[3] {4.0, 5.0, 6.0}>()
                o3 = Sub(x, k)
            },
            else_branch = g4 () => (float[3] o4) { o4 = Constant<value = float[3] {0.5, 0.5, 0.5}>() }
        >
    }
    """
    x = np.array([1.0, -2.0, 0.25], np.float32)
    for feeds in _branch_feeds(x):
        result = run_exact_pass(LiftConstantsPass, _model(text), feeds)
        assert result.stats == {"lifted": 1}
        assert sorted(result.model.graph.initializers) == ["k"]
        assert _ops(result.model) == {"Add": 1, "Constant": 3, "If": 2, "Mul": 1, "Sub": 1}


def test_loop_body_and_nested_if_constants_are_lifted_and_compute_the_same() -> None:
    text = """
    g (float[3] x, bool c) => (float[3] y) {
        n = Constant<value = int64 {3}>()
        y = Loop(n, c, x) <
            body = b (int64 i, bool cond, float[3] acc) => (bool cond_out, float[3] acc_out) {
                cond_out = Identity(cond)
                h = Constant<value = float[3] {0.5, 0.25, 2.0}>()
                m = Mul(acc, h)
                acc_out = If(cond) <
                    then_branch = t () => (float[3] o1) {
                        d = Constant<value = float {1.5}>()
                        o1 = Add(m, d)
                    },
                    else_branch = e () => (float[3] o2) { o2 = Neg(m) }
                >
            }
        >
    }
    """
    for feeds in _branch_feeds(np.array([1.0, -2.0, 0.25], np.float32)):
        result = run_exact_pass(LiftConstantsPass, _model(text), feeds)
        assert result.stats == {"lifted": 3}
        assert sorted(result.model.graph.initializers) == ["d", "h", "n"]
        assert "Constant" not in _ops(result.model)


def test_constants_in_function_bodies_stay_nodes() -> None:
    proto = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17, "local" : 1]>
    g (float[3] x, bool c) => (float[3] y) { y = local.f(x, c) }
    <domain: "local", opset_import: ["" : 17]>
    f (a, flag) => (r) {
        r = If(flag) <
            then_branch = t () => (float[3] o1) {
                k = Constant<value = float[3] {1.0, 2.0, 3.0}>()
                o1 = Add(a, k)
            },
            else_branch = e () => (float[3] o2) { o2 = Neg(a) }
        >
    }
    """)
    result = LiftConstantsPass()(ir.from_proto(proto))
    assert not result.modified and _ops(result.model)["Constant"] == 1


def test_constants_in_a_custom_op_graph_stay_nodes() -> None:
    body = helper.make_graph(
        [helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.ones(3, np.float32))),
         helper.make_node("Add", ["a", "k"], ["o"])],
        "body", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("o", TensorProto.FLOAT, [3])])
    node = helper.make_node("Decode", ["x"], ["y"], domain="custom.ops", step=body)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("custom.ops", 1)])
    result = LiftConstantsPass()(ir.from_proto(proto))
    assert not result.modified and not result.model.graph.initializers
    assert _ops(result.model) == {"Add": 1, "Constant": 1, "custom.ops::Decode": 1}


def test_a_body_constant_named_as_a_custom_op_graph_value_stays_a_node() -> None:
    """An If branch's Constant ``c`` and a custom op's graph defining ``c`` too: a main-graph
    initializer ``c`` would be shadowed by the custom graph's (the model would fail the
    checker), so the branch keeps its Constant node and the model stays valid."""
    proto = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17, "com.x" : 1]>
    g (float[3] x, bool b) => (float[3] y, float[3] z) {
        y = If(b) <
            then_branch = g1 () => (float[3] o1) { c = Constant<value = float[3] {1.0, 2.0, 3.0}>() o1 = Add(x, c) },
            else_branch = g2 () => (float[3] o2) { o2 = Neg(x) }
        >
        z = com.x.Foo(x) < body = g3 (float[3] i) => (float[3] o3) {
            c = Constant<value = float[3] {4.0, 5.0, 6.0}>()
            o3 = Add(i, c)
        } >
    }
    """)
    onnx.checker.check_model(proto)
    result = LiftConstantsPass()(ir.from_proto(proto))
    assert not result.modified and not result.model.graph.initializers
    onnx.checker.check_model(ir.to_proto(result.model))
