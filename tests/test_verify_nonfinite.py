"""Samples on which the original's outputs hold no finite value compare nothing: NaN and
infinities are compared by position only, so any model with the same NaN positions would
pass. Such a check is a proof or skipped (not verified), never a pass; an output that is
NaN everywhere while others compare is a weak-verification note."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import optcc
from optcc.errors import UnverifiedError

from reference import FUSION_RTOL, assert_close, onnxruntime_outputs

NEGATIVE = [{"x": -np.linspace(1.0, 4.0, 12, dtype=np.float32).reshape(3, 4) * (i + 1)} for i in range(3)]


def _log_model(shift: float, *, with_relu: bool = False, identity: bool = False) -> onnx.ModelProto:
    """y = Log(x + shift) (NaN for x + shift < 0); with ``with_relu`` also r = Relu(x) * 2."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])]
    nodes = [helper.make_node("Add", ["x", "c"], ["s"])]
    if identity:  # a node -O2 removes (an exact rewrite the proof proves)
        nodes.append(helper.make_node("Identity", ["s"], ["t"]))
    nodes.append(helper.make_node("Log", ["t" if identity else "s"], ["y"]))
    inits = [numpy_helper.from_array(np.array(shift, np.float32), "c")]
    if with_relu:
        nodes += [helper.make_node("Relu", ["x"], ["q"]), helper.make_node("Mul", ["q", "two"], ["r"])]
        inits.append(numpy_helper.from_array(np.array(2.0, np.float32), "two"))
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [3, 4]))
    graph = helper.make_graph(nodes, "g", [x], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_wrong_model_on_samples_that_compare_nothing_is_not_passed() -> None:
    # the premise, from numpy: the two models differ, but both are NaN on every sample
    positive = np.linspace(1.0, 4.0, 12).reshape(3, 4)
    assert not np.allclose(np.log(positive), np.log(positive + 0.5))
    with np.errstate(invalid="ignore"):
        assert all(np.isnan(np.log(f["x"].astype(np.float64))).all() for f in NEGATIVE)
        assert all(np.isnan(np.log(f["x"].astype(np.float64) + 0.5)).all() for f in NEGATIVE)
    report = optcc.verify(_log_model(0.0), _log_model(0.5), numerics="fusion", inputs=NEGATIVE)
    assert report.status == "skipped" and not report.passed
    assert "NaN, infinite or empty on every sample" in (report.reason or "")


def test_a_lossy_result_on_such_samples_raises_unverified() -> None:
    with pytest.raises(UnverifiedError) as raised:
        optcc.optimize(_log_model(0.0), fp16=True, inputs=NEGATIVE)
    assert "compare nothing" in str(raised.value)
    result = optcc.optimize(_log_model(0.0), fp16=True, inputs=NEGATIVE, allow_unverified=True)
    assert result.report.verification["status"] == "skipped"


def test_a_proved_result_passes_by_its_proof_with_a_note() -> None:
    result = optcc.optimize(_log_model(0.0, identity=True), level=2, inputs=NEGATIVE)
    verification = result.report.verification
    assert verification["status"] == "passed" and verification["reference"] == "proof"
    assert any("compare nothing" in note for note in verification["notes"])
    positive = {"x": np.linspace(0.5, 6.0, 12, dtype=np.float32).reshape(3, 4)}
    (got,) = onnxruntime_outputs(result.model, positive)
    assert_close([got], [np.log(positive["x"].astype(np.float64))], rtol=FUSION_RTOL)


def test_an_output_nan_everywhere_beside_one_that_compares_is_a_note() -> None:
    result = optcc.optimize(_log_model(0.0, with_relu=True), fp16=True, inputs=NEGATIVE)
    verification = result.report.verification
    assert verification["status"] == "passed"
    assert any("'y' is NaN or infinite on every element of every sample" in n for n in verification["notes"])
    (r,) = [o for o in verification["outputs"] if o["name"] == "r"]
    assert r["sqnr_db"] is not None
