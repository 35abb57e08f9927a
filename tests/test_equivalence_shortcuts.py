"""The proof's shortcuts (optcc.numerics.equivalence) are exact where they apply and miss
nothing where they could: folds of data movement computed by the operator's definition
(no onnxruntime session), small constants keyed by their bytes, affine weights compared
chunk by chunk with a fast path for a fold rounded once. Each planted candidate differs in
exactly the place a shortcut could miss, and onnx's reference evaluator shows that it
computes something else."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

import optcc
from optcc.numerics import equivalence
from optcc.numerics.equivalence import prove_equivalent
from tests.reference import expected_outputs, expected_outputs_float64

RNG = np.random.default_rng(7)


def _load(proto: onnx.ModelProto) -> ir.Model:
    return optcc.ir.load(proto)


def _no_session(*args, **kwargs):
    raise AssertionError("a fold of data movement needs no onnxruntime session")


def _with_constant(model: ir.Model, array: np.ndarray) -> ir.Model:
    """``model`` with the second input of its last node replaced by a constant ``array``."""
    node = list(model.graph)[-1]
    value = ir.Value(name="planted", const_value=ir.tensor(array))
    model.graph.initializers["planted"] = value
    node.replace_input_with(1, value)
    return model


def _differs(a: onnx.ModelProto | ir.Model, b: onnx.ModelProto | ir.Model, feeds: dict) -> bool:
    got_a, got_b = expected_outputs(a, feeds), expected_outputs(b, feeds)
    return any(u.shape != v.shape or not np.array_equal(u, v) for u, v in zip(got_a, got_b))


# a constant c, the data-movement node under test making f, and y = Mul(x, f) with x of
# shape [1]: y's shape and values are f's, so a fold in the wrong shape changes y
MOVES = {
    "unsqueeze-input": (17, "float[2, 3] c", "s = Constant <value = int64[2] {0, -1}> ()\n f = Unsqueeze(c, s)",
                        (1, 1, 2, 3)),
    "unsqueeze-attribute": (11, "float[2, 3] c", "f = Unsqueeze <axes = [0, -1]> (c)", (1, 2, 1, 3)),
    "squeeze": (17, "float[1, 2, 1, 3] c", "s = Constant <value = int64[1] {-2}> ()\n f = Squeeze(c, s)",
                (2, 1, 3)),
    "squeeze-all": (17, "float[1, 2, 1, 3] c", "f = Squeeze(c)", (1, 6)),
    "reshape-copy-and-rest": (17, "float[2, 3, 2] c",
                              "s = Constant <value = int64[2] {0, -1}> ()\n f = Reshape(c, s)", (3, 4)),
    "reshape-allowzero": (17, "float[2, 3, 2] c",
                          "s = Constant <value = int64[3] {3, 2, 2}> ()\n f = Reshape <allowzero = 1> (c, s)",
                          (2, 3, 2)),
    "flatten-negative-axis": (17, "float[2, 3, 2] c", "f = Flatten <axis = -1> (c)", (2, 6)),
    "unsqueeze-of-a-constant-of-shape": (17, "float[1] c", "s = Constant <value = int64[2] {2, 3}> ()\n"
                                         " z = ConstantOfShape <value = float[1] {2.5}> (s)\n"
                                         " a = Constant <value = int64[1] {1}> ()\n f = Unsqueeze(z, a)",
                                         (2, 3, 1)),
}


def _move_model(opset: int, constant: str, body: str) -> onnx.ModelProto:
    dims = constant[constant.index("[") + 1:constant.index("]")]
    size = int(np.prod([int(d) for d in dims.split(",")]))
    values = ", ".join(str(float(v)) for v in range(1, size + 1))
    return onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["": {opset}]>
        g (float[1] x) => (float y) {{
            c = Constant <value = float[{dims}] {{{values}}}> ()
            {body}
            y = Mul(x, f)
        }}""")


@pytest.mark.parametrize("name", list(MOVES))
def test_a_data_movement_fold_is_proved_by_its_definition_and_the_same_bytes_in_another_shape_are_not(
        name, monkeypatch):
    opset, constant, body, wrong_shape = MOVES[name]
    proto = _move_model(opset, constant, body)
    candidate = optcc.optimize(proto, passes=["fold-constants", "eliminate-dead-nodes"], verify=False).ir_model
    assert [n.op_type for n in candidate.graph] == ["Mul"]
    feeds = {"x": np.array([1.5], np.float32)}
    assert not _differs(proto, optcc.ir.serialize(candidate), feeds)

    monkeypatch.setattr(equivalence, "make_session", _no_session)
    proof = prove_equivalent(_load(proto), candidate)
    assert proof.complete and proof.folds_checked == 1

    folded = next(n for n in candidate.graph).inputs[1].const_value.numpy()
    planted = _with_constant(_load(proto), folded.reshape(wrong_shape))
    assert _differs(proto, optcc.ir.serialize(planted), feeds)
    assert not prove_equivalent(_load(proto), planted).complete


def test_an_exact_cast_fold_is_proved_by_its_definition_and_another_value_is_not(monkeypatch):
    proto = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["": 17]>
        g (int64[3] x) => (int64[3] y) {
            c = Constant <value = int32[3] {7, -2, 2000000000}> ()
            f = Cast <to = 7> (c)
            y = Mul(x, f)
        }""")
    candidate = optcc.optimize(proto, passes=["fold-constants"], verify=False).ir_model
    assert [n.op_type for n in candidate.graph] == ["Mul"]
    monkeypatch.setattr(equivalence, "make_session", _no_session)
    assert prove_equivalent(_load(proto), candidate).complete
    feeds = {"x": np.array([1, 2, 3], np.int64)}
    assert not _differs(proto, optcc.ir.serialize(candidate), feeds)
    # the int32 bytes of the constant, read as int64 values elsewhere: a cast done wrong
    planted = _with_constant(_load(proto), np.array([7, -2, 2000000000 - (1 << 32)], np.int64))
    assert _differs(proto, optcc.ir.serialize(planted), feeds)
    assert not prove_equivalent(_load(proto), planted).complete


@pytest.mark.parametrize("data,to", [
    (np.array([1 << 40], np.int64), onnx.TensorProto.INT32),  # out of range: kernels may wrap or saturate
    (np.array([2049], np.int32), onnx.TensorProto.FLOAT16),  # not every such integer is a float16
    (np.array([1 << 25], np.int64), onnx.TensorProto.FLOAT),
    (np.array([0.1], np.float32), onnx.TensorProto.FLOAT16),  # a narrowing rounds
    (np.array([np.nan], np.float32), onnx.TensorProto.DOUBLE),  # NaN payloads are a kernel's choice
    (np.array([1.5], np.float32), onnx.TensorProto.INT64),  # float to integer: not by definition
    (np.array([1], np.int64), onnx.TensorProto.BOOL),
])
def test_a_cast_that_may_not_be_exact_is_left_to_onnxruntime(data, to):
    assert equivalence._exact_cast(data, to) is None


@pytest.mark.parametrize("data,to,expected", [
    (np.array([-3, 1 << 40], np.int64), onnx.TensorProto.DOUBLE, np.array([-3.0, 2.0 ** 40])),
    (np.array([2048, -2048], np.int32), onnx.TensorProto.FLOAT16, np.array([2048, -2048], np.float16)),
    (np.array([True, False]), onnx.TensorProto.INT8, np.array([1, 0], np.int8)),
    (np.array([0.1, np.inf], np.float16), onnx.TensorProto.FLOAT, np.array([0.1, np.inf], np.float16)),
])
def test_an_exact_cast_keeps_every_value(data, to, expected):
    got = equivalence._exact_cast(data, to)
    assert got is not None and got.dtype == np.dtype(helper.tensor_dtype_to_np_dtype(to))
    np.testing.assert_array_equal(got, expected.astype(got.dtype))


@pytest.mark.parametrize("shape,reshape", [((2, 3, 2), [0, 0, 0, 0]), ((2, 3), [-1, -1]), ((2, 3), [4, -1]),
                                           ((0, 3), [0, -1]), ((2, 3), [-2, 3])])
def test_a_reshape_the_spec_calls_invalid_is_not_computed(shape, reshape):
    assert optcc.ir.reshaped(np.zeros(shape, np.float32), reshape, allowzero=False) is None


def test_unsqueeze_and_squeeze_reject_repeated_or_wrong_axes():
    data = np.zeros((1, 2), np.float32)
    assert optcc.ir.unsqueezed(data, [0, 0]) is None
    assert optcc.ir.unsqueezed(data, [0, -4]) is None  # [0, -4] is 0 twice in rank 4
    assert optcc.ir.unsqueezed(data, [5]) is None
    assert optcc.ir.squeezed(data, [1]) is None  # dim 1 has size 2
    assert optcc.ir.squeezed(data, [0, -2]) is None


def test_small_constants_with_the_same_bytes_and_another_type_or_shape_are_other_constants():
    def model(kind: str, dims: str, values: str) -> onnx.ModelProto:
        return onnx.parser.parse_model(f"""
            <ir_version: 8, opset_import: ["": 17]>
            g (float[1] x) => (float y) {{
                c = Constant <value = {kind}[{dims}] {{{values}}}> ()
                f = Cast <to = 1> (c)
                y = Mul(x, f)
            }}""")

    base = model("uint8", "4", "255, 1, 2, 3")
    feeds = {"x": np.array([1.0], np.float32)}
    for other in (model("int8", "4", "-1, 1, 2, 3"), model("uint8", "2, 2", "255, 1, 2, 3")):
        assert _differs(base, other, feeds)
        assert not prove_equivalent(_load(base), _load(other)).complete
    assert prove_equivalent(_load(base), _load(model("uint8", "4", "255, 1, 2, 3"))).complete


def _conv_bn(weight: np.ndarray) -> onnx.ModelProto:
    channels = weight.shape[0]
    params = {"s": RNG.uniform(0.5, 2, channels), "beta": RNG.standard_normal(channels),
              "mean": RNG.standard_normal(channels), "var": RNG.uniform(0.5, 4, channels)}
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["t"]),
         helper.make_node("BatchNormalization", ["t", "s", "beta", "mean", "var"], ["y"], epsilon=1e-3)], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, weight.shape[1], 3, 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "W")]
        + [numpy_helper.from_array(v.astype(np.float32), k) for k, v in params.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _nudged_last_weight(model: ir.Model, factor: float) -> ir.Model:
    conv = next(n for n in model.graph if n.op_type == "Conv")
    array = conv.inputs[1].const_value.numpy().copy()
    array.reshape(-1)[-1] *= np.float32(factor)
    value = ir.Value(name="W_planted", const_value=ir.tensor(array))
    model.graph.initializers["W_planted"] = value
    conv.replace_input_with(1, value)
    return model


def test_a_folded_weight_off_only_in_its_last_chunk_is_not_proved():
    """More elements than one comparison chunk: the fold rounded once is proved (the fast
    path), and the same fold with its very last element ~100 roundings off is not."""
    weight = RNG.standard_normal((64, 64, 3, 3)).astype(np.float32)
    assert weight.size > 2 * equivalence.CHUNK_ELEMENTS
    proto = _conv_bn(weight)
    folded = optcc.optimize(proto, passes=["fuse-batchnorm"], verify=False).ir_model
    assert [n.op_type for n in folded.graph] == ["Conv"]
    assert prove_equivalent(_load(proto), folded).complete

    planted = _nudged_last_weight(optcc.optimize(proto, passes=["fuse-batchnorm"], verify=False).ir_model, 1 + 1e-5)
    feeds = {"x": RNG.standard_normal((1, 64, 3, 3)).astype(np.float32)}
    assert not np.array_equal(expected_outputs_float64(proto, feeds)[0],
                              expected_outputs_float64(optcc.ir.serialize(planted), feeds)[0])
    assert not prove_equivalent(_load(proto), planted).complete


def test_a_fold_that_overflows_to_infinity_is_not_proved():
    """The exact fold of a weight near float32's largest is past it: its rounding is an
    infinity, which the fast path must not take for a rounding of the finite product."""
    weight = np.full((2, 1, 1, 1), np.finfo(np.float32).max, np.float32)
    proto = helper.make_model(helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["t"]), helper.make_node("Mul", ["t", "k"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, 1, 1])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(np.full((1, 2, 1, 1), 4, np.float32), "k")]),
        opset_imports=[helper.make_opsetid("", 17)])

    def infinite_fold(model: ir.Model) -> ir.Model:
        graph = model.graph
        mul = next(n for n in graph if n.op_type == "Mul")
        conv = next(n for n in graph if n.op_type == "Conv")
        value = ir.Value(name="W_inf", const_value=ir.tensor(np.full((2, 1, 1, 1), np.inf, np.float32)))
        graph.initializers["W_inf"] = value
        conv.replace_input_with(1, value)
        graph.outputs[0] = conv.outputs[0]
        graph.remove(mul, safe=True)
        conv.outputs[0].name = "y"
        return model

    planted = infinite_fold(_load(proto))
    feeds = {"x": np.full((1, 1, 1, 1), 1e-30, np.float32)}
    assert not np.array_equal(expected_outputs_float64(proto, feeds)[0],
                              expected_outputs_float64(optcc.ir.serialize(planted), feeds)[0])
    assert not prove_equivalent(_load(proto), planted).complete


@pytest.mark.parametrize("alpha_in_weight,proved", [(2.5, True), (1.0, False)])
def test_gemm_alpha_is_composed_into_the_weight(alpha_in_weight, proved):
    """Gemm(x, W, C; alpha, transB) is Gemm(x, alpha*W, C): proved when the candidate's
    weight carries alpha, not when it drops it."""
    weight = RNG.standard_normal((5, 4)).astype(np.float32)
    bias = RNG.standard_normal(5).astype(np.float32)

    def gemm(w: np.ndarray, alpha: float) -> onnx.ModelProto:
        return helper.make_model(helper.make_graph(
            [helper.make_node("Gemm", ["x", "W", "C"], ["y"], alpha=alpha, transB=1)], "g",
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
            [numpy_helper.from_array(w, "W"), numpy_helper.from_array(bias, "C")]),
            opset_imports=[helper.make_opsetid("", 17)])

    original = gemm(weight, 2.5)
    candidate = gemm((weight.astype(np.float64) * alpha_in_weight).astype(np.float32), 1.0)
    feeds = {"x": RNG.standard_normal((2, 4)).astype(np.float32)}
    a, b = expected_outputs_float64(original, feeds)[0], expected_outputs_float64(candidate, feeds)[0]
    assert np.allclose(a, b, rtol=1e-6) == proved
    assert prove_equivalent(_load(original), _load(candidate)).complete == proved


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the reference evaluator meets the infinity
def test_a_weight_replaced_by_an_infinity_is_not_proved():
    """An infinite weight (or bias) must not agree with a finite one: its rounding bound,
    a multiple of the larger magnitude, would be infinite too."""
    weight = RNG.standard_normal((2, 3, 1, 1)).astype(np.float32)
    bias = RNG.standard_normal(2).astype(np.float32)

    def conv(w: np.ndarray, b: np.ndarray) -> onnx.ModelProto:
        return helper.make_model(helper.make_graph(
            [helper.make_node("Conv", ["x", "W", "B"], ["y"])], "g",
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 2, 2])],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
            [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")]),
            opset_imports=[helper.make_opsetid("", 17)])

    original = conv(weight, bias)
    infinite_weight = weight.copy()
    infinite_weight[1, 2, 0, 0] = np.inf
    infinite_bias = bias.copy()
    infinite_bias[0] = -np.inf
    feeds = {"x": RNG.standard_normal((1, 3, 2, 2)).astype(np.float32)}
    for candidate in (conv(infinite_weight, bias), conv(weight, infinite_bias)):
        assert _differs(original, candidate, feeds)
        assert not prove_equivalent(_load(original), _load(candidate)).complete
    assert prove_equivalent(_load(original), _load(conv(weight, bias))).complete


@pytest.mark.parametrize("array", [np.arange(6, dtype=np.float32).reshape(2, 3), np.array([True, False]),
                                   np.arange(4, dtype=np.int64), np.arange(3, dtype=np.float16)])
def test_a_small_constant_has_one_key_however_it_is_held(array):
    """A parsed tensor (raw bytes or typed fields) and an array-backed one with the same type,
    shape and values get one key; the same bytes in another shape or type do not."""
    numbering = equivalence._Numbering()
    raw = ir.serde.TensorProtoTensor(numpy_helper.from_array(array, "a"))
    typed = onnx.helper.make_tensor("a", helper.np_dtype_to_tensor_dtype(array.dtype), array.shape,
                                    array.reshape(-1).tolist())
    keys = {numbering.tensor(t) for t in (raw, ir.serde.TensorProtoTensor(typed), ir.Tensor(array))}
    assert len(keys) == 1
    assert numbering.tensor(ir.Tensor(array.reshape(-1)[::-1].copy().reshape(array.shape))) not in keys \
        or array.size == 0
    assert numbering.tensor(ir.Tensor(array.reshape(1, -1))) not in keys
    assert numbering.tensor(ir.Tensor(array.view(np.uint8).reshape(-1)[:array.nbytes].copy())) not in keys
