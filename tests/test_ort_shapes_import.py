"""onnxruntime's symbolic shape inference, which the onnxruntime fusions use, is imported
without its package's ``__init__`` (which imports torch wherever torch is installed): a
process that runs it holds no torch, and the inference is onnxruntime's own class, whose warnings stay quiet as under its own name."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import sys
from optcc.passes import ort_shapes
inference = ort_shapes._inference_class()
assert inference.__mro__[1].__name__ == "SymbolicShapeInference", inference.__mro__
assert ort_shapes._inference_class().__mro__[1] is inference.__mro__[1]  # its module imported once
print("torch" in sys.modules)

import onnx_ir as ir
from onnx import TensorProto, helper
# batch dims n and 3 that its inference does not merge: it warns, to a logger optcc quiets
graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["y"])], "g",
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 2, 4]),
                           helper.make_tensor_value_info("b", TensorProto.FLOAT, [3, 4, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
ort_shapes.OrtShapes(model).dims(model.graph.outputs[0])
"""


def test_the_shape_inference_imports_no_torch() -> None:
    done = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
    assert done.stderr == ""  # its warnings are not optcc's output
