"""histogram_and_weight_bytes against counts taken from the protobuf itself."""

import collections

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import optcc.ir as oir


def _model_with_a_body() -> onnx.ModelProto:
    then_branch = helper.make_graph(
        [helper.make_node("Constant", [], ["t"], value=numpy_helper.from_array(np.ones((3, 4), np.float32))),
         helper.make_node("Add", ["x", "t"], ["then_out"])],
        "then", [], [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, [3, 4])])
    else_branch = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["else_out"])],
        "else", [], [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, [3, 4])])
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]),
         helper.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch),
         helper.make_node("Gelu", ["r"], ["z"], domain="com.microsoft")],
        "main",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [3, 4])],
        [numpy_helper.from_array(np.zeros((5, 7), np.float64), "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def _proto_counts(proto: onnx.ModelProto) -> tuple[dict[str, int], int]:
    counts: collections.Counter[str] = collections.Counter()
    total = sum(numpy_helper.to_array(t).nbytes for t in proto.graph.initializer)
    pending = [proto.graph]
    while pending:
        graph = pending.pop()
        for node in graph.node:
            counts[node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    pending.append(attr.g)
                if node.op_type == "Constant" and attr.name == "value":
                    total += numpy_helper.to_array(attr.t).nbytes
    return dict(sorted(counts.items())), total


def test_histogram_and_weight_bytes_count_bodies_domains_and_constants():
    proto = _model_with_a_body()
    model = oir.load(proto)
    expected = _proto_counts(proto)
    assert expected == ({"Add": 1, "Constant": 1, "If": 1, "Neg": 1, "Relu": 1, "com.microsoft::Gelu": 1},
                        5 * 7 * 8 + 3 * 4 * 4)
    assert oir.histogram_and_weight_bytes(model) == expected
    assert (oir.op_histogram(model), oir.weight_bytes(model)) == expected
