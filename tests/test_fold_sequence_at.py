"""FoldSequenceAtPass: ``SequenceAt(SequenceConstruct(x_0, ...), k)`` with a constant ``k``
reads ``x_k``. Judged by run_exact_pass (onnx's reference evaluator, onnxruntime on the
original bit for bit, the full checker, idempotence) and by numpy on the tensors put into
the sequence; the negative cases leave the model untouched."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import optcc
from optcc.passes.fold_sequence_at import FoldSequenceAtPass
from exact_pass_checks import run_exact_pass
from fixtures import peer_suite_onnxscript
from reference import onnxruntime_outputs


def _model(body: str) -> ir.Model:
    return ir.from_proto(onnx.parser.parse_model('<ir_version: 8, opset_import: ["" : 17]>\n' + body))


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


FEEDS = {"x": np.array([1.5, -2.0, 0.25], np.float32)}


@pytest.mark.parametrize(("k", "expected"), [(0, lambda x: x), (1, lambda x: x + x), (-1, lambda x: x * x)])
def test_element_at_a_constant_position_is_forwarded(k: int, expected) -> None:
    model = _model(f"""
    g (float[3] x) => (float[3] y) {{
        a = Add(x, x)
        m = Mul(x, x)
        s = SequenceConstruct(x, a, m)
        k = Constant<value = int64 {{{k}}}>()
        e = SequenceAt(s, k)
        y = Relu(e)
    }}
    """)
    result = run_exact_pass(FoldSequenceAtPass, model, FEEDS)
    assert result.stats == {"folded": 1} and "SequenceAt" not in _ops(result.model)
    (got,) = onnxruntime_outputs(result.model, FEEDS)
    assert np.array_equal(got, np.maximum(expected(FEEDS["x"]), 0))


def test_graph_output_takes_the_name_of_the_element() -> None:
    model = _model("""
    g (float[3] x) => (float[3] y) <int32 k = {1}> {
        a = Neg(x)
        s = SequenceConstruct(x, a)
        y = SequenceAt(s, k)
    }
    """)
    result = run_exact_pass(FoldSequenceAtPass, model, FEEDS)
    assert [v.name for v in result.model.graph.outputs] == ["y"]
    (got,) = onnxruntime_outputs(result.model, FEEDS)
    assert np.array_equal(got, -FEEDS["x"])


@pytest.mark.parametrize("case", ["out_of_range", "dynamic_position", "overridable_position",
                                  "graph_input_element_as_output", "other_producer"])
def test_what_is_not_provable_is_left_alone(case: str) -> None:
    bodies = {
        # position 3 of a 2-element sequence: the runtime's error, kept
        "out_of_range": """g (float[3] x) => (float[3] y) <int64 k = {3}> {
            a = Neg(x)  s = SequenceConstruct(x, a)  e = SequenceAt(s, k)  y = Relu(e) }""",
        "dynamic_position": """g (float[3] x, int64 k) => (float[3] y) {
            a = Neg(x)  s = SequenceConstruct(x, a)  e = SequenceAt(s, k)  y = Relu(e) }""",
        "overridable_position": """g (float[3] x, int64 k) => (float[3] y) <int64 k = {0}> {
            a = Neg(x)  s = SequenceConstruct(x, a)  e = SequenceAt(s, k)  y = Relu(e) }""",
        # the element is the graph input x: the output y cannot hand its name to it
        "graph_input_element_as_output": """g (float[3] x) => (float[3] y) <int64 k = {0}> {
            a = Neg(x)  s = SequenceConstruct(x, a)  y = SequenceAt(s, k) }""",
        "other_producer": """g (float[3] x) => (float[1] y) <int64 k = {0}, int64[3] n = {1, 1, 1}> {
            s = SplitToSequence(x, n)  e = SequenceAt(s, k)  y = Relu(e) }""",
    }
    model = _model(bodies[case])
    ops = _ops(model)
    result = FoldSequenceAtPass()(model)
    assert not result.modified and _ops(result.model) == ops


def test_shared_sequence_keeps_its_other_reader() -> None:
    model = _model("""
    g (float[3] x) => (float[3] y, float[6] z) <int64 k = {1}> {
        a = Neg(x)
        s = SequenceConstruct(x, a)
        e = SequenceAt(s, k)
        y = Relu(e)
        z = ConcatFromSequence<axis = 0>(s)
    }
    """)
    result = run_exact_pass(FoldSequenceAtPass, model, FEEDS)
    assert sorted(_ops(result.model)) == ["ConcatFromSequence", "Neg", "Relu", "SequenceConstruct"]
    y, z = onnxruntime_outputs(result.model, FEEDS)
    assert np.array_equal(y, np.maximum(-FEEDS["x"], 0))
    assert np.array_equal(z, np.concatenate([FEEDS["x"], -FEEDS["x"]]))


SUITE_CASE = "onnxscript/optimizer/_function_folding_test.py::FunctionFoldingTest.test_sequence_at"


def test_onnxscript_suite_sequence_at() -> None:
    """onnxscript's test: ``SequenceAt(SequenceConstruct(x, x + x, x * x), 1)`` is ``x + x``."""
    model = dict(peer_suite_onnxscript.recorded()).get(SUITE_CASE)
    if model is None:
        pytest.skip("onnxscript's suite is not cached (python -m fixtures.peer_suites --import-from)")
    optimized = optcc.optimize(model, level=2, verify=False).model
    assert [n.op_type for n in optimized.graph.node] == ["Add"]
    x = np.array([0.5, -3.0, 7.0, 1e-3], np.float32)
    (got,) = onnxruntime_outputs(optimized, {"x": x})
    assert got.dtype == np.float32 and np.array_equal(got, x + x)
