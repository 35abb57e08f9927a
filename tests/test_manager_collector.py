"""The pass manager pauses Python's cyclic garbage collector while float rewrites run, keeps
it running for lossy steps and per-pass verification, and leaves it as it found it; the
passes' results are the same either way."""

from __future__ import annotations

import gc

import numpy as np
import onnx
import onnx_ir as ir
import onnx.reference

import optcc
from optcc.infra.manager import Fixpoint, PassManager
from optcc.numerics import Verifier

MODEL_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
agraph (float[2, 4] x) => (float[2, 4] y) {
    a = Add(x, x)
    i = Identity(a)
    dead = Mul(x, x)
    y = Relu(i)
}
"""


def _model() -> ir.Model:
    return ir.from_proto(onnx.parser.parse_model(MODEL_TEXT))


class _Probe(optcc.Pass):
    """Records whether the collector runs while it runs; changes nothing."""

    name = "test-collector-probe"

    def __init__(self, numerics: str = "exact") -> None:
        super().__init__()
        self.numerics = numerics
        self.seen: list[bool] = []

    def call(self, model: ir.Model) -> optcc.PassResult:
        self.seen.append(gc.isenabled())
        return optcc.PassResult(model, False)


def test_float_rewrites_run_paused_and_the_collector_is_restored():
    assert gc.isenabled()
    probe = _Probe("fusion")
    PassManager([probe, Fixpoint([optcc.create_pass("eliminate-identities"), probe])]).run(_model())
    assert probe.seen == [False, False]
    assert gc.isenabled()


def test_a_disabled_collector_stays_disabled():
    probe = _Probe()
    gc.disable()
    try:
        PassManager([probe]).run(_model())
        assert not gc.isenabled()
    finally:
        gc.enable()
    assert probe.seen == [False]


def test_lossy_steps_and_per_pass_verification_run_with_the_collector():
    lossy, float_pass = _Probe("int8"), _Probe()
    PassManager([float_pass, lossy]).run(_model())
    assert lossy.seen == [True] and float_pass.seen == [True]  # one pipeline: one setting

    verified = _Probe()
    model = _model()
    PassManager([verified], verifier=Verifier(model.clone()), verify_each=True).run(model)
    assert verified.seen == [True]


def test_the_result_computes_what_the_original_computes():
    original = onnx.parser.parse_model(MODEL_TEXT)
    result = PassManager([optcc.create_pass(name) for name in
                          ("eliminate-identities", "eliminate-dead-nodes")]).run(_model())
    assert [n.op_type for n in result.model.graph] == ["Add", "Relu"]
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    got = onnx.reference.ReferenceEvaluator(ir.serde.serialize_model(result.model)).run(None, {"x": x})[0]
    want = onnx.reference.ReferenceEvaluator(original).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, np.maximum(x.astype(np.float64) * 2, 0).astype(np.float32))
    np.testing.assert_array_equal(got, want)
