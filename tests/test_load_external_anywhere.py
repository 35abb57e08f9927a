"""Loading refuses an external data path that leaves the model's folder wherever the tensor
stands: an initializer, a Constant's tensor, one of a TENSORS attribute's tensors, or any of
them inside an If body. The model is refused before onnx's checker or onnx-ir reads it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optcc import ir as oir
from optcc.errors import UnsafeInputError


def _escaping(name: str) -> TensorProto:
    """A 2x3 float tensor whose data is said to be in ``../outside.bin``."""
    tensor = numpy_helper.from_array(np.ones((2, 3), np.float32), name)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../outside.bin"), ("offset", "0"), ("length", "24")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def _constant(output: str, tensor: TensorProto) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [output], value=tensor)


def _tensors_node(output: str) -> onnx.NodeProto:
    """A custom-domain node holding two tensors in one TENSORS attribute, the second one external."""
    inline = numpy_helper.from_array(np.zeros(3, np.float32), "inline")
    return helper.make_node("Holder", ["x"], [output], domain="com.example",
                            tensors=[inline, _escaping("held")])


def _model(nodes: list[onnx.NodeProto], inits: list[TensorProto] = ()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])


def _in_body(nodes: list[onnx.NodeProto], inits: list[TensorProto] = ()) -> list[onnx.NodeProto]:
    """``nodes`` as the then-branch of an If (its output ``b``), the else-branch a plain Identity."""
    then = helper.make_graph(nodes, "then", [], [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 3])],
                             list(inits))
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 3])])
    condition = _constant("c", numpy_helper.from_array(np.array(True), "c"))
    return [condition, helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)]


CASES = {
    "initializer": lambda: _model([helper.make_node("Add", ["x", "w"], ["y"])], [_escaping("w")]),
    "constant": lambda: _model([_constant("w", _escaping("w")), helper.make_node("Add", ["x", "w"], ["y"])]),
    "tensors attribute": lambda: _model([_tensors_node("y")]),
    "body initializer": lambda: _model(_in_body([helper.make_node("Add", ["x", "w"], ["b"])], [_escaping("w")])),
    "body constant": lambda: _model(_in_body([_constant("w", _escaping("w")),
                                              helper.make_node("Add", ["x", "w"], ["b"])])),
    "body tensors attribute": lambda: _model(_in_body([_tensors_node("b")])),
}


@pytest.mark.parametrize("where", list(CASES))
def test_an_escaping_external_path_is_refused_wherever_the_tensor_stands(tmp_path: Path, where: str) -> None:
    (tmp_path / "outside.bin").write_bytes(np.ones(6, np.float32).tobytes())
    folder = tmp_path / "model"
    folder.mkdir()
    path = folder / "model.onnx"
    path.write_bytes(CASES[where]().SerializeToString())
    with pytest.raises(UnsafeInputError, match="refusing external data path '../outside.bin'"):
        oir.load(path)
