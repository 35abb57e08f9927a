"""Fuzzing: random valid models (fixtures/random_graphs.py) through every -O level and
every registered pass alone.

Each example must: optimize without any pass being reverted (a pass that raises or
breaks an invariant is a bug), match the original on onnxruntime (``verify=True`` raises
VerificationError on a mismatch), pass the full onnx checker, keep the graph inputs and
outputs (names, types, shapes), and, for a pass alone, be a fixed point of that pass (a
second run reports ``modified=False``).

Examples are derandomized (fixed seed, no example database), so the default suite is
reproducible: 4 levels x 60 + every pass x 20 (>= 300 in all). ``OPTCC_FUZZ_EXAMPLES=N``
runs N per level and N/3 per pass.

Every failure found by fuzzing becomes a named regression test at the bottom of this
file, with its minimal model written out explicitly.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import onnx
import onnx.parser
import pytest
from hypothesis import HealthCheck, given, settings
from onnx import TensorProto, helper, numpy_helper

import optcc
from fixtures.random_graphs import models

PER_LEVEL = int(os.environ.get("OPTCC_FUZZ_EXAMPLES", "60"))
PER_PASS = max(PER_LEVEL // 3, 20)
MIN_TOTAL_EXAMPLES = 300


def _settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


def _signature(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    initializers = {t.name for t in model.graph.initializer}
    inputs = [str(v) for v in model.graph.input if v.name not in initializers]
    return inputs, [str(v) for v in model.graph.output]


def _optimize_and_check(model: onnx.ModelProto, **kwargs: object) -> optcc.OptimizeResult:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = optcc.optimize(model, verify=True, **kwargs)  # raises VerificationError
    reverted = result.report.reverted()
    assert not reverted, "reverted: " + "; ".join(f"{r.name}: {r.reason}" for r in reverted)
    verification = result.report.verification
    assert verification is not None and verification["status"] == "passed", verification
    optimized = result.model
    onnx.checker.check_model(optimized, full_check=True)
    assert _signature(optimized) == _signature(model)
    return result


def _pass_names() -> list[str]:
    return sorted(optcc.available_passes())


def test_default_suite_runs_enough_examples() -> None:
    assert 4 * PER_LEVEL + len(_pass_names()) * PER_PASS >= MIN_TOTAL_EXAMPLES


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_every_level_preserves_numerics(level: int) -> None:
    seen = []

    @_settings(PER_LEVEL)
    @given(models())
    def check(model: onnx.ModelProto) -> None:
        seen.append(1)
        _optimize_and_check(model, level=level)

    check()
    assert len(seen) >= PER_LEVEL


# Known bugs found by fuzzing, each with a named regression test below; strict, so the
# fix makes these XPASS and the marker must then go.
KNOWN_BUGS: dict[str, str] = {}


def _pass_params() -> list[object]:
    return [
        pytest.param(n, marks=pytest.mark.xfail(reason=KNOWN_BUGS[n], strict=True)) if n in KNOWN_BUGS else n
        for n in _pass_names()
    ]


@pytest.mark.parametrize("name", _pass_params())
def test_every_pass_alone_preserves_numerics_and_is_idempotent(name: str) -> None:
    try:
        optcc.create_pass(name)
    except TypeError as e:
        pytest.skip(f"pass '{name}' cannot be built without options: {e}")

    seen = []

    @_settings(PER_PASS)
    @given(models())
    def check(model: onnx.ModelProto) -> None:
        seen.append(1)
        result = _optimize_and_check(model, passes=[optcc.create_pass(name)])
        again = optcc.create_pass(name)(result.ir_model.clone())
        assert not again.modified, f"a second run of '{name}' modified the model again"

    check()
    assert len(seen) >= PER_PASS


# --------------------------------------------------------------------------- regressions
# Minimal models of failures fuzzing found. Each runs every level and names what broke.


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
           outputs: list[onnx.ValueInfoProto], inits: list[onnx.TensorProto], opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "regression", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _all_levels(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)
    for level in range(4):
        _optimize_and_check(model, level=level)


def test_regression_ml_only_model_without_default_opset_loads() -> None:
    """Found by the node tests: a model of ai.onnx.ml ops only has no '' opset import,
    which is valid; optcc refused it ("no opset import for the default domain")."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    node = helper.make_node("Binarizer", ["x"], ["y"], domain="ai.onnx.ml", threshold=0.0)
    graph = helper.make_graph([node], "ml", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("ai.onnx.ml", 1)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    for level in range(4):
        result = _optimize_and_check(model, level=level)
        assert [n.op_type for n in result.model.graph.node] == ["Binarizer"]


def test_regression_if_branches_read_outer_scope_and_output_mid_chain() -> None:
    """Shape of many fuzz examples: an If on a data-dependent condition whose branches
    read the outer scope, followed by an identity chain whose middle is a graph output."""
    rng = np.random.default_rng(0)
    scale = numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "scale")
    then_g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["t"])], "then", [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2, 3])],
    )
    else_g = helper.make_graph(
        [helper.make_node("Mul", ["x", "scale"], ["m"]), helper.make_node("Identity", ["m"], ["e"])],
        "else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 3])],
    )
    zero = numpy_helper.from_array(np.array(0.0, np.float32), "zero")
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["c"]),
        helper.make_node("If", ["c"], ["i"], then_branch=then_g, else_branch=else_g),
        helper.make_node("Identity", ["i"], ["mid"]),
        helper.make_node("Sigmoid", ["mid"], ["y"]),
    ]
    f = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3])  # noqa: E731
    _all_levels(_model(nodes, [f("x")], [f("mid"), f("y")], [scale, zero]))


DEAD_IF_MODEL = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,1] x) => (float[1,1] r)
  <float[1] w2 = {0.1}, float[1] w3 = {0.2}, float[1] w4 = {0.3}, float[1] w5 = {0.6}, float zero = {0.0}>
{
  b = BatchNormalization <epsilon: float = 1e-05> (x, w2, w3, w4, w5)
  t = ReduceSum <keepdims = 0> (b)
  c = Greater (t, zero)
  i = If (c) <
    then_branch = g1 () => (float[1,1] o1) { o1 = Relu (b) },
    else_branch = g2 () => (float[1,1] o2) <float[1] k = {2.0}> { m = Mul (b, k)  o2 = Identity (m) }
  >
  r = Relu (x)
}
"""


def test_regression_dead_node_read_only_by_removed_if_body() -> None:
    """Found by fuzzing (eliminate-dead-nodes not idempotent): the If is dead, so is
    everything only it reads, including 'b' read from inside both branches."""
    model = onnx.parser.parse_model(DEAD_IF_MODEL)
    onnx.checker.check_model(model, full_check=True)
    result = _optimize_and_check(model, passes=["eliminate-dead-nodes"])
    assert [n.op_type for n in result.model.graph.node] == ["Relu"]
    assert {t.name for t in result.model.graph.initializer} == set()
    again = optcc.create_pass("eliminate-dead-nodes")(result.ir_model.clone())
    assert not again.modified
