"""Fuzzing: random valid models (fixtures/random_graphs.py) through every -O level and
every registered pass alone.

Each example must: optimize (default verification on) without any pass being reverted (a
pass that raises, breaks an invariant or is caught by the verifier on a well-conditioned
random graph is a bug), reach every fixed point before its cap, pass the full onnx
checker, keep the graph inputs and outputs (names, types, shapes), and, for a pass alone,
be a fixed point of that pass (a second run reports ``modified=False``).

Numerics are judged independently of optcc's verifier (tests/reference.py): the optimized
model on onnxruntime against the original evaluated in float64 by onnx's reference
evaluator, per element within the tolerance of what ran (exact: 1e-5, fusion: 1e-4 of the
output's scale). Random graphs hold lossy Cast round trips (via float16 or int32), where
float64 and float32 may round to different sides; there an element may match the float32
original run on onnxruntime (all optimizations off) instead.

Lossy passes (float16, INT8) are fuzzed for validity, interface and idempotence only:
their accuracy on random weights is no property of the rewrite (their own tests judge it
on models built for it). Passes that cannot be built without options are excluded by
name, with the reason, in ``NEEDS_OPTIONS``.

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
from reference import (
    EXACT_RTOL,
    FUSION_RTOL,
    assert_close,
    assert_converged,
    expected_outputs_float64,
    onnxruntime_outputs,
)

PER_LEVEL = int(os.environ.get("OPTCC_FUZZ_EXAMPLES", "60"))
PER_PASS = max(PER_LEVEL // 3, 20)
MIN_TOTAL_EXAMPLES = 300

# Tolerance per numerics kind, relative to each output's scale. Levels 0 and 1 run exact
# passes only; 2 and 3 add fusions.
RTOL = {"exact": EXACT_RTOL, "fusion": FUSION_RTOL}
LEVEL_KIND = {0: "exact", 1: "exact", 2: "fusion", 3: "fusion"}
# Passes whose numerics are lossy by design: fuzzed for validity and idempotence only.
LOSSY_KINDS = ("fp16", "int8")
# Passes that cannot be built without constructor options, and why they are not fuzzed
# alone. A new pass that needs options fails test_every_pass_is_fuzzed_or_excluded until
# it is listed here.
NEEDS_OPTIONS: dict[str, str] = {
    "quantize-int8-calibrated": "needs calibration samples and a method (optimize(int8_calibration=...)); "
    "judged by test_quantize_int8.py and test_calibration.py",
    "smooth-activations": "needs calibration samples (Int8Options.smooth); judged by test_smooth_activations.py",
    "upgrade-opset": "needs the opset to convert to (optimize(target_opset=N)); judged by test_upgrade_opset.py",
}


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


def _feeds(model: onnx.ModelProto, seed: int = 7) -> dict[str, np.ndarray]:
    """Standard-normal float32 feeds for the (static-shaped, float32) graph inputs."""
    rng = np.random.default_rng(seed)
    initializers = {t.name for t in model.graph.initializer}
    feeds = {}
    for v in model.graph.input:
        if v.name in initializers:
            continue
        assert v.type.tensor_type.elem_type == TensorProto.FLOAT, v
        shape = [d.dim_value for d in v.type.tensor_type.shape.dim]
        feeds[v.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _check_numerics(model: onnx.ModelProto, optimized: onnx.ModelProto, kind: str, what: str) -> None:
    """The optimized model on onnxruntime against the original in float64 (or, per element,
    the float32 original on onnxruntime: see the module docstring)."""
    feeds = _feeds(model)
    want = expected_outputs_float64(model, feeds)
    original32 = onnxruntime_outputs(model, feeds)
    got = onnxruntime_outputs(optimized, feeds)
    names = [v.name for v in model.graph.output]
    assert_close(got, want, RTOL[kind], what=what, names=names, also=original32)


def _optimize_and_check(model: onnx.ModelProto, kind: str | None = "exact", **kwargs: object) -> optcc.OptimizeResult:
    """Optimize with the default verification; check validity, interface, convergence and,
    unless ``kind`` is None (lossy passes), numerics against the independent reference."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = optcc.optimize(model, verify=True, **kwargs)  # raises VerificationError
    reverted = result.report.reverted()
    if kind is None:  # a lossy pass may be declined by the verifier; never fail otherwise
        reverted = [r for r in reverted if not (r.reason or "").startswith("changed the numerics")]
    assert not reverted, "reverted: " + "; ".join(f"{r.name}: {r.reason}" for r in reverted)
    assert_converged(result.report, caught)
    optimized = result.model
    onnx.checker.check_model(optimized, full_check=True)
    assert _signature(optimized) == _signature(model)
    if kind is not None:
        _check_numerics(model, optimized, kind, what=f"{kwargs}")
    return result


def _pass_names() -> list[str]:
    return sorted(optcc.available_passes())


def _kind(name: str) -> str | None:
    """The tolerance kind of a pass alone; None for lossy passes."""
    numerics = optcc.create_pass(name).numerics
    assert numerics in RTOL or numerics in LOSSY_KINDS, f"pass '{name}': unknown numerics kind {numerics!r}"
    return None if numerics in LOSSY_KINDS else numerics


def test_default_suite_runs_enough_examples() -> None:
    assert 4 * PER_LEVEL + len(_pass_names()) * PER_PASS >= MIN_TOTAL_EXAMPLES


def test_every_pass_is_fuzzed_or_excluded() -> None:
    """Only the passes in NEEDS_OPTIONS are left out, and each of them really needs options."""
    for name in _pass_names():
        if name in NEEDS_OPTIONS:
            with pytest.raises(optcc.BadInputError, match="needs options"):
                optcc.create_pass(name)
        else:
            optcc.create_pass(name)  # "needs options" here: list the pass in NEEDS_OPTIONS
    assert set(NEEDS_OPTIONS) <= set(_pass_names())


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_every_level_preserves_numerics(level: int) -> None:
    seen = []

    @_settings(PER_LEVEL)
    @given(models())
    def check(model: onnx.ModelProto) -> None:
        seen.append(1)
        _optimize_and_check(model, LEVEL_KIND[level], level=level)

    check()
    assert len(seen) >= PER_LEVEL


# Known bugs found by fuzzing, each with a named regression test below; strict, so the
# fix makes these XPASS and the marker must then go.
KNOWN_BUGS: dict[str, str] = {}


def _pass_params() -> list[object]:
    params = []
    for name in _pass_names():
        if name in NEEDS_OPTIONS:
            continue  # see NEEDS_OPTIONS and test_every_pass_is_fuzzed_or_excluded
        marks = [pytest.mark.xfail(reason=KNOWN_BUGS[name], strict=True)] if name in KNOWN_BUGS else []
        params.append(pytest.param(name, marks=marks))
    return params


@pytest.mark.parametrize("name", _pass_params())
def test_every_pass_alone_preserves_numerics_and_is_idempotent(name: str) -> None:
    kind = _kind(name)
    seen = []

    @_settings(PER_PASS)
    @given(models())
    def check(model: onnx.ModelProto) -> None:
        seen.append(1)
        result = _optimize_and_check(model, kind, passes=[optcc.create_pass(name)])
        if any(r.status == "reverted" for r in result.report.passes):
            return  # a lossy pass declined by the verifier: the output is the input
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
        _optimize_and_check(model, LEVEL_KIND[level], level=level)


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
        result = _optimize_and_check(model, LEVEL_KIND[level], level=level)
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
