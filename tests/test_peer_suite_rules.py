"""Rewrites added for cases of the peers' suites, each judged against numpy, with the
suite models they handle as named regression tests (skipped when the suite is not cached).

- ``eliminate-noops`` ``cast``: a Cast (or CastLike) of a ConstantOfShape output to the
  dtype ConstantOfShape gives it (its ``value`` tensor's, float32 without one) is removed,
  although the value carries no type annotation.
- ``eliminate-noops`` ``reshape``/``expand``/``mul``...: an unannotated Gemm output has the
  shape ``[M, N]`` its definition fixes, so a Reshape to that shape (and ``x*1`` after it)
  is removed.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import optcc
from fixtures import peer_suite_onnxscript, peer_suite_onnxslim


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


def _gemm_model(target: list[int], trans_b: int = 0, symbolic: bool = False) -> onnx.ModelProto:
    rows = "M" if symbolic else 3
    b_shape = [4, 5] if trans_b else [5, 4]
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["a", "b", "c"], ["g"], transB=trans_b),
         helper.make_node("Reshape", ["g", "t"], ["r"]),
         helper.make_node("Mul", ["r", "one"], ["y"])], "gemm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [rows, 5]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, b_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(np.array(target, np.int64), "t"),
                     numpy_helper.from_array(np.ones(1, np.float32), "one"),
                     numpy_helper.from_array(np.arange(4, dtype=np.float32), "c")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _gemm_check(model: onnx.ModelProto, rows: int, trans_b: int, target: list[int]) -> list[str]:
    optimized = optcc.optimize(model, level=1, verify=False).model
    rng = np.random.default_rng(0)
    a = rng.standard_normal((rows, 5)).astype(np.float32)
    b = rng.standard_normal((4, 5) if trans_b else (5, 4)).astype(np.float32)
    session = ort.InferenceSession(optimized.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"a": a, "b": b})
    expected = ((a.astype(np.float64) @ (b.T if trans_b else b).astype(np.float64)) + np.arange(4)).reshape(
        [rows if t == -1 else t for t in target])
    assert got.shape == expected.shape and np.allclose(got, expected, rtol=1e-5, atol=1e-5)
    return [n.op_type for n in optimized.graph.node]


@pytest.mark.parametrize("trans_b", [0, 1])
def test_reshape_of_gemm_to_its_own_shape_is_removed(trans_b: int) -> None:
    assert _gemm_check(_gemm_model([3, 4], trans_b), 3, trans_b, [3, 4]) == ["Gemm"]


def test_reshape_of_gemm_with_symbolic_rows_and_minus_one_is_removed() -> None:
    assert _gemm_check(_gemm_model([-1, 4], symbolic=True), 6, 0, [-1, 4]) == ["Gemm"]


def test_reshape_of_gemm_to_another_shape_stays() -> None:
    # (the Mul by [1.0] goes: the Reshape's constant target fixes its operand's rank at 2)
    assert _gemm_check(_gemm_model([4, 3]), 3, 0, [4, 3]) == ["Gemm", "Reshape"]


def test_reshape_of_gemm_with_symbolic_rows_to_a_static_shape_stays() -> None:
    # [M, 4] -> [3, 4] only holds when M is 3: not provable, kept.
    assert _gemm_check(_gemm_model([3, 4], symbolic=True), 3, 0, [3, 4]) == ["Gemm", "Reshape"]


def test_gemm_of_unknown_input_shape_keeps_the_reshape() -> None:
    model = _gemm_model([3, 4])
    model.graph.input[0].CopyFrom(helper.make_tensor_value_info("a", TensorProto.FLOAT, None))
    optimized = optcc.optimize(model, level=1, passes=["eliminate-noops"], verify=False).model
    assert [n.op_type for n in optimized.graph.node] == ["Gemm", "Reshape"]


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


SLIM = dict(peer_suite_onnxslim.recorded())
SLIM_CASES = {
    # Gemm -> Reshape to its own shape -> Mul by ones: the Gemm alone
    "test_fusion_patterns.py::TestFusionPatterns::test_gemm_mul_uses_schema_default_attributes": ["Gemm"],
}
SCRIPT_GEMM_CASES = {
    # Reshape(x) -> Gemm -> Reshape back, every shape static: the Gemm alone
    "onnxscript/rewriter/rules/common/_gemm_to_matmul_add_test.py::ReshapeGemmReshapeTest."
    "test_reshape_gemm_reshape_replaces_when_inputs_are_two_dimensional_and_broadcastable": ["Gemm"],
}


def _same_outputs(model: onnx.ModelProto, optimized: onnx.ModelProto) -> None:
    rng = np.random.default_rng(1)
    feeds = {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
             for i in model.graph.input}
    run = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
           for m in (model, optimized)]
    for a, b in zip(*run):
        assert a.shape == b.shape and np.allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not SLIM, reason="onnxslim's suite is not cached (python -m fixtures.peer_suites --import-from)")
@pytest.mark.parametrize("name", sorted(SLIM_CASES))
def test_onnxslim_suite_case(name: str) -> None:
    optimized = optcc.optimize(SLIM[name], level=2, verify=False).model
    assert [n.op_type for n in optimized.graph.node] == SLIM_CASES[name]
    _same_outputs(SLIM[name], optimized)


@pytest.mark.skipif(not SUITE, reason="onnxscript's suite is not cached (python -m fixtures.peer_suites --import-from)")
@pytest.mark.parametrize("name", sorted(SCRIPT_GEMM_CASES))
def test_onnxscript_suite_gemm_case(name: str) -> None:
    optimized = optcc.optimize(SUITE[name], level=2, verify=False).model
    assert [n.op_type for n in optimized.graph.node] == SCRIPT_GEMM_CASES[name]
    _same_outputs(SUITE[name], optimized)
