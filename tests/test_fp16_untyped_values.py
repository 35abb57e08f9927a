"""Untyped values and FP16 (PP-Structure's SLANet table recognizer, whose Loop body FP16 made
invalid). optcc.ir.inferred_dtypes types the values behind a Resize whose unused ``scales`` is an
empty initializer (paddle2onnx writes them so): the weights it sets aside for onnx's type
inference are the large ones, so small constants that inference reads keep their values.
With ``scales`` set aside as a graph input, inference stopped at the Resize and typed nothing
after it, down into the Loop body; and the FP16 rewrite then converted a body Constant
whose reader it could not type."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
import onnx_ir as ir
from onnx import TensorProto as TP

import optcc
from optcc.fp16 import Rewriter
from reference import expected_outputs_float64


def _resize_then_relu() -> onnx.ModelProto:
    nodes = [
        oh.make_node("Resize", ["x", "", "scales", "sizes"], ["r"], mode="nearest"),
        oh.make_node("Relu", ["r"], ["h"]),
        oh.make_node("MatMul", ["h", "w"], ["y"]),
    ]
    inits = [nh.from_array(np.zeros(0, np.float32), "scales"),
             nh.from_array(np.array([1, 1, 8, 8], np.int64), "sizes"),
             nh.from_array(np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32), "w")]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TP.FLOAT, [1, 1, 4, 4])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, [1, 1, 8, 8])], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 13)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_values_after_a_resize_with_empty_scales_are_typed():
    types = optcc.ir.inferred_dtypes(optcc.ir.load(_resize_then_relu()))
    assert types.get("r") == ir.DataType.FLOAT and types.get("h") == ir.DataType.FLOAT


def test_a_constant_read_by_a_node_of_unknown_types_stays_float32():
    """The rewrite converts a float Constant only when every reader reads it as float16; a
    reader whose input types could not be inferred (a body onnx's inference gave up on)
    keeps its types, so the Constant keeps float32 too (float16 made Add(float, float16))."""
    proto = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["": 17]>
    g (float[2, 2] x) => (float[2, 2] y) {
      c = Constant <value = float[1] {1.5}> ()
      y = Add(x, c)
    }""")
    model = optcc.ir.load(proto)
    unknown = {"c"}  # as inside SLANet's Loop body, where the reader's types were unknown
    Rewriter(model, lambda node: None, lambda v: None if v.name in unknown else v.dtype, lambda name: True).run()
    out = optcc.ir.serialize(model)
    onnx.checker.check_model(out, full_check=True)
    constant = next(n for n in out.graph.node if n.op_type == "Constant")
    assert constant.attribute[0].t.data_type == TP.FLOAT
    feeds = {"x": np.arange(4, dtype=np.float32).reshape(2, 2)}
    np.testing.assert_array_equal(expected_outputs_float64(out, feeds)[0], feeds["x"] + 1.5)
