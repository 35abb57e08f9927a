"""fold-constants computes ConstantOfShape without an onnxruntime session: the folded
initializer must hold the very bits onnxruntime's kernel writes (special values included),
and the cases outside the plain one (negative dims, a graph-input shape, a large fill) must
come out as before."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import optcc

SPECIAL = {
    np.float32: [0.0, -0.0, 1.0, -1.5, np.inf, -np.inf, np.nan, 1e-45, 3.4028235e38],
    np.float16: [0.0, -0.0, 65504.0, -np.inf, np.nan, 6e-8],
    np.float64: [-0.0, np.nan, 1e-310, -1.7976931348623157e308],
    np.int64: [0, -1, np.iinfo(np.int64).min, np.iinfo(np.int64).max],
    np.int32: [np.iinfo(np.int32).min, 7],
    np.int8: [-128, 127],
    np.uint8: [0, 255],
    np.bool_: [True, False],
}
CASES = [(dtype, value) for dtype, values in SPECIAL.items() for value in values]


def _kernel_output(shape: list[int], value: np.ndarray | None) -> np.ndarray:
    """onnxruntime's ConstantOfShape on a graph-input shape (nothing to fold)."""
    attributes = {} if value is None else {"value": numpy_helper.from_array(value, "value")}
    dtype = TensorProto.FLOAT if value is None else helper.np_dtype_to_tensor_dtype(value.dtype)
    graph = helper.make_graph([helper.make_node("ConstantOfShape", ["s"], ["y"], **attributes)], "k",
                              [helper.make_tensor_value_info("s", TensorProto.INT64, [len(shape)])],
                              [helper.make_tensor_value_info("y", dtype, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"s": np.array(shape, np.int64)})[0]


def _folded(shape: list[int], value: np.ndarray | None) -> onnx.ModelProto:
    attributes = {} if value is None else {"value": numpy_helper.from_array(value, "value")}
    dtype = TensorProto.FLOAT if value is None else helper.np_dtype_to_tensor_dtype(value.dtype)
    graph = helper.make_graph(
        [helper.make_node("ConstantOfShape", ["s"], ["c"], **attributes),
         helper.make_node("Identity", ["c"], ["y"])], "f",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", dtype, None)],
        initializer=[numpy_helper.from_array(np.array(shape, np.int64), "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return optcc.optimize(model, level=1, passes=["fold-constants"], verify=False).model


def _stored(model: onnx.ModelProto) -> np.ndarray:
    (node,) = model.graph.node  # the folded graph output is a Constant node
    assert node.op_type == "Constant"
    return numpy_helper.to_array(node.attribute[0].t)


@pytest.mark.parametrize(("dtype", "value"), CASES, ids=[f"{d.__name__}-{v}" for d, v in CASES])
def test_fill_is_the_kernels_bits(dtype, value) -> None:
    fill = np.array([value], dtype=dtype)
    for shape in ([2, 3], [], [0, 4]):
        expected = _kernel_output(shape, fill)
        got = _stored(_folded(shape, fill))
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert got.tobytes() == expected.tobytes()


def test_default_value_is_float32_zero() -> None:
    expected = _kernel_output([3, 1], None)
    got = _stored(_folded([3, 1], None))
    assert got.dtype == np.float32 and got.tobytes() == expected.tobytes()


def test_negative_dim_is_not_folded() -> None:
    model = _folded([2, -1], np.array([1.0], np.float32))
    assert [n.op_type for n in model.graph.node] == ["ConstantOfShape", "Identity"]


def test_large_fill_is_kept_as_a_node() -> None:
    # 4 MB of zeros from a 16-byte shape: over the default growth limit, not folded.
    model = _folded([1024, 1024], np.array([0.0], np.float32))
    assert [n.op_type for n in model.graph.node] == ["ConstantOfShape", "Identity"]
