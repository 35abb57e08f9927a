"""inline-constant-if: an If with a constant condition becomes the branch it takes.

Structure is asserted on the optimized model, numerics against numpy / onnx's reference
evaluator on the original; the negative cases (dynamic or overridable conditions, branch
outputs that are outer values, branch initializers) must keep the If.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import optcc
from fixtures import peer_suites

FLOAT5 = [5]


def _branch(name: str, nodes, outputs, initializer=()) -> onnx.GraphProto:
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(o, TensorProto.FLOAT, FLOAT5)
                                               for o in outputs], initializer=list(initializer))


def _if_model(condition, then_branch, else_branch, outputs, extra_nodes=(), graph_outputs=None,
              cond_is_input=False) -> onnx.ModelProto:
    n_out = len(then_branch.output)
    if_outputs = outputs[:n_out]
    nodes = [helper.make_node("If", ["cond"], if_outputs, then_branch=then_branch, else_branch=else_branch),
             *extra_nodes]
    inputs = [helper.make_tensor_value_info("a", TensorProto.FLOAT, FLOAT5)]
    if cond_is_input:
        inputs.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    graph = helper.make_graph(
        nodes, "m", inputs,
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, FLOAT5) for o in (graph_outputs or outputs)],
        initializer=[numpy_helper.from_array(np.array(condition), "cond")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _check(model: onnx.ModelProto, level: int = 1) -> onnx.ModelProto:
    optimized = optcc.optimize(model, level=level, verify=False).model
    onnx.checker.check_model(optimized, full_check=True)
    a = np.random.default_rng(0).standard_normal(5).astype(np.float32)
    expected = ReferenceEvaluator(model).run(None, {"a": a})
    session = ort.InferenceSession(optimized.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"a": a})
    assert [o.name for o in optimized.graph.output] == [o.name for o in model.graph.output]
    for e, g in zip(expected, got):
        assert g.shape == e.shape and np.allclose(g, e, rtol=1e-6, atol=1e-7)
    return optimized


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def test_true_condition_inlines_the_then_branch() -> None:
    then_b = _branch("t", [helper.make_node("Sin", ["a"], ["b"]), helper.make_node("Tanh", ["b"], ["c"])], ["c"])
    else_b = _branch("e", [helper.make_node("Neg", ["a"], ["c2"])], ["c2"])
    optimized = _check(_if_model(True, then_b, else_b, ["y"]))
    assert _ops(optimized) == ["Sin", "Tanh"]


def test_false_condition_with_two_outputs_one_read_inside() -> None:
    then_b = _branch("t", [helper.make_node("Sin", ["a"], ["p"]), helper.make_node("Cos", ["a"], ["q"])], ["p", "q"])
    else_b = _branch("e", [helper.make_node("Neg", ["a"], ["p"]), helper.make_node("Exp", ["a"], ["q"])], ["p", "q"])
    model = _if_model(False, then_b, else_b, ["y0", "y1", "z"],
                      extra_nodes=[helper.make_node("Mul", ["y0", "y1"], ["z"])], graph_outputs=["y0", "z"])
    optimized = _check(model)
    assert sorted(_ops(optimized)) == ["Exp", "Mul", "Neg"]


def test_two_inlined_branches_defining_the_same_name_stay_valid() -> None:
    def branch(op):
        return _branch(op, [helper.make_node(op, ["a"], ["c"])], ["c"])
    model = _if_model(True, branch("Sin", ), branch("Cos"), ["y"])
    second = helper.make_node("If", ["cond"], ["w"], then_branch=branch("Exp"), else_branch=branch("Neg"))
    model.graph.node.append(second)
    model.graph.node.append(helper.make_node("Add", ["y", "w"], ["z"]))
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, FLOAT5))
    optimized = _check(model)
    assert sorted(_ops(optimized)) == ["Add", "Exp", "Sin"]
    names = [o for n in optimized.graph.node for o in n.output]
    assert len(names) == len(set(names))


def test_nested_constant_ifs_are_all_inlined() -> None:
    inner = helper.make_node("If", ["cond"], ["c"],
                             then_branch=_branch("it", [helper.make_node("Sin", ["a"], ["s"])], ["s"]),
                             else_branch=_branch("ie", [helper.make_node("Cos", ["a"], ["s2"])], ["s2"]))
    then_b = _branch("t", [inner], ["c"])
    else_b = _branch("e", [helper.make_node("Neg", ["a"], ["n"])], ["n"])
    optimized = _check(_if_model(True, then_b, else_b, ["y"]))
    assert _ops(optimized) == ["Sin"]


@pytest.mark.parametrize("case", ["dynamic", "overridable", "initializer"])
def test_if_stays(case: str) -> None:
    then_b = _branch("t", [helper.make_node("Sin", ["a"], ["b"])], ["b"])
    else_b = _branch("e", [helper.make_node("Neg", ["a"], ["b2"])], ["b2"])
    if case == "initializer":
        then_b = _branch("t", [helper.make_node("Add", ["a", "k"], ["b"])], ["b"],
                         initializer=[numpy_helper.from_array(np.ones(5, np.float32), "k")])
    model = _if_model(True, then_b, else_b, ["y"], cond_is_input=case in ("dynamic", "overridable"))
    if case == "dynamic":  # a graph input without a default
        del model.graph.initializer[:]
    optimized = optcc.optimize(model, level=1, passes=["inline-constant-if"], verify=False).model
    assert _ops(optimized) == ["If"]


SUITE = {entry.name: entry.model for entry in peer_suites.suite_models()}
SUITE_CASES = {
    # onnxscript: the If's condition folds to false; the else branch's 2*2 then folds on
    "onnxscript:onnxscript/optimizer/_constant_folding_test.py::FoldConstantsTest.test_fold_if_propagate": ["Mul"],
    # onnx/optimizer: eliminate_if_with_const_cond (true): the then branch's two nodes
    "test_eliminate_if_with_const_true_cond": ["Sin", "HardSigmoid"],
}


@pytest.mark.parametrize("name", sorted(SUITE_CASES))
def test_suite_case(name: str) -> None:
    if name not in SUITE:
        pytest.skip("the suite is not cached (python -m fixtures.peer_suites --import-from)")
    model = SUITE[name]
    optimized = optcc.optimize(model, level=2, verify=False).model
    assert _ops(optimized) == SUITE_CASES[name]
    x = np.random.default_rng(1).standard_normal(
        [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]).astype(np.float32)
    feeds = {model.graph.input[0].name: x}
    expected = ReferenceEvaluator(model).run(None, feeds)
    got = ort.InferenceSession(optimized.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    for e, g in zip(expected, got):
        assert np.allclose(g, e, rtol=1e-6, atol=1e-7)
