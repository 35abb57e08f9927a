"""The shortcuts passes take when reading a model: weight sizes read from tensor protos,
shape inference on a copy without the weights' data, constants decoded once per pass
(shared by several readers), ConstantOfShape fills held as views until stored, and the
dead-node pass without bodies, functions or foreign opsets, normalize on a graph already
in topological order. Each is judged against an
independent reference: numpy, or onnx's reference evaluator on the original."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper
from onnx_ir.passes.common import NameFixPass, TopologicalSortPass

import optcc
from optcc.passes import EliminateDeadNodesPass, FoldConstantsPass, NormalizeGraphPass
from optcc.passes.fuse_batchnorm import FuseBatchNormPass
from reference import (
    EXACT_RTOL,
    FUSION_RTOL,
    assert_close,
    expected_outputs,
    expected_outputs_float64,
    onnxruntime_outputs,
)

RNG = np.random.default_rng(0)


def _model(nodes: list, inputs: list, outputs: list, inits: list, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _vi(name: str, shape: list | None, dtype: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


# ------------------------------------------------------------------ weight bytes


def test_weight_bytes_counts_every_tensor_kind_as_numpy_does() -> None:
    w = RNG.normal(size=(3, 5)).astype(np.float32)
    h = RNG.normal(size=(7,)).astype(np.float16)
    i = np.arange(4, dtype=np.int64)
    c = RNG.normal(size=(2, 2)).astype(np.float64)
    proto = _model(
        [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(c, "c")),
         helper.make_node("MatMul", ["x", "w"], ["y"]),
         helper.make_node("Cast", ["h"], ["h32"], to=TensorProto.FLOAT),
         helper.make_node("Cast", ["i"], ["i32"], to=TensorProto.FLOAT)],
        [_vi("x", [2, 3])], [_vi("y", [2, 5]), _vi("h32", [7]), _vi("i32", [4]),
                             _vi("c", [2, 2], TensorProto.DOUBLE)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(h, "h"), numpy_helper.from_array(i, "i")])
    model = ir.from_proto(proto)  # proto-backed tensors
    expected = w.nbytes + h.nbytes + i.nbytes + c.nbytes
    assert optcc.ir.weight_bytes(model) == expected
    for value in model.graph.initializers.values():  # numpy-backed tensors
        value.const_value = ir.Tensor(value.const_value.numpy(), name=value.name)
    assert optcc.ir.weight_bytes(model) == expected


# ------------------------------------------------------------------ shape inference


def test_shapes_inferred_through_large_weights_fold_and_the_weights_stay_whole() -> None:
    """A Shape of a MatMul output whose width comes from a 3.6 kB float weight: inference
    runs on a copy without the weight's bytes but with its dims, the Shape folds to what
    the original computes, and the weight the model keeps is intact."""
    w = RNG.normal(size=(3, 300)).astype(np.float32)
    proto = _model(
        [helper.make_node("MatMul", ["x", "w"], ["y"]),
         helper.make_node("Relu", ["y"], ["r"]),
         helper.make_node("Shape", ["r"], ["s"])],
        [_vi("x", [2, 3])], [_vi("r", None), _vi("s", None, TensorProto.INT64)],
        [numpy_helper.from_array(w, "w")])
    model = ir.from_proto(proto)
    result = FoldConstantsPass()(model)
    assert result.modified
    assert "Shape" not in optcc.ir.op_histogram(model)
    feeds = {"x": RNG.normal(size=(2, 3)).astype(np.float32)}
    assert_close(onnxruntime_outputs(model, feeds), expected_outputs(ir.from_proto(proto), feeds), EXACT_RTOL,
                 what="folded model vs onnx reference evaluator on the original")
    np.testing.assert_array_equal(model.graph.initializers["w"].const_value.numpy(), w)


# ------------------------------------------------------------------ constants read once


def test_batchnorm_parameters_shared_by_two_convolutions_fold_into_both() -> None:
    """Both BatchNormalizations read the same parameter tensors: each fold reads them (once
    decoded for the whole pass) and both come out right."""
    c = 4
    inits = [numpy_helper.from_array(RNG.normal(size=(c, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(RNG.normal(size=(c, 3, 3, 3)).astype(np.float32), "w2")]
    for name, array in (("scale", RNG.normal(size=c)), ("beta", RNG.normal(size=c)),
                        ("mean", RNG.normal(size=c)), ("var", RNG.uniform(0.5, 2.0, size=c))):
        inits.append(numpy_helper.from_array(array.astype(np.float32), name))
    params = ["scale", "beta", "mean", "var"]
    proto = _model(
        [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]),
         helper.make_node("BatchNormalization", ["a", *params], ["an"], epsilon=1e-3),
         helper.make_node("Conv", ["x", "w2"], ["b"], pads=[1, 1, 1, 1]),
         helper.make_node("BatchNormalization", ["b", *params], ["bn"], epsilon=1e-3)],
        [_vi("x", [1, 3, 6, 6])], [_vi("an", None), _vi("bn", None)], inits)
    proto = onnx.shape_inference.infer_shapes(proto)
    model = ir.from_proto(proto)
    assert FuseBatchNormPass()(model).modified
    assert optcc.ir.op_histogram(model) == {"Conv": 2}
    feeds = {"x": RNG.normal(size=(1, 3, 6, 6)).astype(np.float32)}
    assert_close(onnxruntime_outputs(model, feeds), expected_outputs_float64(ir.from_proto(proto), feeds),
                 FUSION_RTOL, what="fused model vs float64 reference on the original")


# ------------------------------------------------------------------ fills


def test_fill_feeding_a_fold_in_the_same_wave_and_a_stored_fill_hold_the_fill_values() -> None:
    """``ConstantOfShape`` folded without a session, read by an Add folded in the same
    wave (the fill is fed to that session) and stored itself as a graph output's constant."""
    fill = numpy_helper.from_array(np.array([2.5], np.float32), "value")
    proto = _model(
        [helper.make_node("ConstantOfShape", ["shape"], ["f"], value=fill),
         helper.make_node("Add", ["f", "bias"], ["g"]),
         helper.make_node("Mul", ["x", "g"], ["y"])],
        [_vi("x", [2, 3])], [_vi("y", [2, 3]), _vi("f", [2, 3])],
        [numpy_helper.from_array(np.array([2, 3], np.int64), "shape"),
         numpy_helper.from_array(np.array([1.0, -2.0, 0.5], np.float32), "bias")])
    model = ir.from_proto(proto)
    assert FoldConstantsPass()(model).modified
    assert optcc.ir.op_histogram(model) in ({"Mul": 1}, {"Mul": 1, "Constant": 1})
    feeds = {"x": RNG.normal(size=(2, 3)).astype(np.float32)}
    got = onnxruntime_outputs(model, feeds)
    np.testing.assert_array_equal(got[1], np.full((2, 3), 2.5, np.float32))
    assert_close(got, expected_outputs(ir.from_proto(proto), feeds), EXACT_RTOL,
                 what="folded model vs onnx reference evaluator on the original")


# ------------------------------------------------------------------ dead nodes


def test_dead_nodes_removed_when_a_removed_reader_left_its_use_behind() -> None:
    """A reader removed without unlinking its inputs (``safe=False``) leaves a use behind;
    with no bodies or functions, the dead producer is still found and removed, and the
    opset imports are left as they are."""
    proto = _model(
        [helper.make_node("Neg", ["x"], ["n"]),
         helper.make_node("Abs", ["n"], ["a"]),
         helper.make_node("Relu", ["x"], ["y"])],
        [_vi("x", [3])], [_vi("y", [3])], [])
    model = ir.from_proto(proto)
    model.graph.remove(next(n for n in model.graph if n.op_type == "Abs"), safe=False)
    result = EliminateDeadNodesPass()(model)
    assert result.modified
    assert optcc.ir.op_histogram(model) == {"Relu": 1}
    assert dict(model.opset_imports) == {"": 17}
    feeds = {"x": np.array([-1.0, 0.0, 2.0], np.float32)}
    np.testing.assert_array_equal(onnxruntime_outputs(model, feeds)[0], np.maximum(feeds["x"], 0))


def test_unused_foreign_opset_import_is_dropped_and_a_used_one_kept() -> None:
    proto = _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", [3])], [_vi("y", [3])], [])
    proto.opset_import.append(helper.make_opsetid("com.example", 1))
    model = ir.from_proto(proto)
    assert EliminateDeadNodesPass()(model).modified
    assert dict(model.opset_imports) == {"": 17}


# ------------------------------------------------------------------ normalize


def _random_dag(seed: int, shuffled: bool) -> onnx.ModelProto:
    """40 binary Add/Mul/Sub nodes reading random earlier values, in a topological order
    (``shuffled``: in a random order instead, usually not topological)."""
    rng = np.random.default_rng(seed)
    values, nodes = ["x", "y"], []
    for i in range(40):
        a, b = rng.choice(len(values), size=2)
        op = ("Add", "Mul", "Sub")[int(rng.integers(3))]
        nodes.append(helper.make_node(op, [values[a], values[b]], [f"v{i}"], name=f"n{i}"))
        values.append(f"v{i}")
    if shuffled:
        nodes = [nodes[i] for i in rng.permutation(len(nodes))]
    outputs = [_vi(v, [3]) for v in values[-3:]]
    return _model(nodes, [_vi("x", [3]), _vi("y", [3])], outputs, [])


def test_normalize_keeps_a_topological_order_as_onnx_ir_sort_does() -> None:
    for seed in range(20):
        proto = _random_dag(seed, shuffled=False)
        model, reference = ir.from_proto(proto), ir.from_proto(proto)
        result = NormalizeGraphPass()(model)
        assert not TopologicalSortPass()(reference).modified
        assert [n.name for n in model.graph] == [n.name for n in reference.graph]
        assert result.stats["sorted"] is False


def test_normalize_sorts_a_graph_out_of_order() -> None:
    for seed in range(20):
        proto = _random_dag(seed, shuffled=True)
        model, reference = ir.from_proto(proto), ir.from_proto(proto)
        NormalizeGraphPass()(model)
        TopologicalSortPass()(reference)
        assert [n.name for n in model.graph] == [n.name for n in reference.graph]
        assert optcc.ir.first_order_problem(model) is None
        feeds = {"x": RNG.normal(size=3).astype(np.float32), "y": RNG.normal(size=3).astype(np.float32)}
        assert_close(onnxruntime_outputs(model, feeds), expected_outputs(ir.from_proto(_random_dag(seed, False)), feeds),
                     EXACT_RTOL, what="sorted model vs onnx reference evaluator on the ordered original")


def _named_variant(seed: int) -> tuple[onnx.ModelProto, ir.Model]:
    """``_random_dag(seed)``, and its model with, by ``seed % 4``: its names as they are,
    three node names emptied, a node name repeated, or a value named as an earlier one
    (which onnx's checker would reject, but onnx-ir holds)."""
    rng = np.random.default_rng(seed)
    proto = _random_dag(seed, shuffled=False)
    model = ir.from_proto(proto)
    nodes = list(model.graph)
    kind = seed % 4
    if kind == 1:
        for i in rng.choice(len(nodes), size=3, replace=False):
            nodes[int(i)].name = ""
    elif kind == 2:
        nodes[5].name = nodes[2].name
    elif kind == 3:
        nodes[10].outputs[0].name = nodes[3].outputs[0].name
    return proto, model


def test_normalize_names_as_onnx_ir_namefix_does() -> None:
    """Normalize on graphs whose names are all unique (kept) or not (renamed): the names
    onnx-ir's NameFixPass gives, and the values of the original."""
    for seed in range(16):
        proto, model = _named_variant(seed)
        _, reference = _named_variant(seed)
        result = NormalizeGraphPass()(model)
        assert NameFixPass()(reference).modified is result.stats["renamed"] is (seed % 4 != 0)
        assert [n.name for n in model.graph] == [n.name for n in reference.graph]
        for attr in ("inputs", "outputs"):
            assert [[v.name for v in getattr(n, attr)] for n in model.graph] == \
                [[v.name for v in getattr(n, attr)] for n in reference.graph]
        feeds = {"x": RNG.normal(size=3).astype(np.float32), "y": RNG.normal(size=3).astype(np.float32)}
        assert_close(onnxruntime_outputs(model, feeds), expected_outputs(ir.from_proto(proto), feeds),
                     EXACT_RTOL, what="normalized model vs onnx reference evaluator on the original")
