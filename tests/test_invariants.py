"""Structural invariants: what they reject, and what they must not blame on a pass."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper

import optcc
from optcc.infra.invariants import check_invariants, signature


def _if_model(body_name: str, body_reads: str = "x") -> onnx.ModelProto:
    """An If whose branches define ``body_name`` and add it to ``body_reads``; the main
    graph defines 'late' after it."""
    def branch(k: float) -> onnx.GraphProto:
        const = helper.make_node("Constant", [], [body_name], value=helper.make_tensor("c", TensorProto.FLOAT, [1], [k]))
        add = helper.make_node("Add", [body_reads, body_name], [f"out_{k:g}"])
        return helper.make_graph([const, add], f"b{k:g}", [],
                                 [helper.make_tensor_value_info(f"out_{k:g}", TensorProto.FLOAT, [1])])

    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["y0"], then_branch=branch(1.0), else_branch=branch(-1.0)),
        helper.make_node("Neg", ["y0"], ["late"]),
        helper.make_node("Identity", ["late"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
                              [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_a_body_reusing_a_name_defined_later_outside_is_not_shadowing():
    model = optcc.ir.load(_if_model("late"))
    assert check_invariants(model, signature(model), run_checker=False) == []


def test_a_body_reusing_a_name_defined_earlier_outside_is_shadowing():
    model = ir.serde.deserialize_model(_if_model("s"))  # optcc.ir.load would refuse the file
    problems = check_invariants(model, signature(model), run_checker=False)
    assert any("shadows" in p for p in problems)


def test_no_pass_is_blamed_for_a_name_the_input_reuses():
    proto = _if_model("late")
    result = optcc.optimize(proto, level=1)
    assert not [r for r in result.report.passes if r.status == "reverted"]
    x = np.array([2.0], np.float32)
    got = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(got[0], -(x + 1.0))  # numpy: x > 0 takes the then-branch
