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


def test_weight_bytes_of_in_memory_tensors():
    """Tensors made in memory (as folding and fusions make them), including a 4-bit one
    whose bytes round up, count what their arrays hold."""
    import onnx_ir as ir

    model = oir.load(_model_with_a_body())
    graph = model.graph
    halves = ir.Value(name="h", const_value=ir.Tensor(np.ones((3, 5), np.float16), name="h"))
    nibbles = ir.Value(name="n", const_value=ir.Tensor(np.zeros(7, np.uint8), dtype=ir.DataType.UINT4, name="n"))
    graph.register_initializer(halves)
    graph.register_initializer(nibbles)
    _, total = oir.histogram_and_weight_bytes(model)
    assert total == 5 * 7 * 8 + 3 * 4 * 4 + 3 * 5 * 2 + 4  # seven 4-bit elements: 4 bytes
    assert oir.weight_bytes(model) == total


def test_order_problems_found_with_omitted_inputs_and_bodies():
    """An omitted optional input is never a problem; a value read before its producer is,
    in the main graph and inside a body, as is a graph output nothing defines."""
    import onnx_ir as ir

    model = oir.load(_model_with_a_body())
    assert oir.first_order_problem(model) is None
    relu = next(n for n in model.graph if n.op_type == "Relu")
    clip = ir.Node("", "Clip", [relu.outputs[0], None, None], num_outputs=1)
    model.graph.append(clip)
    assert oir.first_order_problem(model) is None
    model.graph.remove(relu)
    model.graph.append(relu)  # now read by Gelu and Clip before it runs
    problem = oir.first_order_problem(model)
    assert problem is not None and "before it is defined (a cycle)" in problem
    model = oir.load(_model_with_a_body())
    branch = next(n for n in model.graph if n.op_type == "If").attributes["then_branch"].as_graph()
    add = next(n for n in branch if n.op_type == "Add")
    branch.remove(add)
    branch.insert_before(next(iter(branch)), add)  # the body's Add reads its Constant before it
    problem = oir.first_order_problem(model)
    assert problem is not None and "(Add)" in problem
    model = oir.load(_model_with_a_body())
    model.graph.outputs.append(ir.Value(name="nowhere"))
    assert oir.first_order_problem(model) == "graph output 'nowhere' is not defined"


def test_counts_and_bodies_follow_edits_of_the_node_set():
    """After nodes are removed and inserted (an If among them), the summary and the graphs
    walked are those of the edited model, serialized and counted from its protobuf."""
    import onnx_ir as ir

    proto = _model_with_a_body()
    model = oir.load(proto)
    graph = model.graph
    if_node = next(n for n in graph if n.op_type == "If")
    graph.remove(if_node, safe=False)  # y now dangles: the model is only counted, never run
    assert [g.name for g in oir.graphs(model)] == ["main"]
    relu = next(n for n in graph if n.op_type == "Relu")
    neg = ir.node("Neg", [relu.outputs[0]])
    graph.insert_after(relu, neg)
    graph.insert_after(neg, if_node)
    names = [g.name for g in oir.graphs(model)]
    assert names[0] == "main" and sorted(names[1:]) == ["else", "then"]
    counts, total = oir.histogram_and_weight_bytes(model)
    assert counts == {"Add": 1, "Constant": 1, "If": 1, "Neg": 2, "Relu": 1, "com.microsoft::Gelu": 1}
    assert (counts, total) == _proto_counts(oir.serialize(model))


def test_the_unordered_node_reads_agree_with_onnx_ir_public_api():
    """The walker reads onnx-ir's node set and node fields directly for speed: on this
    onnx-ir they must be exactly the graph's nodes, op types and domains (an onnx-ir that
    stores them otherwise must fail here, not miss a body silently)."""
    from optcc.ir import walk

    model = oir.load(_model_with_a_body())
    for graph in oir.graphs(model):
        nodes = walk._unordered_nodes(graph)
        assert sorted(map(id, nodes)) == sorted(map(id, graph))
        assert [walk._OP_TYPE(n) for n in nodes] == [n.op_type for n in nodes]
        assert [walk._DOMAIN(n) for n in nodes] == [n.domain for n in nodes]
    assert walk._may_hold_bodies(list(model.graph))
