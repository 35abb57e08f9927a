"""A lossy step that fails the verification is reverted, and the model it made is let go
before the pipeline's result is verified again: nothing the run or ``optimize`` keeps
reaches it (the float result of the steps before it stays). The result computes the float
graph, checked against onnx's reference evaluator."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import onnx
import onnx.reference
import onnx_ir as ir
import pytest

import optcc
from optcc.numerics import Verifier

MODEL_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
agraph (float[N, 4] x) => (float[N, 4] y) {
    a = Add(x, x)
    i = Identity(a)
    y = Relu(i)
}
"""


class SubtractingLossyPass(optcc.Pass):
    """Claims INT8 numerics and turns the Add into a Sub; keeps a weak reference to each
    model it returns."""

    name = "test-subtracting-lossy"
    numerics = "int8"

    def __init__(self) -> None:
        super().__init__()
        self.made: list[weakref.ref] = []

    def call(self, model: ir.Model) -> optcc.PassResult:
        for node in model.graph:
            if node.op_type == "Add":
                node.op_type = "Sub"
                self.made.append(weakref.ref(model))
                return optcc.PassResult(model, True)
        return optcc.PassResult(model, False)


def test_the_reverted_lossy_model_is_released_before_the_result_is_verified(monkeypatch: pytest.MonkeyPatch) -> None:
    lossy = SubtractingLossyPass()
    reachable: list[bool] = []  # at each check: whether the lossy step's model can still be reached
    check = Verifier.check

    def watched(self: Verifier, model: ir.Model, *args: object, **kwargs: object) -> object:
        gc.collect()
        reachable.append(bool(lossy.made) and lossy.made[0]() is not None)
        return check(self, model, *args, **kwargs)

    monkeypatch.setattr(Verifier, "check", watched)
    result = optcc.optimize(onnx.parser.parse_model(MODEL_TEXT), passes=["eliminate-identities", lossy])
    statuses = {r.name: r.status for r in result.report.passes}
    assert statuses == {"eliminate-identities": "changed", "test-subtracting-lossy": "reverted"}
    assert len(lossy.made) == 1
    # the lossy result's check, then the check of the result without it
    assert reachable[-2:] == [True, False]
    x = np.linspace(-3, 3, 8, dtype=np.float32).reshape(2, 4)
    (y,) = onnx.reference.ReferenceEvaluator(ir.to_proto(result.ir_model)).run(None, {"x": x})
    np.testing.assert_array_equal(y, np.maximum(x + x, 0))
