"""The proof of equivalence (optcc.numerics.equivalence): exact rewrites and correct folds are
proved; planted miscompiles are not. Proved pairs are also run on onnx's reference evaluator
in float64 (an independent check that the proof means what it says)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

import optcc
from optcc.numerics.equivalence import prove_equivalent
from tests.reference import expected_outputs_float64

RNG = np.random.default_rng(0)


def _conv_chain(tail: list[onnx.NodeProto], extra: list[onnx.TensorProto], out: str = "y") -> onnx.ModelProto:
    """x -> Conv(W, b) -> tail -> y, float32, channels 4."""
    weights = [numpy_helper.from_array(RNG.standard_normal((4, 3, 3, 3)).astype(np.float32), "W"),
               numpy_helper.from_array(RNG.standard_normal(4).astype(np.float32), "b")]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W", "b"], ["t"], pads=[1, 1, 1, 1]), *tail], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, [1, 4, 8, 8])], weights + extra)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _bn(epsilon: float = 1e-2) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    params = {"s": RNG.uniform(0.5, 2, 4), "beta": RNG.standard_normal(4), "mean": RNG.standard_normal(4),
              "var": RNG.uniform(0.5, 4, 4)}
    tensors = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in params.items()]
    return [helper.make_node("BatchNormalization", ["t", "s", "beta", "mean", "var"], ["y"], epsilon=epsilon)], tensors


def _const(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, np.float32), name)


def _load(proto: onnx.ModelProto) -> ir.Model:
    return optcc.ir.load(proto)


def _optimized(proto: onnx.ModelProto, passes: list[str]) -> ir.Model:
    return optcc.optimize(proto, passes=passes, verify=False).ir_model


def _same_in_float64(a: onnx.ModelProto, b: onnx.ModelProto) -> None:
    x = RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)
    got_a = expected_outputs_float64(a, {"x": x})
    got_b = expected_outputs_float64(b, {"x": x})
    for u, v in zip(got_a, got_b):
        np.testing.assert_allclose(v, u, rtol=1e-6, atol=1e-6 * float(np.abs(u).max()))


@pytest.mark.parametrize("tail,extra,passes", [
    pytest.param(*_bn(), ["fuse-batchnorm"], id="conv-batchnorm"),
    pytest.param([helper.make_node("Mul", ["t", "c"], ["m"]), helper.make_node("Add", ["m", "d"], ["y"])],
                 [_const("c", RNG.uniform(0.5, 2, (4, 1, 1))), _const("d", RNG.standard_normal((1, 4, 1, 1)))],
                 ["fuse-conv-affine"], id="conv-mul-add"),
    pytest.param([helper.make_node("Dropout", ["t"], ["i"]), helper.make_node("Identity", ["i"], ["y"])], [],
                 ["eliminate-identities"], id="dropout-identity"),
])
def test_correct_rewrites_are_proved(tail, extra, passes):
    proto = _conv_chain(tail, extra)
    candidate = _optimized(proto, passes)
    assert len(candidate.graph) < len(proto.graph.node)
    proof = prove_equivalent(_load(proto), candidate)
    assert proof.complete, proof.outputs
    _same_in_float64(proto, optcc.ir.serialize(candidate))


def test_common_subexpressions_and_duplicate_constants_are_proved():
    proto = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["": 17]>
        g (float[2, 3] x) => (float[2, 3] y) {
            a = Constant <value = float[1] {2.0}> ()
            b = Constant <value = float[1] {2.0}> ()
            p = Mul(x, a)
            q = Mul(x, b)
            y = Add(p, q)
        }""")
    candidate = _optimized(proto, ["lift-constants", "deduplicate-initializers", "eliminate-common-subexpressions"])
    assert len(candidate.graph) == 2
    assert prove_equivalent(_load(proto), candidate).complete


def _planted(proto: onnx.ModelProto, edit) -> ir.Model:  # noqa: ANN001 - a function that edits the model
    model = _load(proto)
    edit(model)
    return model


def _fold_bn(model: ir.Model, epsilon: float) -> None:
    """Fold the BatchNormalization into the Conv in float64, with ``epsilon``."""
    graph = model.graph
    bn = next(n for n in graph if n.op_type == "BatchNormalization")
    conv = next(n for n in graph if n.op_type == "Conv")
    s, beta, mean, var = (v.const_value.numpy().astype(np.float64) for v in bn.inputs[1:])
    factor = s / np.sqrt(var + epsilon)
    weight, bias = conv.inputs[1].const_value.numpy(), conv.inputs[2].const_value.numpy()
    conv.inputs[1].const_value = ir.tensor((weight * factor[:, None, None, None]).astype(np.float32))
    conv.inputs[2].const_value = ir.tensor(((bias - mean) * factor + beta).astype(np.float32))
    graph.outputs[0] = conv.outputs[0]  # the BatchNormalization's output was only the graph's
    graph.remove(bn, safe=True)
    conv.outputs[0].name = "y"


def test_a_fold_with_the_models_epsilon_is_proved_and_one_that_ignores_it_is_not():
    proto = _conv_chain(*_bn(epsilon=1e-2))
    assert prove_equivalent(_load(proto), _planted(proto, lambda m: _fold_bn(m, 1e-2))).complete
    assert not prove_equivalent(_load(proto), _planted(proto, lambda m: _fold_bn(m, 1e-5))).complete


def test_a_weight_off_by_more_than_rounding_is_not_proved():
    proto = _conv_chain([helper.make_node("Relu", ["t"], ["y"])], [])

    def nudge(model: ir.Model) -> None:
        weight = model.graph.initializers["W"]
        array = weight.const_value.numpy().copy()
        array[0, 0, 0, 0] *= np.float32(1 + 1e-5)  # ~100 roundings: no fold rounds that much
        weight.const_value = ir.tensor(array)

    assert not prove_equivalent(_load(proto), _planted(proto, nudge)).complete


def test_a_constant_on_the_wrong_axis_is_not_proved_as_a_channel_factor():
    """(1, 1, 4) broadcasts along the last spatial axis, not the channels: folding it into
    the Conv's channels would be a miscompile."""
    factor = RNG.uniform(0.5, 2, (1, 1, 4)).astype(np.float32)
    proto = _conv_chain([helper.make_node("Mul", ["t", "c"], ["y"])], [_const("c", factor)])
    proto.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 4
    proto.graph.output[0].type.tensor_type.shape.dim[3].dim_value = 4

    def fold_as_channels(model: ir.Model) -> None:
        conv = next(n for n in model.graph if n.op_type == "Conv")
        mul = next(n for n in model.graph if n.op_type == "Mul")
        v = factor.reshape(-1).astype(np.float64)
        conv.inputs[1].const_value = ir.tensor((conv.inputs[1].const_value.numpy() * v[:, None, None, None]).astype(np.float32))
        conv.inputs[2].const_value = ir.tensor((conv.inputs[2].const_value.numpy() * v).astype(np.float32))
        model.graph.outputs[0] = conv.outputs[0]
        model.graph.remove(mul, safe=True)
        conv.outputs[0].name = "y"

    assert not prove_equivalent(_load(proto), _planted(proto, fold_as_channels)).complete


def test_merging_two_random_draws_is_not_proved():
    proto = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["": 17]>
        g (float[2, 3] x) => (float[2, 3] y) {
            p = RandomNormalLike(x)
            q = RandomNormalLike(x)
            y = Sub(p, q)
        }""")

    def merge(model: ir.Model) -> None:
        first, second = [n for n in model.graph if n.op_type == "RandomNormalLike"]
        second.outputs[0].replace_all_uses_with(first.outputs[0])
        model.graph.remove(second, safe=True)

    assert not prove_equivalent(_load(proto), _planted(proto, merge)).complete


def test_removing_a_training_mode_dropout_is_not_proved():
    proto = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["": 17]>
        g (float[2, 3] x) => (float[2, 3] y) {
            r = Constant <value = float {0.5}> ()
            on = Constant <value = bool {1}> ()
            y = Dropout(x, r, on)
        }""")

    def remove(model: ir.Model) -> None:
        dropout = next(n for n in model.graph if n.op_type == "Dropout")
        model.graph.outputs[0] = dropout.inputs[0]

    assert not prove_equivalent(_load(proto), _planted(proto, remove)).complete


def _mul_conv(factor: np.ndarray, x_dims: tuple = (1, 3, 8, 8), group: int = 1) -> onnx.ModelProto:
    """x -> Mul(x, factor) -> Conv(W, b, zero padding) -> y."""
    weights = [numpy_helper.from_array(RNG.standard_normal((4 if group == 1 else 3, 3 // group, 3, 3)).astype(np.float32), "W"),
               numpy_helper.from_array(RNG.standard_normal(4 if group == 1 else 3).astype(np.float32), "b"),
               _const("s", factor)]
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "s"], ["m"]),
         helper.make_node("Conv", ["m", "W", "b"], ["y"], pads=[1, 1, 1, 1], group=group)],
        "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(x_dims))],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _fold_input_factor(model: ir.Model, weight_factor, bias_factor: float = 1.0) -> None:  # noqa: ANN001
    """Conv(Mul(x, s), W, b) -> Conv(x, W * weight_factor, b * bias_factor), in float64."""
    graph = model.graph
    mul = next(n for n in graph if n.op_type == "Mul")
    conv = next(n for n in graph if n.op_type == "Conv")
    weight, bias = conv.inputs[1].const_value.numpy(), conv.inputs[2].const_value.numpy()
    weight_factor = np.reshape(weight_factor, (1, -1, 1, 1))  # per input channel (Conv, one group)
    conv.inputs[1].const_value = ir.tensor((weight.astype(np.float64) * weight_factor).astype(np.float32))
    conv.inputs[2].const_value = ir.tensor((bias.astype(np.float64) * bias_factor).astype(np.float32))
    conv.replace_input_with(0, mul.inputs[0])
    graph.remove(mul, safe=True)


@pytest.mark.parametrize("factor", [0.5, 0.3, [[[[1.7]]]]])
def test_a_scalar_input_factor_folded_into_the_conv_weight_is_proved(factor):
    proto = _mul_conv(np.array(factor))
    candidate = _optimized(proto, ["fuse-conv-affine"])
    assert [n.op_type for n in candidate.graph] == ["Conv"]
    assert prove_equivalent(_load(proto), candidate).complete
    _same_in_float64(proto, optcc.ir.serialize(candidate))


def test_an_input_factor_folded_wrongly_or_not_finite_is_not_proved():
    proto = _mul_conv(np.array(0.3))
    assert prove_equivalent(_load(proto), _planted(proto, lambda m: _fold_input_factor(m, 0.3))).complete
    # the bias scaled too (the factor read as an output factor), or the weight scaled twice
    assert not prove_equivalent(_load(proto), _planted(proto, lambda m: _fold_input_factor(m, 0.3, 0.3))).complete
    assert not prove_equivalent(_load(proto), _planted(proto, lambda m: _fold_input_factor(m, 0.09))).complete
    # an infinite factor: the original's padding stays 0, the folded weight makes inf * 0 = NaN there
    infinite = _mul_conv(np.array(np.inf))
    with np.errstate(invalid="ignore"):
        assert not prove_equivalent(_load(infinite), _planted(infinite, lambda m: _fold_input_factor(m, np.inf))).complete


@pytest.mark.parametrize("group", [1, 3])
def test_a_per_channel_input_factor_is_proved_where_the_inputs_channels_are_known(group):
    proto = _mul_conv(RNG.uniform(0.5, 2, (1, 3, 1, 1)), group=group)
    candidate = _optimized(proto, ["fuse-conv-affine"])
    assert [n.op_type for n in candidate.graph] == ["Conv"]
    assert prove_equivalent(_load(proto), candidate).complete
    _same_in_float64(proto, optcc.ir.serialize(candidate))


def test_a_per_channel_input_factor_is_not_proved_where_it_may_broadcast_the_channels():
    """The prover knows ranks, not dims: a factor of 3 channels against an input whose
    channels are unknown (or 1) could broadcast it to 3, and the folded Conv would read
    the narrower input. Not proved."""
    factor = RNG.uniform(0.5, 2, (1, 3, 1, 1))
    for x_dims in ((1, "C", 8, 8), (1, 1, 8, 8)):  # with 1 channel the original runs: Mul broadcasts x to 3
        proto = _mul_conv(factor, x_dims=x_dims)
        planted = _planted(proto, lambda m: _fold_input_factor(m, factor))
        assert not prove_equivalent(_load(proto), planted).complete
        assert prove_equivalent(_load(proto), _load(proto)).complete
    # the pass itself refuses the fold where it cannot tell (the Mul "could enlarge its input")
    unknown = _mul_conv(factor, x_dims=(1, "C", 8, 8))
    assert [n.op_type for n in _optimized(unknown, ["fuse-conv-affine"]).graph] == ["Mul", "Conv"]


def test_the_verifier_passes_a_proved_model_without_running_it_and_runs_the_users_samples():
    proto = _conv_chain(*_bn())
    result = optcc.optimize(proto, passes=["fuse-batchnorm"])
    verification = result.report.verification
    assert verification["reference"] == "proof" and verification["samples"] == 0
    assert verification["proof"]["outputs"] == {"y": True}
    x = RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)
    given = optcc.optimize(proto, passes=["fuse-batchnorm"], inputs=[{"x": x}]).report.verification
    assert given["samples"] == 1 and given["proof"] is None


def _flatten_model(target_dims: str) -> onnx.ModelProto:
    return onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["": 17]>
        g (float[N, 4, 3] x) => (float[N, 12] y) {{
            s = Shape(x)
            zero = Constant <value = int64[1] {{0}}> ()
            one = Constant <value = int64[1] {{1}}> ()
            first = Slice(s, {target_dims})
            rest = Constant <value = int64[1] {{-1}}> ()
            t = Concat <axis = 0> (first, rest)
            y = Reshape(x, t)
        }}""")


def test_a_reshape_target_built_from_the_inputs_shape_is_proved_equal_to_its_constant_form():
    proto = _flatten_model("zero, one")
    candidate = _optimized(proto, ["simplify-reshape-targets", "eliminate-dead-nodes"])
    assert [n.op_type for n in candidate.graph if n.op_type != "Constant"] == ["Reshape"]
    assert prove_equivalent(_load(proto), candidate).complete
    x = RNG.standard_normal((5, 4, 3)).astype(np.float32)
    np.testing.assert_array_equal(expected_outputs_float64(optcc.ir.serialize(candidate), {"x": x})[0],
                                  expected_outputs_float64(proto, {"x": x})[0])


def test_a_reshape_target_copying_the_wrong_dim_is_not_proved():
    """Reshape(x, [0, -1]) copies dim 0; a target made of dim 1 at position 0 is another model."""
    proto = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["": 17]>
        g (float[N, 4, 3] x) => (float[M, K] y) {
            s = Shape <start = 1, end = 2> (x)
            rest = Constant <value = int64[1] {-1}> ()
            t = Concat <axis = 0> (s, rest)
            y = Reshape(x, t)
        }""")

    def copy_dim_zero(model: ir.Model) -> None:
        reshape = next(n for n in model.graph if n.op_type == "Reshape")
        reshape.replace_input_with(1, ir.Value(name="c", const_value=ir.tensor(np.array([0, -1], np.int64))))
        model.graph.initializers["c"] = reshape.inputs[1]

    assert not prove_equivalent(_load(proto), _planted(proto, copy_dim_zero)).complete


def test_matmul_add_folded_into_gemm_is_proved_for_a_rank_2_input_only():
    def model(rank: int) -> onnx.ModelProto:
        shape = "2, 5" if rank == 2 else "2, 3, 5"
        out = "2, 4" if rank == 2 else "2, 3, 4"
        return onnx.parser.parse_model(f"""
            <ir_version: 8, opset_import: ["": 17]>
            g (float[{shape}] x) => (float[{out}] y) {{
                w = Constant <value = float[5, 4] {{{", ".join(str(v) for v in RNG.standard_normal(20).round(3))}}}> ()
                b = Constant <value = float[4] {{0.5, -1.0, 2.0, 0.25}}> ()
                m = MatMul(x, w)
                y = Add(m, b)
            }}""")

    proto = model(2)
    candidate = _optimized(proto, ["lift-constants", "fuse-matmul-add"])
    assert [n.op_type for n in candidate.graph] == ["Gemm"]
    assert prove_equivalent(_load(proto), candidate).complete

    def gemm_on_rank_3(m: ir.Model) -> None:  # what a wrong fold would write
        matmul = next(n for n in m.graph if n.op_type == "MatMul")
        add = next(n for n in m.graph if n.op_type == "Add")
        gemm = ir.node("Gemm", [matmul.inputs[0], matmul.inputs[1], add.inputs[1]])
        m.graph.append(gemm)
        m.graph.outputs[0] = gemm.outputs[0]
        m.graph.remove([add, matmul], safe=True)
        gemm.outputs[0].name = "y"

    assert not prove_equivalent(_load(model(3)), _planted(model(3), gemm_on_rank_3)).complete


def test_legacy_broadcasting_is_not_read_as_numpy_broadcasting():
    """Add-6 with broadcast=1, axis=1 adds a (C,) vector along axis 1, where numpy rules would
    add it along the last axis: the checker reads neither, so even this correct fold into
    the Conv's bias is left to the samples."""
    proto = _conv_chain([helper.make_node("Add", ["t", "c"], ["y"], broadcast=1, axis=1)],
                        [_const("c", RNG.standard_normal(4))])
    proto.opset_import[0].version = 6
    folded = onnx.ModelProto()
    folded.CopyFrom(proto)
    folded.graph.node[1].CopyFrom(helper.make_node("Identity", ["t"], ["y"]))
    conv_bias = next(t for t in folded.graph.initializer if t.name == "b")
    bias = numpy_helper.to_array(conv_bias) + numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == "c"))
    conv_bias.CopyFrom(numpy_helper.from_array(bias.astype(np.float32), "b"))
    assert not prove_equivalent(_load(proto), _load(folded)).complete


def test_an_input_whose_type_changed_is_not_proved():
    proto = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["": 17]>
        g (float[2, 3] x) => (float[2, 3] y) { y = Identity(x) }""")
    other = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["": 17]>
        g (double[2, 3] x) => (float[2, 3] y) { y = Cast <to = 1> (x) }""")
    assert not prove_equivalent(_load(proto), _load(other)).complete


def test_folds_read_in_another_order_than_they_are_computed_are_matched_value_by_value():
    proto = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["": 17]>
        g (float[2, 3] x) => (float[2, 3] y) {
            c1 = Constant <value = float[1] {1.5}> ()
            c2 = Constant <value = float[1] {2.0}> ()
            a = Add(c1, c2)
            b = Mul(c1, c2)
            p = Mul(x, b)
            y = Add(p, a)
        }""")
    candidate = _optimized(proto, ["fold-constants"])
    assert [n.op_type for n in candidate.graph] == ["Mul", "Add"]
    proof = prove_equivalent(_load(proto), candidate)
    assert proof.complete and proof.folds_checked == 2


def test_constants_are_equal_only_byte_for_byte():
    """-0.0 and 0.0, or string tensors that concatenate to the same bytes, are other constants."""
    def model(floats: str, strings: str) -> onnx.ModelProto:
        return onnx.parser.parse_model(f"""
            <ir_version: 8, opset_import: ["": 17]>
            g (float[2] x) => (float[2] y, string[2] s) {{
                c = Constant <value = float[2] {{{floats}}}> ()
                y = Add(x, c)
                s = Constant <value = string[2] {{{strings}}}> ()
            }}""")

    same = prove_equivalent(_load(model("1.0, 0.0", '"ab", "c"')), _load(model("1.0, 0.0", '"ab", "c"')))
    assert same.complete
    signed = prove_equivalent(_load(model("1.0, 0.0", '"ab", "c"')), _load(model("1.0, -0.0", '"ab", "c"')))
    assert signed.outputs == {"y": False, "s": True}
    split = prove_equivalent(_load(model("1.0, 0.0", '"ab", "c"')), _load(model("1.0, 0.0", '"a", "bc"')))
    assert split.outputs == {"y": True, "s": False}


def test_protos_handed_over_prove_the_same_folds_with_external_data(tmp_path):
    """The verifier hands the proof the original's file parsed without its external data
    and the candidate's serialization; a fold of a large weight stored outside is still
    evaluated from the parse's weights, and a wrong fold is still not proved."""
    weight = RNG.standard_normal((4, 32)).astype(np.float32)  # past the elements read as shapes
    proto = helper.make_model(helper.make_graph(
        [helper.make_node("Mul", ["w", "k"], ["wk"]), helper.make_node("MatMul", ["x", "wk"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 32])],
        [numpy_helper.from_array(weight, "w"), _const("k", np.float32(0.5))]),
        opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "m.onnx"
    onnx.save(proto, path, save_as_external_data=True, all_tensors_to_one_file=True, location="m.data",
              size_threshold=0)
    folded = optcc.optimize(str(path), passes=["fold-constants"], verify=False).ir_model
    assert [n.op_type for n in folded.graph] == ["MatMul"]

    def proved(candidate: ir.Model):
        return prove_equivalent(optcc.ir.load(str(path)), candidate,
                                original_proto=onnx.load(path, load_external_data=False),
                                candidate_proto=optcc.ir.serialize(candidate))

    proof = proved(folded)
    assert proof.complete and proof.folds_checked == 1

    def wrong_fold(model: ir.Model) -> None:
        matmul = next(n for n in model.graph if n.op_type == "MatMul")
        bad = ir.Value(name="bad", const_value=ir.tensor(weight * np.float32(0.5) * np.float32(1.001)))
        model.graph.initializers["bad"] = bad
        matmul.replace_input_with(1, bad)

    assert not proved(_planted(onnx.load(path), wrong_fold)).complete
    x = RNG.standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_allclose(expected_outputs_float64(optcc.ir.serialize(folded), {"x": x})[0],
                               expected_outputs_float64(onnx.load(path), {"x": x})[0], rtol=1e-6, atol=1e-6)


def test_a_constant_of_shape_fold_is_proved_by_its_definition(monkeypatch):
    """A ConstantOfShape of a constant shape is its value's bits everywhere: proved
    without a session; a fill one ulp off is another model."""
    proto = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["": 17]>
        g (float[4, 3] x) => (float[4, 3] y) {
            s = Constant <value = int64[2] {4, 3}> ()
            c = ConstantOfShape <value = float[1] {1.5}> (s)
            y = Add(x, c)
        }""")
    candidate = _optimized(proto, ["fold-constants"])
    assert [n.op_type for n in candidate.graph] == ["Add"]

    def no_session(*args, **kwargs):
        raise AssertionError("a ConstantOfShape fold needs no onnxruntime session")

    monkeypatch.setattr("optcc.numerics.equivalence.make_session", no_session)
    proof = prove_equivalent(_load(proto), candidate)
    assert proof.complete and proof.folds_checked == 1

    def off_by_one_ulp(model: ir.Model) -> None:
        add = next(n for n in model.graph if n.op_type == "Add")
        fill = np.full((4, 3), np.nextafter(np.float32(1.5), np.float32(2)), np.float32)
        wrong = ir.Value(name="wrong", const_value=ir.tensor(fill))
        model.graph.initializers["wrong"] = wrong
        add.replace_input_with(1, wrong)

    assert not prove_equivalent(_load(proto), _planted(proto, off_by_one_ulp)).complete
    x = RNG.standard_normal((4, 3)).astype(np.float32)
    np.testing.assert_array_equal(expected_outputs_float64(optcc.ir.serialize(candidate), {"x": x})[0],
                                  expected_outputs_float64(proto, {"x": x})[0])


@pytest.mark.parametrize("handed_over", [False, True])
def test_a_fold_of_a_large_constant_node_is_evaluated_from_its_data(handed_over):
    """Shape inference sees large Constant-node tensors without their data; a fold that
    reads one is still evaluated on its real values: the correct fold is proved, one off
    by 0.1% is not."""
    weight = RNG.standard_normal((4, 32)).astype(np.float32)  # past the elements read as shapes
    proto = helper.make_model(helper.make_graph(
        [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(weight, "w")),
         helper.make_node("Mul", ["w", "k"], ["wk"]), helper.make_node("MatMul", ["x", "wk"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 32])],
        [_const("k", np.float32(0.5))]),
        opset_imports=[helper.make_opsetid("", 17)])
    folded = _optimized(proto, ["fold-constants"])
    assert [n.op_type for n in folded.graph] == ["MatMul"]

    def proved(candidate: ir.Model):
        given = {"original_proto": onnx.ModelProto.FromString(proto.SerializeToString()),
                 "candidate_proto": optcc.ir.serialize(candidate)} if handed_over else {}
        return prove_equivalent(_load(proto), candidate, **given)

    proof = proved(folded)
    assert proof.complete and proof.folds_checked == 1

    def wrong_fold(model: ir.Model) -> None:
        matmul = next(n for n in model.graph if n.op_type == "MatMul")
        bad = ir.Value(name="bad", const_value=ir.tensor(weight * np.float32(0.5) * np.float32(1.001)))
        model.graph.initializers["bad"] = bad
        matmul.replace_input_with(1, bad)

    assert not proved(_planted(proto, wrong_fold)).complete
    x = RNG.standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_allclose(expected_outputs_float64(optcc.ir.serialize(folded), {"x": x})[0],
                               expected_outputs_float64(proto, {"x": x})[0], rtol=1e-6, atol=1e-6)
