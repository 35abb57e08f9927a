"""FuseOrtConvActivationPass: Conv + Relu/Sigmoid/Tanh/LeakyRelu/HardSigmoid/Clip (and a
same-shape residual Add) into com.microsoft.FusedConv, checked against onnxruntime with
its graph optimizations disabled; left alone when the Conv output is shared or a graph
output, Clip bounds are not constant, the Conv is not float32 or not ai.onnx, or the
residual's shape is not known to match."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import optcc
from optcc.infra.invariants import check_invariants, signature
from optcc.passes.fuse_ort_conv_activation import FuseOrtConvActivationPass
from reference import (
    FUSION_RTOL,
    assert_close,
    assert_converged,
    expected_outputs_float64,
    onnxruntime_outputs,
)

MS = "com.microsoft"
SEED = 0
# Conv attributes that must survive the fusion unchanged.
CONV_ATTRS = dict(pads=[1, 0, 1, 2], strides=[1, 2], dilations=[2, 1], group=2, kernel_shape=[3, 3])


def _w(rng: np.random.Generator, name: str, *shape: int, dtype: type = np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(rng.normal(size=shape).astype(dtype), name)


def _vi(name: str, shape: list | None, elem: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _model(nodes: list, inputs: list, outputs: list, inits: list, opset: int = 17,
           infer: bool = True, functions: list | None = None,
           extra_opsets: list | None = None) -> ir.Model:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", opset), *(extra_opsets or [])]
    proto = helper.make_model(graph, opset_imports=opsets, functions=functions or [])
    proto.ir_version = 8
    if infer:
        proto = onnx.shape_inference.infer_shapes(proto)
    return ir.from_proto(proto)


def _ops(model: ir.Model) -> dict[str, int]:
    return optcc.ir.op_histogram(model)


def _feeds(model: ir.Model, shapes: dict[str, list[int]]) -> dict[str, np.ndarray]:
    """Random feeds: ``shapes`` by name, else the input's static shape; standard normal
    for float inputs, a coin for bool ones."""
    rng = np.random.default_rng(SEED)
    feeds = {}
    for v in model.graph.inputs:
        if v.name in model.graph.initializers:
            continue
        shape = shapes.get(v.name) or [int(d) for d in v.shape]
        if v.dtype == ir.DataType.BOOL:
            feeds[v.name] = np.array(rng.random(shape) < 0.5)
        else:
            feeds[v.name] = rng.standard_normal(shape).astype(v.dtype.numpy())
    return feeds


def _check_numerics(original: ir.Model, fused: ir.Model, feeds: dict[str, np.ndarray]) -> None:
    """The fused model on onnxruntime (graph optimizations off) against the original in
    float64 by onnx's reference evaluator, within the fusion tolerance."""
    assert_close(onnxruntime_outputs(fused, feeds), expected_outputs_float64(original, feeds), FUSION_RTOL,
                 what="fused vs original (float64)")


def _fuse(model: ir.Model, **shapes: list[int]) -> optcc.PassResult:
    """Run the pass; check invariants, convergence, numerics against float64 and that a
    second run changes nothing."""
    original = model.clone()
    result = FuseOrtConvActivationPass()(model)
    assert check_invariants(result.model, signature(original)) == []
    assert "capped" not in result.stats, result.stats
    _check_numerics(original, result.model, _feeds(original, shapes))
    assert not FuseOrtConvActivationPass()(result.model).modified, "second run must be a no-op"
    return result


def _fused_nodes(model: ir.Model) -> list[ir.Node]:
    return [n for n in optcc.ir.nodes(model) if n.domain == MS and n.op_type == "FusedConv"]


def _attr(node: ir.Node, name: str) -> object:
    attr = node.attributes.get(name)
    if attr is None:
        return None
    return list(attr.value) if isinstance(attr.value, (tuple, list)) else attr.value


# ---------------------------------------------------------------- one Conv + one activation

ACTIVATION_CASES = [
    ("Relu", {}, [], None),
    ("Sigmoid", {}, [], None),
    ("Tanh", {}, [], None),
    ("LeakyRelu", {"alpha": 0.2}, [], [0.2]),
    ("LeakyRelu", {}, [], [0.01]),
    ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}, [], [0.3, 0.4]),
    ("HardSigmoid", {}, [], [0.2, 0.5]),
    ("Clip", {}, ["lo", "hi"], [-0.5, 1.5]),
    ("Clip", {}, ["lo"], [-0.5, float(np.finfo(np.float32).max)]),
    ("Clip", {}, ["", "hi"], [float(np.finfo(np.float32).min), 1.5]),
]


@pytest.mark.parametrize("op_type,attrs,clip_inputs,params", ACTIVATION_CASES)
def test_conv_activation_becomes_fused_conv(op_type: str, attrs: dict, clip_inputs: list,
                                             params: list | None) -> None:
    rng = np.random.default_rng(1)
    bounds = {"lo": -0.5, "hi": 1.5}
    inits = [_w(rng, "w", 4, 2, 3, 3), _w(rng, "b", 4)]
    inits += [numpy_helper.from_array(np.array(bounds[n], np.float32), n) for n in clip_inputs if n]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["t"], name="conv", **CONV_ATTRS),
             helper.make_node(op_type, ["t", *clip_inputs], ["y"], name="act", **attrs)]
    model = _model(nodes, [_vi("x", ["N", 4, 9, 8])], [_vi("y", None)], inits)
    result = _fuse(model, x=[2, 4, 9, 8])

    assert result.modified
    assert _ops(result.model) == {f"{MS}::FusedConv": 1}
    (node,) = _fused_nodes(result.model)
    assert _attr(node, "activation") == op_type
    if params is None:
        assert "activation_params" not in node.attributes
    else:
        assert _attr(node, "activation_params") == pytest.approx(params)
    for key, value in CONV_ATTRS.items():
        assert _attr(node, key) == value, key
    assert [v.name for v in node.inputs] == ["x", "w", "b"]
    assert node.outputs[0].name == "y" and result.model.graph.outputs[0].name == "y"
    assert result.model.opset_imports[MS] == 1
    assert result.stats["applied"] == {f"conv-{op_type.lower()}": 1}
    # Clip bounds no longer read by anything are dropped; the weights stay.
    assert set(result.model.graph.initializers) == {"w", "b"}
    assert result.stats.get("constants_dropped", 0) == len([n for n in clip_inputs if n])


def test_clip_attribute_form_before_opset_11() -> None:
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Conv", ["x", "w"], ["t"], pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["t"], ["y"], min=0.0, max=6.0)]
    model = _model(nodes, [_vi("x", [1, 3, 6, 6])], [_vi("y", [1, 5, 6, 6])],
                   [_w(rng, "w", 5, 3, 3, 3)], opset=10)
    result = _fuse(model)
    (node,) = _fused_nodes(result.model)
    assert _attr(node, "activation") == "Clip"
    assert _attr(node, "activation_params") == pytest.approx([0.0, 6.0])
    assert [v.name for v in node.inputs] == ["x", "w"]


def test_conv1d_with_dynamic_weight_and_auto_pad() -> None:
    nodes = [helper.make_node("Conv", ["x", "w"], ["t"], auto_pad="SAME_UPPER"),
             helper.make_node("Relu", ["t"], ["y"])]
    model = _model(nodes, [_vi("x", [2, 3, 10]), _vi("w", [4, 3, 3])], [_vi("y", None)], [])
    result = _fuse(model)
    (node,) = _fused_nodes(result.model)
    assert _attr(node, "auto_pad") == "SAME_UPPER"
    assert [v.name for v in node.inputs] == ["x", "w"]


def test_existing_microsoft_import_is_kept() -> None:
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Conv", ["x", "w"], ["t"]), helper.make_node("Relu", ["t"], ["y"])]
    model = _model(nodes, [_vi("x", [1, 2, 5, 5])], [_vi("y", None)], [_w(rng, "w", 3, 2, 1, 1)],
                   extra_opsets=[helper.make_opsetid(MS, 1)])
    result = _fuse(model)
    assert result.model.opset_imports[MS] == 1
    assert "opset_import_added" not in result.stats


# ---------------------------------------------------------------- residual Add into Z


@pytest.mark.parametrize("conv_first", [True, False])
def test_residual_add_relu_becomes_fused_conv_with_z(conv_first: bool) -> None:
    rng = np.random.default_rng(4)
    add_inputs = ["t", "skip"] if conv_first else ["skip", "t"]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["t"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", add_inputs, ["s"]),
             helper.make_node("Relu", ["s"], ["y"])]
    model = _model(nodes, [_vi("x", ["N", 3, 6, 6]), _vi("skip", ["N", 4, 6, 6])], [_vi("y", None)],
                   [_w(rng, "w", 4, 3, 3, 3), _w(rng, "b", 4)])
    result = _fuse(model, x=[2, 3, 6, 6], skip=[2, 4, 6, 6])
    assert _ops(result.model) == {f"{MS}::FusedConv": 1}
    (node,) = _fused_nodes(result.model)
    assert [v.name if v is not None else "" for v in node.inputs] == ["x", "w", "b", "skip"]
    assert _attr(node, "activation") == "Relu"
    assert result.stats["applied"] == {"conv-add-relu": 1}


def test_residual_add_without_bias_or_activation() -> None:
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Conv", ["x", "w"], ["t"]),
             helper.make_node("Add", ["t", "skip"], ["y"])]
    model = _model(nodes, [_vi("x", [1, 3, 4, 4]), _vi("skip", [1, 3, 4, 4])], [_vi("y", None)],
                   [_w(rng, "w", 3, 3, 1, 1)])
    result = _fuse(model)
    (node,) = _fused_nodes(result.model)
    assert [v.name if v is not None else "" for v in node.inputs] == ["x", "w", "", "skip"]
    assert "activation" not in node.attributes
    assert result.stats["applied"] == {"conv-add": 1}


def test_broadcast_residual_is_not_fused_into_z() -> None:
    """FusedConv's Z is not broadcast: a per-channel Add must stay an Add (the activation
    alone may still not fuse, as the Conv output feeds the Add)."""
    rng = np.random.default_rng(6)
    nodes = [helper.make_node("Conv", ["x", "w"], ["t"]),
             helper.make_node("Add", ["t", "skip"], ["s"]),
             helper.make_node("Relu", ["s"], ["y"])]
    model = _model(nodes, [_vi("x", [1, 3, 4, 4]), _vi("skip", [1, 3, 1, 1])], [_vi("y", None)],
                   [_w(rng, "w", 3, 3, 1, 1)])
    result = FuseOrtConvActivationPass()(model)
    assert not result.modified
    assert _ops(result.model) == {"Add": 1, "Conv": 1, "Relu": 1}
    reasons = result.stats["rejected"]["conv-add-relu"]
    assert "residual operand shape not known to equal the Conv output's" in reasons


def test_residual_with_unknown_shapes_is_not_fused() -> None:
    rng = np.random.default_rng(7)
    nodes = [helper.make_node("Conv", ["x", "w"], ["t"]),
             helper.make_node("Add", ["t", "skip"], ["y"])]
    model = _model(nodes, [_vi("x", None), _vi("skip", None)], [_vi("y", None)],
                   [_w(rng, "w", 3, 3, 1, 1)], infer=False)
    result = FuseOrtConvActivationPass()(model)
    assert not result.modified
    assert _ops(result.model) == {"Add": 1, "Conv": 1}


# ---------------------------------------------------------------- what must stay alone


def _conv_relu(rng: np.random.Generator, extra_nodes: list, outputs: list, **kw: object) -> ir.Model:
    nodes = [helper.make_node("Conv", ["x", "w"], ["t"]), helper.make_node("Relu", ["t"], ["y"]),
             *extra_nodes]
    return _model(nodes, [_vi("x", [1, 2, 5, 5])], outputs, [_w(rng, "w", 3, 2, 3, 3)], **kw)


def test_conv_output_read_by_another_node_is_not_fused() -> None:
    rng = np.random.default_rng(8)
    model = _conv_relu(rng, [helper.make_node("Sigmoid", ["t"], ["z"])],
                       [_vi("y", None), _vi("z", None)])
    result = FuseOrtConvActivationPass()(model)
    assert not result.modified
    assert _ops(result.model) == {"Conv": 1, "Relu": 1, "Sigmoid": 1}
    assert "intermediate 't' has readers outside the match" in result.stats["rejected"]["conv-relu"]
    assert MS not in result.model.opset_imports


def test_conv_output_that_is_a_graph_output_is_not_fused() -> None:
    rng = np.random.default_rng(9)
    model = _conv_relu(rng, [], [_vi("y", None), _vi("t", None)])
    result = FuseOrtConvActivationPass()(model)
    assert not result.modified
    assert _ops(result.model) == {"Conv": 1, "Relu": 1}
    assert "intermediate 't' is a graph output" in result.stats["rejected"]["conv-relu"]


def test_clip_with_non_constant_bounds_is_not_fused() -> None:
    rng = np.random.default_rng(10)
    nodes = [helper.make_node("Conv", ["x", "w"], ["t"]),
             helper.make_node("Clip", ["t", "lo", "hi"], ["y"])]
    model = _model(nodes, [_vi("x", [1, 2, 5, 5]), _vi("lo", []), _vi("hi", [])],
                   [_vi("y", None)], [_w(rng, "w", 3, 2, 3, 3)])
    result = FuseOrtConvActivationPass()(model)
    assert not result.modified
    assert _ops(result.model) == {"Clip": 1, "Conv": 1}
    assert "Clip bounds are not constant" in result.stats["rejected"]["conv-clip"]


def test_clip_with_min_above_max_is_not_fused() -> None:
    rng = np.random.default_rng(11)
    inits = [_w(rng, "w", 3, 2, 3, 3), numpy_helper.from_array(np.array(2.0, np.float32), "lo"),
             numpy_helper.from_array(np.array(1.0, np.float32), "hi")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["t"]),
             helper.make_node("Clip", ["t", "lo", "hi"], ["y"])]
    model = _model(nodes, [_vi("x", [1, 2, 5, 5])], [_vi("y", None)], inits)
    result = FuseOrtConvActivationPass()(model)
    assert not result.modified
    assert "Clip min > max" in result.stats["rejected"]["conv-clip"]


@pytest.mark.parametrize("elem,dtype", [(TensorProto.FLOAT16, np.float16), (TensorProto.DOUBLE, np.float64)])
def test_non_float32_conv_is_not_fused(elem: int, dtype: type) -> None:
    rng = np.random.default_rng(12)
    nodes = [helper.make_node("Conv", ["x", "w"], ["t"]), helper.make_node("Relu", ["t"], ["y"])]
    model = _model(nodes, [_vi("x", [1, 2, 5, 5], elem)], [_vi("y", None, elem)],
                   [_w(rng, "w", 3, 2, 3, 3, dtype=dtype)])
    result = FuseOrtConvActivationPass()(model)
    assert not result.modified
    assert _ops(result.model) == {"Conv": 1, "Relu": 1}
    (reason,) = result.stats["rejected"]["conv-relu"]
    assert "float32 only" in reason


def test_unknown_element_type_is_not_fused() -> None:
    nodes = [helper.make_node("Conv", ["x", "w"], ["t"]), helper.make_node("Relu", ["t"], ["y"])]
    model = _model(nodes, [_vi("x", None), _vi("w", None)], [_vi("y", None)], [], infer=False)
    for value in model.graph.inputs:
        value.type = None
    result = FuseOrtConvActivationPass()(model)
    assert not result.modified
    assert "unknown element type" in result.stats["rejected"]["conv-relu"]


def test_custom_domain_ops_are_passed_through() -> None:
    rng = np.random.default_rng(13)
    nodes = [helper.make_node("Conv", ["x", "w"], ["t"], domain="custom.ops"),
             helper.make_node("Relu", ["t"], ["y"]),
             helper.make_node("Conv", ["x", "w"], ["u"]),
             helper.make_node("Relu", ["u"], ["z"], domain="custom.ops")]
    model = _model(nodes, [_vi("x", [1, 2, 5, 5])], [_vi("y", None), _vi("z", None)],
                   [_w(rng, "w", 3, 2, 3, 3)], infer=False,
                   extra_opsets=[helper.make_opsetid("custom.ops", 1)])
    result = FuseOrtConvActivationPass()(model)
    assert not result.modified
    assert _ops(result.model) == {"Conv": 1, "Relu": 1, "custom.ops::Conv": 1, "custom.ops::Relu": 1}


def test_shared_clip_bound_stays_while_still_read() -> None:
    rng = np.random.default_rng(14)
    inits = [_w(rng, "w", 3, 2, 3, 3), numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
             numpy_helper.from_array(np.array(6.0, np.float32), "hi")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["t"]),
             helper.make_node("Clip", ["t", "lo", "hi"], ["y"]),
             helper.make_node("Clip", ["x", "lo", "hi"], ["z"])]
    model = _model(nodes, [_vi("x", [1, 2, 5, 5])], [_vi("y", None), _vi("z", None)], inits)
    result = _fuse(model)
    assert _ops(result.model) == {"Clip": 1, f"{MS}::FusedConv": 1}
    assert {"lo", "hi"} <= set(result.model.graph.initializers)


# ---------------------------------------------------------------- subgraphs and functions


def test_conv_relu_inside_if_branches() -> None:
    rng = np.random.default_rng(15)

    def branch(name: str, act: str) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("Conv", ["x", "w"], [f"{name}_t"], pads=[1, 1, 1, 1]),
             helper.make_node(act, [f"{name}_t"], [f"{name}_y"])],
            name, [], [_vi(f"{name}_y", None)])

    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=branch("then", "Relu"),
                              else_branch=branch("else", "Tanh"))]
    model = _model(nodes, [_vi("cond", [], TensorProto.BOOL), _vi("x", [1, 2, 5, 5])],
                   [_vi("y", None)], [_w(rng, "w", 3, 2, 3, 3)])
    original = model.clone()
    result = _fuse(model)
    assert _ops(result.model) == {"If": 1, f"{MS}::FusedConv": 2}
    assert sorted(_attr(n, "activation") for n in _fused_nodes(result.model)) == ["Relu", "Tanh"]
    assert result.model.opset_imports[MS] == 1
    # Both branches, fed explicitly, agree with the original.
    for cond in (True, False):
        feeds = {"cond": np.array(cond), "x": rng.normal(size=(1, 2, 5, 5)).astype(np.float32)}
        _check_numerics(original, result.model, feeds)


def test_conv_relu_inside_a_model_function() -> None:
    """Function parameters are untyped: a Conv on them fuses only when its weight is a
    constant that says float32; the function then imports com.microsoft itself."""
    rng = np.random.default_rng(16)
    weight = numpy_helper.from_array(rng.normal(size=(3, 2, 3, 3)).astype(np.float32), "k")
    function = helper.make_function(
        "local", "ConvRelu", ["a", "k2"], ["r", "r2"],
        [helper.make_node("Constant", [], ["k"], value=weight),
         helper.make_node("Conv", ["a", "k"], ["c"]), helper.make_node("Relu", ["c"], ["r"]),
         helper.make_node("Conv", ["a", "k2"], ["c2"]), helper.make_node("Relu", ["c2"], ["r2"])],
        opset_imports=[helper.make_opsetid("", 17)])
    nodes = [helper.make_node("ConvRelu", ["x", "w"], ["y", "y2"], domain="local")]
    model = _model(nodes, [_vi("x", [1, 2, 5, 5])], [_vi("y", None), _vi("y2", None)],
                   [_w(rng, "w", 3, 2, 3, 3)],
                   functions=[function], extra_opsets=[helper.make_opsetid("local", 1)])
    result = _fuse(model)
    fn = result.model.functions[("local", "ConvRelu", "")]
    assert [n.op_type for n in fn] == ["Constant", "FusedConv", "Conv", "Relu"]
    assert "unknown element type" in result.stats["rejected"]["conv-relu"]
    assert fn.opset_imports[MS] == 1 and result.model.opset_imports[MS] == 1


# ---------------------------------------------------------------- a real model


def test_tinycnn_after_batchnorm_folding_runs_in_onnxruntime() -> None:
    from fixtures.make_example import build
    from optcc.passes.fuse_batchnorm import FuseBatchNormPass

    original = build()
    folded = optcc.optimize(original, passes=[FuseBatchNormPass()], verify=False).model
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = optcc.optimize(folded, passes=[FuseOrtConvActivationPass()], verify=True)
    assert_converged(result.report, caught)
    model = ir.from_proto(result.model)
    assert _ops(model)["com.microsoft::FusedConv"] == 3
    assert "Relu" not in _ops(model) and "Conv" not in _ops(model)
    # onnxruntime with all its own optimizations on still loads and runs it.
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(result.model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    image = np.random.default_rng(SEED).normal(size=(2, 3, 32, 32)).astype(np.float32)
    (logits,) = session.run(None, {"image": image})
    # Against the original in float64 by onnx's reference evaluator (both fusions applied).
    want = expected_outputs_float64(original, {"image": image})
    assert_close([logits], want, FUSION_RTOL, what="tinycnn folded + FusedConv vs float64")
    assert_close(onnxruntime_outputs(result.model, {"image": image}), want, FUSION_RTOL,
                 what="tinycnn folded + FusedConv (onnxruntime optimizations off) vs float64")


def test_gpu_providers_get_no_fusion() -> None:
    """A model also meant for CUDA gets no FusedConv (CUDA's implements Relu alone and runs
    slower than Conv + Relu): the pass leaves it as it is and says why."""
    rng = np.random.default_rng(17)
    nodes = [helper.make_node("Conv", ["x", "w"], ["t1"]), helper.make_node("Sigmoid", ["t1"], ["y1"]),
             helper.make_node("Conv", ["x", "w"], ["t2"]), helper.make_node("Relu", ["t2"], ["y2"])]
    model = _model(nodes, [_vi("x", [1, 3, 4, 4])], [_vi(f"y{i}", None) for i in range(1, 3)],
                   [_w(rng, "w", 3, 3, 1, 1)])
    before = _ops(model)
    result = FuseOrtConvActivationPass(providers=["cpu", "cuda"])(model)
    assert not result.modified and _ops(result.model) == before
    assert "cuda" in result.stats["reason"]
    assert FuseOrtConvActivationPass(providers=["cpu"])(model).modified


def test_function_attribute_references_are_not_fused() -> None:
    """A LeakyRelu whose alpha is the function's own attribute has no value to copy."""
    alpha = helper.make_attribute_ref("alpha", onnx.AttributeProto.FLOAT)
    leaky = helper.make_node("LeakyRelu", ["c"], ["r"])
    leaky.attribute.append(alpha)
    weight = numpy_helper.from_array(np.ones((3, 2, 1, 1), np.float32), "k")
    function = helper.make_function(
        "local", "ConvLeaky", ["a"], ["r"],
        [helper.make_node("Constant", [], ["k"], value=weight),
         helper.make_node("Conv", ["a", "k"], ["c"]), leaky],
        opset_imports=[helper.make_opsetid("", 17)], attributes=["alpha"])
    nodes = [helper.make_node("ConvLeaky", ["x"], ["y"], domain="local", alpha=0.3)]
    model = _model(nodes, [_vi("x", [1, 2, 5, 5])], [_vi("y", None)], [], functions=[function],
                   extra_opsets=[helper.make_opsetid("local", 1)])
    result = FuseOrtConvActivationPass()(model)
    assert not result.modified
    assert "attribute refers to a function attribute" in result.stats["rejected"]["conv-leakyrelu"]


def _sigmoid_and_relu_convs() -> ir.Model:
    rng = np.random.default_rng(23)
    nodes = [helper.make_node("Conv", ["x", "w"], ["t1"]), helper.make_node("Sigmoid", ["t1"], ["y1"]),
             helper.make_node("Conv", ["x", "v"], ["t2"]), helper.make_node("Relu", ["t2"], ["y2"])]
    return _model(nodes, [_vi("x", [1, 3, 8, 8])], [_vi("y1", None), _vi("y2", None)],
                  [_w(rng, "w", 4, 3, 3, 3), _w(rng, "v", 4, 3, 3, 3)])


def test_optimize_fuses_for_the_providers_it_verifies_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """-O3 builds the FusedConv pass for the providers the result is meant for: the CPU alone
    gets FusedConv; with CUDA among them (as when a GPU is present), the Convs stay."""
    model = _sigmoid_and_relu_convs()
    on_cpu = optcc.optimize(model.clone(), level=3, verify=False).ir_model
    assert {_attr(n, "activation") for n in _fused_nodes(on_cpu)} == {"Sigmoid", "Relu"}
    monkeypatch.setattr(optcc.api, "resolve_providers",
                        lambda names: ["CPUExecutionProvider", "CUDAExecutionProvider"])
    result = optcc.optimize(model.clone(), level=3, verify=False)
    assert not _fused_nodes(result.ir_model) and _ops(result.ir_model)["Sigmoid"] == 1
    assert any("cuda" in (p.stats.get("reason") or "") for p in result.report.passes)


@pytest.mark.gpu
@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(), reason="no CUDA execution provider")
def test_o3_result_builds_and_verifies_on_cuda() -> None:
    model = _sigmoid_and_relu_convs()
    original = model.clone()
    result = optcc.optimize(model, level=3, providers=["cpu", "cuda"])
    assert result.report.verification["status"] == "passed"
    assert not result.report.reverted() and not _fused_nodes(result.ir_model)
    _check_numerics(original, result.ir_model, _feeds(original, {}))
