"""Dead-node and Identity/Dropout elimination, including inside If bodies and functions,
and the cases where onnx-ir's own IdentityEliminationPass falls short."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper
from onnx_ir.passes.common import IdentityEliminationPass

import optcc
from optcc.passes import EliminateDeadNodesPass, EliminateIdentitiesPass
from reference import (
    EXACT_RTOL,
    FUSION_RTOL,
    assert_close,
    assert_converged,
    expected_outputs,
    expected_outputs_float64,
    onnxruntime_outputs,
    random_feeds,
)


def _load(text: str) -> ir.Model:
    return ir.from_proto(onnx.parser.parse_model(text))


def _histogram(model: ir.Model) -> dict[str, int]:
    return optcc.ir.op_histogram(model)


def _check_numerics(original: ir.Model, optimized: ir.Model, inputs: dict | None = None) -> None:
    """The optimized model on onnxruntime against the original by onnx's reference
    evaluator, within the exact tolerance (eliminations change no arithmetic)."""
    feeds = inputs if inputs is not None else random_feeds(original)
    assert_close(onnxruntime_outputs(optimized, feeds), expected_outputs(original, feeds), EXACT_RTOL,
                 what="optimized vs onnx reference evaluator on the original")


def _run(pass_: optcc.Pass, model: ir.Model) -> tuple[ir.Model, optcc.PassResult, ir.Model]:
    original = model.clone()
    result = pass_(model)
    onnx.checker.check_model(ir.to_proto(result.model))
    _check_numerics(original, result.model)
    again = type(pass_)()(result.model)
    assert not again.modified, "second run must be a no-op"
    return original, result, result.model


def _if_model(then_nodes: list, else_nodes: list, extra_inits=()) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    c = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    then_g = helper.make_graph(then_nodes, "then", [], [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, None)], list(extra_inits))
    else_g = helper.make_graph(else_nodes, "else", [], [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, None)])
    nodes = [
        helper.make_node("Relu", ["x"], ["rx"], name="outer_relu"),
        helper.make_node("If", ["c"], ["y"], name="if", then_branch=then_g, else_branch=else_g),
    ]
    graph = helper.make_graph(nodes, "g", [x, c], [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_dead_nodes_initializers_and_opsets_are_removed():
    model = _load("""
    <ir_version: 8, opset_import: ["" : 17, "custom.dead" : 1]>
    agraph (float[N, 4] x) => (float[N, 4] y) <float[4] unused_w = {1,2,3,4}, float[4] w = {1,1,1,1}> {
        y = Mul(x, w)
        d1 = Add(x, unused_w)
        d2 = Relu(d1)
    }
    """)
    _, result, out = _run(EliminateDeadNodesPass(), model)
    assert _histogram(out) == {"Mul": 1}
    assert list(out.graph.initializers) == ["w"]
    assert "custom.dead" not in out.opset_imports
    assert result.stats == {"nodes": 2, "initializers": 1, "opset_imports": 1}


def test_outer_value_used_only_inside_a_subgraph_is_kept():
    then_nodes = [helper.make_node("Neg", ["rx"], ["t_out"])]
    else_nodes = [
        helper.make_node("Abs", ["x"], ["e_out"]),
        helper.make_node("Exp", ["x"], ["e_dead"]),
    ]
    model = ir.from_proto(_if_model(then_nodes, else_nodes))
    original = model.clone()
    result = EliminateDeadNodesPass()(model)
    assert result.modified
    hist = _histogram(result.model)
    assert hist.get("Relu") == 1, "Relu feeds the then-branch and must stay"
    assert "Exp" not in hist, "dead node inside the else-branch is removed"
    for cond in (True, False):
        feeds = {"x": np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32), "c": np.array(cond)}
        _check_numerics(original, result.model, inputs=feeds)


def test_unused_body_initializer_is_removed():
    unused = onnx.numpy_helper.from_array(np.ones(3, np.float32), "body_unused")
    then_nodes = [helper.make_node("Neg", ["x"], ["t_out"])]
    else_nodes = [helper.make_node("Abs", ["x"], ["e_out"])]
    model = ir.from_proto(_if_model(then_nodes, else_nodes, [unused]))
    result = EliminateDeadNodesPass()(model)
    assert result.stats.get("initializers") == 1
    onnx.checker.check_model(ir.to_proto(result.model))


def test_unused_function_is_removed():
    model = _load("""
    <ir_version: 8, opset_import: ["" : 17, "local" : 1]>
    agraph (float[N] x) => (float[N] y) {
        y = local.Used(x)
    }
    <domain: "local", opset_import: ["" : 17]>
    Used (a) => (b) { b = Neg(a) }
    <domain: "local", opset_import: ["" : 17]>
    Unused (a) => (b) { b = Abs(a) }
    """)
    _, result, out = _run(EliminateDeadNodesPass(), model)
    assert [f.name for f in out.functions.values()] == ["Used"]
    assert result.stats["functions"] == 1


def test_identity_and_inference_dropout_are_removed():
    model = _load("""
    <ir_version: 8, opset_import: ["" : 17]>
    agraph (float[N, 4] x) => (float[N, 4] y) <float ratio = {0.5}, bool off = {0}> {
        a = Identity(x)
        b = Relu(a)
        c = Dropout(b)
        d = Dropout(c, ratio, off)
        y = Abs(d)
    }
    """)
    _, result, out = _run(EliminateIdentitiesPass(), model)
    assert _histogram(out) == {"Abs": 1, "Relu": 1}
    assert result.stats == {"Identity": 1, "Dropout": 2}


def test_training_dropout_and_used_mask_are_kept():
    model = _load("""
    <ir_version: 8, opset_import: ["" : 17]>
    agraph (float[N, 4] x, bool train) => (float[N, 4] y, bool[N, 4] m) <float ratio = {0.5}> {
        a = Dropout(x, ratio, train)
        y, m = Dropout(a)
    }
    """)
    result = EliminateIdentitiesPass()(model)
    assert not result.modified
    assert _histogram(result.model) == {"Dropout": 2}


def test_identity_producing_a_graph_output_renames_its_source():
    model = _load("""
    <ir_version: 8, opset_import: ["" : 17]>
    agraph (float[N, 4] x) => (float[N, 4] y) {
        r = Relu(x)
        y = Identity(r)
    }
    """)
    _, _, out = _run(EliminateIdentitiesPass(), model)
    assert _histogram(out) == {"Relu": 1}
    assert out.graph.outputs[0].name == "y"
    assert [str(d) for d in out.graph.outputs[0].shape] == ["N", "4"]


def test_identity_between_interface_values_is_kept():
    """onnx-ir's IdentityEliminationPass renames ``r`` to ``y2`` here, so the model loses
    its output ``y1``; ours keeps the node (and the interface)."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    agraph (float[N, 4] x) => (float[N, 4] y1, float[N, 4] y2, float[N, 4] y3) {
        y1 = Relu(x)
        y2 = Identity(y1)
        y3 = Identity(x)
    }
    """
    ours = EliminateIdentitiesPass()(_load(text))
    assert not ours.modified
    assert [v.name for v in ours.model.graph.outputs] == ["y1", "y2", "y3"]
    theirs = IdentityEliminationPass()(_load(text)).model
    assert [v.name for v in theirs.graph.outputs] != ["y1", "y2", "y3"]


def test_identity_inside_if_branches_is_removed_without_renaming_outer_values():
    then_nodes = [helper.make_node("Identity", ["rx"], ["t_out"])]  # reads an outer value
    else_nodes = [
        helper.make_node("Abs", ["x"], ["e_abs"]),
        helper.make_node("Identity", ["e_abs"], ["e_id"]),
        helper.make_node("Neg", ["e_id"], ["e_out"]),
    ]
    model = ir.from_proto(_if_model(then_nodes, else_nodes))
    original = model.clone()
    result = EliminateIdentitiesPass()(model)
    assert result.stats == {"Identity": 1}, "only the else-branch Identity is removable"
    outer_relu = next(n for n in result.model.graph if n.op_type == "Relu")
    assert outer_relu.outputs[0].name == "rx"
    onnx.checker.check_model(ir.to_proto(result.model))
    for cond in (True, False):
        feeds = {"x": np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32), "c": np.array(cond)}
        _check_numerics(original, result.model, inputs=feeds)


def test_level_2_cleans_the_example_model_and_keeps_its_interface():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = optcc.optimize("fixtures/tinycnn.onnx", level=2)
    assert_converged(result.report, caught)
    after = result.report.model_after.op_histogram
    assert "Identity" not in after and "Dropout" not in after
    assert "Shape" not in after, "the dead branch is gone"
    graph = result.ir_model.graph
    assert [v.name for v in graph.inputs] == ["image"] and [v.name for v in graph.outputs] == ["logits"]
    assert str(graph.inputs[0].shape[0]) == "N" and str(graph.outputs[0].shape[0]) == "N"
    assert result.report.verification["status"] == "passed"
    feeds = random_feeds(onnx.load("fixtures/tinycnn.onnx"))
    assert_close(onnxruntime_outputs(result.model, feeds), expected_outputs_float64(onnx.load("fixtures/tinycnn.onnx"), feeds),
                 FUSION_RTOL, what="tinycnn -O2 vs float64 reference evaluator")
