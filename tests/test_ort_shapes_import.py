"""onnxruntime's symbolic shape inference, which the onnxruntime fusions use, is imported
without its package's ``__init__`` (which imports torch wherever torch is installed): a
process that runs it holds no torch, and the inference is onnxruntime's own class."""

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
"""


def test_the_shape_inference_imports_no_torch() -> None:
    done = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
