"""fold_data_movement computes Reshape, Squeeze, Unsqueeze and exact Casts of constants
bit for bit as onnxruntime does, and declines (None) every case outside the plain ones:
errors and rounding casts are left to the kernel."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from optcc.passes.fold_data_movement import evaluate


def _node_model(op: str, arrays: list[np.ndarray | None], opset: int, attrs: dict) -> onnx.ModelProto:
    names = [f"i{k}" if a is not None else "" for k, a in enumerate(arrays)]
    node = helper.make_node(op, names, ["y"], **attrs)
    inits = [numpy_helper.from_array(a, n) for n, a in zip(names, arrays) if a is not None]
    graph = helper.make_graph([node], "g", [], [helper.make_empty_tensor_value_info("y")], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _ours(op: str, arrays: list[np.ndarray | None], opset: int, attrs: dict) -> np.ndarray | None:
    model = ir.from_proto(_node_model(op, arrays, opset, attrs))
    result = evaluate(next(iter(model.graph)), opset, arrays)
    return None if result is None else result[0]


def _ort(op: str, arrays: list[np.ndarray | None], opset: int, attrs: dict) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(_node_model(op, arrays, opset, attrs).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {})[0]


RNG = np.random.default_rng(0)
X = RNG.standard_normal((2, 1, 3, 1)).astype(np.float32)
I64 = lambda *v: np.array(v, np.int64)  # noqa: E731

PLAIN = [
    ("Reshape", [X, I64(3, 2)], 13, {}),
    ("Reshape", [X, I64(0, -1)], 13, {}),
    ("Reshape", [X, I64(-1)], 5, {}),
    ("Reshape", [X, I64(2, 0, 3)], 14, {"allowzero": 0}),
    ("Reshape", [np.zeros((0, 3), np.float32), I64(3, 0)], 14, {"allowzero": 1}),
    ("Reshape", [np.arange(6, dtype=np.int64), I64(1, 2, 3)], 17, {}),
    ("Squeeze", [X], 13, {}),
    ("Squeeze", [X, I64(-1)], 13, {}),
    ("Squeeze", [X], 11, {"axes": [1, 3]}),
    ("Unsqueeze", [X, I64(0, -1)], 13, {}),
    ("Unsqueeze", [X], 9, {"axes": [1, 2]}),
    ("Unsqueeze", [np.array(2.5, np.float32), I64(0)], 13, {}),
    ("Unsqueeze", [RNG.standard_normal(7).astype(np.float16)], 11, {"axes": [-1, 0]}),
    ("Cast", [np.array([1, -7, 1 << 24], np.int32)], 13, {"to": onnx.TensorProto.FLOAT}),
    ("Cast", [np.array([3, 200], np.uint8)], 13, {"to": onnx.TensorProto.INT64}),
    ("Cast", [np.array([-5, 1 << 40], np.int64)], 13, {"to": onnx.TensorProto.DOUBLE}),
]

DECLINED = [
    ("Reshape", [X, I64(4, -1)], 13, {}),  # does not fit
    ("Reshape", [X, I64(-1, -1)], 13, {}),
    ("Reshape", [X, I64(0, 0, 0, 0, 0)], 13, {}),  # copies a dimension the input lacks
    ("Squeeze", [X, I64(0)], 13, {}),  # dimension 0 is 2
    ("Unsqueeze", [X, I64(0, 0)], 13, {}),  # repeated axis
    ("Unsqueeze", [X, I64(9)], 13, {}),
    ("Cast", [np.array([(1 << 24) + 1], np.int32)], 13, {"to": onnx.TensorProto.FLOAT}),  # rounds
    ("Cast", [np.array([300], np.int32)], 13, {"to": onnx.TensorProto.UINT8}),  # narrows
    ("Cast", [np.array([1.5], np.float32)], 13, {"to": onnx.TensorProto.INT32}),  # float source
]


@pytest.mark.parametrize("case", PLAIN, ids=lambda c: f"{c[0]}-op{c[2]}")
def test_plain_cases_are_onnxruntimes_bits(case):
    op, arrays, opset, attrs = case
    ours = _ours(op, arrays, opset, attrs)
    assert ours is not None
    want = _ort(op, arrays, opset, attrs)
    assert ours.dtype == want.dtype and ours.shape == want.shape
    assert np.ascontiguousarray(ours).tobytes() == want.tobytes()


@pytest.mark.parametrize("case", DECLINED, ids=lambda c: f"{c[0]}-op{c[2]}")
def test_other_cases_are_left_to_the_kernel(case):
    op, arrays, opset, attrs = case
    assert _ours(op, arrays, opset, attrs) is None


def test_fold_constants_needs_no_session_for_them():
    """BatchNorm-style parameters made by ConstantOfShape and Unsqueezed, and a Cast index
    table Reshaped into a graph output, fold without an onnxruntime session; the folded
    model computes what onnx's reference evaluator computes on the original."""
    import onnx.reference
    from optcc.passes import FoldConstantsPass

    proto = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[1,4,2,2] x) => (float[1,4,2,2] y, float[3] z) {
        shape = Constant <value = int64[1] {4}> ()
        fill = ConstantOfShape <value = float[1] {0.5}> (shape)
        axes = Constant <value = int64[2] {1, 2}> ()
        scale = Unsqueeze (fill, axes)
        y = Mul (x, scale)
        idx = Constant <value = int32[3] {1, 2, 3}> ()
        flat = Cast <to = 1> (idx)
        shape3 = Constant <value = int64[1] {3}> ()
        z = Reshape (flat, shape3)
    }
    """)
    result = FoldConstantsPass(fold_large=True)(ir.from_proto(proto))
    assert result.modified and "sessions" not in result.stats
    # the graph output z is a folded Constant node (it keeps its name)
    assert sorted(n.op_type for n in result.model.graph) == ["Constant", "Mul"]
    x = RNG.standard_normal((1, 4, 2, 2)).astype(np.float32)
    want = onnx.reference.ReferenceEvaluator(proto).run(None, {"x": x})
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    got = ort.InferenceSession(ir.to_proto(result.model).SerializeToString(), options,
                               providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
