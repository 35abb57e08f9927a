"""fuse-ort-packed-attention must not take an overridable initializer (an initializer that is
also a graph input, IR >= 4) as a constant when it rewrites a shape read of a projection.
onnxruntime's symbolic shape inference (passes/ort_shapes.py) reads such an initializer's value
(``without_weights`` keeps small initializers, listed as inputs or not), so
``Shape(Reshape(q, split))`` was rewritten to ``[Shape(x)[0], Shape(x)[1], 2, 8]`` although a
caller may feed ``split = [0, 0, 4, 4]`` and the original returns ``[b, s, 4, 4]``."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import optcc

HEADS, HEAD = 2, 8
HIDDEN = HEADS * HEAD


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [onnx.numpy_helper.from_array((rng.standard_normal((HIDDEN, HIDDEN)) / 3).astype(np.float32), f"w{n}")
             for n in "qkv"]
    inits += [onnx.numpy_helper.from_array(rng.standard_normal(HIDDEN).astype(np.float32), f"b{n}") for n in "qkv"]
    inits.append(onnx.numpy_helper.from_array(np.array([0, 0, HEADS, HEAD], np.int64), "split"))
    nodes = []
    for n in "qkv":
        nodes += [helper.make_node("MatMul", ["x", f"w{n}"], [f"{n}_mm"]),
                  helper.make_node("Add", [f"{n}_mm", f"b{n}"], [n])]
    nodes += [helper.make_node("Reshape", ["q", "split"], ["q_split"]),  # read for its shape alone
              helper.make_node("Shape", ["q_split"], ["q_split_shape"]),
              helper.make_node("Cast", ["q_split_shape"], ["q_dims"], to=TensorProto.FLOAT),
              helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["y"], domain="com.microsoft", num_heads=HEADS)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", HIDDEN]),
              helper.make_tensor_value_info("split", TensorProto.INT64, [4])]  # overridable: initializer and input
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", HIDDEN]),
               helper.make_tensor_value_info("q_dims", TensorProto.FLOAT, [4])]
    graph = helper.make_graph(nodes, "mha", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=9)


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3  # the "initializer appears in graph inputs" warning
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("verify", [False, True])
def test_a_shape_read_through_an_overridable_initializer_keeps_its_run_time_value(verify: bool) -> None:
    model = _model()
    optimized = optcc.optimize(model, level=3, verify=verify).model
    assert [i.name for i in optimized.graph.input] == ["x", "split"]
    original, fused = _session(model), _session(optimized)
    rng = np.random.default_rng(1)
    for batch, seq in ((1, 5), (2, 3)):
        x = rng.standard_normal((batch, seq, HIDDEN)).astype(np.float32)
        for split in ([0, 0, HEADS, HEAD], [0, 0, 4, 4], [0, 0, -1, 1]):
            feeds = {"x": x, "split": np.array(split, np.int64)}
            want, got = original.run(None, feeds), fused.run(None, feeds)
            np.testing.assert_array_equal(got[1], want[1], err_msg=f"q_dims, batch {batch}, seq {seq}, split {split}")
            np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-4 * np.abs(want[0]).max())


def test_a_shape_read_that_is_a_graph_output_keeps_its_layer_unfused() -> None:
    """``Shape(Reshape(q, split))`` read as a graph output (an exporter's Identity removed at
    -O3): its value cannot be replaced, so the layer stays MultiHeadAttention, without the
    pass failing."""
    model = _model()
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "split"))
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([0, 0, HEADS, HEAD], np.int64), "split"))
    del model.graph.input[1:]  # split: a constant here
    cast = next(n for n in model.graph.node if n.op_type == "Cast")
    model.graph.node.remove(cast)
    model.graph.output[1].CopyFrom(helper.make_tensor_value_info("q_split_shape", TensorProto.INT64, [4]))
    result = optcc.optimize(model, level=3)
    record = next(r for r in result.report.passes if r.name == "fuse-ort-packed-attention")
    assert record.status == "unchanged" and "computed twice" in next(iter(record.stats["layers"].values()))
    x = np.random.default_rng(2).standard_normal((2, 3, HIDDEN)).astype(np.float32)
    want, got = _session(model).run(None, {"x": x}), _session(result.model).run(None, {"x": x})
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-4 * np.abs(want[0]).max())
