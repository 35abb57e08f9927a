"""fuse-parallel-matmuls: MatMuls of one input by constant weights become one MatMul and
a Split. Numerics against onnx's reference evaluator (float32 within the fusion
tolerance; float64 as the precise reference); negative cases: a shared weight, a weight
that is a graph input, weights of different K, one MatMul, unknown rank, weights as wide
as one CPU kernel pass (16 columns) or wider."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import optcc
from fixtures import peer_suites
from optcc.infra.invariants import check_invariants, signature
from optcc.passes.fuse_parallel_matmuls import FuseParallelMatMulsPass
from reference import (EXACT_RTOL, FUSION_RTOL, assert_close, expected_outputs,
                       expected_outputs_float64, random_feeds)


def _model(a_shape, weights, outputs=None, opset=17, extra_nodes=(), extra_inputs=()) -> onnx.ModelProto:
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in weights.items()]
    nodes = [helper.make_node("MatMul", ["a", name], [f"y_{name}"]) for name in weights]
    nodes += list(extra_nodes)
    outs = outputs or [f"y_{name}" for name in weights]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, a_shape),
                                           *extra_inputs],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return onnx.shape_inference.infer_shapes(model) if a_shape is not None else model


def _check(proto: onnx.ModelProto, shapes=None) -> optcc.PassResult:
    original = ir.from_proto(proto)
    result = FuseParallelMatMulsPass()(ir.from_proto(proto))
    assert check_invariants(result.model, signature(original)) == []
    out = ir.to_proto(result.model)
    onnx.checker.check_model(out, full_check=True)
    feeds = random_feeds(proto, shapes, seed=6)
    got = expected_outputs(out, feeds)
    assert_close(got, expected_outputs(proto, feeds), FUSION_RTOL)
    assert_close(got, expected_outputs_float64(proto, feeds), FUSION_RTOL)
    assert not FuseParallelMatMulsPass()(result.model).modified
    return result


def _ops(model: ir.Model) -> dict[str, int]:
    return optcc.ir.op_histogram(model)


@pytest.mark.parametrize("opset", [11, 17])
def test_three_matmuls_become_one_and_a_split(opset):
    proto = _model(["B", 4, 8], {"wq": [8, 3], "wk": [8, 5], "wv": [8, 2]}, opset=opset)
    result = _check(proto, {"a": [2, 4, 8]})
    assert _ops(result.model) == {"MatMul": 1, "Split": 1}
    assert [v.name for v in result.model.graph.outputs] == ["y_wq", "y_wk", "y_wv"]
    assert sorted(result.model.graph.initializers) != ["wk", "wq", "wv"]  # the weights moved
    assert optcc.ir.weight_bytes(result.model) <= optcc.ir.weight_bytes(ir.from_proto(proto)) + 3 * 8


def test_intermediate_results_feed_their_readers():
    relu = helper.make_node("Relu", ["y_w1"], ["r"])
    proto = _model([3, 4], {"w1": [4, 2], "w2": [4, 2]}, outputs=["r", "y_w2"], extra_nodes=[relu])
    result = _check(proto)
    assert _ops(result.model) == {"MatMul": 1, "Split": 1, "Relu": 1}


def test_shared_weight_graph_input_weight_and_different_k_stay():
    shared = helper.make_node("Add", ["w1", "w1"], ["s"])
    proto = _model([3, 4], {"w1": [4, 2], "w2": [4, 2]}, outputs=["y_w1", "y_w2", "s"], extra_nodes=[shared])
    assert not FuseParallelMatMulsPass()(ir.from_proto(proto)).modified
    proto = _model([3, 4], {"w1": [4, 2], "w2": [4, 2]})
    proto.graph.input.append(helper.make_tensor_value_info("w2", TensorProto.FLOAT, [4, 2]))
    assert not FuseParallelMatMulsPass()(ir.from_proto(proto)).modified
    other = helper.make_node("MatMul", ["b", "w2"], ["y2"])
    proto = _model([3, 4], {"w1": [4, 2]}, outputs=["y_w1", "y2"], extra_nodes=[other],
                   extra_inputs=[helper.make_tensor_value_info("b", TensorProto.FLOAT, [3, 5])])
    proto.graph.initializer.append(numpy_helper.from_array(np.ones((5, 2), np.float32), "w2"))
    assert not FuseParallelMatMulsPass()(ir.from_proto(proto)).modified


def test_unknown_rank_input_stays():
    proto = _model(None, {"w1": [4, 2], "w2": [4, 2]})
    assert not FuseParallelMatMulsPass()(ir.from_proto(proto)).modified


def test_narrow_weights_merge_and_wide_ones_stay_apart():
    """Q/K/V-like projections 16 columns wide or wider stay three MatMuls; of a group
    mixing widths, the narrow ones (15 and 4 columns) are merged and the results of all
    five still match the reference evaluator."""
    wide = _model(["B", 6, 32], {"wq": [32, 16], "wk": [32, 16], "wv": [32, 64]})
    assert not FuseParallelMatMulsPass()(ir.from_proto(wide)).modified
    mixed = _model(["B", 6, 32], {"wq": [32, 16], "g1": [32, 15], "wk": [32, 32], "g2": [32, 4], "wv": [32, 16]})
    result = _check(mixed, {"a": [3, 6, 32]})
    assert _ops(result.model) == {"MatMul": 4, "Split": 1}
    split = next(n for n in result.model.graph if n.op_type == "Split")
    assert split.inputs[1].const_value.numpy().tolist() == [15, 4]
    assert [v.name for v in result.model.graph.outputs] == ["y_wq", "y_g1", "y_wk", "y_g2", "y_wv"]


def test_suite_fuse_qkv():
    """onnx/optimizer's test_fuse_qkv: three 320-column projections of one input stay three
    MatMuls at -O2 (8 nodes, as onnxoptimizer leaves them); the results match the original."""
    entry = {e.name: e for e in peer_suites.build_models()}.get("test_fuse_qkv")
    if entry is None:
        pytest.skip("onnx/optimizer's suite file is not cached")
    result = optcc.optimize(entry.model, level=2, verify=False)
    assert len(result.model.graph.node) == 8
    assert [n.op_type for n in result.model.graph.node].count("MatMul") == 3
    feeds = random_feeds(entry.model, seed=7)
    got = expected_outputs(result.model, feeds)
    assert_close(got, expected_outputs(entry.model, feeds), EXACT_RTOL)
