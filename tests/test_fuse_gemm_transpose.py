"""FuseGemmTransposePass and FuseLogSoftmaxPass: what fuses, what stays, and numerics
against onnx's reference evaluator (float64 inputs)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
from onnx.reference import ReferenceEvaluator

from optcc.passes.fuse_gemm_transpose import FuseGemmTransposePass
from optcc.passes.fuse_log_softmax import FuseLogSoftmaxPass

RNG = np.random.default_rng(1)


def _apply(pass_type, text: str, feeds, rtol: float = 1e-12) -> tuple[dict, list[str]]:
    proto = onnx.parser.parse_model(text)
    onnx.checker.check_model(proto, full_check=True)
    result = pass_type()(ir.from_proto(proto))
    out = ir.to_proto(result.model)
    onnx.checker.check_model(out, full_check=True)
    for want, got in zip(ReferenceEvaluator(proto).run(None, feeds), ReferenceEvaluator(out).run(None, feeds)):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol)
    assert not pass_type()(ir.from_proto(out)).modified
    return dict(result.stats.get("applied", {})), [n.op_type for n in out.graph.node]


def test_transposed_operands_become_gemm_flags():
    stats, ops = _apply(FuseGemmTransposePass, """
    <ir_version: 8, opset_import: ["" : 13]>
    g (double[4, 3] a, double[4, 5] b, double[5] c) => (double[3, 5] y) {
        ta = Transpose<perm = [1, 0]>(a)
        tb = Transpose(b)
        y = Gemm<transB = 1, alpha = 2.0>(ta, tb, c)
    }""", {"a": RNG.standard_normal((4, 3)), "b": RNG.standard_normal((4, 5)), "c": RNG.standard_normal(5)})
    assert stats == {"gemm-transpose-a": 1, "gemm-transpose-b": 1} and ops == ["Gemm"]


def test_shared_transpose_and_graph_output_stay():
    stats, ops = _apply(FuseGemmTransposePass, """
    <ir_version: 8, opset_import: ["" : 13]>
    g (double[4, 3] a, double[4, 5] b) => (double[3, 5] y, double[3, 4] ta, double[3, 5] z) {
        ta = Transpose(a)
        y = Gemm(ta, b)
        tb = Transpose(b)
        z0 = Gemm(ta, b)
        u = Relu(tb)
        v = Transpose(u)
        z1 = Gemm(ta, v)
        z = Add(z0, z1)
    }""", {"a": RNG.standard_normal((4, 3)), "b": RNG.standard_normal((4, 5))})
    assert stats == {"gemm-transpose-b": 1} and ops.count("Transpose") == 2


def test_log_of_softmax_becomes_log_softmax_with_the_same_axis():
    x = RNG.standard_normal((2, 3, 4)) * 5
    for opset, attrs in ((11, ""), (11, "<axis = 2>"), (13, "<axis = 1>"), (13, "")):
        stats, ops = _apply(FuseLogSoftmaxPass, f"""
        <ir_version: 8, opset_import: ["" : {opset}]>
        g (double[2, 3, 4] x) => (double[2, 3, 4] y) {{
            s = Softmax{attrs}(x)
            y = Log(s)
        }}""", {"x": x}, rtol=1e-10)
        assert stats == {"log-softmax": 1} and ops == ["LogSoftmax"], (opset, attrs)


def test_softmax_read_elsewhere_stays():
    stats, ops = _apply(FuseLogSoftmaxPass, """
    <ir_version: 8, opset_import: ["" : 13]>
    g (double[2, 3] x) => (double[2, 3] y, double[2, 3] s) {
        s = Softmax(x)
        y = Log(s)
    }""", {"x": RNG.standard_normal((2, 3))})
    assert stats == {} and ops == ["Softmax", "Log"]
