"""A Transpose pair that cancels between a value that cannot take the output's name (a
graph input, an initializer) and a graph output becomes one Identity (cancel-transpose-pairs);
it stays when the first Transpose has another reader or is itself a graph output, or
when the pair does not cancel. Numerics against onnx's reference
evaluator and onnxruntime on the original (bit for bit)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import optcc
from exact_pass_checks import run_exact_pass
from fixtures import peer_suites
from optcc.passes.cancel_transpose_pairs import CancelTransposePairsPass
from reference import EXACT_RTOL, assert_close, expected_outputs, random_feeds


def _model(body: str, opset: int = 17) -> ir.Model:
    proto = onnx.parser.parse_model(f'<ir_version: 8, opset_import: ["" : {opset}]>\n' + body)
    return ir.from_proto(onnx.shape_inference.infer_shapes(proto, strict_mode=True))


def _ops(model: ir.Model) -> dict[str, int]:
    return optcc.ir.op_histogram(model)


def _run(model: ir.Model, shapes: dict[str, list[int]] | None = None) -> optcc.PassResult:
    return run_exact_pass(CancelTransposePairsPass, model, random_feeds(ir.to_proto(model), shapes, seed=3))


def test_cancelling_pair_from_input_to_output_becomes_identity():
    model = _model("""
    agraph (float[N, 3, M] a) => (float[N, 3, M] b) {
        y = Transpose <perm = [2, 0, 1]> (a)
        b = Transpose <perm = [1, 2, 0]> (y)
    }""")
    result = _run(model, {"a": [2, 3, 5]})
    assert result.stats == {"cancelled": 1}
    assert _ops(result.model) == {"Identity": 1}
    node = next(iter(result.model.graph))
    assert node.inputs[0].name == "a" and node.outputs[0].name == "b"
    assert "perm" not in node.attributes


def test_default_perm_pair_from_initializer_to_output_becomes_identity():
    model = _model("""
    agraph (float[2] x) => (float[2, 3] b) <float[2, 3] w = {1, 2, 3, 4, 5, 6}> {
        y = Transpose (w)
        b = Transpose (y)
    }""")
    result = _run(model)
    assert _ops(result.model) == {"Identity": 1}


def test_cancelling_pair_with_shared_first_transpose_stays():
    model = _model("""
    agraph (float[2, 3] a) => (float[2, 3] b, float[3, 2] c) {
        y = Transpose (a)
        b = Transpose (y)
        c = Relu (y)
    }""")
    result = CancelTransposePairsPass()(model)
    assert not result.modified
    assert _ops(result.model) == {"Transpose": 2, "Relu": 1}


def test_cancelling_pair_with_first_transpose_a_graph_output_stays():
    model = _model("""
    agraph (float[2, 3] a) => (float[3, 2] y, float[2, 3] b) {
        y = Transpose (a)
        b = Transpose (y)
    }""")
    assert not CancelTransposePairsPass()(model).modified


def test_default_perm_pair_of_unknown_rank_stays():
    proto = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Transpose", ["a"], ["y"]), onnx.helper.make_node("Transpose", ["y"], ["b"])],
            "g",
            [onnx.helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, None)],
            [onnx.helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, None)],
        ),
        opset_imports=[onnx.helper.make_opsetid("", 17)],
    )
    assert not CancelTransposePairsPass()(ir.from_proto(proto)).modified


def test_non_cancelling_pair_stays():
    model = _model("""
    agraph (float[2, 3, 4] a) => (float[3, 4, 2] b) {
        y = Transpose <perm = [1, 0, 2]> (a)
        b = Transpose <perm = [0, 2, 1]> (y)
    }""")
    assert not CancelTransposePairsPass()(model).modified


def test_level_one_removes_the_identity_where_a_name_can_move():
    model = _model("""
    agraph (float[2, 3] a, float[2, 3] c) => (float[2, 3] b) {
        s = Add (a, c)
        y = Transpose (s)
        b = Transpose (y)
    }""")
    result = optcc.optimize(ir.to_proto(model), level=1, verify=False)
    assert [n.op_type for n in result.model.graph.node] == ["Add"]


def test_suite_fuse_transpose_default():
    """onnx/optimizer's test_fuse_transpose_default: Identity, Transpose pair, Identity
    from input to output -> one Identity at -O2 (onnxoptimizer: 2)."""
    entry = {e.name: e for e in peer_suites.build_models()}.get("test_fuse_transpose_default")
    if entry is None:
        pytest.skip("onnx/optimizer's suite file is not cached")
    result = optcc.optimize(entry.model, level=2, verify=False)
    assert [n.op_type for n in result.model.graph.node] == ["Identity"]
    feeds = {"A": np.random.default_rng(4).standard_normal((2, 3, 4)).astype(np.float32)}
    assert_close(expected_outputs(result.model, feeds), expected_outputs(entry.model, feeds), EXACT_RTOL)
