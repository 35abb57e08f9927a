"""FuseBatchNormPass: BatchNormalization folded into Conv (groups, depthwise),
ConvTranspose, Gemm (transB, alpha, beta) and 2-D MatMul; constant per-channel Mul/Add
after it folded into it; a weight shared by convolutions that all fold; standalone ones
kept (or turned into Mul+Add on request); left alone in training mode, with weights shared
otherwise, an intermediate graph output, unknown rank or a custom-domain producer."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import optcc
from optcc.infra.invariants import check_invariants, signature
from optcc.passes.fuse_batchnorm import FuseBatchNormPass
from fixtures import peer_suite_onnxscript
from reference import FUSION_RTOL, assert_close, expected_outputs_float64, onnxruntime_outputs

RNG_SEED = 0


def _bn_inits(rng: np.random.Generator, c: int, prefix: str = "") -> list[onnx.TensorProto]:
    arrays = {
        "scale": rng.normal(size=c),
        "beta": rng.normal(size=c),
        "mean": rng.normal(size=c),
        "var": rng.uniform(0.5, 2.0, size=c),
    }
    return [numpy_helper.from_array(a.astype(np.float32), prefix + k) for k, a in arrays.items()]


def _bn(inp: str, out: str, prefix: str = "", **attrs: object) -> onnx.NodeProto:
    names = [prefix + k for k in ("scale", "beta", "mean", "var")]
    return helper.make_node("BatchNormalization", [inp, *names], [out], epsilon=1e-3, **attrs)


def _tensor(rng: np.random.Generator, name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name)


def _model(nodes: list, inputs: list, outputs: list, inits: list, opset: int = 17) -> ir.Model:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto = onnx.shape_inference.infer_shapes(proto)
    return ir.from_proto(proto)


def _vi(name: str, shape: list | None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _feeds(model: ir.Model, shapes: dict[str, list[int]]) -> dict[str, np.ndarray]:
    """Standard-normal float32 feeds: ``shapes`` by name, else the input's static shape."""
    rng = np.random.default_rng(RNG_SEED)
    feeds = {}
    for v in model.graph.inputs:
        if v.name in model.graph.initializers:
            continue
        shape = shapes.get(v.name) or [int(d) for d in v.shape]
        feeds[v.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _check_numerics(original: ir.Model, fused: ir.Model, feeds: dict[str, np.ndarray],
                    reference: str = "float64") -> None:
    """The fused model on onnxruntime against the original in float64 by onnx's reference
    evaluator (``reference="onnxruntime"``: the float32 original on onnxruntime, for the
    legacy opsets the evaluator computes differently)."""
    if reference == "float64":
        want = expected_outputs_float64(original, feeds)
    else:
        want = onnxruntime_outputs(original, feeds)
    assert_close(onnxruntime_outputs(fused, feeds), want, FUSION_RTOL, what=f"fused vs original ({reference})")


def _fuse(model: ir.Model, split: bool = False, reference: str = "float64", **shapes: list[int]) -> optcc.PassResult:
    """Run the pass; check invariants, the checker, convergence, numerics and idempotence."""
    original = model.clone()
    result = FuseBatchNormPass(split_standalone=split)(model)
    assert check_invariants(result.model, signature(original)) == []
    onnx.checker.check_model(ir.to_proto(result.model), full_check=True)
    assert "capped" not in result.stats, result.stats
    _check_numerics(original, result.model, _feeds(original, shapes), reference)
    second = FuseBatchNormPass(split_standalone=split)(result.model)
    assert not second.modified, "second run must be a no-op"
    return result


def _ops(model: ir.Model) -> dict[str, int]:
    return optcc.ir.op_histogram(model)


@pytest.mark.parametrize("group,with_bias", [(1, True), (1, False), (2, True), (6, False)])
def test_conv_batchnorm_folds_into_conv(group: int, with_bias: bool) -> None:
    rng = np.random.default_rng(group)
    c = 6
    inits = [_tensor(rng, "w", c, 6 // group, 3, 3), *_bn_inits(rng, c)]
    conv_inputs = ["x", "w"]
    if with_bias:
        inits.append(_tensor(rng, "b", c))
        conv_inputs.append("b")
    nodes = [helper.make_node("Conv", conv_inputs, ["t"], pads=[1, 1, 1, 1], group=group),
             _bn("t", "y")]
    model = _model(nodes, [_vi("x", ["N", 6, 5, 5])], [_vi("y", ["N", c, 5, 5])], inits)
    result = _fuse(model, x=[2, 6, 5, 5])
    assert _ops(result.model) == {"Conv": 1}
    assert result.stats == {"applied": {"conv-batchnorm": 1}}
    conv = result.model.graph.outputs[0].producer()
    assert result.model.graph.outputs[0].name == "y" and conv.attributes["group"].as_int() == group
    assert str(result.model.graph.outputs[0].shape[0]) == "N"
    # Only the fused weight and bias remain.
    assert len(result.model.graph.initializers) == 2


@pytest.mark.parametrize("group", [1, 2])
def test_convtranspose_batchnorm_uses_the_cin_cout_layout(group: int) -> None:
    rng = np.random.default_rng(10 + group)
    cin, cout = 4, 6
    inits = [_tensor(rng, "w", cin, cout // group, 3, 3), _tensor(rng, "b", cout),
             *_bn_inits(rng, cout)]
    nodes = [helper.make_node("ConvTranspose", ["x", "w", "b"], ["t"], strides=[2, 2],
                              group=group),
             _bn("t", "y")]
    model = _model(nodes, [_vi("x", [1, cin, 4, 4])], [_vi("y", None)], inits)
    # onnx's reference evaluator cannot run a grouped ConvTranspose (it reshapes the weight
    # as if group were 1): grouped ones are judged against the original on onnxruntime.
    result = _fuse(model, reference="float64" if group == 1 else "onnxruntime")
    assert _ops(result.model) == {"ConvTranspose": 1}


@pytest.mark.parametrize("trans_b,alpha,beta,with_c", [(0, 1.0, 1.0, True), (1, 0.5, 2.0, True),
                                                        (1, 1.5, 1.0, False)])
def test_gemm_batchnorm(trans_b: int, alpha: float, beta: float, with_c: bool) -> None:
    rng = np.random.default_rng(20)
    k, n = 5, 4
    inits = [_tensor(rng, "w", *((n, k) if trans_b else (k, n))), *_bn_inits(rng, n)]
    inputs = ["a", "w"]
    if with_c:
        inits.append(_tensor(rng, "c", n))
        inputs.append("c")
    nodes = [helper.make_node("Gemm", inputs, ["t"], transB=trans_b, alpha=alpha, beta=beta),
             _bn("t", "y")]
    model = _model(nodes, [_vi("a", [3, k])], [_vi("y", [3, n])], inits)
    result = _fuse(model)
    assert _ops(result.model) == {"Gemm": 1}


def test_matmul_2d_batchnorm_becomes_gemm() -> None:
    rng = np.random.default_rng(30)
    inits = [_tensor(rng, "w", 5, 4), *_bn_inits(rng, 4)]
    nodes = [helper.make_node("MatMul", ["a", "w"], ["t"]), _bn("t", "y")]
    model = _model(nodes, [_vi("a", ["M", 5])], [_vi("y", ["M", 4])], inits)
    result = _fuse(model, a=[3, 5])
    assert _ops(result.model) == {"Gemm": 1}
    assert result.stats["applied"] == {"matmul-batchnorm": 1}


def test_matmul_3d_batchnorm_is_not_gemm() -> None:
    rng = np.random.default_rng(31)
    # BatchNormalization normalizes axis 1 (size 4 here), MatMul's output axis is the last.
    inits = [_tensor(rng, "w", 5, 3), *_bn_inits(rng, 4)]
    nodes = [helper.make_node("MatMul", ["a", "w"], ["t"]), _bn("t", "y")]
    model = _model(nodes, [_vi("a", [2, 4, 5])], [_vi("y", [2, 4, 3])], inits)
    result = _fuse(model)
    assert _ops(result.model) == {"BatchNormalization": 1, "MatMul": 1}
    assert result.stats["rejected"]["matmul-batchnorm"] == {
        "channel axis is not MatMul's output axis": 1
    }


@pytest.mark.parametrize("shape", [["N", 3, 4, 4], ["N", 3]])
def test_batchnorm_alone_becomes_mul_add_on_request(shape: list) -> None:
    rng = np.random.default_rng(40)
    model = _model([_bn("x", "y")], [_vi("x", shape)], [_vi("y", shape)], _bn_inits(rng, 3))
    kept = FuseBatchNormPass()(model.clone())
    assert not kept.modified and _ops(kept.model) == {"BatchNormalization": 1}
    result = _fuse(model, split=True, x=[2, *shape[1:]])
    assert _ops(result.model) == {"Add": 1, "Mul": 1}
    mul = next(n for n in result.model.graph if n.op_type == "Mul")
    assert optcc.ir.as_numpy(mul.inputs[1]).shape == (3,) + (1,) * (len(shape) - 2)
    assert result.model.graph.outputs[0].name == "y"


def test_weight_shared_by_convolutions_that_all_fold_is_folded() -> None:
    rng = np.random.default_rng(50)
    inits = [_tensor(rng, "w", 4, 3, 1, 1), *_bn_inits(rng, 4, "p"), *_bn_inits(rng, 4, "q")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["t1"]), _bn("t1", "y1", "p"),
             helper.make_node("Conv", ["x", "w"], ["t2"]), _bn("t2", "y2", "q")]
    model = _model(nodes, [_vi("x", [1, 3, 4, 4])], [_vi("y1", None), _vi("y2", None)], inits)
    result = _fuse(model)
    assert _ops(result.model) == {"Conv": 2}
    assert result.stats == {"applied": {"conv-batchnorm": 2}}
    assert "w" not in result.model.graph.initializers  # the shared original is gone


def test_weight_shared_with_a_convolution_that_does_not_fold_is_not_folded() -> None:
    rng = np.random.default_rng(51)
    inits = [_tensor(rng, "w", 4, 3, 1, 1), *_bn_inits(rng, 4, "p")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["t1"]), _bn("t1", "y1", "p"),
             helper.make_node("Conv", ["x", "w"], ["t2"]), helper.make_node("Relu", ["t2"], ["y2"])]
    model = _model(nodes, [_vi("x", [1, 3, 4, 4])], [_vi("y1", None), _vi("y2", None)], inits)
    result = FuseBatchNormPass()(model)
    assert not result.modified
    assert _ops(result.model) == {"BatchNormalization": 1, "Conv": 2, "Relu": 1}
    assert result.stats["rejected"]["conv-batchnorm"] == {"shared weight 'w'": 1}


def test_large_shared_weight_is_copied_only_when_the_copies_are_equal() -> None:
    rng = np.random.default_rng(52)
    # 300*300*3*1 float32 = 1.08 MB: two different folds would add a second copy > 1 MiB
    w = _tensor(rng, "w", 300, 300, 3, 1)
    nodes = [helper.make_node("Conv", ["x", "w"], ["t1"]), _bn("t1", "y1", "p"),
             helper.make_node("Conv", ["x", "w"], ["t2"]), _bn("t2", "y2", "q")]
    outputs = [_vi("y1", None), _vi("y2", None)]
    different = _model(nodes, [_vi("x", [1, 300, 3, 1])], outputs,
                       [w, *_bn_inits(rng, 300, "p"), *_bn_inits(rng, 300, "q")])
    result = FuseBatchNormPass()(different)
    assert not result.modified
    assert result.stats["rejected"]["conv-batchnorm"] == {
        "shared weight 'w' (copies would exceed 1 MiB)": 2}
    same = _bn_inits(rng, 300, "p")
    same += [numpy_helper.from_array(numpy_helper.to_array(t), "q" + t.name[1:]) for t in same]
    equal = _model(nodes, [_vi("x", [1, 300, 3, 1])], outputs, [w, *same])
    result = _fuse(equal)
    assert _ops(result.model) == {"Conv": 2}


def test_bias_shared_with_another_reader_is_copied_per_fused_conv() -> None:
    # b is read by both convolutions (each with its own weight) and by an Add: each fused
    # Conv gets its own bias, and b stays for the Add.
    rng = np.random.default_rng(53)
    inits = [_tensor(rng, "w1", 4, 3, 1, 1), _tensor(rng, "w2", 4, 3, 1, 1), _tensor(rng, "b", 4),
             *_bn_inits(rng, 4, "p"), *_bn_inits(rng, 4, "q")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b"], ["t1"]), _bn("t1", "y1", "p"),
             helper.make_node("Conv", ["x", "w2", "b"], ["t2"]), _bn("t2", "y2", "q"),
             helper.make_node("Add", ["b", "b"], ["y3"])]
    model = _model(nodes, [_vi("x", [1, 3, 4, 4])], [_vi("y1", None), _vi("y2", None), _vi("y3", None)], inits)
    result = _fuse(model)
    assert _ops(result.model) == {"Add": 1, "Conv": 2}
    assert result.stats == {"applied": {"conv-batchnorm": 2}}
    biases = [n.inputs[2] for n in result.model.graph if n.op_type == "Conv"]
    assert len({id(v) for v in biases}) == 2 and "b" in result.model.graph.initializers


def test_shared_weight_and_bias_with_equal_batchnorms() -> None:
    """onnxscript's FuseBatchnormTest.test_fuse_batchnorm_skips_shared_weight_initializers:
    W and B shared by two convolutions, each followed by BatchNormalization with the same
    parameters: both fold (5 nodes -> Conv, Conv, Add, as onnxsim and onnxslim)."""
    rng = np.random.default_rng(54)
    inits = [_tensor(rng, "W", 16, 32, 3, 3), _tensor(rng, "B", 16), *_bn_inits(rng, 16)]
    nodes = [helper.make_node("Conv", ["X1", "W", "B"], ["C1"]), _bn("C1", "BN1"),
             helper.make_node("Conv", ["X2", "W", "B"], ["C2"]), _bn("C2", "BN2"),
             helper.make_node("Add", ["BN1", "BN2"], ["Y"])]
    model = _model(nodes, [_vi("X1", ["N", 32, 14, 16]), _vi("X2", ["N", 32, 14, 16])], [_vi("Y", None)], inits)
    result = _fuse(model, X1=[2, 32, 14, 16], X2=[2, 32, 14, 16])
    assert _ops(result.model) == {"Add": 1, "Conv": 2}


def test_onnxscript_suite_model_shared_weight_and_bias_with_equal_batchnorms() -> None:
    """The recorded suite model itself, at -O2."""
    recorded = dict(peer_suite_onnxscript.recorded()).get(SHARED_SUITE_CASE)
    if recorded is None:
        pytest.skip("onnxscript's suite is not cached (python -m fixtures.peer_suites --import-from)")
    optimized = optcc.optimize(recorded, level=2, verify=False).model
    assert sorted(n.op_type for n in optimized.graph.node) == ["Add", "Conv", "Conv"]
    feeds = _feeds(ir.from_proto(recorded), {"X1": [2, 32, 14, 16], "X2": [2, 32, 14, 16]})
    assert_close(onnxruntime_outputs(optimized, feeds), expected_outputs_float64(recorded, feeds), FUSION_RTOL,
                 what="suite model -O2 vs float64")


SHARED_SUITE_CASE = ("onnxscript/rewriter/rules/common/_fuse_batchnorm_test.py::FuseBatchnormTest."
                     "test_fuse_batchnorm_skips_shared_weight_initializers")


def test_conv_output_that_is_a_graph_output_is_not_folded() -> None:
    rng = np.random.default_rng(60)
    inits = [_tensor(rng, "w", 4, 3, 1, 1), *_bn_inits(rng, 4)]
    nodes = [helper.make_node("Conv", ["x", "w"], ["t"]), _bn("t", "y")]
    model = _model(nodes, [_vi("x", [1, 3, 4, 4])], [_vi("y", None), _vi("t", None)], inits)
    result = FuseBatchNormPass()(model)
    assert not result.modified
    assert _ops(result.model) == {"BatchNormalization": 1, "Conv": 1}
    assert result.stats["rejected"]["conv-batchnorm"] == {"intermediate 't' is a graph output": 1}
    assert [v.name for v in result.model.graph.outputs] == ["y", "t"]


def test_training_mode_batchnorm_is_left_alone() -> None:
    rng = np.random.default_rng(70)
    inits = [_tensor(rng, "w", 4, 3, 1, 1), *_bn_inits(rng, 4)]
    nodes = [helper.make_node("Conv", ["x", "w"], ["t"]), _bn("t", "y", training_mode=1)]
    model = _model(nodes, [_vi("x", [1, 3, 4, 4])], [_vi("y", None)], inits, opset=15)
    result = FuseBatchNormPass()(model)
    assert not result.modified and _ops(result.model) == {"BatchNormalization": 1, "Conv": 1}
    assert result.stats["rejected"]["conv-batchnorm"] == {"training mode": 1}
    split = FuseBatchNormPass(split_standalone=True)(model)
    assert split.stats["rejected"]["batchnorm-to-mul-add"] == {"training mode": 1}


def test_unknown_rank_and_custom_producer_are_left_alone() -> None:
    rng = np.random.default_rng(80)
    inits = [_tensor(rng, "w", 4, 3, 1, 1), *_bn_inits(rng, 4)]
    nodes = [helper.make_node("Conv", ["x", "w"], ["t"], domain="custom"), _bn("t", "y")]
    graph = helper.make_graph(nodes, "g", [_vi("x", [1, 3, 4, 4])], [_vi("y", None)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("custom", 1)])
    model = ir.from_proto(proto)
    result = FuseBatchNormPass(split_standalone=True)(model)
    assert not result.modified
    assert _ops(result.model) == {"BatchNormalization": 1, "custom::Conv": 1}
    assert result.stats["rejected"] == {"batchnorm-to-mul-add": {"unknown input rank": 1}}


def test_batchnorm_inside_if_body() -> None:
    rng = np.random.default_rng(90)
    inits = [_tensor(rng, "w", 4, 3, 1, 1), *_bn_inits(rng, 4)]
    then_graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["t"]), _bn("t", "o1")], "then", [],
        [_vi("o1", [1, 4, 4, 4])])
    else_graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["o2"])], "else", [], [_vi("o2", [1, 4, 4, 4])])
    nodes = [helper.make_node("If", ["c"], ["y"], then_branch=then_graph, else_branch=else_graph)]
    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    model = _model(nodes, [_vi("x", [1, 3, 4, 4]), cond], [_vi("y", [1, 4, 4, 4])], inits)
    original = model.clone()
    result = FuseBatchNormPass(split_standalone=True)(model)
    # The weight is read by both branches (the else one does not fold): the
    # BatchNormalization becomes Mul+Add.
    assert result.stats["applied"] == {"batchnorm-to-mul-add": 1}
    assert _ops(result.model) == {"Add": 1, "Conv": 2, "If": 1, "Mul": 1}
    x = rng.normal(size=(1, 3, 4, 4)).astype(np.float32)
    for c in (True, False):
        _check_numerics(original, result.model, {"x": x, "c": np.array(c)})


def test_ir_version_3_initializers_are_constants_and_new_weights_are_constant_nodes() -> None:
    rng = np.random.default_rng(100)
    inits = [_tensor(rng, "w", 4, 3, 1, 1), *_bn_inits(rng, 4)]
    nodes = [helper.make_node("Conv", ["x", "w"], ["t"]), _bn("t", "y")]
    # Below IR version 4 every initializer is also a graph input (and not overridable).
    inputs = [_vi("x", [1, 3, 4, 4])] + [
        helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)) for t in inits
    ]
    graph = helper.make_graph(nodes, "g", inputs, [_vi("y", [1, 4, 4, 4])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=3)
    model = ir.from_proto(proto)
    input_names = [v.name for v in model.graph.inputs]
    original = model.clone()
    result = FuseBatchNormPass()(model)
    assert result.stats["applied"] == {"conv-batchnorm": 1}
    assert _ops(result.model) == {"Constant": 2, "Conv": 1}
    assert [v.name for v in result.model.graph.inputs] == input_names
    assert check_invariants(result.model, signature(original)) == []
    feeds = {"x": rng.normal(size=(1, 3, 4, 4)).astype(np.float32)}
    # BatchNormalization-9 is judged against onnxruntime: onnx's reference evaluator
    # computes the legacy versions differently.
    _check_numerics(original, result.model, feeds, reference="onnxruntime")


# ---------------------------------------------------------------- Mul / Add after BatchNormalization


def _raw_model(nodes: list, inputs: list, outputs: list, inits: list) -> ir.Model:
    """No shape inference: intermediate values carry no declared shape or rank."""
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _affine_nodes(src: str, c_shape: tuple[int, ...], rng: np.random.Generator) -> tuple[list, list]:
    nodes = [_bn(src, "b"), helper.make_node("Mul", ["s", "b"], ["m"]),
             helper.make_node("Add", ["m", "d"], ["y"])]
    inits = [*_bn_inits(rng, 4), _tensor(rng, "s", *c_shape), _tensor(rng, "d", *c_shape)]
    return nodes, inits


@pytest.mark.parametrize("c_shape", [(4, 1, 1), (1, 4, 1, 1), (1,), (1, 1, 1)])
def test_mul_add_after_batchnorm_fold_into_it_then_into_the_conv(c_shape: tuple) -> None:
    rng = np.random.default_rng(110)
    nodes, inits = _affine_nodes("t", c_shape, rng)
    nodes.insert(0, helper.make_node("Conv", ["x", "w"], ["t"], pads=[1, 1, 1, 1]))
    inits.append(_tensor(rng, "w", 4, 3, 3, 3))
    # rank of "t" comes from the Conv weight (no shape inference ran)
    model = _raw_model(nodes, [_vi("x", ["N", 3, 5, 5])], [_vi("y", ["N", 4, 5, 5])], inits)
    result = _fuse(model, x=[2, 3, 5, 5])
    assert _ops(result.model) == {"Conv": 1}
    assert result.stats["applied"] == {"batchnorm-add": 1, "batchnorm-mul": 1, "conv-batchnorm": 1}
    assert result.model.graph.outputs[0].name == "y"


def test_mul_add_after_batchnorm_after_concat_fold_into_the_batchnorm() -> None:
    rng = np.random.default_rng(111)
    nodes, inits = _affine_nodes("cat", (4, 1, 1), rng)
    nodes.insert(0, helper.make_node("Concat", ["x1", "x2"], ["cat"], axis=1))
    model = _raw_model(nodes, [_vi("x1", [1, 1, 3, 3]), _vi("x2", [1, 3, 3, 3])],
                       [_vi("y", [1, 4, 3, 3])], inits)
    result = _fuse(model)
    assert _ops(result.model) == {"BatchNormalization": 1, "Concat": 1}


def test_mul_that_is_not_per_channel_or_of_unknown_rank_is_left_alone() -> None:
    rng = np.random.default_rng(112)
    nodes, inits = _affine_nodes("x", (1, 1, 1, 4), rng)  # varies along the last axis
    model = _raw_model(nodes, [_vi("x", [1, 4, 3, 4])], [_vi("y", None)], inits)
    result = FuseBatchNormPass()(model)
    assert not result.modified
    assert result.stats["rejected"]["batchnorm-mul"] == {"constant is not per channel": 1}
    nodes, inits = _affine_nodes("x", (4, 1, 1), rng)
    unranked = helper.make_tensor_value_info("x", TensorProto.FLOAT, None)
    result = FuseBatchNormPass()(_raw_model(nodes, [unranked], [_vi("y", None)], inits))
    assert not result.modified
    assert result.stats["rejected"]["batchnorm-mul"] == {"unknown input rank": 1}


def test_batchnorm_output_read_elsewhere_keeps_its_mul() -> None:
    rng = np.random.default_rng(113)
    nodes, inits = _affine_nodes("x", (4, 1, 1), rng)
    model = _raw_model(nodes, [_vi("x", [1, 4, 3, 3])],
                       [_vi("y", [1, 4, 3, 3]), _vi("b", [1, 4, 3, 3])], inits)
    result = _fuse(model)
    assert _ops(result.model) == {"Add": 1, "BatchNormalization": 1, "Mul": 1}
    assert [v.name for v in result.model.graph.outputs] == ["y", "b"]


# ---------------------------------------------------------------- the reference is more precise


def test_fold_of_ill_conditioned_conv_is_judged_against_float64() -> None:
    """A Conv whose outputs sit near 1e5, re-centred by a BatchNormalization (var 4,
    epsilon 1e-2): the correct fold is closer to float64 than the float32 original is,
    and a fold that ignores epsilon (off by 0.12% of the scale) is caught."""
    rng = np.random.default_rng(120)
    c = 4
    w = rng.normal(size=(c, 3, 3, 3)).astype(np.float32)
    b = np.full(c, 1e5, np.float32)
    mean = (b + rng.normal(size=c)).astype(np.float32)
    var = np.full(c, 4.0, np.float32)
    scale, beta = np.ones(c, np.float32), rng.normal(size=c).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in
             [(w, "w"), (b, "b"), (scale, "scale"), (beta, "beta"), (mean, "mean"), (var, "var")]]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["t"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["t", "scale", "beta", "mean", "var"], ["y"],
                              epsilon=1e-2)]
    model = _model(nodes, [_vi("x", [1, 3, 6, 6])], [_vi("y", [1, c, 6, 6])], inits)
    original = model.clone()
    result = _fuse(model)  # the correct fold, judged against float64
    assert _ops(result.model) == {"Conv": 1}

    def folded(epsilon: float) -> ir.Model:
        k = scale.astype(np.float64) / np.sqrt(var.astype(np.float64) + epsilon)
        fw = (w * k[:, None, None, None]).astype(np.float32)
        fb = ((b - mean.astype(np.float64)) * k + beta).astype(np.float32)
        conv = helper.make_node("Conv", ["x", "fw", "fb"], ["y"], pads=[1, 1, 1, 1])
        return _model([conv], [_vi("x", [1, 3, 6, 6])], [_vi("y", [1, c, 6, 6])],
                      [numpy_helper.from_array(fw, "fw"), numpy_helper.from_array(fb, "fb")])

    feeds = _feeds(original, {})
    _check_numerics(original, folded(1e-2), feeds)
    with pytest.raises(AssertionError, match="elements off by more than"):
        _check_numerics(original, folded(0.0), feeds)
