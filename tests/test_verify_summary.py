"""The verification's one-line summary: an output that passed per element within an
absolute allowance (a Sigmoid's float32 resolution, on a sample whose values are all tiny)
can show a max rel far above the tolerance; the line then gives its max abs and the largest
share of an element's allowance used, so a PASS never reads as a 15% error within 1e-4."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import optcc
from optcc.numerics import verify


def _sigmoid_of_shifted(shift: float) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])
    nodes = [helper.make_node("Add", ["x", "c"], ["s"]), helper.make_node("Sigmoid", ["s"], ["y"])]
    graph = helper.make_graph(nodes, "g", [x], [y], [numpy_helper.from_array(np.array(shift, np.float32), "c")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _feeds() -> list[dict[str, np.ndarray]]:
    """Deep in Sigmoid's tail: every output is about 1e-6, a few float32 steps of 1.2e-7."""
    return [{"x": (np.float32(-14.0) + np.linspace(0, 0.5, 32, dtype=np.float32)).reshape(4, 8)}]


def test_a_pass_within_an_absolute_allowance_reports_its_max_abs() -> None:
    feeds = _feeds()
    report = verify(_sigmoid_of_shifted(0.0), optcc.ir.load(_sigmoid_of_shifted(0.1)), numerics="fusion",
                    inputs=feeds, reference="float32")
    x = feeds[0]["x"].astype(np.float64)
    expected_abs = float(np.max(np.abs(1 / (1 + np.exp(-(x + 0.1))) - 1 / (1 + np.exp(-x)))))
    (output,) = report.outputs
    assert report.passed and output.max_rel > report.tolerance.max_rel
    assert abs(output.max_abs - expected_abs) < 2e-7
    assert f"max abs {output.max_abs:.3g}" in report.describe()
    # the judged quantity: every element may be off by max(1e-4 of the output's scale, 4 steps
    # of float32 at 1, Sigmoid's resolution), a constant here; the line reports the share used
    scale = float(np.max(1 / (1 + np.exp(-x))))
    allowed = max(1e-4 * scale, 4 * float(np.finfo(np.float32).eps))
    assert abs(output.allowance_used - output.max_abs / allowed) < 1e-6
    assert 0 < output.allowance_used <= 1
    assert f"at most {output.allowance_used:.0%} of it" in report.describe()


def test_a_pass_within_the_relative_tolerance_reports_max_rel_alone() -> None:
    report = verify(_sigmoid_of_shifted(0.0), optcc.ir.load(_sigmoid_of_shifted(0.0)), numerics="fusion",
                    inputs=_feeds(), reference="float32")
    assert report.passed and "max rel 0" in report.describe() and "max abs" not in report.describe()


def test_allowance_used_is_the_largest_error_over_its_allowance() -> None:
    from optcc.numerics.metrics import TOLERANCES, compare_outputs

    ref = np.array([[1.0, -2.0, 0.5, 0.25]], np.float32)
    got = ref + np.array([[1e-4, 0.0, -3e-4, 0.0]], np.float32)
    m = compare_outputs("y", "CPU", [ref], [got], TOLERANCES["fusion"])
    allowed = 1e-4 * 2.0  # the tolerance times the output's scale, max |ref|
    err = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    assert m.allowance_used == np.float64(np.max(err / allowed)) and m.allowance_used > 1
    assert not m.passed and m.elements_over == 1
    zero = np.zeros((1, 3), np.float32)  # nothing is allowed where the scale is 0: any error is infinitely over
    assert compare_outputs("y", "CPU", [zero], [zero + np.float32(1e-30)], TOLERANCES["fusion"]).allowance_used == np.inf
    assert compare_outputs("y", "CPU", [zero], [zero], TOLERANCES["fusion"]).allowance_used == 0
