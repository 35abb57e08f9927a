"""The proof's original numbered before the passes change its parse in place
(optcc.numerics.equivalence.number_original, the verifier's ``parsed_changes``): what the
passes then do to that parse cannot change what the original is taken to compute. Correct
rewrites made in place are proved, planted miscompiles made in place are not, and each
verdict is checked on onnx's reference evaluator in float64."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper

import optcc
from optcc.numerics.equivalence import number_original
from tests.reference import expected_outputs_float64
from tests.test_equivalence import _fold_bn

RNG = np.random.default_rng(7)


def _conv_bn(epsilon: float = 1e-2) -> onnx.ModelProto:
    """x -> Conv(W, b) -> BatchNormalization -> y, float32, 4 channels."""
    tensors = {"W": RNG.standard_normal((4, 3, 3, 3)), "b": RNG.standard_normal(4), "s": RNG.uniform(0.5, 2, 4),
               "beta": RNG.standard_normal(4), "mean": RNG.standard_normal(4), "var": RNG.uniform(0.5, 4, 4)}
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W", "b"], ["t"], pads=[1, 1, 1, 1]),
         helper.make_node("BatchNormalization", ["t", "s", "beta", "mean", "var"], ["y"], epsilon=epsilon)], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 8, 8])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in tensors.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _max_difference(a: onnx.ModelProto, b: onnx.ModelProto, shape: tuple[int, ...] = (1, 3, 8, 8)) -> float:
    x = RNG.standard_normal(shape).astype(np.float32)
    got_a, got_b = expected_outputs_float64(a, {"x": x}), expected_outputs_float64(b, {"x": x})
    return max(float(np.abs(u - v).max() / np.abs(u).max()) for u, v in zip(got_a, got_b))


def test_a_fold_made_in_place_after_numbering_is_proved():
    proto = _conv_bn(epsilon=1e-2)
    model = optcc.ir.load(proto)
    premise = number_original(model)
    assert premise is not None  # nothing computed from constants alone: numbered now
    _fold_bn(model, 1e-2)
    try:
        assert premise.prove(model).complete
    finally:
        premise.release()
    assert _max_difference(proto, optcc.ir.serialize(model)) < 1e-5


def test_a_miscompile_made_in_place_after_numbering_is_not_proved():
    """The fold ignores the model's epsilon: the numbering taken before keeps the original's."""
    proto = _conv_bn(epsilon=1e-2)
    model = optcc.ir.load(proto)
    premise = number_original(model)
    assert premise is not None
    _fold_bn(model, 1e-5)
    try:
        assert not premise.prove(model).complete
    finally:
        premise.release()
    assert _max_difference(proto, optcc.ir.serialize(model)) > 1e-4  # really another function


def _flatten(first: str) -> onnx.ModelProto:
    """y = Reshape(x, Concat(Slice(Shape(x), first), [-1])): a target read from x's shape."""
    return onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["": 17]>
        g (float[2, 4, 3] x) => (float[A, B] y) {{
            s = Shape(x)
            zero = Constant <value = int64[1] {{0}}> ()
            one = Constant <value = int64[1] {{1}}> ()
            two = Constant <value = int64[1] {{2}}> ()
            head = Slice(s, {first})
            rest = Constant <value = int64[1] {{-1}}> ()
            t = Concat <axis = 0> (head, rest)
            y = Reshape(x, t)
        }}""")


def _constant_target(model: ir.Model) -> None:
    """In place: the Reshape's target becomes the constant [0, -1] (copy dim 0, flatten the rest)."""
    reshape = next(n for n in model.graph if n.op_type == "Reshape")
    target = ir.Value(name="target", const_value=ir.tensor(np.array([0, -1], np.int64)))
    reshape.replace_input_with(1, target)
    model.graph.initializers["target"] = target
    model.graph.remove([n for n in model.graph if n is not reshape], safe=True)


def _renamed(model: ir.Model) -> None:
    """In place: every value between the graph's inputs and outputs gets another name."""
    for i, node in enumerate(model.graph):
        for output in node.outputs:
            if output not in model.graph.outputs:
                output.name = f"renamed_{i}"


def test_a_reshape_target_folded_in_place_is_proved_only_where_it_copies_the_same_dim():
    for first, proved in (("zero, one", True), ("one, two", False)):
        proto = _flatten(first)
        model = optcc.ir.load(proto)
        premise = number_original(model)
        assert premise is not None
        _constant_target(model)
        try:
            assert premise.prove(model).complete is proved
        finally:
            premise.release()
        x = RNG.standard_normal((2, 4, 3)).astype(np.float32)
        same = [np.array_equal(u, v) for u, v in zip(expected_outputs_float64(proto, {"x": x}),
                                                     expected_outputs_float64(optcc.ir.serialize(model), {"x": x}))]
        assert all(same) is proved  # the verdict is the reference evaluator's


def test_renaming_values_in_place_after_numbering_changes_nothing():
    """Keys and the ranks the proof asks by key are the numbering's, not the names' of now."""
    proto = _flatten("zero, one")
    model = optcc.ir.load(proto)
    premise = number_original(model)
    assert premise is not None
    _renamed(model)
    try:
        assert premise.prove(model).complete
    finally:
        premise.release()
    x = RNG.standard_normal((2, 4, 3)).astype(np.float32)
    np.testing.assert_array_equal(expected_outputs_float64(optcc.ir.serialize(model), {"x": x})[0],
                                  expected_outputs_float64(proto, {"x": x})[0])


def test_a_candidate_with_other_static_input_shapes_is_left_to_the_full_proof():
    proto = _conv_bn()
    model = optcc.ir.load(proto)
    premise = number_original(model)
    assert premise is not None
    model.graph.inputs[0].shape = ir.Shape([2, 3, 8, 8])
    try:
        assert premise.prove(model) is None
    finally:
        premise.release()


def test_an_original_that_computes_from_constants_alone_is_not_numbered_early():
    """A fold of the original's would need its nodes when the candidate is judged."""
    proto = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["": 17]>
        g (float[2, 3] x) => (float[2, 3] y) {
            c = Constant <value = float[3] {1, 2, 3}> ()
            d = Neg(c)
            y = Add(x, d)
        }""")
    assert number_original(optcc.ir.load(proto)) is None


class _PlantedSigmoid(ir.passes.InPlacePass):
    """A miscompile: the Relu becomes a Sigmoid."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        for node in model.graph:
            if node.op_type == "Relu":
                node.op_type = "Sigmoid"
        return ir.passes.PassResult(model, modified=True)


def _conv_relu(tmp_path) -> str:  # noqa: ANN001 - pytest's tmp_path
    proto = _conv_bn()
    proto.graph.node[1].output[0] = "z"
    proto.graph.node.append(helper.make_node("Relu", ["z"], ["y"]))
    path = str(tmp_path / "model.onnx")
    onnx.save(proto, path)
    return path


def test_optimize_numbers_a_files_parse_before_its_passes_and_still_catches_a_miscompile(tmp_path):
    path = _conv_relu(tmp_path)
    fused = optcc.optimize(path, passes=["fuse-batchnorm"])
    assert fused.report.verification["reference"] == "proof"
    assert _max_difference(onnx.load(path), fused.model) < 1e-5
    planted = optcc.optimize(path, passes=["fuse-batchnorm", _PlantedSigmoid()])
    # the first check (on the numbering taken before the passes) fails; the bisection reverts the
    # planted pass, and the fused result left is proved on the file parsed again
    assert [(p.name, p.status) for p in planted.report.passes] == [("fuse-batchnorm", "changed"),
                                                                   ("_PlantedSigmoid", "reverted")]
    assert planted.report.verification["status"] == "passed"
    assert _max_difference(onnx.load(path), planted.model) < 1e-5  # the miscompile was undone


def _conv_affine_concat(tmp_path) -> str:  # noqa: ANN001 - pytest's tmp_path
    """x -> Conv -> Mul, Add per channel -> Flatten -> Concat of it twice -> y: the Concat's
    rank is not given by the definitions (Flatten's), so the numbering infers ranks."""
    tensors = {"W": RNG.standard_normal((4, 3, 3, 3)), "b": RNG.standard_normal(4),
               "s": RNG.uniform(0.5, 2, (1, 4, 1, 1)), "d": RNG.standard_normal((1, 4, 1, 1))}
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W", "b"], ["t"], pads=[1, 1, 1, 1]),
         helper.make_node("Mul", ["t", "s"], ["u"]), helper.make_node("Add", ["u", "d"], ["z"]),
         helper.make_node("Flatten", ["z"], ["f"], axis=1), helper.make_node("Concat", ["f", "f"], ["y"], axis=1)],
        "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 512])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in tensors.items()])
    path = str(tmp_path / "model.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_optimize_hands_the_files_parse_to_the_numbering(tmp_path, monkeypatch):  # noqa: ANN001
    """The numbering's shape inference of the original reads the parse the file was loaded
    from: the file is parsed once, and the fused result is proved."""
    path = _conv_affine_concat(tmp_path)
    parses: list[object] = []
    real = onnx.load
    monkeypatch.setattr(onnx, "load", lambda *args, **kwargs: parses.append(args) or real(*args, **kwargs))
    fused = optcc.optimize(path, passes=["fuse-conv-affine"])
    assert [(p.name, p.status) for p in fused.report.passes] == [("fuse-conv-affine", "changed")]
    assert fused.report.verification["reference"] == "proof"
    assert parses == []
    monkeypatch.setattr(onnx, "load", real)
    assert _max_difference(onnx.load(path), fused.model) < 1e-5


def _matmul_add(rank: int) -> onnx.ModelProto:
    shape, out = ("2, 5", "2, 4") if rank == 2 else ("2, 3, 5", "2, 3, 4")
    weights = ", ".join(str(v) for v in RNG.standard_normal(20).round(3))
    return onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["": 17]>
        g (float[{shape}] x) => (float[{out}] y) {{
            w = Constant <value = float[5, 4] {{{weights}}}> ()
            b = Constant <value = float[4] {{0.5, -1.0, 2.0, 0.25}}> ()
            m = MatMul(x, w)
            y = Add(m, b)
        }}""")


def _gemm_in_place(model: ir.Model) -> None:
    """In place: MatMul + Add become one Gemm (the original's values, renamed, stay in the object)."""
    matmul = next(n for n in model.graph if n.op_type == "MatMul")
    add = next(n for n in model.graph if n.op_type == "Add")
    gemm = ir.node("Gemm", [matmul.inputs[0], matmul.inputs[1], add.inputs[1]])
    model.graph.append(gemm)
    model.graph.outputs[0] = gemm.outputs[0]
    model.graph.remove([add, matmul], safe=True)
    gemm.outputs[0].name = "y"
    matmul.outputs[0].name = "y_before"  # a removed value keeps a name the candidate's inference may use


def test_a_gemm_made_in_place_is_proved_for_a_rank_2_input_only():
    """The rank of x is inferred on the original while it is unchanged; the candidate, the
    same object changed in place, is inferred on its own."""
    for rank in (2, 3):
        proto = _matmul_add(rank)
        model = optcc.ir.load(proto)
        premise = number_original(model)
        assert premise is not None
        _gemm_in_place(model)
        try:
            assert premise.prove(model).complete is (rank == 2)
        finally:
            premise.release()
        if rank == 2:
            x = RNG.standard_normal((2, 5)).astype(np.float32)
            np.testing.assert_allclose(expected_outputs_float64(optcc.ir.serialize(model), {"x": x})[0],
                                       expected_outputs_float64(proto, {"x": x})[0], rtol=1e-6, atol=1e-6)


def _gemm_after_reshape_chain() -> onnx.ModelProto:
    """x -> Reshape(x, [dim 0 of x through int32, -1]) -> Transpose -> Relu -> MatMul + Add."""
    weights = ", ".join(str(v) for v in RNG.standard_normal(24).round(3))
    return onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["": 17]>
        g (float[6, 5] x) => (float[5, 4] y) {{
            zero = Constant <value = int64[1] {{0}}> ()
            one = Constant <value = int64[1] {{1}}> ()
            s = Shape(x)
            s32 = Cast <to = 6> (s)
            head = Slice(s32, zero, one)
            h64 = Cast <to = 7> (head)
            minus = Constant <value = int64[1] {{-1}}> ()
            target = Concat <axis = 0> (h64, minus)
            r = Reshape(x, target)
            t = Transpose <perm = [1, 0]> (r)
            u = Relu(t)
            w = Constant <value = float[6, 4] {{{weights}}}> ()
            b = Constant <value = float[4] {{0.5, -1.0, 2.0, 0.25}}> ()
            m = MatMul(u, w)
            y = Add(m, b)
        }}""")


def test_a_gemm_made_in_place_after_a_reshape_chain_is_proved_and_a_transposed_weight_is_not():
    """MatMul + Add is Gemm only for a rank-2 input (here behind a Relu, a Transpose and a
    Reshape whose target is read from x's shape)."""
    proto = _gemm_after_reshape_chain()
    for transposed, proved in ((0, True), (1, False)):
        model = optcc.ir.load(proto)
        premise = number_original(model)
        assert premise is not None
        _gemm_in_place(model)
        gemm = next(n for n in model.graph if n.op_type == "Gemm")
        if transposed:  # a miscompile: the weight read transposed (a (4, 6) weight would fit)
            w = gemm.inputs[1]
            flipped = ir.Value(name="w_t", const_value=ir.tensor(optcc.ir.const_tensor(w).numpy().reshape(4, 6)))
            model.graph.initializers["w_t"] = flipped
            gemm.replace_input_with(1, flipped)
            gemm.attributes["transB"] = ir.AttrInt64("transB", 1)
        try:
            assert premise.prove(model).complete is proved
        finally:
            premise.release()
        x = RNG.standard_normal((6, 5)).astype(np.float32)
        got = expected_outputs_float64(optcc.ir.serialize(model), {"x": x})[0]
        want = expected_outputs_float64(proto, {"x": x})[0]
        assert np.allclose(got, want, rtol=1e-6, atol=1e-6) is proved
