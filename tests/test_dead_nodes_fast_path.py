"""eliminate-dead-nodes leaves a model whose nodes are all needed without running onnx-ir's
removal passes; on each case that pass would change (a dead node, an unused optional
output, an omitted trailing input, BatchNormalization's training_mode, an unused
initializer, a use by a detached node) the result is exactly onnx-ir's."""

from __future__ import annotations

import onnx
import onnx_ir as ir
import pytest
from onnx_ir.passes.common import RemoveUnusedNodesPass

from optcc.passes import EliminateDeadNodesPass

LIVE = """
<ir_version: 8, opset_import: ["" : 15]>
g (float[2,3] x) => (float[2,3] y, float[2,3] z) <float[3] b = {1.0, 2.0, 3.0}> {
    a = Add(x, b)
    y = Relu(a)
    z = Sigmoid(a)
}
"""

CASES = {
    "dead node": """
<ir_version: 8, opset_import: ["" : 15]>
g (float[2,3] x) => (float[2,3] y) {
    a = Relu(x)
    y = Sigmoid(x)
}
""",
    "unused optional output": """
<ir_version: 8, opset_import: ["" : 15]>
g (float[2,3] x) => (float[2,3] y) {
    y, mask = Dropout(x)
}
""",
    "unused middle optional output": """
<ir_version: 8, opset_import: ["" : 15]>
g (float[4,2,3] x, float[1,12,3] w, float[1,12,3] r) => (float[1,2,3] h) {
    y, h = GRU <hidden_size: int = 3> (x, w, r)
}
""",
    "omitted trailing input": """
<ir_version: 8, opset_import: ["" : 15]>
g (float[2,3] x) => (float[2,3] y) {
    y = Clip(x, , )
}
""",
    "batchnorm training_mode": """
<ir_version: 8, opset_import: ["" : 15]>
g (float[1,2,3] x, float[2] s, float[2] b, float[2] m, float[2] v) => (float[1,2,3] y) {
    y = BatchNormalization <training_mode: int = 0> (x, s, b, m, v)
}
""",
    "unused initializer": """
<ir_version: 8, opset_import: ["" : 15]>
g (float[2,3] x) => (float[2,3] y) <float[3] unused = {1.0, 2.0, 3.0}> {
    y = Relu(x)
}
""",
}


def _model(text: str) -> ir.Model:
    return ir.from_proto(onnx.parser.parse_model(text))


def _bytes(model: ir.Model) -> bytes:
    return ir.to_proto(model).SerializeToString(deterministic=True)


def test_all_needed_is_left_as_is() -> None:
    model = _model(LIVE)
    before = _bytes(model)
    result = EliminateDeadNodesPass()(model)
    assert not result.modified
    assert _bytes(result.model) == before
    reference = _model(LIVE)
    assert not RemoveUnusedNodesPass()(reference).modified
    assert _bytes(reference) == before


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_result_as_onnx_ir(case: str) -> None:
    ours = EliminateDeadNodesPass()(_model(CASES[case]))
    reference = _model(CASES[case])
    modified = RemoveUnusedNodesPass()(reference).modified
    assert ours.modified == modified
    assert _bytes(ours.model) == _bytes(reference)
    assert _bytes(ours.model) != _bytes(_model(CASES[case]))  # each case is one onnx-ir changes


def test_use_by_a_detached_node_is_dropped() -> None:
    """A node removed without detaching its inputs leaves a use behind: the values it read
    are then dead, as the full path finds."""
    model = _model("""
<ir_version: 8, opset_import: ["" : 15]>
g (float[2,3] x) => (float[2,3] y) {
    a = Relu(x)
    b = Sigmoid(a)
    y = Neg(x)
}
""")
    sigmoid = next(n for n in model.graph if n.op_type == "Sigmoid")
    model.graph.remove(sigmoid)  # unsafe: 'a' still lists the Sigmoid as a reader
    result = EliminateDeadNodesPass()(model)
    assert result.modified
    assert [n.op_type for n in result.model.graph] == ["Neg"]
