"""Structural invariants: what they reject, and what they must not blame on a pass."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper

import optcc
from optcc.infra.invariants import WHOLE_CHECK_MAX_BYTES, check_invariants, checked, checker_problems, signature
from optcc.runtime.shared_weights import light_proto


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


def _conv_model(channels: int) -> ir.Model:
    """x -> Conv with a float weight of ``channels`` x 64 x 3 x 3."""
    weight = np.random.default_rng(0).standard_normal((channels, 64, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, 6, 6])],
        [onnx.numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return optcc.ir.load(model)


def test_the_bytes_the_checker_read_are_handed_on():
    """A model with few weight bytes is checked with them, and the bytes kept are the
    model's own serialization; a larger one is checked without its large weights, and the
    bytes kept give exactly what light_proto gives (the graph, the weights as arrays); the
    verdicts are the checker's."""
    small = _conv_model(4)
    problems, kept = checked(small)
    assert problems == [] and kept.aside == () and kept.data == optcc.ir.serialize(small).SerializeToString()
    large = _conv_model(WHOLE_CHECK_MAX_BYTES // (64 * 9 * 4) + 1)
    assert optcc.ir.weight_bytes(large) > WHOLE_CHECK_MAX_BYTES
    problems, kept = checked(large)
    assert problems == [] and [name for name, _ in kept.aside] == ["w"]
    proto, weights = kept.light()
    expected, expected_weights = light_proto(large)
    assert proto.SerializeToString() == expected.SerializeToString()
    assert weights.keys() == expected_weights.keys()
    np.testing.assert_array_equal(weights["w"], expected_weights["w"])
    small.graph.node(0).op_type = "NoSuchOp"  # the checker rejects it
    problems, kept = checked(small)
    assert problems and problems == checker_problems(small) and kept is not None


def test_bytes_with_a_weight_light_proto_keeps_are_not_handed_on():
    """A large initializer of a dtype onnxruntime cannot take as an array (bfloat16) is set
    aside for the checker but kept in light_proto's graph: those bytes are not its form."""
    large = _conv_model(WHOLE_CHECK_MAX_BYTES // (64 * 9 * 4) + 1)
    odd = ir.Value(name="odd", const_value=ir.Tensor(np.zeros(2048, np.uint16), dtype=ir.DataType.BFLOAT16),
                   type=ir.TensorType(ir.DataType.BFLOAT16), shape=ir.Shape([2048]))
    large.graph.register_initializer(odd)
    problems, kept = checked(large)
    assert problems == [] and kept is None
