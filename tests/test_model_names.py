"""ModelNames hands out names no graph of the model uses: values and nodes, the Constant
nodes it makes included, collected when first needed."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.reference
import onnx_ir as ir

import optcc.ir as oir

_TEXT = """
<ir_version: 3, opset_import: ["" : 13]>
g (float[2] x) => (float[2] y) {
    y = Add(x, x)
}"""


def test_a_constant_node_it_makes_takes_its_node_name_too() -> None:
    model = ir.from_proto(onnx.parser.parse_model(_TEXT))  # IR 3: constants are Constant nodes
    (reader,) = list(model.graph)
    reader.name = "r"
    names = oir.ModelNames(model)
    value = names.constant_for(reader, np.array([3.0, 4.0], np.float32), "t")
    reader.replace_input_with(1, value)
    assert value.producer() is not None and value.producer().name == value.name == "r_t"
    assert names.node("r_t") == "r_t_1" and names.value("r_t") == "r_t_1"
    (y,) = onnx.reference.ReferenceEvaluator(ir.to_proto(model)).run(None, {"x": np.array([1.0, 2.0], np.float32)})
    np.testing.assert_array_equal(y, np.array([4.0, 6.0], np.float32))


def test_names_are_collected_when_first_needed() -> None:
    model = ir.from_proto(onnx.parser.parse_model(_TEXT))
    names = oir.ModelNames(model)
    (node,) = list(model.graph)
    node.outputs[0].name = "later"  # a name the model takes before the first one is handed out
    node.name = "later_node"
    assert names.value("later") == "later_1" and names.node("later_node") == "later_node_1"
