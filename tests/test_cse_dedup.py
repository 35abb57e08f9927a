"""EliminateCommonSubexpressionsPass and DeduplicateInitializersPass: what they merge
(in the main graph, functions and If bodies), what they never merge (random ops,
custom ops, 0.0 vs -0.0, overridable initializers, graph outputs that cannot be handed
over), and where onnx-ir's own passes fall short."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_ir.passes.common import (
    CommonSubexpressionEliminationPass,
    DeduplicateInitializersPass as OnnxIrDeduplicateInitializersPass,
)

import optcc
from optcc.passes.deduplicate_initializers import DeduplicateInitializersPass
from optcc.passes.eliminate_common_subexpressions import EliminateCommonSubexpressionsPass
from exact_pass_checks import ort_outputs, run_exact_pass
from reference import EXACT_RTOL, assert_close, expected_outputs
from calls import first_arguments


def _model(body: str, opset: int = 17, extra_opsets: str = "") -> ir.Model:
    header = f'<ir_version: 8, opset_import: ["" : {opset}{extra_opsets}]>\n'
    return ir.from_proto(onnx.parser.parse_model(header + body))


def _run(pass_type: type, model: ir.Model, feeds=None) -> optcc.PassResult:
    return run_exact_pass(pass_type, model, feeds)


def _ops(model: ir.Model) -> dict[str, int]:
    return optcc.ir.op_histogram(model)


# --------------------------------------------------------------------------- CSE


def test_duplicates_collapse_in_one_run_and_different_attributes_stay():
    big = ", ".join(["1.5"] * 100)
    model = _model(f"""
    agraph (float[2, 3] x) => (float[2, 3] y, float[3, 2] z) {{
        r1 = Relu(x)
        r2 = Relu(x)
        a1 = Add(r1, x)
        a2 = Add(r2, x)
        k1 = Constant<value = float[100] {{{big}}}>()
        k2 = Constant<value = float[100] {{{big}}}>()
        s1 = ReduceSum<keepdims = 0>(k1)
        s2 = ReduceSum<keepdims = 0>(k2)
        m = Mul(a1, s1)
        n = Mul(a2, s2)
        y = Sub(m, n)
        t1 = Transpose<perm = [1, 0]>(x)
        t2 = Transpose<perm = [1, 0]>(m)
        z = Add(t1, t2)
    }}
    """)
    result = _run(EliminateCommonSubexpressionsPass, model)
    assert result.stats == {"Relu": 1, "Add": 1, "Constant": 1, "ReduceSum": 1, "Mul": 1}
    assert _ops(result.model) == {
        "Add": 2, "Constant": 1, "Mul": 1, "ReduceSum": 1, "Relu": 1, "Sub": 1, "Transpose": 2,
    }


def test_float_attributes_compare_by_bits_negative_zero_is_not_zero():
    model = _model("""
    agraph (float[2] x) => (float[2] y, float[2] z) {
        p = Constant<value_float = 0.0>()
        n = Constant<value_float = -0.0>()
        y = Add(x, p)
        z = Add(x, n)
    }
    """)
    ours = EliminateCommonSubexpressionsPass()(model.clone())
    assert not ours.modified
    # onnx-ir's CSE merges the two constants, so z computes x + 0.0: -0.0 becomes +0.0.
    theirs = CommonSubexpressionEliminationPass()(model.clone()).model
    feeds = {"x": np.array([-0.0, 1.0], np.float32)}
    assert np.signbit(ort_outputs(model, feeds)[1][0])
    assert not np.signbit(ort_outputs(theirs, feeds)[1][0])


def test_random_ops_and_custom_ops_are_never_merged():
    model = _model("""
    agraph (float[2, 3] x) => (float[2, 3] y, float[2, 3] z, float[2, 3] w) {
        a = RandomNormalLike(x)
        b = RandomNormalLike(x)
        y = Add(a, b)
        c = Bernoulli(x)
        d = Bernoulli(x)
        z = Add(c, d)
        e = custom.Op(x)
        f = custom.Op(x)
        w = Add(e, f)
    }
    """, extra_opsets=', "custom" : 1')
    assert not EliminateCommonSubexpressionsPass()(model.clone()).modified
    theirs = CommonSubexpressionEliminationPass()(model.clone()).model
    assert _ops(theirs)["Bernoulli"] == 1, "onnx-ir merges Bernoulli"


def test_graph_outputs_keep_their_names():
    model = _model("""
    agraph (float[N, 3] x) => (float[N, 3] y1, float[N, 3] y2, float[N, 3] z, float[N, 3] w) {
        y1 = Relu(x)
        y2 = Relu(x)
        t = Abs(x)
        z = Abs(x)
        u = Neg(x)
        v = Neg(x)
        w = Add(u, v)
    }
    """)
    result = _run(EliminateCommonSubexpressionsPass, model)
    # y1/y2: both graph outputs, one value cannot carry two names: kept. z: t takes its name.
    assert result.stats == {"Abs": 1, "Neg": 1}
    assert _ops(result.model) == {"Abs": 1, "Add": 1, "Neg": 1, "Relu": 2}
    graph = result.model.graph
    assert [v.name for v in graph.outputs] == ["y1", "y2", "z", "w"]
    assert [str(d) for d in graph.outputs[2].shape] == ["N", "3"]


def _if_model(then_nodes: list, else_nodes: list, outer_nodes: list, inits=(), body_inits=()) -> ir.Model:
    then_g = helper.make_graph(
        then_nodes, "then", [], [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [3, 4])],
        list(body_inits),
    )
    else_g = helper.make_graph(
        else_nodes, "else", [], [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [3, 4])]
    )
    graph = helper.make_graph(
        outer_nodes + [helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4]),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])],
        list(inits),
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))


def _cse_if_model() -> ir.Model:
    return _if_model(
        then_nodes=[
            helper.make_node("Sigmoid", ["x"], ["s1"]),
            helper.make_node("Sigmoid", ["x"], ["s2"]),
            helper.make_node("Mul", ["s1", "o2"], ["m"]),
            helper.make_node("Add", ["m", "s2"], ["t_out"]),
        ],
        else_nodes=[helper.make_node("Neg", ["o1"], ["e_out"])],
        outer_nodes=[helper.make_node("Exp", ["x"], ["o1"]), helper.make_node("Exp", ["x"], ["o2"])],
    )


@pytest.mark.parametrize("cond", [True, False])
def test_cse_inside_if_bodies_and_outer_duplicates_read_from_bodies(cond: bool):
    model = _cse_if_model()
    x = np.random.default_rng(5).standard_normal((3, 4)).astype(np.float32)
    result = _run(EliminateCommonSubexpressionsPass, model, {"x": x, "c": np.array(cond)})
    assert result.stats == {"Exp": 1, "Sigmoid": 1}
    then_branch = result.model.graph.node(1).attributes["then_branch"].as_graph()
    mul = next(n for n in then_branch if n.op_type == "Mul")
    assert mul.inputs[1].name == "o1", "the body reads the kept outer value"
    theirs = CommonSubexpressionEliminationPass()(_cse_if_model()).model
    theirs_then = theirs.graph.node(1).attributes["then_branch"].as_graph()
    assert sum(n.op_type == "Sigmoid" for n in theirs_then) == 2, "onnx-ir skips bodies"


def test_cse_in_functions_but_not_of_function_calls():
    model = _model("""
    agraph (float[2] x) => (float[2] y) {
        a = local.F(x)
        b = local.F(x)
        y = Add(a, b)
    }
    <domain: "local", opset_import: ["" : 17]>
    F (p) => (q) {
        r1 = Relu(p)
        r2 = Relu(p)
        q = Add(r1, r2)
    }
    """, extra_opsets=', "local" : 1')
    result = _run(EliminateCommonSubexpressionsPass, model)
    assert result.stats == {"Relu": 1}
    assert _ops(result.model) == {"Add": 2, "Relu": 1, "local::F": 2}


# --------------------------------------------------------------------------- initializers


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array, name)


def _dedup_model(inits: list[onnx.TensorProto], inputs_too: tuple[str, ...] = ()) -> ir.Model:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    nodes, outputs = [], []
    for i, init in enumerate(inits):
        if init.data_type == TensorProto.FLOAT:
            nodes.append(helper.make_node("Add", ["x", init.name], [f"y{i}"]))
        else:
            nodes.append(helper.make_node("Cast", [init.name], [f"c{i}"], to=TensorProto.FLOAT))
            nodes.append(helper.make_node("Add", ["x", f"c{i}"], [f"y{i}"]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None))
    extra_inputs = [
        helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in inits if i.name in inputs_too
    ]
    graph = helper.make_graph(nodes, "g", [x, *extra_inputs], outputs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return ir.from_proto(onnx.shape_inference.infer_shapes(proto))


def test_equal_initializers_merge_and_near_misses_stay():
    rng = np.random.default_rng(0)
    w = rng.standard_normal(4).astype(np.float32)
    big = rng.standard_normal((1000, 4)).astype(np.float32)
    model = _dedup_model([
        _init("w1", w),
        _init("w2", w.copy()),
        _init("w3", w + 1),
        _init("pzero", np.zeros(4, np.float32)),
        _init("nzero", -np.zeros(4, np.float32)),  # same value, different bytes
        _init("izero", np.zeros(4, np.int32)),  # same bytes as pzero, other dtype
        _init("w2d", w.reshape(1, 4)),  # same bytes as w1, other shape
        _init("big1", big),
        _init("big2", big.copy()),
    ])
    result = _run(DeduplicateInitializersPass, model)
    assert result.stats == {"initializers": 2, "bytes": 16 + big.nbytes}
    assert sorted(result.model.graph.initializers) == sorted(
        ["w1", "w3", "pzero", "nzero", "izero", "w2d", "big1"]
    )


def test_overridable_and_output_initializers_are_never_merged():
    w = np.arange(4, dtype=np.float32)
    model = _dedup_model([_init("w1", w), _init("w2", w.copy()), _init("w3", w.copy())], inputs_too=("w1", "w2"))
    result = DeduplicateInitializersPass()(model)
    assert not result.modified, "w1 and w2 are graph inputs: a caller may override either"
    model = _dedup_model([_init("w1", w), _init("w2", w.copy())])
    model.graph.outputs.append(model.graph.initializers["w2"])
    assert not DeduplicateInitializersPass()(model).modified


def _dedup_if_model() -> ir.Model:
    w = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    return _if_model(
        then_nodes=[
            helper.make_node("Add", ["x", "bw1"], ["t1"]),
            helper.make_node("Mul", ["t1", "bw2"], ["t2"]),
            helper.make_node("Sub", ["t2", "bv"], ["t3"]),
            helper.make_node("Add", ["t3", "bv2"], ["t_out"]),
        ],
        else_nodes=[helper.make_node("Mul", ["x", "w"], ["e_out"])],
        outer_nodes=[],
        inits=[_init("w", w)],
        body_inits=[_init("bw1", w.copy()), _init("bw2", w.copy()), _init("bv", w + 2), _init("bv2", w + 2)],
    )


@pytest.mark.parametrize("cond", [True, False])
def test_body_initializers_merge_with_outer_ones(cond: bool):
    model = _dedup_if_model()
    x = np.random.default_rng(6).standard_normal((3, 4)).astype(np.float32)
    result = _run(DeduplicateInitializersPass, model, {"x": x, "c": np.array(cond)})
    then_branch = result.model.graph.node(0).attributes["then_branch"].as_graph()
    # bw1 and bw2 read the outer w; bv2 reads bv.
    assert list(then_branch.initializers) == ["bv"]
    assert result.stats["initializers"] == 3
    theirs = OnnxIrDeduplicateInitializersPass()(_dedup_if_model()).model
    assert "bw1" in theirs.graph.node(0).attributes["then_branch"].as_graph().initializers


def test_external_data_is_read_only_for_tensors_that_could_be_equal(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 4)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 4])
    nodes = [
        helper.make_node("Add", ["x", "w1"], ["a"]),
        helper.make_node("Mul", ["a", "w2"], ["b"]),
        helper.make_node("Add", ["b", "unique"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 4])],
        [_init("w1", w), _init("w2", w.copy()), _init("unique", rng.standard_normal((4,)).astype(np.float32))],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = tmp_path / "m.onnx"
    onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.onnx.data", size_threshold=0)
    # onnx_ir.load, not optcc.ir.load: the latter runs onnx's checker on the proto without
    # its folder and rejects external data unless the working directory is that folder.
    model = ir.load(str(path))
    assert optcc.ir.uses_external_data(model)
    read = first_arguments(monkeypatch, ir.ExternalTensor, "numpy")
    result = DeduplicateInitializersPass()(model)
    monkeypatch.undo()
    reads = [tensor.name for tensor in read]
    assert result.stats == {"initializers": 1, "bytes": w.nbytes}
    assert "unique" not in reads, "a tensor of a shape no other has is never read"
    assert reads.count("w1") <= 2 and reads.count("w2") <= 2  # hash, then confirm once
    feeds = {"x": rng.standard_normal((64, 4)).astype(np.float32)}
    want = expected_outputs(onnx.load(str(path)), feeds)  # external data loaded
    deduplicated = ir.to_proto(result.model)
    onnx.external_data_helper.load_external_data_for_model(deduplicated, str(tmp_path))
    got = ort_outputs(deduplicated, feeds)
    assert_close(got, want, EXACT_RTOL, what="deduplicated external-data model vs onnx reference evaluator")
    assert not DeduplicateInitializersPass()(result.model).modified
