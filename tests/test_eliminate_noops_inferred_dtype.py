"""eliminate-noops removes a Cast to the type its input already has when that type is not
annotated but fixed by ONNX's type constraints (a Slice of a float input is float, a Not
is bool), and keeps a Cast that converts."""

from __future__ import annotations

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator

import optcc


def _model() -> onnx.ModelProto:
    return onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["": 17]>
        g (float[2, 8] x, bool[2, 8] m) => (float[2, 4] y, bool[2, 8] n, float[2, 8] f) {
            starts = Constant <value = int64[1] {0}> ()
            ends = Constant <value = int64[1] {4}> ()
            axes = Constant <value = int64[1] {1}> ()
            part = Slice(x, starts, ends, axes)
            y = Cast <to = 1> (part)
            flipped = Not(m)
            n = Cast <to = 9> (flipped)
            f = Cast <to = 1> (flipped)
        }""")


def test_casts_to_the_type_the_constraints_fix_are_removed_and_conversions_kept():
    model = _model()
    assert not model.graph.value_info  # nothing annotated: the types come from the ops
    result = optcc.optimize(model, passes=["eliminate-noops"])
    casts = [n for n in result.model.graph.node if n.op_type == "Cast"]
    assert [c.attribute[0].i for c in casts] == [onnx.TensorProto.FLOAT]  # bool -> float stays
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((2, 8)).astype(np.float32), "m": rng.random((2, 8)) < 0.5}
    for got, want in zip(ReferenceEvaluator(result.model).run(None, feeds), ReferenceEvaluator(model).run(None, feeds)):
        assert got.dtype == want.dtype and np.array_equal(got, want)


def test_element_type_reads_a_data_movement_op_from_its_data_input_only():
    """A Reshape of a value of unknown type has an unknown type, not its int64 shape's: a
    Cast to int64 after it may convert, and stays; an Add takes its known operand's type."""
    proto = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["": 17, "com.example": 1]>
        g (float[2, 8] x) => (int64[16] y, float[2, 8] z, bool[2, 8] b) {
            unknown = com.example.Opaque(x)
            shape = Constant <value = int64[1] {16}> ()
            flat = Reshape(unknown, shape)
            y = Cast <to = 7> (flat)
            added = Add(unknown, x)
            less = Less(unknown, x)
            z = Identity(added)
            b = Identity(less)
        }""")
    model = optcc.ir.load(proto)
    by_name = {v.name: v for node in model.graph for v in node.outputs}
    assert optcc.ir.element_type(by_name["unknown"]) is None
    assert optcc.ir.element_type(by_name["flat"]) is None
    assert optcc.ir.element_type(by_name["y"]) == onnx.TensorProto.INT64
    assert optcc.ir.element_type(by_name["added"]) == onnx.TensorProto.FLOAT
    assert optcc.ir.element_type(by_name["less"]) == onnx.TensorProto.BOOL
    result = optcc.optimize(proto, passes=["eliminate-noops"], verify=False)
    assert [n.op_type for n in result.model.graph.node].count("Cast") == 1


def test_casts_after_convolutions_pools_and_reductions_are_removed_and_indices_kept():
    """A Conv's output has its operands' type, a pool's, normalization's or reduction's its
    data input's (as PyTorch exports a channels-last ResNet with a float Cast after every
    op): those Casts are removed; MaxPool's int64 indices are no data and keep their Cast."""
    proto = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["": 17]>
        g (float[1, 2, 6, 6] x, float[3, 2, 3, 3] w) => (float[1, 3, 1, 1] y, float[1, 3, 2, 2] i) {
            c = Conv <pads = [1, 1, 1, 1]> (x, w)
            c1 = Cast <to = 1> (c)
            t = Tanh(c1)
            t1 = Cast <to = 1> (t)
            p, idx = MaxPool <kernel_shape = [3, 3], strides = [3, 3]> (t1)
            p1 = Cast <to = 1> (p)
            a = AveragePool <kernel_shape = [2, 2], strides = [2, 2]> (p1)
            a1 = Cast <to = 1> (a)
            r = ReduceMean <axes = [2, 3], keepdims = 1> (a1)
            y = Cast <to = 1> (r)
            i = Cast <to = 1> (idx)
        }""")
    result = optcc.optimize(proto, passes=["eliminate-noops"], verify=False)
    casts = [n for n in result.model.graph.node if n.op_type == "Cast"]
    assert [list(c.input) for c in casts] == [["idx"]]
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((1, 2, 6, 6)).astype(np.float32),
             "w": rng.standard_normal((3, 2, 3, 3)).astype(np.float32)}
    for got, want in zip(ReferenceEvaluator(result.model).run(None, feeds), ReferenceEvaluator(proto).run(None, feeds)):
        assert got.dtype == want.dtype and np.array_equal(got, want)
