"""Constant folding (FoldConstantsPass) and shape folding (FoldShapesPass): what folds,
what deliberately does not, and that the folded model computes what the original did."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx.reference
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import optcc
from optcc.passes.fold_constants import FoldConstantsPass, _GraphFolder
from optcc.passes.fold_shapes import FoldShapesPass
from reference import EXACT_RTOL, assert_close, expected_outputs, onnxruntime_outputs, random_feeds

LIGHT_MODELS = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")


def _parse(text: str) -> ir.Model:
    return ir.from_proto(onnx.parser.parse_model(text))


def _run(pass_: optcc.Pass, model: ir.Model, *, inputs: dict[str, np.ndarray] | None = None,
         input_shapes: dict[str, list[int]] | None = None, evaluator: bool = True):
    """Run the pass on ``model``; check the result, its numerics and idempotence.

    Numerics: the folded model on onnxruntime against the original by onnx's reference
    evaluator and by onnxruntime, within the exact tolerance, on ``inputs`` (else random
    feeds of ``input_shapes``). ``evaluator=False`` for a model onnx's evaluator cannot
    run: onnxruntime on the original is then the only reference."""
    original = model.clone()
    result = pass_(model)
    onnx.checker.check_model(ir.to_proto(result.model), full_check=True)
    feeds = inputs if inputs is not None else random_feeds(original, input_shapes)
    got = onnxruntime_outputs(result.model, feeds)
    if evaluator:
        assert_close(got, expected_outputs(original, feeds), EXACT_RTOL, what="folded vs onnx reference evaluator")
    assert_close(got, onnxruntime_outputs(original, feeds), EXACT_RTOL, what="folded vs onnxruntime on the original")
    again = pass_(result.model)
    assert not again.modified, f"second run must be a no-op, got {again.stats}"
    return original, result


def _hist(model: ir.Model) -> dict[str, int]:
    return optcc.ir.op_histogram(model)


def _ort(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, feeds)


def test_chain_of_constant_ops_folds_into_one_initializer_in_one_session():
    model = _parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x) => (float[N, 4] y, int32[4] k) <float[4] w = {1, 2, 3, 4}, float[2, 2] m = {1, 2, 3, 4}, int64[1] s = {4}> {
        w1 = Add(w, w)
        w2 = Mul(w1, w)
        mt = Transpose(m)
        mr = Reshape(mt, s)
        w3 = Add(w2, mr)
        k = Cast<to = 6>(w3)
        kf = Cast<to = 1>(k)
        y = Add(x, kf)
    }
    """)
    _, result = _run(FoldConstantsPass(), model)
    out = result.model
    assert _hist(out) == {"Add": 1, "Constant": 1}  # Constant: the graph output k
    assert result.stats["folded"] == {"Add": 2, "Cast": 2, "Mul": 1, "Reshape": 1, "Transpose": 1}
    assert result.stats["sessions"] == 1  # every node evaluated in one batch
    assert list(out.graph.initializers) == ["kf"]  # the folded value keeps its name
    assert out.graph.initializers["kf"].const_value.dtype == ir.DataType.FLOAT
    k = out.graph.outputs[1]
    assert (k.name, k.dtype, k.producer().op_type) == ("k", ir.DataType.INT32, "Constant")


def test_graph_output_in_the_middle_of_a_foldable_chain_keeps_name_type_and_shape():
    model = _parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x) => (float[N, 4] y, float[M] w2) <float[4] w = {1, 2, 3, 4}> {
        w2 = Add(w, w)
        w3 = Mul(w2, w)
        y = Add(x, w3)
    }
    """)
    _, result = _run(FoldConstantsPass(), model)
    out = result.model
    assert _hist(out) == {"Add": 1, "Constant": 1}
    w2 = out.graph.outputs[1]
    assert w2.name == "w2" and w2.producer().op_type == "Constant"
    assert [d.value if isinstance(d, ir.SymbolicDim) else d for d in w2.shape] == ["M"]
    assert list(out.graph.initializers) == ["w3"]


def test_static_shape_chain_folds_completely():
    model = _parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3, 4] x) => (float[2, 12] y) <int64 zero = {0}, int64[1] minus1 = {-1}, int64[1] ax = {0}> {
        s = Shape(x)
        b = Gather<axis = 0>(s, zero)
        bu = Unsqueeze(b, ax)
        shape = Concat<axis = 0>(bu, minus1)
        y = Reshape(x, shape)
    }
    """)
    _, result = _run(FoldConstantsPass(), model)
    assert _hist(result.model) == {"Reshape": 1}
    assert result.stats["folded_shapes"] == {"Shape": 1}
    assert result.stats["folded"] == {"Concat": 1, "Gather": 1, "Unsqueeze": 1}
    np.testing.assert_array_equal(optcc.ir.as_numpy(result.model.graph.node(0).inputs[1]), [2, -1])


def test_a_gather_of_static_dims_with_matrix_indices_folds_to_a_matrix():
    """Gather(Shape(x), [[2, 1], [-1, 1]]) with a dynamic batch: the gathered dims are
    static, the result a 2x2 int64 constant (elementwise: 4 * 3 and 4 + 3 read it)."""
    model = _parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 3, 4] x) => (int64[2, 2] y, int64[2] z) <int64[2, 2] idx = {2, 1, -1, 1}, int64[2] bad = {0, 1}> {
        s = Shape(x)
        y = Gather<axis = 0>(s, idx)
        z = Gather<axis = 0>(s, bad)
    }
    """)
    _, result = _run(FoldConstantsPass(), model, input_shapes={"x": [5, 3, 4]})
    assert result.stats["folded_shapes"] == {"Gather": 1}  # z reads the dynamic batch: kept
    y = result.model.graph.outputs[0]
    assert y.producer().op_type == "Constant"
    np.testing.assert_array_equal(optcc.ir.as_numpy(y), [[4, 3], [4, 3]])


_SYMBOLIC_CHAIN = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 3, 4] x) => (float[N, 12] y) <int64 i0 = {0}, int64 i1 = {1}, int64 i2 = {2}, int64[1] ax = {0}> {
        s = Shape(x)
        n = Gather<axis = 0>(s, i0)
        c = Gather<axis = 0>(s, i1)
        h = Gather<axis = 0>(s, i2)
        ch = Mul(c, h)
        nu = Unsqueeze(n, ax)
        chu = Unsqueeze(ch, ax)
        shape = Concat<axis = 0>(nu, chu)
        y = Reshape(x, shape)
    }
    """


def test_symbolic_batch_stays_dynamic_while_static_dims_fold():
    model = _parse(_SYMBOLIC_CHAIN)
    _, result = _run(FoldConstantsPass(), model, input_shapes={"x": [5, 3, 4]})
    assert _hist(result.model) == {"Concat": 1, "Gather": 1, "Reshape": 1, "Shape": 1, "Unsqueeze": 1}
    assert result.stats["folded_shapes"] == {"Gather": 2}
    assert result.stats["folded"] == {"Mul": 1, "Unsqueeze": 1}
    assert result.model.graph.inputs[0].shape[0] == ir.SymbolicDim("N")
    # Shape folding alone, as its own pass: the same partial folds, nothing else.
    _, shapes_only = _run(FoldShapesPass(), _parse(_SYMBOLIC_CHAIN), input_shapes={"x": [5, 3, 4]})
    assert shapes_only.stats == {"folded": {"Gather": 2}}
    assert _hist(shapes_only.model)["Mul"] == 1


def test_shape_start_end_and_size_fold_only_over_static_dims():
    model = _parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 3, 4] x) => (int64[2] tail, int64[3] all, int64 n) {
        tail = Shape<start = -2>(x)
        all = Shape(x)
        n = Size(x)
    }
    """)
    _, result = _run(FoldShapesPass(), model, input_shapes={"x": [2, 3, 4]})
    assert _hist(result.model) == {"Constant": 1, "Shape": 1, "Size": 1}
    tail = result.model.graph.outputs[0]
    np.testing.assert_array_equal(optcc.ir.as_numpy(tail), [3, 4])
    assert tail.name == "tail" and tail.dtype == ir.DataType.INT64


def test_shape_computations_fold_element_by_element_where_every_element_is_known():
    """Regression (pipecat's smart-turn v3.2, a torch export): ``x.transpose(1, 2).reshape(
    -1, *shape[-2:])`` is Slices of a Gather of the Shape of a tensor with a dynamic batch;
    the Slices pick static dims only, so they fold, and the target's Concat with them; an
    int32 round trip and an Unsqueeze of a gathered static dim fold too. What reads the
    batch stays (a Slice keeping element 0, a Concat with it)."""
    model = _parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4, 6, 8] x) => (float[M, 4, 8] y, int64[2] kept, int32[1] c32, int64[1] u) {
        perm = Constant <value = int64[4] {0, 2, 1, 3}> ()
        s = Shape(x)
        p = Gather(s, perm)
        lo = Constant <value = int64[1] {-2}> ()
        mid = Constant <value = int64[1] {-1}> ()
        hi = Constant <value = int64[1] {9223372036854775807}> ()
        zero = Constant <value = int64[1] {0}> ()
        two = Constant <value = int64[1] {2}> ()
        d2 = Slice(p, lo, mid)
        d3 = Slice(p, mid, hi)
        minus = Constant <value = int64[1] {-1}> ()
        t = Concat <axis = 0> (minus, d2, d3)
        tr = Transpose <perm = [0, 2, 1, 3]> (x)
        y = Reshape(tr, t)
        kept = Slice(p, zero, two)
        c32 = Cast <to = 6> (d3)
        i1 = Constant <value = int64 {1}> ()
        g1 = Gather(s, i1)
        ax = Constant <value = int64[1] {0}> ()
        u = Unsqueeze(g1, ax)
    }
    """)
    _, result = _run(FoldConstantsPass(), model, input_shapes={"x": [2, 4, 6, 8]})
    assert result.stats["folded_shapes"] == {"Gather": 1, "Slice": 2}  # the rest folds from constants
    hist = _hist(result.model)
    assert hist.get("Slice") == 1 and "Concat" not in hist and "Cast" not in hist and "Unsqueeze" not in hist
    outputs = {v.name: v for v in result.model.graph.outputs}
    assert optcc.ir.as_numpy(outputs["c32"]).tolist() == [8] and outputs["c32"].dtype == ir.DataType.INT32
    assert optcc.ir.as_numpy(outputs["u"]).tolist() == [4]
    kept = outputs["kept"].producer()
    assert kept is not None and kept.op_type == "Slice"  # it reads the dynamic batch


def test_nondeterministic_quantized_and_custom_domain_nodes_are_kept():
    model = _parse("""
    <ir_version: 8, opset_import: ["" : 17, "custom.ops" : 1]>
    g (float[2, 4] x) => (float[2, 4] r, float[2, 4] b, float[2, 4] c) <float[2, 4] w = {1, 2, 3, 4, 5, 6, 7, 8}, float[2, 4] p = {0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5}> {
        noise = RandomNormalLike(w)
        r = Add(x, noise)
        coin = Bernoulli(p)
        b = Add(x, coin)
        k = custom.ops.Twice(w)
        c = Add(x, k)
    }
    """)
    before = _hist(model)
    result = FoldConstantsPass()(model)
    onnx.checker.check_model(ir.to_proto(result.model))
    assert not result.modified
    assert _hist(result.model) == before
    assert result.stats["kept_nondeterministic"] == {"Bernoulli": 1, "RandomNormalLike": 1}
    assert result.stats["kept_custom_domain"] == {"custom.ops::Twice": 1}


def test_dequantize_linear_on_a_quantized_weight_is_kept():
    model = _parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[3, 4] x) => (float[3, 2] y, float[3, 2] z) <int8[4, 2] wq = {1, -2, 3, -4, 5, -6, 7, -8}, float s = {0.5}, int8 zp = {0}, float[4, 2] wf = {1, 2, 3, 4, 5, 6, 7, 8}> {
        w = DequantizeLinear(wq, s, zp)
        y = MatMul(x, w)
        fq = QuantizeLinear(wf, s, zp)
        fd = DequantizeLinear(fq, s, zp)
        z = MatMul(x, fd)
    }
    """)
    before = _hist(model)
    # onnx's evaluator has no DequantizeLinear before opset 19: onnxruntime on the original judges.
    _, result = _run(FoldConstantsPass(), model, evaluator=False)
    assert not result.modified and _hist(result.model) == before
    assert result.stats["kept_quantized_weight"] == {"DequantizeLinear": 1, "QuantizeLinear": 1}


def _large_fill_model(rows: int) -> ir.Model:
    return _parse(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[{rows}, 1024] x, float[2, 2] u) => (float[{rows}, 1024] y, float[2, 2] v) <int64[2] big = {{{rows}, 1024}}, int64[2] small = {{2, 2}}> {{
        fill = ConstantOfShape<value = float[1] {{0.25}}>(big)
        y = Add(x, fill)
        tiny = ConstantOfShape<value = float[1] {{2.0}}>(small)
        v = Mul(u, tiny)
    }}
    """)


def test_large_constant_of_shape_is_kept_unless_fold_large():
    model = _large_fill_model(512)  # 2 MiB of float32
    _, result = _run(FoldConstantsPass(), model)
    assert _hist(result.model) == {"Add": 1, "ConstantOfShape": 1, "Mul": 1}
    assert result.stats["kept_large"] == {"ConstantOfShape": 1}
    assert result.stats["folded"] == {"ConstantOfShape": 1}  # the 2x2 fill folds
    assert "big" in result.model.graph.initializers

    _, forced = _run(FoldConstantsPass(fold_large=True), _large_fill_model(512))
    assert _hist(forced.model) == {"Add": 1, "Mul": 1}
    assert forced.model.graph.initializers["fill"].const_value.nbytes == 512 * 1024 * 4

    _, lowered = _run(FoldConstantsPass(max_growth_bytes=0), _large_fill_model(4))
    assert lowered.stats["kept_large"] == {"ConstantOfShape": 1}  # the 16 KiB fill
    assert lowered.stats["folded"] == {"ConstantOfShape": 1}  # 2x2: no bigger than its input


def test_many_small_growing_folds_are_bounded_by_the_total_budget():
    fills = "\n".join(
        f"f{i} = ConstantOfShape<value = float[1] {{{i}.0}}>(shape)\n y{i} = Add(x, f{i})"
        for i in range(3)
    )
    outputs = ", ".join(f"float[256, 512] y{i}" for i in range(3))
    model = _parse(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[256, 512] x) => ({outputs}) <int64[2] shape = {{256, 512}}> {{
        {fills}
    }}
    """)
    # Each fill is 512 KiB (under the 1 MiB limit) but together they would add 1.5 MiB.
    _, result = _run(FoldConstantsPass(), model)
    assert result.stats["kept_large"] == {"ConstantOfShape": 3}
    assert _hist(result.model)["ConstantOfShape"] == 3


def test_op_onnxruntime_cannot_run_folds_with_the_reference_evaluator():
    # onnxruntime has no int16 kernel for Max; the reference evaluator computes it.
    model = _parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (int16[3] x) => (int16[3] y) <int16[3] a = {1, -7, 300}, int16[3] b = {2, -9, 100}> {
        m = Max(a, b)
        y = Add(x, m)
    }
    """)
    original = model.clone()
    result = FoldConstantsPass()(model)
    assert result.stats["evaluated_with_reference"] == {"Max": 1}
    assert _hist(result.model) == {"Add": 1}
    folded = result.model.graph.initializers["m"].const_value
    assert folded.dtype == ir.DataType.INT16
    feeds = {"x": np.array([5, 6, 7], np.int16)}
    expected = onnx.reference.ReferenceEvaluator(ir.to_proto(original)).run(None, feeds)[0]
    got = _ort(result.model, feeds)[0]
    assert got.dtype == np.int16
    np.testing.assert_array_equal(got, expected)
    assert not FoldConstantsPass()(result.model).modified


def test_batch_failure_falls_back_per_node(monkeypatch):
    real = _GraphFolder._run_batch

    def no_sin(self, batch, known=None):
        if any(n.op_type == "Sin" for n in batch):
            return None  # simulate onnxruntime failing on Sin
        return real(self, batch, known)

    monkeypatch.setattr(_GraphFolder, "_run_batch", no_sin)
    model = _parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[4] x) => (float[4] y) <float[4] w = {0.1, 0.2, 0.3, 0.4}> {
        a = Sin(w)
        b = Exp(a)
        y = Mul(x, b)
    }
    """)
    _, result = _run(FoldConstantsPass(), model)
    assert result.stats["evaluated_with_reference"] == {"Sin": 1}
    assert result.stats["folded"] == {"Exp": 1, "Sin": 1}
    assert _hist(result.model) == {"Mul": 1}


def _if_model() -> onnx.ModelProto:
    then_nodes = [
        helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.array([2.0, 3.0, 4.0, 5.0], np.float32))),
        helper.make_node("Mul", ["k", "w"], ["kw"]),  # w: an outer initializer
        helper.make_node("Add", ["kw", "k"], ["kwk"]),
        helper.make_node("Add", ["x", "kwk"], ["t_out"]),
    ]
    else_nodes = [
        helper.make_node("Neg", ["x"], ["nx"]),  # reads a non-constant outer value: kept
        helper.make_node("Sub", ["nx", "w"], ["e_out"]),
    ]
    then_g = helper.make_graph(then_nodes, "then", [], [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [4])])
    else_g = helper.make_graph(else_nodes, "else", [], [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [4])])
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4]), helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [numpy_helper.from_array(np.array([1.0, -1.0, 0.5, 2.0], np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("cond", [True, False])
def test_folding_inside_an_if_branch(cond):
    model = ir.from_proto(_if_model())
    feeds = {"x": np.array([1.0, 2.0, 3.0, 4.0], np.float32), "c": np.array(cond)}
    _, result = _run(FoldConstantsPass(), model, inputs=feeds)
    then_branch = result.model.graph.node(0).attributes["then_branch"].as_graph()
    else_branch = result.model.graph.node(0).attributes["else_branch"].as_graph()
    assert [n.op_type for n in then_branch] == ["Constant", "Add"]
    assert then_branch.node(1).inputs[1].producer() is then_branch.node(0)
    assert [n.op_type for n in else_branch] == ["Neg", "Sub"]
    assert result.stats["folded"] == {"Add": 1, "Mul": 1}
    assert "w" in result.model.graph.initializers  # still read by the else branch


def test_folding_inside_a_model_local_function():
    model = _parse("""
    <ir_version: 8, opset_import: ["" : 17, "local" : 1]>
    g (float[4] x) => (float[4] y) {
        y = local.scale(x)
    }
    <domain: "local", opset_import: ["" : 17]>
    scale (a) => (b) {
        k = Constant<value = float[4] {1, 2, 3, 4}>()
        kk = Mul(k, k)
        b = Mul(a, kk)
    }
    """)
    _, result = _run(FoldConstantsPass(), model)
    function = next(iter(result.model.functions.values()))
    nodes = list(function)
    assert [n.op_type for n in nodes] == ["Constant", "Mul"]
    assert nodes[1].inputs[1].producer() is nodes[0]


def test_overridable_initializer_and_shared_weight():
    model = _parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[3, 4] x, float[4] o) => (float[3, 4] y, float[3, 4] z) <float[4] o = {1, 1, 1, 1}, float[4, 3] w = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}> {
        o2 = Add(o, o)
        y = Add(x, o2)
        wt = Transpose(w)
        xw = MatMul(x, w)
        z = MatMul(xw, wt)
    }
    """)
    original, result = _run(FoldConstantsPass(), model)
    # 'o' is also a graph input (IR >= 4): a caller may feed it, so Add(o, o) stays.
    assert _hist(result.model) == {"Add": 2, "MatMul": 2}
    assert set(result.model.graph.initializers) == {"o", "w", "wt"}  # w is still read
    assert result.stats["folded"] == {"Transpose": 1}
    # Feeding the overridable initializer still changes the result, as in the original.
    feeds = {"x": np.ones((3, 4), np.float32), "o": np.arange(4, dtype=np.float32)}
    for want, got in zip(_ort(original, feeds), _ort(result.model, feeds)):
        np.testing.assert_array_equal(got, want)


def test_light_model_from_the_onnx_wheel_stays_small_and_exact():
    path = os.path.join(LIGHT_MODELS, "light_inception_v2.onnx")
    if not os.path.exists(path):
        pytest.skip("onnx wheel without backend test data")
    result = optcc.optimize(path, passes=[FoldConstantsPass(), "eliminate-dead-nodes"], verify=False)
    record = result.report.passes[0]
    assert record.status in ("changed", "unchanged")
    assert record.bytes_after - record.bytes_before <= FoldConstantsPass().max_growth_bytes
    assert record.stats["kept_large"]["ConstantOfShape"] > 0
    original = onnx.load(path)
    feeds = random_feeds(original, seed=1)
    assert_close(onnxruntime_outputs(result.model, feeds), onnxruntime_outputs(original, feeds), EXACT_RTOL,
                 what="folded vs onnxruntime on the original")
    again = FoldConstantsPass()(optcc.ir.load(result.model))
    assert not again.modified


def _legacy_negative_dim_model() -> onnx.ModelProto:
    """``x: float[3, -1]`` (a legacy negative dim_value, meaning "unknown") read by Shape,
    Size and Gather-of-Shape, and a Reshape whose target is built from the shape."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, -1])
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Size", ["x"], ["n"]),
        helper.make_node("Gather", ["s", "i0"], ["d0"], axis=0),
        helper.make_node("Gather", ["s", "i1"], ["d1"], axis=0),
        helper.make_node("Mul", ["d0", "d1"], ["t"]),
        helper.make_node("Reshape", ["x", "t"], ["flat"]),
    ]
    inits = [numpy_helper.from_array(np.array([0], np.int64), "i0"),
             numpy_helper.from_array(np.array([1], np.int64), "i1")]
    outputs = [helper.make_tensor_value_info("s", TensorProto.INT64, [2]),
               helper.make_tensor_value_info("n", TensorProto.INT64, []),
               helper.make_tensor_value_info("d0", TensorProto.INT64, [1]),
               helper.make_tensor_value_info("flat", TensorProto.FLOAT, [-1])]
    graph = helper.make_graph(nodes, "legacy_negative_dim", [x], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("passes", [["fold-shapes"], ["fold-constants"], None])
def test_legacy_negative_dim_value_is_never_folded_as_a_size(passes):
    """Regression: ``float[3,-1]`` once folded Shape to [3,-1] and Size to -3. Only the
    static dim 3 may fold; every output matches onnxruntime on inputs of several sizes."""
    proto = _legacy_negative_dim_model()
    result = optcc.optimize(proto, passes=passes, level=1, verify=False)
    folded = ir.from_proto(result.model)
    constants = [optcc.ir.as_numpy(v) for v in folded.graph.initializers.values()]
    constants += [optcc.ir.as_numpy(n.outputs[0]) for n in folded.graph if n.op_type == "Constant"]
    for array in constants:
        assert not np.any(array < 0), f"a negative size was folded: {array}"
    hist = _hist(folded)
    assert hist.get("Shape", 0) == 1 and hist.get("Size", 0) == 1
    assert hist.get("Gather", 0) == 1, "the static dim 3 still folds"
    reference = ir.from_proto(proto)
    for cols in (1, 4, 7):
        feeds = {"x": np.arange(3 * cols, dtype=np.float32).reshape(3, cols)}
        expected = _ort(reference, feeds)
        assert [int(v) for v in expected[0]] == [3, cols] and int(expected[1]) == 3 * cols
        for want, got in zip(expected, _ort(folded, feeds)):
            np.testing.assert_array_equal(got, want)
