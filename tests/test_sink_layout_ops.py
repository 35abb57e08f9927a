"""A channels-last export's layout round trips (Transpose/Squeeze before elementwise ops
and Pads, Unsqueeze/Transpose after them) disappear (sink-layout-ops), bit for bit
against onnxruntime on the original and onnx's reference evaluator; at -O2 the freed
Mul/Add/Pad then fold into the Convs (within the fusion tolerance). Left alone: a layout
value read twice, a graph output inside the chain, a constant of a higher rank than the
chain, an op that reads axes (Softmax), an unknown rank."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import optcc
from exact_pass_checks import run_exact_pass
from fixtures.corpus import cached_path
from fixtures.heldout import find_heldout
from optcc.passes.sink_layout_ops import SinkLayoutOpsPass
from reference import FUSION_RTOL, assert_close, onnxruntime_outputs, random_feeds

LAYOUT_OPS = ("Transpose", "Squeeze", "Unsqueeze")


def _model(body: str, opset: int = 18, inits: dict[str, np.ndarray] | None = None) -> ir.Model:
    proto = onnx.parser.parse_model(f'<ir_version: 8, opset_import: ["" : {opset}]>\n' + body)
    for name, array in (inits or {}).items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    return ir.from_proto(onnx.shape_inference.infer_shapes(proto, strict_mode=True))


def _layout_count(model: ir.Model) -> int:
    histogram = optcc.ir.op_histogram(model)
    return sum(histogram.get(op, 0) for op in LAYOUT_OPS)


def _madmom_unit(channels: int = 4) -> ir.Model:
    """Two channels-last conv units and a pool, as madmom's key CNN exports them: every
    Conv and MaxPool wrapped in Unsqueeze+Transpose and Transpose+Squeeze, BatchNorm as a
    channels-last Mul/Add, Elu, and a Pad of the spatial axes before the second Conv."""
    rng = np.random.default_rng(7)
    inits = {
        "w1": rng.standard_normal((channels, 1, 3, 3)).astype(np.float32),
        "b1": np.zeros(channels, np.float32),
        "w2": rng.standard_normal((channels, channels, 3, 3)).astype(np.float32),
        "b2": np.zeros(channels, np.float32),
        "scale": rng.uniform(0.5, 2.0, channels).astype(np.float32),
        "offset": rng.standard_normal(channels).astype(np.float32),
        "scale2": rng.uniform(0.5, 2.0, channels).astype(np.float32),
        "offset2": rng.standard_normal(channels).astype(np.float32),
        "pads": np.array([1, 1, 0, 1, 1, 0], np.int64),
        "zero": np.array(0.0, np.float32),
        "a0": np.array([0], np.int64),
        "a03": np.array([0, 3], np.int64),
    }
    return _model(f"""
    agraph (float[H, W] x) => (float[H2, W2, {channels}] y) {{
        u = Unsqueeze (x, a03)
        t = Transpose <perm = [0, 3, 1, 2]> (u)
        c1 = Conv <pads = [1, 1, 1, 1]> (t, w1, b1)
        h1 = Transpose <perm = [0, 2, 3, 1]> (c1)
        s1 = Squeeze (h1, a0)
        m1 = Mul (s1, scale)
        n1 = Add (m1, offset)
        e1 = Elu (n1)
        p1 = Pad (e1, pads, zero)
        u2 = Unsqueeze (p1, a0)
        t2 = Transpose <perm = [0, 3, 1, 2]> (u2)
        c2 = Conv (t2, w2, b2)
        h2 = Transpose <perm = [0, 2, 3, 1]> (c2)
        s2 = Squeeze (h2, a0)
        m2 = Mul (s2, scale2)
        n2 = Add (offset2, m2)
        e2 = Elu (n2)
        u3 = Unsqueeze (e2, a0)
        t3 = Transpose <perm = [0, 3, 1, 2]> (u3)
        mp = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (t3)
        h3 = Transpose <perm = [0, 2, 3, 1]> (mp)
        y = Squeeze (h3, a0)
    }}""", inits=inits)


def test_madmom_unit_round_trips_disappear_bit_for_bit():
    model = _madmom_unit()
    feeds = random_feeds(ir.to_proto(model), {"x": [11, 9]}, seed=1)
    result = run_exact_pass(SinkLayoutOpsPass, model, feeds)
    # the round trips between the Convs and the MaxPool go; the first Conv's entry and
    # the MaxPool's exit, with nothing to cancel against, stay
    assert _layout_count(result.model) == 4
    ops = [node.op_type for node in result.model.graph if node.op_type != "Constant"]  # carried constants
    assert ops[ops.index("Conv"):ops.index("MaxPool") + 1] == [
        "Conv", "Mul", "Add", "Elu", "Pad", "Conv", "Mul", "Add", "Elu", "MaxPool"]


def test_madmom_unit_at_o2_folds_into_convs_and_matches_the_original():
    model = _madmom_unit()
    original = ir.to_proto(model)
    result = optcc.optimize(model.clone(), level=2, verify=False)
    ops = optcc.ir.op_histogram(result.model)
    assert ops == {"Unsqueeze": 1, "Transpose": 2, "Conv": 2, "Elu": 2, "MaxPool": 1, "Squeeze": 1}
    for seed, shape in ((0, [11, 9]), (1, [6, 15])):
        feeds = random_feeds(original, {"x": shape}, seed=seed)
        assert_close(onnxruntime_outputs(result.model, feeds), onnxruntime_outputs(original, feeds),
                     FUSION_RTOL, what="-O2 vs onnxruntime on the original")


def test_permutation_left_over_becomes_one_transpose():
    model = _model("""
    agraph (float[2, 3, 4] x) => (float[3, 4, 2] y) <float[3] c = {1, -2, 3}, float lo = {-1}, float hi = {2}> {
        t = Transpose <perm = [2, 0, 1]> (x)
        m = Sub (c, t)
        r = Clip (m, lo, hi)
        y = Transpose <perm = [2, 0, 1]> (r)
    }""")
    result = run_exact_pass(SinkLayoutOpsPass, model)
    assert optcc.ir.op_histogram(result.model)["Transpose"] == 1
    assert [node.op_type for node in result.model.graph][-1] == "Transpose"
    assert result.model.graph.outputs[0].name == "y"


def test_replaced_constants_are_dropped_not_kept_beside_the_carried_ones():
    model = _model("""
    agraph (float[2, 3, 4] x) => (float[2, 3, 4] y) <float[2] c1 = {1, 2}, float[2] c2 = {3, -1},
                                                        int64[1] a = {0}> {
        t = Transpose <perm = [2, 1, 0]> (x)
        u = Unsqueeze (t, a)
        s = Add (u, c1)
        m = Mul (s, c2)
        q = Squeeze (m, a)
        y = Transpose <perm = [2, 1, 0]> (q)
    }""")
    result = run_exact_pass(SinkLayoutOpsPass, model)
    assert _layout_count(result.model) == 0
    # c1, c2 and the axes a: nothing reads them; the carried operands are main-graph initializers
    assert not any(n.op_type == "Constant" for n in result.model.graph)
    carried = result.model.graph.initializers.values()
    assert sorted(v.const_value.numpy().shape for v in carried) == [(2, 1, 1), (2, 1, 1)]


def test_pad_with_axes_moves_to_the_axes_of_the_input():
    model = _model("""
    agraph (float[N, 3, 5, 6] x) => (float[N, 3, 7, 6] y) <int64[2] pads = {1, 1}, int64[1] axes = {-3}, float v = {0.5}> {
        t = Transpose <perm = [0, 2, 3, 1]> (x)
        p = Pad (t, pads, v, axes)
        e = LeakyRelu <alpha = 0.2> (p)
        y = Transpose <perm = [0, 3, 1, 2]> (e)
    }""")
    result = run_exact_pass(SinkLayoutOpsPass, model, random_feeds(ir.to_proto(model), {"x": [2, 3, 5, 6]}, seed=4))
    assert _layout_count(result.model) == 0


def test_opset_11_axes_attributes_and_pads_input():
    model = _model("""
    agraph (float[1, 3, 5, 6] x) => (float[1, 3, 7, 8] y) <int64[6] pads = {1, 1, 0, 1, 1, 0}, float[3] c = {1, 2, 3}> {
        h = Transpose <perm = [0, 2, 3, 1]> (x)
        s = Squeeze <axes = [0]> (h)
        m = Mul (s, c)
        p = Pad (m, pads)
        r = Relu (p)
        v = Unsqueeze <axes = [0]> (r)
        y = Transpose <perm = [0, 3, 1, 2]> (v)
    }""", opset=11)
    result = run_exact_pass(SinkLayoutOpsPass, model)
    assert _layout_count(result.model) == 0


def _unchanged(body: str, inits: dict[str, np.ndarray] | None = None) -> None:
    model = _model(body, inits=inits)
    result = SinkLayoutOpsPass()(model)
    assert not result.modified


def test_layout_value_read_twice_stays():
    _unchanged("""
    agraph (float[2, 3, 4] x) => (float[2, 3, 4] y, float[3, 4, 2] z) {
        t = Transpose <perm = [1, 2, 0]> (x)
        z = Relu (t)
        e = Elu (t)
        y = Transpose <perm = [2, 0, 1]> (e)
    }""")


def test_graph_output_inside_the_chain_stays():
    _unchanged("""
    agraph (float[2, 3, 4] x) => (float[2, 3, 4] y, float[3, 4, 2] e) {
        t = Transpose <perm = [1, 2, 0]> (x)
        e = Elu (t)
        y = Transpose <perm = [2, 0, 1]> (e)
    }""")


def test_constant_of_higher_rank_than_the_chain_stays():
    _unchanged("""
    agraph (float[3, 4, 5] x) => (float[2, 3, 4, 5] y) <float[2, 1, 1, 3] c = {1, 2, 3, 4, 5, 6}> {
        t = Transpose <perm = [1, 2, 0]> (x)
        a = Add (t, c)
        y = Transpose <perm = [0, 3, 1, 2]> (a)
    }""")


def test_softmax_on_the_last_axis_stays():
    _unchanged("""
    agraph (float[2, 3, 4] x) => (float[2, 3, 4] y) {
        t = Transpose <perm = [1, 2, 0]> (x)
        s = Softmax <axis = -1> (t)
        y = Transpose <perm = [2, 0, 1]> (s)
    }""")


def test_reflect_pad_stays():
    _unchanged("""
    agraph (float[2, 3, 4] x) => (float[2, 3, 6] y) <int64[6] pads = {0, 1, 0, 0, 1, 0}> {
        t = Transpose <perm = [0, 2, 1]> (x)
        p = Pad <mode = "reflect"> (t, pads)
        y = Transpose <perm = [0, 2, 1]> (p)
    }""")


def test_unknown_rank_stays():
    h = onnx.helper
    graph = h.make_graph(
        [h.make_node("Unsqueeze", ["x", "a"], ["u"]), h.make_node("Elu", ["u"], ["e"]),
         h.make_node("Squeeze", ["e", "a"], ["y"])],
        "g", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(np.array([0], np.int64), "a")])
    model = ir.from_proto(h.make_model(graph, opset_imports=[h.make_opsetid("", 18)]))
    assert not SinkLayoutOpsPass()(model).modified


def test_real_madmom_key_cnn_at_o2_matches_the_original():
    path = cached_path(find_heldout("madmom-key-cnn"))
    if not path.exists():
        pytest.skip("madmom-key-cnn is not cached (python -m fixtures.heldout madmom-key-cnn)")
    original = onnx.load(path)
    result = optcc.optimize(original, level=2, verify=False)
    ops = optcc.ir.op_histogram(ir.from_proto(result.model))
    assert ops.get("Transpose", 0) <= 2 and sum(ops.values()) <= 40
    for seed in range(3):
        feeds = random_feeds(original, {"input": [100, 105]}, seed=seed)
        assert_close(onnxruntime_outputs(result.model, feeds), onnxruntime_outputs(original, feeds),
                     FUSION_RTOL, what="-O2 vs onnxruntime on the original")


def test_a_binary_op_below_opset_7_stays():
    # its legacy broadcast (``broadcast=1``, ``axis``) aligns the constant from ``axis``, not
    # from the right: carrying it back as if right-aligned would pair other elements
    model = _model("""
    agraph (float[2, 3, 4] x) => (float[2, 3, 4] y) <float[3] c = {1, 2, 3}> {
        t = Transpose <perm = [2, 1, 0]> (x)
        m = Mul <broadcast = 1, axis = 1> (t, c)
        y = Transpose <perm = [2, 1, 0]> (m)
    }""", opset=6)
    assert not SinkLayoutOpsPass()(model).modified


def test_a_replaced_constant_before_the_chain_is_dropped_too():
    # the constant is the op's first operand, the chain its second
    model = _model("""
    agraph (float[2, 3, 4] x) => (float[2, 3, 4] y) <float[2] c = {1, 2}> {
        t = Transpose <perm = [2, 1, 0]> (x)
        s = Sub (c, t)
        y = Transpose <perm = [2, 1, 0]> (s)
    }""")
    result = run_exact_pass(SinkLayoutOpsPass, model)
    assert _layout_count(result.model) == 0 and list(result.model.graph.initializers) == ["Sub_layout_operand"]
