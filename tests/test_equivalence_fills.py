"""Large ConstantOfShape fills in the proof (optcc.numerics.equivalence): a tensor whose
elements all have the same bytes is keyed by its type, shape and that element, whether a
ConstantOfShape computes it (held as a view, never materialized) or it is stored; the
original numbered before the passes (``number_original``) may hold such fills. A fold
made in place after numbering is proved; planted miscompiles (a wrong fill value, one
element off at either end or in the middle, a fold with the wrong BatchNormalization
epsilon, a zero of the wrong sign) are not, and each verdict is checked on onnx's
reference evaluator in float64."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import optcc
from optcc.numerics.equivalence import number_original
from tests.reference import expected_outputs_float64

WEIGHT_SHAPE = (16, 8, 3, 3)  # 1152 elements: more than the proof keys by their bytes
EPSILON = 1e-3
FILLS = {"W": (WEIGHT_SHAPE, 0.02), "s": ((16,), 1.5), "beta": ((16,), 0.25), "mean": ((16,), 0.1),
         "var": ((16,), 0.8)}


def _fill_node(name: str, shape: tuple[int, ...], value: float) -> tuple[onnx.NodeProto, onnx.TensorProto]:
    """``name = ConstantOfShape(shape)`` filled with ``value`` (float32), and its shape initializer."""
    shape_name = f"{name}__SHAPE"
    node = helper.make_node("ConstantOfShape", [shape_name], [name],
                            value=helper.make_tensor("", onnx.TensorProto.FLOAT, [1], [value]))
    return node, numpy_helper.from_array(np.array(shape, np.int64), shape_name)


def _light_conv_bn() -> onnx.ModelProto:
    """x -> Conv(W) -> BatchNormalization -> y, every weight a ConstantOfShape fill (as in
    onnx's light test models)."""
    fills = [_fill_node(name, shape, value) for name, (shape, value) in FILLS.items()]
    graph = helper.make_graph(
        [node for node, _ in fills] + [
            helper.make_node("Conv", ["x", "W"], ["t"], pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", ["t", "s", "beta", "mean", "var"], ["y"], epsilon=EPSILON)],
        "light", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8, 6, 6])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 16, 6, 6])],
        [shape for _, shape in fills])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _stored(model: ir.Model, name: str, array: np.ndarray) -> None:
    """Replace the ConstantOfShape computing ``name`` with an initializer holding ``array``."""
    graph = model.graph
    node = next(n for n in graph if n.outputs[0].name == name)
    value = ir.Value(name=f"{name}_stored", const_value=ir.tensor(array.astype(np.float32)))
    graph.register_initializer(value)
    node.outputs[0].replace_all_uses_with(value)
    graph.remove(node, safe=True)


def _fold_bn(model: ir.Model, epsilon: float) -> None:
    """Fold the BatchNormalization into the Conv as a stored weight and bias, in float64."""
    graph = model.graph
    bn = next(n for n in graph if n.op_type == "BatchNormalization")
    conv = next(n for n in graph if n.op_type == "Conv")
    (_, w), (_, s), (_, beta), (_, mean), (_, var) = (FILLS[k] for k in ("W", "s", "beta", "mean", "var"))
    factor = s / np.sqrt(np.float64(np.float32(var)) + epsilon)
    weight = ir.Value(name="W_folded", const_value=ir.tensor(np.full(WEIGHT_SHAPE, w * factor, np.float32)))
    bias = ir.Value(name="b_folded", const_value=ir.tensor(np.full(16, beta - mean * factor, np.float32)))
    graph.register_initializer(weight)
    graph.register_initializer(bias)
    conv.replace_input_with(1, weight)
    conv.resize_inputs(3)
    conv.replace_input_with(2, bias)
    graph.outputs[0] = conv.outputs[0]
    graph.remove(bn, safe=True)
    for node in [n for n in graph if n.op_type == "ConstantOfShape"]:
        graph.remove(node, safe=True)
    conv.outputs[0].name = "y"


def _proved_after(proto: onnx.ModelProto, change) -> tuple[bool, onnx.ModelProto]:
    """Number ``proto``'s parse, change it in place with ``change``, and prove it against the
    numbering; whether every output is proved, and the changed model."""
    model = optcc.ir.load(proto)
    premise = number_original(model)
    assert premise is not None  # every weight a fill: numbered before the change
    change(model)
    try:
        proof = premise.prove(model)
    finally:
        premise.release()
    return proof is not None and proof.complete, optcc.ir.serialize(model)


def _difference(a: onnx.ModelProto, b: onnx.ModelProto, name: str = "x",
                shape: tuple[int, ...] = (1, 8, 6, 6)) -> float:
    """The largest difference of ``b``'s outputs from ``a``'s, relative to ``a``'s scale,
    in float64 on onnx's reference evaluator."""
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    got_a, got_b = expected_outputs_float64(a, {name: x}), expected_outputs_float64(b, {name: x})
    return max(float(np.abs(u - v).max() / max(np.abs(u).max(), 1e-30)) for u, v in zip(got_a, got_b))


def _numpy_reference(x: np.ndarray) -> np.ndarray:
    """``_light_conv_bn``'s output in float64 numpy: every weight one value, so the Conv is
    that value times each padded 3x3 window's sum over the input channels (onnx's reference
    evaluator computes this model's BatchNormalization differently from onnxruntime and
    from its definition, so it does not judge a fold of it)."""
    (_, w), (_, s), (_, beta), (_, mean), (_, var) = (FILLS[k] for k in ("W", "s", "beta", "mean", "var"))
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    sums = np.array([[padded[0, :, i:i + 3, j:j + 3].sum() for j in range(6)] for i in range(6)])
    cast = [float(np.float32(v)) for v in (w, s, beta, mean, var)]
    t = cast[0] * sums
    y = cast[1] * (t - cast[3]) / np.sqrt(cast[4] + float(np.float32(EPSILON))) + cast[2]
    return np.broadcast_to(y, (1, 16, 6, 6))


def _difference_from_definition(model: onnx.ModelProto) -> float:
    """The largest difference of ``model``'s output (float64 reference evaluator) from
    ``_numpy_reference``, relative to its scale."""
    x = np.random.default_rng(3).standard_normal((1, 8, 6, 6)).astype(np.float32)
    expected = _numpy_reference(x)
    got = expected_outputs_float64(model, {"x": x})[0]
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def test_a_fill_stored_as_an_initializer_after_numbering_is_proved():
    proto = _light_conv_bn()
    proved, changed = _proved_after(proto, lambda m: _stored(m, "W", np.full(WEIGHT_SHAPE, 0.02)))
    assert proved
    assert _difference(proto, changed) == 0.0


def test_a_stored_fill_of_another_value_is_not_proved():
    proto = _light_conv_bn()
    proved, changed = _proved_after(proto, lambda m: _stored(m, "W", np.full(WEIGHT_SHAPE, 0.0201)))
    assert not proved
    assert _difference(proto, changed) > 1e-3


def test_a_stored_fill_with_one_element_off_is_not_proved():
    proto = _light_conv_bn()
    for index in [(15, 7, 2, 2), (0, 0, 0, 1), (8, 3, 1, 1)]:  # the last, the second, one in the middle
        weight = np.full(WEIGHT_SHAPE, 0.02)
        weight[index] = 0.03
        proved, changed = _proved_after(proto, lambda m, w=weight: _stored(m, "W", w))
        assert not proved, index
        assert _difference(proto, changed) > 1e-4


def test_a_batchnorm_folded_into_a_fill_weight_is_proved_only_with_the_models_epsilon():
    proto = _light_conv_bn()
    proved, changed = _proved_after(proto, lambda m: _fold_bn(m, EPSILON))
    assert proved
    assert _difference_from_definition(changed) < 1e-6
    proved, changed = _proved_after(proto, lambda m: _fold_bn(m, 1e-5))
    assert not proved
    assert _difference_from_definition(changed) > 1e-4


def test_a_changed_epsilon_on_an_unchanged_fill_weight_is_not_proved():
    """Both forms read the one view of the fill: the factors composed into it still decide."""
    proto = _light_conv_bn()

    def wrong_epsilon(model: ir.Model) -> None:
        bn = next(n for n in model.graph if n.op_type == "BatchNormalization")
        bn.attributes["epsilon"] = ir.AttrFloat32("epsilon", 1e-5)

    proved, changed = _proved_after(proto, wrong_epsilon)
    assert not proved
    assert _difference_from_definition(changed) > 1e-4


def test_a_zero_fill_of_the_other_sign_is_not_proved():
    """x / fill(+0.0) and x / fill(-0.0): the two fills decode apart (infinities of opposite
    signs), though their values compare equal."""
    shape = (1, 8, 12, 12)
    plus, plus_shape = _fill_node("plus", shape, 0.0)
    minus, minus_shape = _fill_node("minus", shape, -0.0)
    graph = helper.make_graph(
        [plus, minus, helper.make_node("Div", ["x", "plus"], ["y1"]), helper.make_node("Div", ["x", "minus"], ["y2"])],
        "zeros", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, list(shape)) for n in ("y1", "y2")],
        [plus_shape, minus_shape])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model = optcc.ir.load(proto)
    premise = number_original(model)
    assert premise is not None
    _stored(model, "minus", np.zeros(shape))
    try:
        proof = premise.prove(model)
    finally:
        premise.release()
    assert proof is not None and proof.outputs == {"y1": True, "y2": False}
    x = np.abs(np.random.default_rng(5).standard_normal(shape)).astype(np.float32) + 1
    original = expected_outputs_float64(proto, {"x": x})
    changed = expected_outputs_float64(optcc.ir.serialize(model), {"x": x})
    assert np.all(original[1] < 0) and np.all(changed[1] > 0)  # -inf before, +inf after


def test_optimize_proves_a_light_model_and_computes_its_outputs(tmp_path):
    path = tmp_path / "light.onnx"
    proto = _light_conv_bn()
    onnx.save(proto, path)
    result = optcc.optimize(str(path), level=2)
    verification = result.report.verification
    assert verification["status"] == "passed" and verification["reference"] == "proof"
    assert _difference_from_definition(result.model) < 1e-5


def _huge_fill_matmul(value: float) -> onnx.ModelProto:
    """y = x @ W with W = ConstantOfShape([4100, 4100]) filled with ``value``: 67 MB of
    float32, more than the proof evaluates of folds (MAX_FOLD_CHECK_BYTES) were it held."""
    node, shape = _fill_node("W", (4100, 4100), value)
    graph = helper.make_graph(
        [node, helper.make_node("MatMul", ["x", "W"], ["y"])], "huge",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4100])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4100])], [shape])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_a_fill_larger_than_any_evaluated_fold_is_numbered_and_its_value_still_decides():
    """The fill is a view of its one element: numbered before the passes without being
    held; the same fill is proved, a fill of another value is not."""
    proto = _huge_fill_matmul(0.25)

    def refill(value: float):
        def change(model: ir.Model) -> None:
            node = next(n for n in model.graph if n.op_type == "ConstantOfShape")
            node.attributes["value"] = ir.AttrTensor("value", ir.tensor(np.array([value], np.float32)))
        return change

    x = np.random.default_rng(11).standard_normal((1, 4100)).astype(np.float32)
    for value, expected_proved in ((0.25, True), (0.5, False)):
        proved, changed = _proved_after(proto, refill(value))
        assert proved is expected_proved
        got = ReferenceEvaluator(changed).run(None, {"x": x})[0]
        definition = np.full((1, 4100), x.astype(np.float64).sum() * 0.25)  # the original's output
        close = np.allclose(got, definition, rtol=1e-4, atol=1e-4 * np.abs(definition).max())
        assert close is expected_proved
