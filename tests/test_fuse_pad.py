"""FusePadPass: constant Pads folded into Conv/AveragePool/MaxPool padding, the cases
that must stay, and numerics against onnx's reference evaluator in float64."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import pytest
from onnx.reference import ReferenceEvaluator

import optcc
from optcc.passes.fuse_pad import FusePadPass


def _run(text: str, feeds: dict[str, np.ndarray]) -> tuple[dict[str, int], onnx.ModelProto]:
    """Apply the pass; the result (float64 throughout) equals the original's reference
    output to rounding; returns the applied stats and the new model."""
    proto = onnx.parser.parse_model(text)
    onnx.checker.check_model(proto, full_check=True)
    result = FusePadPass()(ir.from_proto(proto))
    out = ir.to_proto(result.model)
    onnx.checker.check_model(out, full_check=True)
    for want, got in zip(ReferenceEvaluator(proto).run(None, feeds), ReferenceEvaluator(out).run(None, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert not FusePadPass()(ir.from_proto(out)).modified
    return dict(result.stats.get("applied", {})), out


_RNG = np.random.default_rng(0)
X = {"x": _RNG.standard_normal((1, 2, 5, 6))}
W = "double[3, 2, 3, 3] w = " + "{" + ", ".join(str(round(v, 3)) for v in _RNG.standard_normal(54)) + "}"


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


@pytest.mark.parametrize("opset", [11, 18])
def test_zero_pad_folds_into_conv_padding(opset):
    stats, out = _run(f"""
    <ir_version: 8, opset_import: ["" : {opset}]>
    g (double[1, 2, 5, 6] x) => (double[1, 3, 6, 8] y) <{W}, int64[8] p = {{0, 0, 1, 0, 0, 0, 0, 2}}> {{
        t = Pad(x, p)
        y = Conv<pads = [1, 1, 1, 1]>(t, w)
    }}""", X)
    assert stats == {"pad-conv": 1} and _ops(out) == ["Conv"]
    assert list(out.graph.node[0].attribute[0].ints) == [2, 1, 1, 3]


def test_legacy_pad_attribute_and_averagepool():
    stats, out = _run("""
    <ir_version: 7, opset_import: ["" : 10]>
    g (double[1, 2, 5, 6] x) => (double[1, 2, 5, 7] y) {
        t = Pad<pads = [0, 0, 1, 1, 0, 0, 1, 2]>(x)
        y = AveragePool<kernel_shape = [3, 3]>(t)
    }""", X)
    assert stats == {"pad-averagepool": 1} and _ops(out) == ["AveragePool"]


def test_minus_inf_pad_folds_into_maxpool_but_zero_pad_does_not():
    stats, out = _run("""
    <ir_version: 8, opset_import: ["" : 13]>
    g (double[1, 2, 5, 6] x) => (double[1, 2, 5, 6] y, double[1, 2, 5, 6] z)
      <int64[8] p = {0, 0, 1, 1, 0, 0, 1, 1}, double v = {-inf}, double zero = {0}> {
        t = Pad(x, p, v)
        y = MaxPool<kernel_shape = [3, 3]>(t)
        u = Pad(x, p, zero)
        z = MaxPool<kernel_shape = [3, 3]>(u)
    }""", {"x": -np.abs(X["x"])})  # all negative: a zero pad would win every border max
    assert stats == {"pad-maxpool": 1} and _ops(out).count("Pad") == 1


@pytest.mark.parametrize("case", ["reflect", "channel", "shared", "output", "auto_pad", "value"])
def test_pads_that_must_stay(case):
    mode = 'mode = "reflect"' if case == "reflect" else 'mode = "constant"'
    pads = {"channel": "0, 1, 1, 0, 0, 0, 0, 1"}.get(case, "0, 0, 1, 0, 0, 0, 1, 0")
    conv_attrs = '<auto_pad = "SAME_UPPER">' if case == "auto_pad" else ""
    extra_out = ", double[N, C, H, W] t" if case == "output" else ""
    shared = "z = Relu(t)" if case == "shared" else ""
    value = ", one" if case == "value" else ""
    channels = 3 if case == "channel" else 2
    text = f"""
    <ir_version: 8, opset_import: ["" : 13]>
    g (double[1, 2, 5, 6] x) => (double[N, K, P, Q] y{extra_out}) <{W if channels == 2 else "double[3, 3, 1, 1] w = {1, 2, 3, 4, 5, 6, 7, 8, 9}"}, int64[8] p = {{{pads}}}, double one = {{1}}> {{
        t = Pad<{mode}>(x, p{value})
        {shared}
        y = Conv{conv_attrs}(t, w)
    }}"""
    stats, out = _run(text, X)
    assert stats == {} and "Pad" in _ops(out)


def test_runs_in_o2_and_not_in_o1():
    proto = onnx.parser.parse_model(f"""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[1, 2, 5, 6] x) => (float[1, 3, 5, 6] y) <{W.replace("double", "float")}, int64[8] p = {{0, 0, 1, 1, 0, 0, 1, 1}}> {{
        t = Pad(x, p)
        y = Conv(t, w)
    }}""")
    assert "Pad" in [n.op_type for n in optcc.optimize(proto, level=1).model.graph.node]
    assert "Pad" not in [n.op_type for n in optcc.optimize(proto, level=2).model.graph.node]
