"""Generated integer inputs that index a tensor sized by another input's dynamic dim (a
graph network's edge list indexes its nodes; its per-node graph ids index the graphs) are
drawn within that dim as the sample sizes it, through Gather (a row of the edge list),
Unsqueeze and Expand, into ScatterElements, GatherND and Gather: the model runs on every
generated sample. An integer input whose indexed dim nothing sizes keeps the plain range."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

import optcc
from optcc.numerics.inputs import generate_inputs, input_roles

_GNN = """
<ir_version: 8, opset_import: ["": 17]>
g (float[nodes, 4] feat, int64[2, edges] edge_index, int64[nodes] batch, float[graphs] slots)
    => (float[graphs, 4] pooled, float[nodes, 4] gathered, float[graphs] counts) {
    zero = Constant<value = int64 {0}>()
    one = Constant<value = int64 {1}>()
    axis = Constant<value = int64[1] {1}>()
    minus = Constant<value = int64[2] {-1, 1}>()
    width = Constant<value = int64[2] {1, 4}>()
    source = Gather<axis = 0>(edge_index, zero)
    target = Gather<axis = 0>(edge_index, one)
    messages = Gather<axis = 0>(feat, source)
    column = Reshape(target, minus)
    spread = Expand(column, Shape(messages))
    nodes_shape = Shape(feat)
    empty_nodes = ConstantOfShape<value = float[1] {0.0}>(nodes_shape)
    summed = ScatterElements<axis = 0, reduction = "add">(empty_nodes, spread, messages)
    graph_shape = Shape(slots)
    empty_graphs = ConstantOfShape<value = float[1] {0.0}>(graph_shape)
    ones = ConstantOfShape<value = float[1] {1.0}>(Shape(batch))
    counts = ScatterElements<axis = 0, reduction = "add">(empty_graphs, batch, ones)
    pooled_shape = Concat<axis = 0>(graph_shape, Constant<value = int64[1] {4}>())
    empty_pool = ConstantOfShape<value = float[1] {0.0}>(pooled_shape)
    ids = Unsqueeze(batch, axis)
    wide = Expand(ids, Shape(summed))
    pooled = ScatterElements<axis = 0, reduction = "add">(empty_pool, wide, summed)
    gathered = GatherND(pooled, ids)
}
"""


def _gnn() -> onnx.ModelProto:
    # the parser takes no nested calls: name the inner values
    text = _GNN.replace("spread = Expand(column, Shape(messages))",
                        "message_shape = Shape(messages)\n    spread = Expand(column, message_shape)")
    text = text.replace("ones = ConstantOfShape<value = float[1] {1.0}>(Shape(batch))",
                        "batch_shape = Shape(batch)\n    ones = ConstantOfShape<value = float[1] {1.0}>(batch_shape)")
    text = text.replace("pooled_shape = Concat<axis = 0>(graph_shape, Constant<value = int64[1] {4}>())",
                        "four = Constant<value = int64[1] {4}>()\n    pooled_shape = Concat<axis = 0>(graph_shape, four)")
    text = text.replace("wide = Expand(ids, Shape(summed))", "summed_shape = Shape(summed)\n    wide = Expand(ids, summed_shape)")
    return onnx.shape_inference.infer_shapes(onnx.parser.parse_model(text))


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def test_graph_indices_stay_within_the_dims_the_sample_gives_and_the_model_runs():
    model = _gnn()
    parsed = optcc.ir.load(model)
    assert input_roles(parsed)["edge_index"] == "index" and input_roles(parsed)["batch"] == "index"
    # fewer nodes and graphs than the plain range [0, 4) of an integer input would index
    samples = generate_inputs(parsed, {"feat": [3, 4], "slots": [2]}, samples=3, seed=0, dynamic_dim=16)
    for feeds in samples:
        nodes, graphs = feeds["feat"].shape[0], feeds["slots"].shape[0]
        assert 0 <= feeds["edge_index"].min() and feeds["edge_index"].max() < nodes
        assert 0 <= feeds["batch"].min() and feeds["batch"].max() < graphs
        pooled, gathered, counts = _run(model, feeds)
        # an independent reference: numpy's scatter-add of the same indices
        want_counts = np.bincount(feeds["batch"], minlength=graphs).astype(np.float32)
        np.testing.assert_array_equal(counts, want_counts)
        source, target = feeds["edge_index"]
        summed = np.zeros_like(feeds["feat"])
        np.add.at(summed, target, feeds["feat"][source])
        want_pooled = np.zeros((graphs, 4), np.float32)
        np.add.at(want_pooled, feeds["batch"], summed)
        np.testing.assert_allclose(pooled, want_pooled, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(gathered, want_pooled[feeds["batch"]], rtol=1e-5, atol=1e-5)
    assert samples[0]["edge_index"].shape == (2, 16)  # many edges between the three nodes: every node drawn
    assert set(np.unique(samples[0]["edge_index"])) == {0, 1, 2}


def test_the_bound_follows_the_size_each_sample_gives():
    parsed = optcc.ir.load(_gnn())
    samples = generate_inputs(parsed, {"slots": [2]}, samples=2, seed=1, dynamic_dim=64, last_batch=8)
    assert [s["feat"].shape[0] for s in samples] == [1, 8]  # the nodes are the batch axis
    assert samples[0]["edge_index"].max() == 0 and 0 < samples[1]["edge_index"].max() < 8


def test_an_index_whose_dim_nothing_sizes_keeps_the_plain_range():
    # the table's rows are computed (a Range of a constant count): no input's symbol sizes them
    text = """
<ir_version: 8, opset_import: ["": 17]>
g (int64[n] idx) => (float[m] y) {
    start = Constant<value = float {0.0}>()
    limit = Constant<value = float {9.0}>()
    step = Constant<value = float {1.0}>()
    table = Range(start, limit, step)
    y = Gather<axis = 0>(table, idx)
}
"""
    model = onnx.parser.parse_model(text)
    parsed = optcc.ir.load(model)
    assert input_roles(parsed)["idx"] == "plain"
    feeds = generate_inputs(parsed, samples=1, seed=0, dynamic_dim=64)[0]
    assert feeds["idx"].max() < 4
    np.testing.assert_array_equal(_run(model, feeds)[0], feeds["idx"].astype(np.float32))
