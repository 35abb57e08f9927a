"""Shapes, ranks and element types derived through producers, for cases of the peers' suites:

- ``eliminate-noops`` ``reshape``: an unannotated MatMul result has ``numpy.matmul``'s shape
  of its operands', and a Reshape result its constant target's (``0`` copies, ``-1`` inferred
  where every dim is static), so a Reshape to that shape is removed (onnxscript's
  ``_broadcast_to_matmul`` and ``_gemm_to_matmul_add`` tests);
- ``optcc.rewrite.static_rank``: a Gather result has the data's rank plus the indices' less
  one, Range and Shape results rank 1, an Expand result the larger of its input's rank and
  the target's length, so ``x * [1.0]`` goes and ``simplify-reshape-targets`` reads the
  shapes of such values (onnxscript's BART encoder);
- ``optcc.ir.element_type``: Shape, Size, ArgMax, ArgMin and NonZero give int64, so a Cast
  of a dim to int64 goes.

Each rewrite is judged against numpy (float64 where sums are involved) and onnxruntime on
the original bit for bit; the suite models are named regression tests (skipped when the
suite is not cached).
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest

import optcc
from fixtures import peer_suite_onnxscript
from reference import onnxruntime_outputs, random_feeds


def _parse(body: str, opset: int = 17) -> onnx.ModelProto:
    return onnx.parser.parse_model(f'<ir_version: 8, opset_import: ["" : {opset}]>\n' + body)


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _optimized(model: onnx.ModelProto, level: int = 1) -> onnx.ModelProto:
    optimized = optcc.optimize(model, level=level, verify=False).model
    onnx.checker.check_model(optimized, full_check=True)
    return optimized


def _bit_equal(model: onnx.ModelProto, optimized: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    got = onnxruntime_outputs(optimized, feeds)
    for want, out in zip(onnxruntime_outputs(model, feeds), got):
        assert want.dtype == out.dtype and want.shape == out.shape and want.tobytes() == out.tobytes()
    return got


MATMUL_CASES = [
    # (a's shape, b's shape, the result's shape)
    ([2, 3, 4], [4, 5], [2, 3, 5]),
    ([1, 3, 4], [2, 4, 5], [2, 3, 5]),  # batch dims broadcast
    ([4], [2, 4, 5], [2, 5]),  # a 1-D operand's unit axis is dropped
    ([3, 4], [4], [3]),
]


@pytest.mark.parametrize(("a", "b", "result"), MATMUL_CASES)
def test_reshape_of_matmul_to_its_own_shape_is_removed(a: list[int], b: list[int], result: list[int]) -> None:
    dims = lambda s: ", ".join(map(str, s))  # noqa: E731
    model = _parse(f"""
    g (float[{dims(a)}] a, float[{dims(b)}] b) => (float[{dims(result)}] y) <int64[{len(result)}] t = {{{dims(result)}}}> {{
        m = MatMul(a, b)
        r = Reshape(m, t)
        y = Relu(r)
    }}
    """)
    optimized = _optimized(model)
    assert _ops(optimized) == ["MatMul", "Relu"]
    feeds = random_feeds(model, seed=1)
    (got,) = _bit_equal(model, optimized, feeds)
    want = np.maximum(np.matmul(feeds["a"].astype(np.float64), feeds["b"].astype(np.float64)), 0)
    assert got.shape == want.shape and np.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_reshape_after_matmuls_of_a_value_by_itself_is_removed() -> None:
    # m_i = MatMul(m_(i-1), m_(i-1)): each value is read along two paths and derived once
    chain = "\n".join(f"m{i} = MatMul(m{i - 1}, m{i - 1})" for i in range(1, 9))
    model = _parse(f"""
    g (float[4, 4] m0) => (float[4, 4] y) <int64[2] t = {{4, 4}}> {{
        {chain}
        r = Reshape(m8, t)
        y = Tanh(r)
    }}
    """)
    optimized = _optimized(model)
    assert "Reshape" not in _ops(optimized)
    c, s = np.cos(0.01), np.sin(0.01)  # two plane rotations: the 256th power rotates by 2.56
    rotation = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, c, s], [0, 0, -s, c]])
    feeds = {"m0": rotation.astype(np.float32)}
    (got,) = _bit_equal(model, optimized, feeds)
    c, s = np.cos(2.56), np.sin(2.56)
    want = np.tanh(np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, c, s], [0, 0, -s, c]]))
    assert np.allclose(got, want, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(("a", "target"), [
    ("N, 3, 4", "2, 3, 5"),  # a symbolic batch dim may not be 2
    ("2, 3, 4", "3, 2, 5"),  # another shape with the same elements
    ("2, 3, 4", "2, 15"),  # another rank
])
def test_reshape_of_matmul_to_another_or_unprovable_shape_stays(a: str, target: str) -> None:
    model = _parse(f"""
    g (float[{a}] a, float[4, 5] b) => (float y) <int64[{len(target.split(','))}] t = {{{target}}}> {{
        m = MatMul(a, b)
        r = Reshape(m, t)
        y = ReduceSum<keepdims = 0>(r)
    }}
    """)
    optimized = _optimized(model)
    assert _ops(optimized) == ["MatMul", "Reshape", "ReduceSum"]
    feeds = random_feeds(model, {"a": [2, 3, 4]}, seed=2)
    _bit_equal(model, optimized, feeds)


@pytest.mark.parametrize(("x", "first", "second", "kept"), [
    ("2, 6", "-1, 3", "4, 3", False),  # -1 inferred from static dims: 12 / 3
    ("2, 6", "0, 2, 3", "2, 2, 3", False),  # 0 copies the static dim 2
    ("N, 6", "-1, 3", "-1, 3", False),  # the same target: -1 infers the same dim
    ("N, 6", "-1, 3", "4, 3", True),  # -1 over a symbolic dim is unknown
    ("N, 6", "0, 2, 3", "2, 2, 3", True),  # 0 copies a symbolic dim
])
def test_reshape_of_reshape_result_shape(x: str, first: str, second: str, kept: bool) -> None:
    n1, n2 = len(first.split(",")), len(second.split(","))
    model = _parse(f"""
    g (float[{x}] x) => (float y) <int64[{n1}] t1 = {{{first}}}, int64[{n2}] t2 = {{{second}}}> {{
        r1 = Reshape(x, t1)
        n = Neg(r1)
        r2 = Reshape(n, t2)
        y = ReduceSum<keepdims = 0>(r2)
    }}
    """)
    optimized = _optimized(model)
    assert _ops(optimized).count("Reshape") == (2 if kept else 1)
    feeds = random_feeds(model, {"x": [2, 6]}, seed=3)
    (got,) = _bit_equal(model, optimized, feeds)
    assert np.isclose(got, -feeds["x"].astype(np.float64).sum(), rtol=1e-5)


def test_mul_by_one_of_a_gather_result_is_removed_and_wider_ones_stay() -> None:
    # Gather of [10, 4] rows by [1, S] ids is [1, S, 4]: rank 3, so [1.0] keeps its shape and
    # [1, 1, 1, 1] (rank 4) does not.
    model = _parse("""
    g (int64[1, S] ids) => (float[1, S, 4] y, float[1, 1, S, 4] z)
      <float[10, 4] w = {0.5, 1.5, -2.0, 3.0, 0.5, 1.5, -2.0, 3.0, 0.5, 1.5, -2.0, 3.0, 0.5, 1.5, -2.0, 3.0,
                         0.5, 1.5, -2.0, 3.0, 0.5, 1.5, -2.0, 3.0, 0.5, 1.5, -2.0, 3.0, 0.5, 1.5, -2.0, 3.0,
                         0.5, 1.5, -2.0, 3.0, 0.25, 0.75, -1.0, 8.0},
       float[1] one = {1.0}, float[1, 1, 1, 1] wide = {1.0}> {
        e = Gather(w, ids)
        m = Mul(e, one)
        y = Relu(m)
        z = Mul(e, wide)
    }
    """)
    optimized = _optimized(model)
    assert sorted(_ops(optimized)) == ["Gather", "Mul", "Relu"]
    ids = np.array([[9, 0, 3]], np.int64)
    y, z = _bit_equal(model, optimized, {"ids": ids})
    table = onnx.numpy_helper.to_array(model.graph.initializer[0])
    assert np.array_equal(y, np.maximum(table[ids], 0)) and np.array_equal(z, table[ids][None])


@pytest.mark.parametrize(("op", "to", "kept"), [("Shape", "int64", False), ("Size", "int64", False),
                                                ("Shape", "int32", True)])
def test_cast_of_a_dim_to_int64_is_removed(op: str, to: str, kept: bool) -> None:
    code = {"int64": 7, "int32": 6}[to]
    pick = "d = Gather<axis = 0>(s, one)" if op == "Shape" else "d = Identity(s)"
    model = _parse(f"""
    g (float[2, N] x) => ({to} y) <int64 one = {{1}}> {{
        s = {op}(x)
        {pick}
        y = Cast<to = {code}>(d)
    }}
    """)
    optimized = _optimized(model)
    assert ("Cast" in _ops(optimized)) == kept
    x = np.zeros((2, 5), np.float32)
    (got,) = _bit_equal(model, optimized, {"x": x})
    assert got == (5 if op == "Shape" else 10)


def test_reshape_target_from_the_shape_of_a_gather_result_is_constant() -> None:
    # e = Gather(w, ids) is [1, S, 4] (rank 3 through the Gather) and its transposition
    # [1, 4, S] is reshaped to [4, S] with S read from e's shape: the target becomes [4, -1].
    model = _parse("""
    g (int64[1, S] ids) => (float[4, S] y) <float[6, 4] w = {1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0,
      11.0, 12.0, 13.0, 14.0, 15.0, 16.0, 17.0, 18.0, 19.0, 20.0, 21.0, 22.0, 23.0, 24.0},
      int64[1] four = {4}, int64 one = {1}, int64[1] zero = {0}> {
        e = Gather(w, ids)
        t = Transpose<perm = [0, 2, 1]>(e)
        s = Shape(e)
        d = Gather(s, one)
        u = Unsqueeze(d, zero)
        target = Concat<axis = 0>(four, u)
        y = Reshape(t, target)
    }
    """)
    optimized = _optimized(model)
    assert _ops(optimized) == ["Gather", "Transpose", "Reshape"]
    assert any(onnx.numpy_helper.to_array(t).tolist() == [4, -1] for t in optimized.graph.initializer)
    ids = np.array([[5, 0, 2]], np.int64)
    (got,) = _bit_equal(model, optimized, {"ids": ids})
    table = onnx.numpy_helper.to_array(model.graph.initializer[0])
    assert np.array_equal(got, table[ids[0]].T)


@functools.cache
def _suite() -> dict[str, onnx.ModelProto]:
    return dict(peer_suite_onnxscript.recorded())


def _suite_model(name: str) -> onnx.ModelProto:
    if name not in _suite():
        pytest.skip("onnxscript's suite is not cached (python -m fixtures.peer_suites --import-from)")
    return _suite()[name]


_MATMUL = "onnxscript/rewriter/rules/common/_broadcast_to_matmul_test.py::"
_FOLD = "onnxscript/optimizer/_constant_folding_test.py::FoldConstantsTest."
SUITE_CASES = {
    # Reshape -> MatMul -> Reshape to the MatMul's own (static) shape: the last Reshape goes
    f"{_MATMUL}TwoReshapesMatMulReshapeTest."
    "test_reshape_matmul_reshape_replace_when_inputs_are_broadcastable_with_one_in_dims": ["MatMul"],
    f"{_MATMUL}OneReshapeMatMulReshapeTest."
    "test_reshape_matmul_reshape_replace_when_nd_inputs_are_broadcastable": ["MatMul"],
    f"{_MATMUL}TwoReshapesMatMulReshapeTest."
    "test_reshape_matmul_reshape_does_not_replace_when_output_sizes_do_not_match_1": ["Reshape", "MatMul"],
    f"{_MATMUL}TwoReshapesMatMulReshapeTest."
    "test_reshape_matmul_reshape_remain_when_first_input_is_one_dimension_and_not_broadcastable":
        ["Reshape", "MatMul"],
    "onnxscript/rewriter/rules/common/_gemm_to_matmul_add_test.py::ReshapeGemmReshapeTest."
    "test_reshape_gemm_reshape_remain_when_inputs_are_two_dimension_and_not_broadcastable": ["Reshape", "Gemm"],
    # folded outputs declared with symbolic dims are stored as initializers (store-constant-outputs)
    f"{_FOLD}test_attribute_reference": [],
    f"{_FOLD}test_transpose_is_always_folded": [],
    "onnxscript/rewriter/ort_fusions/shape_optimization_test.py::ShapeOptimizationTest."
    "test_shape_optimization_5": [],
}


@pytest.mark.parametrize("name", sorted(SUITE_CASES))
def test_onnxscript_suite_case(name: str) -> None:
    model = _suite_model(name)
    optimized = _optimized(model, level=2)
    assert _ops(optimized) == SUITE_CASES[name]
    feeds = random_feeds(model, seed=4)
    if "test_shape_optimization_5" in name:  # x reshaped to [dim0, dim1, dim2, dim3]
        feeds.update(x=np.arange(6, dtype=np.float32), dim0=[1], dim1=[2], dim2=[3], dim3=[1])
        feeds.update({k: np.array(v, np.int64) for k, v in feeds.items() if k.startswith("dim")})
    want, got = onnxruntime_outputs(model, feeds), onnxruntime_outputs(optimized, feeds)
    for a, b in zip(want, got):
        assert a.dtype == b.dtype and a.shape == b.shape and np.allclose(a, b, rtol=1e-5, atol=1e-5)


BART = "onnxscript/rewriter/ort_fusions/skip_normalization_test.py::TestSkipNormalization.test_bart_encoder"


def test_onnxscript_bart_encoder_shape_subgraphs_fold() -> None:
    """The per-layer Shape -> Gather -> Unsqueeze -> Concat targets become [1, -1, 16], the
    embedding scale ``* [1.0]`` and the Cast of the sequence length to int64 go (82 nodes,
    onnxslim's count), and ten CastLikes of a constant to the type of a value whose element
    type is derived from its input's (a LayerNormalization's output) fold: 72 nodes."""
    model = _suite_model(BART)
    optimized = _optimized(model, level=2)
    ops = _ops(optimized)
    assert len(ops) == 72 and ops.count("Shape") == 1 and "Concat" not in ops and "Cast" not in ops
    assert ops.count("CastLike") == 2
    feeds = {"input_ids": np.random.default_rng(5).integers(0, 1024, (1, 7)).astype(np.int64)}
    (want,), (got,) = onnxruntime_outputs(model, feeds), onnxruntime_outputs(optimized, feeds)
    assert got.shape == want.shape and np.allclose(got, want, rtol=1e-4, atol=1e-5)
