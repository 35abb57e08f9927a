"""StoreConstantOutputsPass: a main-graph output made by a Constant node, or by Identity of
an initializer, becomes an initializer of the same name. Judged by run_exact_pass (onnx's
reference evaluator, onnxruntime on the original bit for bit, the full checker,
idempotence); the negative cases leave the model untouched."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

import optcc
from optcc.passes.store_constant_outputs import StoreConstantOutputsPass
from exact_pass_checks import run_exact_pass
from reference import onnxruntime_outputs, random_feeds


def _model(body: str, ir_version: int = 8) -> ir.Model:
    header = f'<ir_version: {ir_version}, opset_import: ["" : 17]>\n'
    return ir.from_proto(onnx.parser.parse_model(header + body))


def _ops(model: ir.Model) -> dict[str, int]:
    return optcc.ir.op_histogram(model)


def test_constant_and_identity_outputs_become_initializers() -> None:
    model = _model("""
    g (float[3, 2] x) => (float[3, 2] y, int64[2] s, float[2] k, float[2] w) <float[2] c = {1.0, -0.0}> {
        s = Constant<value = int64[2] {3, 2}>()
        k = Identity(c)
        s_f = Constant<value = float[2] {2.0, 3.0}>()
        w = Mul(k, s_f)
        y = Add(x, c)
    }
    """)
    result = run_exact_pass(StoreConstantOutputsPass, model)
    assert result.stats == {"stored": 2}
    graph = result.model.graph
    assert _ops(result.model) == {"Add": 1, "Constant": 1, "Mul": 1}
    assert [v.name for v in graph.outputs] == ["y", "s", "k", "w"]
    assert graph.initializers["s"].const_value.numpy().tolist() == [3, 2]
    # c is still read by Add, so it stays; Mul reads the stored k
    assert "c" in graph.initializers
    assert [v.name for n in graph if n.op_type == "Mul" for v in n.inputs] == ["k", "s_f"]


def test_identity_source_without_other_readers_is_dropped() -> None:
    model = _model("""
    g (float[2] x) => (float[2] y, float[2] k) <float[2] c = {1.0, 2.0}> {
        k = Identity(c)
        y = Relu(x)
    }
    """)
    result = run_exact_pass(StoreConstantOutputsPass, model)
    assert sorted(result.model.graph.initializers) == ["k"]
    assert _ops(result.model) == {"Relu": 1}


def test_suite_eliminate_shape_op_output_is_an_initializer_after_optimize() -> None:
    """onnx/optimizer test_eliminate_shape_op: Shape of a static value is the only output."""
    proto = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[3, 2] x) => (int64[2] y) { r = Relu(x)  y = Shape(r) }
    """)
    feeds = random_feeds(proto)
    for level in (1, 2):
        optimized = optcc.optimize(proto, level=level, verify=False).model
        onnx.checker.check_model(optimized, full_check=True)
        assert len(optimized.graph.node) == 0
        assert [t.name for t in optimized.graph.initializer] == ["y"]
        got, want = onnxruntime_outputs(optimized, feeds), onnxruntime_outputs(proto, feeds)
        assert got[0].dtype == want[0].dtype and np.array_equal(got[0], want[0])


def test_contradicting_declarations_are_left_alone() -> None:
    model = _model("""
    g (float[2] x) => (float[2] y, int64[3] bad, int64[2, 1] rank, float[2] t) {
        bad = Constant<value = int64[2] {1, 2}>()
        rank = Constant<value = int64[2] {1, 2}>()
        t = Constant<value = float[2] {1.0, 2.0}>()
        y = Relu(x)
    }
    """)
    model.graph.outputs[3].dtype = ir.DataType.DOUBLE  # a dtype the tensor does not have
    result = StoreConstantOutputsPass()(model)
    assert not result.modified and _ops(result.model)["Constant"] == 3


def test_symbolic_declarations_admit_the_tensor_and_are_kept() -> None:
    """onnxscript's FoldConstantsTest.test_transpose_is_always_folded and
    ShapeOptimizationTest.test_shape_optimization_5: a folded output declared with named or
    unknown dims (``[M, 512]``, ``[M]``) is stored; its declaration stays as it was."""
    model = _model("""
    g (float[M, 2] x) => (float[M, 2] y, int64[N] sym, float[M, 3] mixed, int64[?] empty) {
        sym = Constant<value = int64[2] {1, 2}>()
        mixed = Constant<value = float[2, 3] {1.0, 2.0, 3.0, 4.0, 5.0, 6.0}>()
        empty = Constant<value = int64[0] {}>()
        y = Relu(x)
    }
    """)
    result = run_exact_pass(StoreConstantOutputsPass, model)
    assert result.stats == {"stored": 3} and _ops(result.model) == {"Relu": 1}
    outputs = result.model.graph.outputs
    assert [str(v.shape) for v in outputs[1:]] == ["[N]", "[M,3]", "[None]"]
    assert result.model.graph.initializers["mixed"].const_value.numpy().shape == (2, 3)


def test_overridable_input_subgraph_and_ir3_are_left_alone() -> None:
    proto = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x, bool b) => (float[2] k, float[2] z) {
        k = Identity(x)
        z = If(b) <
            then_branch = g1 () => (float[2] o1) { o1 = Constant<value = float[2] {1.0, 2.0}>() },
            else_branch = g2 () => (float[2] o2) { o2 = Identity(x) }
        >
    }
    """)
    # x becomes an initializer that is also a graph input: an overridable default
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.ones(2, np.float32), "x"))
    result = StoreConstantOutputsPass()(ir.from_proto(proto))
    assert not result.modified
    legacy = _model("g (float[2] x) => (int64[1] s) { s = Constant<value = int64[1] {2}>() }", ir_version=3)
    assert not StoreConstantOutputsPass()(legacy).modified
