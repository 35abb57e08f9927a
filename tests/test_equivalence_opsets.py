"""The proof across opset versions (optcc.numerics.op_versions): a model and onnx's version
converter's upgrade of it are proved equal where every operator's definition is listed as
the same function; an operator whose definition changed between the two versions is not.
Each verdict is checked on onnx's reference evaluator in float64."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper, version_converter

import optcc
from optcc.numerics.equivalence import prove_equivalent
from optcc.numerics.op_versions import SAME_FUNCTION, definition, schema_version
from tests.reference import expected_outputs_float64, onnxruntime_outputs

RNG = np.random.default_rng(0)


def _classifier(opset: int) -> onnx.ModelProto:
    """x -> Conv -> Relu -> MaxPool -> Add -> Reshape -> Gemm -> LeakyRelu -> Gemm -> Sigmoid -> y."""
    weights = [
        numpy_helper.from_array(RNG.standard_normal((4, 3, 3, 3)).astype(np.float32), "W"),
        numpy_helper.from_array(RNG.standard_normal(4).astype(np.float32), "b"),
        numpy_helper.from_array(RNG.standard_normal((1, 4, 1, 1)).astype(np.float32), "shift"),
        numpy_helper.from_array(np.array([1, -1], np.int64), "flat"),
        numpy_helper.from_array(RNG.standard_normal((6, 64)).astype(np.float32), "W1"),
        numpy_helper.from_array(RNG.standard_normal(6).astype(np.float32), "b1"),
        numpy_helper.from_array(RNG.standard_normal((6, 5)).astype(np.float32), "W2"),
        numpy_helper.from_array(RNG.standard_normal(5).astype(np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Add", ["p", "shift"], ["a"]),
        helper.make_node("Reshape", ["a", "flat"], ["f"]),
        helper.make_node("Gemm", ["f", "W1", "b1"], ["g"], transB=1),
        helper.make_node("LeakyRelu", ["g"], ["l"], alpha=0.1),
        helper.make_node("Gemm", ["l", "W2", "b2"], ["h"]),
        helper.make_node("Sigmoid", ["h"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "classifier", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 5])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=4)


def _with_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """The same graph, importing another opset (what the nodes mean may change with it)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.opset_import[0].version = opset
    copy.ir_version = max(copy.ir_version, 7)
    return copy


def _outputs(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    return expected_outputs_float64(model, {"x": x})


def test_upgraded_classifier_is_proved_equal_and_computes_the_same():
    original = _classifier(8)
    upgraded = version_converter.convert_version(original, 13)
    assert upgraded.opset_import[0].version == 13
    # the converter kept every node (no adapter) but Reshape's, MaxPool's, Gemm's ... schemas moved on
    assert [n.op_type for n in upgraded.graph.node] == [n.op_type for n in original.graph.node]
    proof = prove_equivalent(optcc.ir.load(original), optcc.ir.load(upgraded))
    assert proof.complete, proof.outputs
    x = RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)
    for a, b in zip(_outputs(original, x), _outputs(upgraded, x)):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=0)


def test_same_schema_in_two_opsets_is_proved_equal():
    # Conv, Relu, MaxPool, Add, Gemm, Sigmoid and LeakyRelu have the same schemas in opsets 13 and 15
    original = _classifier(13)
    proof = prove_equivalent(optcc.ir.load(original), optcc.ir.load(_with_opset(original, 15)))
    assert proof.complete, proof.outputs


def _softmax(opset: int) -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("Softmax", ["x"], ["y"])], "softmax",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3, 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)


def test_softmax_default_axis_change_is_not_proved():
    # Softmax 11 (no axis: 1) normalizes over dims 1 and 2 together; Softmax 13 (no axis: -1) over dim 2 alone
    older, newer = _softmax(12), _softmax(13)
    proof = prove_equivalent(optcc.ir.load(older), optcc.ir.load(newer))
    assert not proof.complete
    x = RNG.standard_normal((2, 3, 4)).astype(np.float32)
    # onnx's evaluator computes Softmax before 13 as 13 does: onnxruntime is the reference for the older one
    (a,), (b,) = onnxruntime_outputs(older, {"x": x}), _outputs(newer, x)
    assert np.abs(a - b).max() > 0.1  # the refusal is right: they compute different things
    np.testing.assert_allclose(a.sum(axis=(1, 2)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(b.sum(axis=2), 1.0, rtol=1e-12)


def _single(op: str, opset: int, **attributes) -> onnx.ModelProto:
    node = helper.make_node(op, ["x"], ["y"], **attributes)
    graph = helper.make_graph([node], op.lower(), [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 5, 5])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)


@pytest.mark.parametrize("op,older,newer,attributes", [
    # Floor 13 defines its value on special inputs: listed nowhere, so never proved across it
    pytest.param("Floor", 12, 13, {}, id="floor-unlisted"),
    # ceil_mode's last window was described anew in MaxPool 12: only floor mode is listed
    pytest.param("MaxPool", 11, 12, {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}, id="maxpool-ceil"),
    # SAME padding was described anew in MaxPool 12: only explicit padding is listed
    pytest.param("MaxPool", 11, 12, {"kernel_shape": [2, 2], "auto_pad": "SAME_UPPER"}, id="maxpool-same"),
    # a negative axis is defined from Softmax 11 on, not in 1
    pytest.param("Softmax", 10, 11, {"axis": -1}, id="softmax-negative-axis"),
])
def test_unlisted_or_conditioned_changes_are_not_proved(op, older, newer, attributes):
    a, b = _single(op, older, **attributes), _single(op, newer, **attributes)
    assert schema_version("", op, older) != schema_version("", op, newer)
    assert not prove_equivalent(optcc.ir.load(a), optcc.ir.load(b)).complete


def test_listed_condition_holds_proves_across_versions():
    a = _single("MaxPool", 11, kernel_shape=[2, 2], strides=[2, 2])
    b = _single("MaxPool", 12, kernel_shape=[2, 2], strides=[2, 2])
    assert prove_equivalent(optcc.ir.load(a), optcc.ir.load(b)).complete
    x = RNG.standard_normal((1, 2, 5, 5)).astype(np.float32)
    for u, v in zip(_outputs(a, x), _outputs(b, x)):
        np.testing.assert_array_equal(u, v)


def test_table_names_real_schema_versions():
    # every listed version is a schema onnx has for that operator, oldest first
    for entry in SAME_FUNCTION:
        assert list(entry.versions) == sorted(set(entry.versions)), entry
        for version in entry.versions:
            assert schema_version("", entry.op, version) == version, (entry.op, version)


def test_table_versions_accept_every_older_input_type():
    # a newer listed version accepts every type an older one did (for each input, by name),
    # so a node of the older version is a node of the newer one
    def input_types(schema):
        constraints = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
        return {i.name: constraints.get(i.type_str, {i.type_str}) for i in schema.inputs}

    for entry in SAME_FUNCTION:
        for older, newer in zip(entry.versions, entry.versions[1:]):
            before = input_types(onnx.defs.get_schema(entry.op, older, ""))
            after = input_types(onnx.defs.get_schema(entry.op, newer, ""))
            for name, types in before.items():
                assert types <= after.get(name, set()), (entry.op, older, newer, name, types - after.get(name, set()))


def _conv_softmax(op: str = "Softmax", batch: int | str = 1) -> onnx.ModelProto:
    """x -> Conv -> Softmax (opset 9: over each sample's 4x4x4 values coerced to one row) -> y."""
    weight = numpy_helper.from_array(RNG.standard_normal((4, 3, 3, 3)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]), helper.make_node(op, ["c"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [batch, 3, 4, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [batch, 4, 4, 4])], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=4)


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_converter_softmax_adapter_is_proved_equal(op):
    original = _conv_softmax(op)
    upgraded = version_converter.convert_version(original, 13)
    # the converter's form: Reshape(Softmax-13(Flatten(c, 1), axis=-1), Shape(c))
    assert [n.op_type for n in upgraded.graph.node] == ["Conv", "Shape", "Flatten", op, "Reshape"]
    # and as -O2 leaves it: Shape(c) folded to its constant dims
    folded = optcc.optimize(upgraded, level=2, verify=False).model
    assert "Shape" not in [n.op_type for n in folded.graph.node]
    x = RNG.standard_normal((1, 3, 4, 4)).astype(np.float32)
    # onnx's evaluator computes Softmax before 13 as 13 does: onnxruntime is the reference for the original
    (expected,) = onnxruntime_outputs(original, {"x": x})
    for candidate in (upgraded, folded):
        assert prove_equivalent(optcc.ir.load(original), optcc.ir.load(candidate)).complete
        (got,) = _outputs(candidate, x)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    if op == "Softmax":
        np.testing.assert_allclose(expected.reshape(1, -1).sum(axis=1), 1.0, rtol=1e-5)


def test_softmax_adapter_with_unknown_dims_is_not_proved():
    # a 0 in Shape(c) would make Reshape copy a dim of the 2-D value: a free batch dim is not proved
    original = _conv_softmax(batch="N")
    upgraded = version_converter.convert_version(original, 13)
    assert "Flatten" in [n.op_type for n in upgraded.graph.node]
    assert not prove_equivalent(optcc.ir.load(original), optcc.ir.load(upgraded)).complete


def test_softmax_adapter_at_another_axis_is_not_proved():
    # the Flatten coerces at axis 2, the original Softmax at its default 1: different rows
    original = _conv_softmax()
    upgraded = version_converter.convert_version(original, 13)
    for node in upgraded.graph.node:
        if node.op_type == "Flatten":
            node.attribute[0].CopyFrom(helper.make_attribute("axis", 2))
    assert not prove_equivalent(optcc.ir.load(original), optcc.ir.load(upgraded)).complete
    x = RNG.standard_normal((1, 3, 4, 4)).astype(np.float32)
    (a,), (b,) = onnxruntime_outputs(original, {"x": x}), _outputs(upgraded, x)
    assert np.abs(a - b).max() > 1e-3


def test_opsets_beyond_the_installed_onnx_are_keyed_apart():
    # the installed onnx cannot tell whether a newer opset changed Relu: keyed by the opset itself
    newest = onnx.defs.onnx_opset_version()
    assert definition("", "Relu", newest)[0] == definition("", "Relu", newest - 1)[0]
    assert definition("", "Relu", newest + 1)[0] != definition("", "Relu", newest)[0]
    assert definition("", "Relu", newest + 1)[0] != definition("", "Relu", newest + 2)[0]


def _with_weight(op: str, opset: int, weight: np.ndarray, **attributes) -> onnx.ModelProto:
    """x (1x2x5x5) -> op(x, W) -> y, W a constant (a convolution with one has an affine form)."""
    graph = helper.make_graph([helper.make_node(op, ["x", "W"], ["y"], **attributes)], op.lower(),
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 5, 5])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(weight, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)


def test_convtranspose_same_padding_redefined_in_11_is_not_proved():
    # ConvTranspose 1 puts an odd total padding's extra element at the start for SAME_UPPER,
    # ConvTranspose 11 at the end: 2 * (5 - 1) + 3 - 10 = 1 here. A convolution's affine form
    # must name that definition as its node's key does.
    weight = RNG.standard_normal((2, 3, 3, 3)).astype(np.float32)
    same = {"auto_pad": "SAME_UPPER", "strides": [2, 2]}
    older, newer = _with_weight("ConvTranspose", 10, weight, **same), _with_weight("ConvTranspose", 11, weight, **same)
    assert not prove_equivalent(optcc.ir.load(older), optcc.ir.load(newer)).complete
    # the two readings, as explicit padding in onnx's evaluator, differ
    x = RNG.standard_normal((1, 2, 5, 5)).astype(np.float32)
    extra_first = _with_weight("ConvTranspose", 11, weight, pads=[1, 1, 0, 0], strides=[2, 2], output_shape=[10, 10])
    extra_last = _with_weight("ConvTranspose", 11, weight, pads=[0, 0, 1, 1], strides=[2, 2], output_shape=[10, 10])
    (a,), (b,) = _outputs(extra_first, x), _outputs(extra_last, x)
    assert a.shape == b.shape == (1, 3, 10, 10) and np.abs(a - b).max() > 0.1


def test_conv_same_padding_is_not_proved_across_11_but_explicit_padding_is():
    # Conv 11 described SAME padding anew (op_versions lists explicit padding only); the
    # affine form of a Conv with a constant weight is keyed by that definition too
    weight = RNG.standard_normal((3, 2, 3, 3)).astype(np.float32)
    for attributes, proved in (({"auto_pad": "SAME_UPPER", "strides": [2, 2]}, False),
                               ({"pads": [1, 0, 0, 1], "strides": [2, 2]}, True)):
        older, newer = _with_weight("Conv", 10, weight, **attributes), _with_weight("Conv", 11, weight, **attributes)
        assert prove_equivalent(optcc.ir.load(older), optcc.ir.load(newer)).complete is proved, attributes
    x = RNG.standard_normal((1, 2, 5, 5)).astype(np.float32)
    for u, v in zip(_outputs(older, x), _outputs(newer, x)):  # the explicit padding, computed alike
        np.testing.assert_array_equal(u, v)


def test_convtranspose_explicit_padding_is_proved_across_11_but_output_shape_is_not():
    # ConvTranspose 11 described SAME padding and the pads output_shape implies anew (an odd
    # total's extra element moved from the end to the start); explicit pads compute alike
    weight = RNG.standard_normal((2, 3, 3, 3)).astype(np.float32)
    explicit = {"pads": [1, 0, 0, 1], "strides": [2, 2], "output_padding": [1, 0]}
    older, newer = _with_weight("ConvTranspose", 10, weight, **explicit), _with_weight("ConvTranspose", 11, weight,
                                                                                       **explicit)
    assert prove_equivalent(optcc.ir.load(older), optcc.ir.load(newer)).complete
    x = RNG.standard_normal((1, 2, 5, 5)).astype(np.float32)
    for u, v in zip(_outputs(older, x), _outputs(newer, x)):
        np.testing.assert_array_equal(u, v)
    # output_shape 10x10 from 5x5 at stride 2: 2 * 4 + 3 - 10 = 1, an odd total padding
    shaped = {"strides": [2, 2], "output_shape": [10, 10]}
    older, newer = _with_weight("ConvTranspose", 10, weight, **shaped), _with_weight("ConvTranspose", 11, weight,
                                                                                     **shaped)
    assert not prove_equivalent(optcc.ir.load(older), optcc.ir.load(newer)).complete


def _opset21_cnn(opset: int = 21) -> onnx.ModelProto:
    """x -> Pad -> Conv -> MaxPool -> AveragePool -> Transpose -> Reshape -> Flatten -> y, with
    Shape, Squeeze and Unsqueeze on the way: operators whose schemas change after opset 21
    (Conv, MaxPool, AveragePool 22; Pad, Transpose, Reshape, Shape, Flatten, Squeeze,
    Unsqueeze 23 to 25) by adding types only."""
    weights = [
        numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"),
        numpy_helper.from_array(RNG.standard_normal((4, 3, 3, 3)).astype(np.float32), "W"),
        numpy_helper.from_array(RNG.standard_normal(4).astype(np.float32), "b"),
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([1, 2, -1], np.int64), "shape"),
    ]
    nodes = [
        helper.make_node("Pad", ["x", "pads"], ["p"], mode="reflect"),
        helper.make_node("Conv", ["p", "W", "b"], ["c"], pads=[0, 1, 1, 0]),
        helper.make_node("MaxPool", ["c"], ["m"], kernel_shape=[2, 2], strides=[1, 1], pads=[1, 1, 0, 0]),
        helper.make_node("AveragePool", ["m"], ["a"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
                         count_include_pad=0),
        helper.make_node("Transpose", ["a"], ["t"], perm=[0, 2, 3, 1]),
        helper.make_node("Squeeze", ["t", "zero"], ["s"]),
        helper.make_node("Unsqueeze", ["s", "zero"], ["u"]),
        helper.make_node("Reshape", ["u", "shape"], ["r"]),
        helper.make_node("Flatten", ["r"], ["y"], axis=1),
        helper.make_node("Shape", ["r"], ["dims"]),
    ]
    graph = helper.make_graph(nodes, "cnn21", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 9, 9])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("dims", onnx.TensorProto.INT64, None)], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


@pytest.mark.parametrize("target", [22, 23, 25])
def test_opset21_model_upgraded_past_21_is_proved_equal(target):
    original = _opset21_cnn()
    upgraded = version_converter.convert_version(original, target)
    assert [n.op_type for n in upgraded.graph.node] == [n.op_type for n in original.graph.node]
    changed = {n.op_type for n in original.graph.node if schema_version("", n.op_type, 21) != schema_version("", n.op_type,
                                                                                                            target)}
    assert {"Conv", "MaxPool", "AveragePool"} <= changed
    proof = prove_equivalent(optcc.ir.load(original), optcc.ir.load(upgraded))
    assert proof.complete, proof.outputs
    x = RNG.standard_normal((1, 3, 9, 9)).astype(np.float32)
    for a, b in zip(_outputs(original, x), _outputs(upgraded, x)):
        np.testing.assert_array_equal(b, a)


def test_opset21_model_target_opset_22_is_verified_by_proof():
    original = _opset21_cnn()
    result = optcc.optimize(original, level=0, target_opset=22)
    assert result.model.opset_import[0].version == 22
    assert result.report.verification["reference"] == "proof", result.report.verification
    x = RNG.standard_normal((1, 3, 9, 9)).astype(np.float32)
    for a, b in zip(_outputs(original, x), _outputs(result.model, x)):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=0)


def test_ceil_mode_pooling_redefined_in_22_is_not_proved():
    # MaxPool 22 ignores a window that would start in the right padding (ceil mode): at
    # 4 + 1 padding, kernel 2, stride 2, MaxPool 12 has ceil(3 / 2 + 1) = 3 windows a side,
    # the last one all padding; MaxPool 22 has 2
    ceil = {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [0, 0, 1, 1], "ceil_mode": 1}
    for op in ("MaxPool", "AveragePool"):
        older, newer = _with_input_side(_single(op, 21, **ceil), 4), _with_input_side(_single(op, 22, **ceil), 4)
        assert not prove_equivalent(optcc.ir.load(older), optcc.ir.load(newer)).complete, op
        older_windows = int(np.ceil((4 + 1 - 2) / 2 + 1))
        (y,) = _outputs(newer, RNG.standard_normal((1, 2, 4, 4)).astype(np.float32))
        assert older_windows == 3 and y.shape == (1, 2, 2, 2), op
    # the same pooling without ceil mode is one function in both
    floor = {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [0, 0, 1, 1]}
    for op in ("MaxPool", "AveragePool"):
        assert prove_equivalent(optcc.ir.load(_single(op, 21, **floor)), optcc.ir.load(_single(op, 22, **floor))).complete


def _with_input_side(model: onnx.ModelProto, side: int) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    dims = copy.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_value = dims[3].dim_value = side
    return copy
