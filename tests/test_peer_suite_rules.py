"""Rewrites added for cases of the peers' suites, each judged against numpy, with the
suite models they handle as named regression tests (skipped when the suite is not cached).

- ``eliminate-noops`` ``cast``: a Cast (or CastLike) of a ConstantOfShape output to the
  dtype ConstantOfShape gives it (its ``value`` tensor's, float32 without one) is removed,
  although the value carries no type annotation.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import optcc
from fixtures import peer_suite_onnxscript


def _model(nodes, outputs, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("s", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info(name, dtype, None) for name, dtype in outputs])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _run(model: onnx.ModelProto, shape) -> list[np.ndarray]:
    """Outputs with the one int64 shape input (whatever its name) set to ``shape``."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    return session.run(None, {name: np.array(shape, dtype=np.int64)})


def _fill(value: float, dtype: int) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array([value], dtype=helper.tensor_dtype_to_np_dtype(dtype)), "value")


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT64, TensorProto.BOOL])
def test_cast_of_constant_of_shape_to_its_own_dtype_is_removed(dtype: int) -> None:
    # The shape is a graph input: the fill is dynamic and is not folded.
    model = _model([helper.make_node("ConstantOfShape", ["s"], ["c"], value=_fill(1, dtype)),
                    helper.make_node("Cast", ["c"], ["y"], to=dtype)], [("y", dtype)])
    optimized = optcc.optimize(model, level=1, verify=False).model
    assert [n.op_type for n in optimized.graph.node] == ["ConstantOfShape"]
    assert [o.name for o in optimized.graph.output] == ["y"]  # the graph output keeps its name
    (got,) = _run(optimized, [3, 4])
    expected = np.ones((3, 4), dtype=helper.tensor_dtype_to_np_dtype(dtype))
    assert got.dtype == expected.dtype and np.array_equal(got, expected)


def test_default_value_is_float32_and_castlike_uses_it() -> None:
    like = helper.make_node("ConstantOfShape", ["s"], ["f"])  # float32 zeros: no value attribute
    model = _model([helper.make_node("ConstantOfShape", ["s"], ["c"]), like,
                    helper.make_node("CastLike", ["c", "f"], ["y"]),
                    helper.make_node("Add", ["y", "f"], ["z"])], [("z", TensorProto.FLOAT)])
    optimized = optcc.optimize(model, level=1, verify=False).model
    assert "CastLike" not in [n.op_type for n in optimized.graph.node]
    (got,) = _run(optimized, [2, 5])
    assert got.dtype == np.float32 and np.array_equal(got, np.zeros((2, 5), np.float32))


def test_cast_to_another_dtype_and_shared_fill_stay_correct() -> None:
    # A real conversion (float32 -> float16) stays; the fill is also read by an Add.
    model = _model([helper.make_node("ConstantOfShape", ["s"], ["c"], value=_fill(0.1, TensorProto.FLOAT)),
                    helper.make_node("Cast", ["c"], ["half"], to=TensorProto.FLOAT16),
                    helper.make_node("Cast", ["c"], ["same"], to=TensorProto.FLOAT),
                    helper.make_node("Add", ["c", "c"], ["twice"])],
                   [("half", TensorProto.FLOAT16), ("same", TensorProto.FLOAT), ("twice", TensorProto.FLOAT)])
    optimized = optcc.optimize(model, level=1, verify=False).model
    assert [n.op_type for n in optimized.graph.node].count("Cast") == 1
    half, same, twice = _run(optimized, [2, 3])
    fill = np.full((2, 3), 0.1, np.float32)
    assert half.dtype == np.float16 and np.array_equal(half, fill.astype(np.float16))
    assert same.dtype == np.float32 and np.array_equal(same, fill)
    assert np.array_equal(twice, fill + fill)


def test_graph_output_fill_keeps_the_cast() -> None:
    # The fill is a graph output itself: the Cast's output cannot take over its name.
    model = _model([helper.make_node("ConstantOfShape", ["s"], ["c"], value=_fill(2, TensorProto.FLOAT)),
                    helper.make_node("Cast", ["c"], ["y"], to=TensorProto.FLOAT)],
                   [("c", TensorProto.FLOAT), ("y", TensorProto.FLOAT)])
    optimized = optcc.optimize(model, level=1, verify=False).model
    assert [o.name for o in optimized.graph.output] == ["c", "y"]
    c, y = _run(optimized, [1, 2])
    assert np.array_equal(c, np.full((1, 2), 2, np.float32)) and np.array_equal(y, c)


def test_custom_domain_producer_is_left_alone() -> None:
    # A ConstantOfShape of another domain says nothing about the dtype: the Cast stays.
    node = helper.make_node("ConstantOfShape", ["s"], ["c"], domain="custom.domain", value=_fill(1, TensorProto.FLOAT))
    model = _model([node, helper.make_node("Cast", ["c"], ["y"], to=TensorProto.FLOAT)], [("y", TensorProto.FLOAT)])
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT, ["d0", "d1"]))
    model.opset_import.append(helper.make_opsetid("custom.domain", 1))
    optimized = optcc.optimize(model, level=1, passes=["eliminate-noops"], verify=False).model
    assert [n.op_type for n in optimized.graph.node] == ["ConstantOfShape", "Cast"]


SUITE = dict(peer_suite_onnxscript.recorded())
SUITE_CASES = {
    # onnxscript's cast_constant_of_shape rule: Cast to the fill's own dtype
    "onnxscript/rewriter/rules/common/_cast_constant_of_shape_extended_test.py::"
    "CastConstantOfShapeExtendedTest.test_same_dtype_cast_still_fuses": ["ConstantOfShape"],
    # one no-op Cast removed, the float16 conversion kept (CSE merges the two fills)
    "onnxscript/rewriter/pattern_test.py::RewriteRuleTest."
    "test_delayed_run_provides_correct_bindings_for_multiple_matches": ["ConstantOfShape", "Cast"],
}


@pytest.mark.skipif(not SUITE, reason="onnxscript's suite is not cached (python -m fixtures.peer_suites --import-from)")
@pytest.mark.parametrize("name", sorted(SUITE_CASES))
def test_onnxscript_suite_case(name: str) -> None:
    model = SUITE[name]
    optimized = optcc.optimize(model, level=2, verify=False).model
    assert [n.op_type for n in optimized.graph.node] == SUITE_CASES[name]
    for original, got in zip(_run(model, [1, 4]), _run(optimized, [1, 4])):
        assert original.dtype == got.dtype and np.array_equal(original, got)
