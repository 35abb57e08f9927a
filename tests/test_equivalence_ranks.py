"""The proof reads ranks by the operators' definitions where it can (a MatMul's by numpy's
matmul rules; any chain of such nodes, however long, in graph order) before it asks onnx's
shape inference, and the ranks it reads are the ones shape inference gives."""

from __future__ import annotations

import onnx
import pytest

import optcc
from optcc.numerics import equivalence
from optcc.numerics.equivalence import _Keys, _Numbering, _inferred_ranks, _static_shapes


def _keys(proto: onnx.ModelProto) -> _Keys:
    model = optcc.ir.load(proto)
    return _Keys(model, _Numbering(), _static_shapes(model))


def _value(keys: _Keys, name: str):
    return next(v for node in keys.model.graph for v in node.outputs if v.name == name)


def _unshaped_outputs(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The graph outputs without a declared shape (the parser declares ``float y`` a scalar)."""
    for output in proto.graph.output:
        output.type.tensor_type.ClearField("shape")
    return proto


def _no_inference(monkeypatch) -> list:
    asked = []

    def refuse(*args, **kwargs):
        asked.append(args)
        raise AssertionError("ranks by definition need no shape inference")

    monkeypatch.setattr(equivalence, "_inferred_ranks", refuse)
    return asked


MATMULS = {
    "batched": ("float[2, 3, 4, 5] a, float[5, 6] b", 4),
    "batched-both": ("float[3, 4, 5] a, float[2, 1, 5, 6] b", 4),
    "matrix": ("float[4, 5] a, float[5, 6] b", 2),
    "vector-left": ("float[5] a, float[2, 5, 6] b", 2),
    "vector-right": ("float[2, 4, 5] a, float[5] b", 2),
    "vectors": ("float[5] a, float[5] b", 0),
}


@pytest.mark.parametrize("name", sorted(MATMULS))
def test_a_matmuls_rank_is_numpys_and_shape_inferences(name, monkeypatch):
    inputs, expected = MATMULS[name]
    proto = _unshaped_outputs(onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["": 17]>
        g ({inputs}) => (float y) {{
            m = MatMul(a, b)
            y = Relu(m)
        }}"""))
    assert _inferred_ranks(proto, {})["m"] == expected
    asked = _no_inference(monkeypatch)
    keys = _keys(proto)
    assert keys.rank(_value(keys, "m")) == expected
    assert not asked


def _chain(length: int) -> onnx.ModelProto:
    body = "\n".join(f"r{i + 1} = Relu(r{i})" for i in range(length))
    return _unshaped_outputs(onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["": 17]>
        g (float[1, 3, 8, 8] r0, float[4, 3, 1, 1] w) => (float y) {{
            {body}
            y = Conv(r{length}, w)
        }}"""))


def test_a_chain_longer_than_the_depth_bound_is_ranked_without_inference(monkeypatch):
    length = equivalence.MAX_RANK_DEPTH * 3
    asked = _no_inference(monkeypatch)
    keys = _keys(_chain(length))
    assert keys.rank(keys.model.graph.outputs[0]) == 4
    assert not asked


def test_ranks_read_in_graph_order_are_shape_inferences():
    proto = _unshaped_outputs(onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["": 17]>
        g (float[2, 3, 4] x, float[4, 5] w, float[3] v, float[5, 1, 1] c) => (float y, float z) {
            m = MatMul(x, w)
            t = Transpose <perm = [2, 0, 1]> (m)
            s = Add(t, c)
            r = ReduceMean <keepdims = 1, axes = [0]> (s)
            q = Mul(r, v)
            u = MatMul(q, v)
            y = Sigmoid(u)
            p = Softmax <axis = -1> (q)
            k = Concat <axis = 0> (p, q)
            z = Pow(k, q)
        }"""))
    inferred = _inferred_ranks(proto, {})
    keys = _keys(proto)
    keys._warm_ranks()
    ranked = {value.name: rank for value, rank in keys._rank_memo.values()}
    assert set(ranked) >= {"m", "t", "s", "r", "q", "u", "y", "p", "k", "z"}
    assert all(inferred[name] == rank for name, rank in ranked.items())


def test_an_unknown_rank_every_path_reaches_is_sought_once_per_node(monkeypatch) -> None:
    # a ladder of 16 rungs, each rung's two values reading both of the rung before, on top of
    # an op whose rank no definition gives: every value reaches it along 2**rung paths.
    # The rank of the last value is sought along each of them unless a rank not found is
    # remembered; the number of values ranked stays within a few per node. The answer is
    # what shape inference gives (unknown: the op's domain is unknown to it)
    rungs = 16
    lines = ["a0 = acme.Mystery (x)", "b0 = acme.Mystery (x)"]
    for i in range(1, rungs + 1):
        lines += [f"a{i} = Add (a{i - 1}, b{i - 1})", f"b{i} = Mul (a{i - 1}, b{i - 1})"]
    lines.append(f"y = Add (a{rungs}, b{rungs})")
    proto = onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 17, "acme" : 1]>\n'
        "agraph (float[2, 3] x) => (float[2, 3] y) {\n" + "\n".join(lines) + "\n}")
    keys = _keys(proto)
    sought = []
    rank_of = _Keys._rank_of
    monkeypatch.setattr(_Keys, "_rank_of", lambda self, value, depth: sought.append(value.name)
                        or rank_of(self, value, depth))
    assert keys.rank(_value(keys, "y")) is None
    assert len(sought) <= 4 * (2 * rungs + 3), len(sought)
