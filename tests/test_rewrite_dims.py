"""optcc.rewrite.same_dim: dims traced to the dim they copy. Every claim of equality is
checked on onnx's reference evaluator at two input sizes (the intermediate values made
graph outputs); pairs a broadcast could make different are not claimed."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import pytest
from onnx.reference import ReferenceEvaluator

from optcc.rewrite import dim_origin, same_dim

MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[A, B, 4] x, float[C, 4] z) => (float[A, 4] y)
  <int64[2] flat = {0, -1}, int64[1] ax = {1}, float[1, 1, 4] one_row = {1, 2, 3, 4}, float[4, 3] w> {
    t = Transpose<perm = [2, 0, 1]>(x)
    r = Relu(t)
    u = Unsqueeze(r, ax)
    q = Squeeze(u, ax)
    s = Add(x, one_row)
    m = MatMul(x, w)
    k = Concat<axis = 2>(x, x)
    rs = Reshape(x, flat)
    gm = Gemm<transA = 1>(z, z)
    y = ReduceSum<axes = [1], keepdims = 0>(x)
    b = Add(y, z)
}
"""


def _model() -> ir.Model:
    proto = onnx.parser.parse_model(MODEL.replace("float[4, 3] w", "float[4, 3] w = {" + ", ".join(["1"] * 12) + "}"))
    return ir.from_proto(proto)


def _values(model: ir.Model) -> dict[str, ir.Value]:
    found = {v.name: v for v in model.graph.inputs}
    found.update({v.name: v for n in model.graph for v in n.outputs})
    return found


CLAIMED = [
    (("t", 0), ("x", 2)), (("t", 1), ("x", 0)), (("q", 2), ("x", 1)), (("u", 2), ("x", 0)),
    (("s", 0), ("x", 0)), (("s", 1), ("x", 1)), (("m", 1), ("x", 1)), (("m", 0), ("x", 0)),
    (("k", 0), ("x", 0)), (("rs", 0), ("x", 0)), (("gm", 0), ("z", 1)), (("gm", 1), ("z", 1)),
]
NOT_CLAIMED = [
    (("k", 2), ("x", 2)),  # the concatenated axis
    (("m", 2), ("x", 2)),  # MatMul's columns come from w
    (("b", 0), ("x", 0)),  # y + z: z's rows may broadcast y's one row, or y's z's
    (("b", 0), ("z", 0)),
    (("rs", 1), ("x", 1)),  # -1: the product of the rest
    (("t", 0), ("x", 0)),
    (("s", 2), ("x", 2)),  # the constant's 4 sets it (x's dim there may be 1)
]


@pytest.mark.parametrize("pair", CLAIMED, ids=[f"{a[0]}{a[1]}={b[0]}{b[1]}" for a, b in CLAIMED])
def test_claimed_dims_are_equal_on_the_reference_evaluator(pair):
    (a, i), (b, j) = pair
    model = _model()
    values = _values(model)
    assert same_dim(values[a], i, values[b], j, {})
    proto = ir.to_proto(model)
    names = [a, b]
    proto.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in ("x", "z"))
    for sizes in ((2, 3, 1), (5, 1, 5)):
        a_size, b_size, c_size = sizes
        feeds = {"x": np.ones((a_size, b_size, 4), np.float32), "z": np.ones((c_size, 4), np.float32)}
        outs = dict(zip([o.name for o in proto.graph.output], ReferenceEvaluator(proto).run(None, feeds)))
        outs.update(feeds)
        assert outs[a].shape[i] == outs[b].shape[j]


@pytest.mark.parametrize("pair", NOT_CLAIMED, ids=[f"{a[0]}{a[1]}-{b[0]}{b[1]}" for a, b in NOT_CLAIMED])
def test_dims_a_broadcast_or_a_computation_may_change_are_not_claimed(pair):
    (a, i), (b, j) = pair
    values = _values(_model())
    assert not same_dim(values[a], i, values[b], j, {})


def test_a_broadcast_sum_is_really_different_where_not_claimed():
    """b = ReduceSum(x) + z with x of one row and z of three: b has z's rows."""
    proto = ir.to_proto(_model())
    proto.graph.output.extend([onnx.helper.make_empty_tensor_value_info("b")])
    outs = ReferenceEvaluator(proto).run(None, {"x": np.ones((1, 1, 4), np.float32), "z": np.ones((3, 4), np.float32)})
    assert outs[-1].shape[0] == 3


def test_recurrent_outputs_keep_sequence_and_batch():
    proto = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[S, N, 3] x, float[1, 8, 3] w, float[1, 8, 2] r) => (float[S, 1, N, 2] y) {
        y = LSTM<hidden_size = 2>(x, w, r)
    }""")
    model = ir.from_proto(proto)
    x, y = model.graph.inputs[0], model.graph.outputs[0]
    assert dim_origin(y, 0, {}) == (x, 0) and dim_origin(y, 2, {}) == (x, 1)
    assert dim_origin(y, 1, {}) == (y, 1) and dim_origin(y, 3, {}) == (y, 3)
    feeds = {"x": np.ones((4, 2, 3), np.float32), "w": np.ones((1, 8, 3), np.float32) * 0.1,
             "r": np.ones((1, 8, 2), np.float32) * 0.1}
    assert ReferenceEvaluator(proto).run(None, feeds)[0].shape == (4, 1, 2, 2)
