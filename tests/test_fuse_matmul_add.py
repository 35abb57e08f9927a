"""FuseMatMulAddPass: 2-D MatMul + bias Add becomes Gemm; batched or unknown-rank MatMul,
non-constant weights, biases Gemm cannot take, shared or exposed MatMul results stay."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper

import optcc
from optcc.infra.invariants import check_invariants, signature
from optcc.passes.fuse_matmul_add import FuseMatMulAddPass
from reference import FUSION_RTOL, assert_close, expected_outputs_float64, onnxruntime_outputs, random_feeds


def _model(body: str, inits: dict[str, np.ndarray], opset: int = 17) -> ir.Model:
    proto = onnx.parser.parse_model(f'<ir_version: 9, opset_import: ["" : {opset}]>\n' + body)
    for name, array in inits.items():
        proto.graph.initializer.append(numpy_helper.from_array(array, name))
    proto = onnx.shape_inference.infer_shapes(proto)
    return ir.from_proto(proto)


def _rand(seed: int, *shape: int, dtype: type = np.float32) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


def _fuse(model: ir.Model, **shapes: list[int]) -> optcc.PassResult:
    original = model.clone()
    result = FuseMatMulAddPass()(model)
    assert check_invariants(result.model, signature(original)) == []
    onnx.checker.check_model(ir.to_proto(result.model), full_check=True)
    # The fused model on onnxruntime against the original in float64 (onnx's evaluator).
    feeds = random_feeds(original, shapes)
    assert_close(onnxruntime_outputs(result.model, feeds), expected_outputs_float64(original, feeds),
                 FUSION_RTOL, what="fused vs original in float64")
    assert not FuseMatMulAddPass()(result.model).modified, "second run must be a no-op"
    return result


def _ops(model: ir.Model) -> dict[str, int]:
    return optcc.ir.op_histogram(model)


@pytest.mark.parametrize("bias_shape", [(4,), (1, 4), (3, 4), (3, 1), (), (1,)])
@pytest.mark.parametrize("order", ["Add(t, c)", "Add(c, t)"])
def test_matmul_add_becomes_gemm(bias_shape: tuple[int, ...], order: str) -> None:
    body = f"g (float[3, 5] a) => (float[3, 4] y) {{ t = MatMul(a, w) y = {order} }}"
    model = _model(body, {"w": _rand(1, 5, 4), "c": _rand(2, *bias_shape)})
    result = _fuse(model)
    assert _ops(result.model) == {"Gemm": 1}
    assert result.stats == {"applied": {"matmul-add": 1}}
    assert result.model.graph.outputs[0].name == "y"


def test_symbolic_rows_and_a_bias_that_is_a_graph_input() -> None:
    body = "g (float[M, 5] a, float[4] c) => (float[M, 4] y) { t = MatMul(a, w) y = Add(t, c) }"
    result = _fuse(_model(body, {"w": _rand(1, 5, 4)}), a=[7, 5])
    assert _ops(result.model) == {"Gemm": 1}
    assert str(result.model.graph.outputs[0].shape[0]) == "M"


def test_batched_matmul_is_not_gemm() -> None:
    body = "g (float[2, 3, 5] a) => (float[2, 3, 4] y) { t = MatMul(a, w) y = Add(t, c) }"
    result = _fuse(_model(body, {"w": _rand(1, 5, 4), "c": _rand(2, 4)}))
    assert not result.modified and _ops(result.model) == {"Add": 1, "MatMul": 1}
    assert result.stats["rejected"]["matmul-add"] == {"batched MatMul (input rank is not 2)": 1}


def test_unknown_rank_input_is_left_alone() -> None:
    proto = onnx.parser.parse_model(
        '<ir_version: 9, opset_import: ["" : 17]>\n'
        "g (float a) => (float y) { t = MatMul(a, w) y = Add(t, c) }"
    )
    for value in (*proto.graph.input, *proto.graph.output):
        value.type.tensor_type.ClearField("shape")
    proto.graph.initializer.extend(
        [numpy_helper.from_array(_rand(1, 5, 4), "w"), numpy_helper.from_array(_rand(2, 4), "c")]
    )
    model = ir.from_proto(proto)
    result = FuseMatMulAddPass()(model)
    assert not result.modified and _ops(result.model) == {"Add": 1, "MatMul": 1}
    assert result.stats["rejected"]["matmul-add"] == {"unknown input rank": 1}


def test_runtime_weight_with_static_dims_becomes_gemm_and_unknown_dims_stay() -> None:
    """Regression for onnx/optimizer's test_fuse_matmul_add_bias_into_gemm: B and C are
    graph inputs of static shape; Gemm takes a runtime B as well."""
    from onnx.reference import ReferenceEvaluator

    body = "g (float[3, 5] a, float[5, 4] w, float[4] c) => (float[3, 4] y) { t = MatMul(a, w) y = Add(t, c) }"
    result = _fuse(_model(body, {}))
    assert result.stats["applied"] == {"matmul-add": 1} and _ops(result.model) == {"Gemm": 1}
    feeds = {"a": _rand(1, 3, 5), "w": _rand(2, 5, 4), "c": _rand(3, 4)}
    want = feeds["a"].astype(np.float64) @ feeds["w"].astype(np.float64) + feeds["c"]
    got = ReferenceEvaluator(ir.to_proto(result.model)).run(None, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    unknown = "g (float[3, 5] a, float[5, K] w) => (float[3, K] y) { t = MatMul(a, w) y = Add(t, c) }"
    result = _fuse(_model(unknown, {"c": _rand(2, 1)}))
    assert not result.modified and result.stats["rejected"] == {"matmul-add": {"weight dims unknown": 1}}


@pytest.mark.parametrize("bias_shape", [(2, 3, 4), (6, 4), (1, 1, 4)])
def test_bias_gemm_cannot_take_is_left_alone(bias_shape: tuple[int, ...]) -> None:
    body = "g (float[1, 5] a) => (float y) { t = MatMul(a, w) y = Add(t, c) }"
    proto = onnx.parser.parse_model('<ir_version: 9, opset_import: ["" : 17]>\n' + body)
    proto.graph.output[0].type.tensor_type.ClearField("shape")
    proto.graph.initializer.extend(
        [numpy_helper.from_array(_rand(1, 5, 4), "w"),
         numpy_helper.from_array(_rand(2, *bias_shape), "c")]
    )
    model = ir.from_proto(onnx.shape_inference.infer_shapes(proto))
    result = _fuse(model)
    assert not result.modified and _ops(result.model) == {"Add": 1, "MatMul": 1}
    assert result.stats["rejected"]["matmul-add"] == {"bias does not broadcast to [M, N]": 1}


def test_shared_or_exposed_matmul_result_is_left_alone() -> None:
    shared = "g (float[3, 5] a) => (float[3, 4] y, float[3, 4] z) { t = MatMul(a, w) y = Add(t, c) z = Relu(t) }"
    exposed = "g (float[3, 5] a) => (float[3, 4] y, float[3, 4] t) { t = MatMul(a, w) y = Add(t, c) }"
    for body in (shared, exposed):
        result = _fuse(_model(body, {"w": _rand(1, 5, 4), "c": _rand(2, 4)}))
        assert not result.modified and _ops(result.model)["MatMul"] == 1


def test_integer_matmul_is_left_alone() -> None:
    body = "g (int32[3, 5] a) => (int32[3, 4] y) { t = MatMul(a, w) y = Add(t, c) }"
    inits = {"w": np.arange(20, dtype=np.int32).reshape(5, 4), "c": np.arange(4, dtype=np.int32)}
    result = _fuse(_model(body, inits))
    assert not result.modified
    assert result.stats["rejected"]["matmul-add"] == {"dtype without a Gemm kernel": 1}


def test_rank_two_input_found_without_declared_shapes() -> None:
    # Flatten's output is 2-D whatever its input: no shape inference needed
    proto = onnx.parser.parse_model("""<ir_version: 9, opset_import: ["" : 17]>
    g (float[N, 2, 3] x) => (float[N, 4] y) { f = Flatten(x) t = MatMul(f, w) y = Add(t, c) }""")
    proto.graph.initializer.extend([numpy_helper.from_array(_rand(1, 6, 4), "w"),
                                    numpy_helper.from_array(_rand(2, 4), "c")])
    model = ir.from_proto(proto)
    assert all(v.shape is None for node in model.graph for v in node.outputs if v.name != "y")
    result = _fuse(model, x=[3, 2, 3])
    assert _ops(result.model) == {"Flatten": 1, "Gemm": 1}
