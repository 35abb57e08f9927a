"""CSE keys a tensor attribute by its bytes when small (then equal keys need no second
comparison) and by a digest when large (then the bytes are compared again): Constant
nodes equal as numbers but not as bytes stay apart, byte-equal ones merge, for small and
large tensors alike. Outputs are checked with onnx's reference evaluator against numpy."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.reference
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from optcc.passes.eliminate_common_subexpressions import EliminateCommonSubexpressionsPass


def _model(tensors: list[np.ndarray]) -> onnx.ModelProto:
    """``y_i = x + Constant(t_i)`` for each tensor."""
    width = tensors[0].size
    nodes = []
    for i, t in enumerate(tensors):
        nodes.append(helper.make_node("Constant", [], [f"c{i}"], value=numpy_helper.from_array(t)))
        nodes.append(helper.make_node("Add", ["x", f"c{i}"], [f"y{i}"]))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, width])
    outputs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [2, width]) for i in range(len(tensors))]
    graph = helper.make_graph(nodes, "g", [x], outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _cse_and_check(tensors: list[np.ndarray]) -> int:
    """Run CSE; check every output bit for bit against numpy; return the Constants left."""
    model = ir.from_proto(_model(tensors))
    EliminateCommonSubexpressionsPass()(model)
    result = ir.to_proto(model)
    x = np.random.default_rng(0).standard_normal((2, tensors[0].size)).astype(np.float32)
    got = onnx.reference.ReferenceEvaluator(result).run(None, {"x": x})
    for out, t in zip(got, tensors):
        np.testing.assert_array_equal(out.view(np.uint32), (x + t).view(np.uint32))
    assert not EliminateCommonSubexpressionsPass()(model).modified
    return sum(n.op_type == "Constant" for n in result.graph.node)


def test_small_constants_merge_only_when_their_bytes_are_equal():
    zeros, negative_zeros = np.zeros(4, np.float32), -np.zeros(4, np.float32)
    assert _cse_and_check([zeros, negative_zeros, zeros.copy(), negative_zeros.copy()]) == 2


def test_large_constants_merge_only_when_their_bytes_are_equal():
    base = np.random.default_rng(1).standard_normal(64).astype(np.float32)
    signed = base.copy()
    signed[31] = -signed[31]
    assert _cse_and_check([base, signed, base.copy()]) == 2


def test_constants_stored_in_different_fields_merge_when_their_values_are_equal():
    """A parsed tensor keeps its values in ``float_data``/``int64_data`` or in ``raw_data``:
    CSE keys both by the values' bytes, so equal ones merge and unequal ones stay apart."""
    values = np.array([1.5, -0.0, 3.0, 2.0], np.float32)
    other = np.array([1.5, 0.0, 3.0, 2.0], np.float32)
    tensors = [helper.make_tensor("t", TensorProto.FLOAT, [4], values.tolist()),  # float_data
               helper.make_tensor("t", TensorProto.FLOAT, [4], values.tobytes(), raw=True),
               helper.make_tensor("t", TensorProto.FLOAT, [4], other.tolist()),
               helper.make_tensor("t", TensorProto.FLOAT, [4], other.tobytes(), raw=True)]
    nodes = []
    for i, t in enumerate(tensors):
        nodes.append(helper.make_node("Constant", [], [f"c{i}"], value=t))
        nodes.append(helper.make_node("Add", ["x", f"c{i}"], [f"y{i}"]))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    outputs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [2, 4]) for i in range(4)]
    proto = helper.make_model(helper.make_graph(nodes, "g", [x], outputs),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    model = ir.from_proto(proto)
    assert EliminateCommonSubexpressionsPass()(model).modified
    result = ir.to_proto(model)
    assert sum(n.op_type == "Constant" for n in result.graph.node) == 2
    feed = np.random.default_rng(2).standard_normal((2, 4)).astype(np.float32)
    got = onnx.reference.ReferenceEvaluator(result).run(None, {"x": feed})
    for out, expected in zip(got, [values, values, other, other]):
        np.testing.assert_array_equal(out.view(np.uint32), (feed + expected).view(np.uint32))
