"""A proved candidate is loaded on onnxruntime on a second thread while the proof runs
(``Verifier._proved``). The verdict must be the one a load after the proof gives: the same
status and reason, onnxruntime's own error as it reports it; the thread is gone when the
check returns or raises; and an interrupt during the proof ends the command as before
(exit 130, nothing written)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx.reference import ReferenceEvaluator

import optcc
from optcc import cli
from optcc.numerics import Verifier
from optcc.numerics.equivalence import Premise
from optcc.runtime.shared_weights import Serialized

RELU = """
<ir_version: 8, opset_import: ["" : 17]>
agraph (float[4] x) => (float[4] y) { y = Relu(x) }
"""


def _model(text: str) -> ir.Model:
    return ir.from_proto(onnx.parser.parse_model(text))


def _bytes(model: ir.Model) -> bytes:
    return ir.serde.serialize_model(model).SerializeToString()


def _load_error(data: bytes) -> str | None:
    """onnxruntime's own verdict on ``data``: the first non-empty line of its error, or None."""
    try:
        ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001
        return next(line for line in str(error).splitlines() if line.strip())[:300]
    return None


def _unloadable_ir_version() -> bytes:
    model = _model(RELU)
    model.ir_version = 99  # a version onnxruntime does not know
    return _bytes(model)


@pytest.mark.parametrize("candidate_bytes", [
    lambda: _bytes(_model(RELU)),  # the candidate's own bytes: loads
    lambda: _bytes(_model(RELU.replace("float", "int64"))),  # no int64 Relu kernel
    _unloadable_ir_version,
], ids=["loads", "no-kernel", "ir-version"])
def test_the_load_beside_the_proof_gives_onnxruntimes_own_verdict(candidate_bytes):
    data = candidate_bytes()
    expected = _load_error(data)  # onnxruntime alone, on the main thread
    threads = set(threading.enumerate())
    with Verifier(_model(RELU)) as verifier:
        verdict = verifier.check(_model(RELU), serialized=Serialized(data))
    assert set(threading.enumerate()) == threads  # the load's thread was joined
    assert verdict.reference == "proof"
    if expected is None:
        assert verdict.passed, verdict.describe()
    else:
        assert verdict.status == "failed"
        assert verdict.reason == f"onnxruntime cannot load the optimized model: {expected}"


def test_an_unproved_candidate_is_judged_on_samples_and_leaves_no_thread():
    # Max(x, 0) is Relu(x), but the proof does not know it: the samples decide, whatever
    # the load beside the proof found
    candidate = _model(RELU.replace("Relu(x)", "Max(x, zero)").replace(
        "=> (float[4] y)", "=> (float[4] y) <float zero = {0.0}>"))
    threads = set(threading.enumerate())
    with Verifier(_model(RELU)) as verifier:
        verdict = verifier.check(candidate, serialized=Serialized(_bytes(candidate)))
        feeds = verifier.feeds
    assert set(threading.enumerate()) == threads
    assert verdict.passed and verdict.reference != "proof", verdict.describe()
    # independently: the candidate on onnxruntime equals the original on onnx's reference evaluator
    session = ort.InferenceSession(_bytes(candidate), providers=["CPUExecutionProvider"])
    reference = ReferenceEvaluator(onnx.parser.parse_model(RELU))
    for sample in feeds:
        np.testing.assert_array_equal(session.run(None, sample)[0], reference.run(None, sample)[0])


def _conv_bn(path: Path) -> None:
    """A Conv followed by a BatchNormalization (fused by -O2, proved by the verifier)."""
    rng = np.random.default_rng(0)
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    weights = [numpy_helper.from_array(a.astype(np.float32), name) for name, a in (
        ("w", rng.standard_normal((4, 3, 3, 3))), ("scale", rng.uniform(0.5, 1.5, 4)),
        ("bias", rng.standard_normal(4)), ("mean", rng.standard_normal(4)), ("var", rng.uniform(0.5, 1.5, 4)))]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["y"])],
        "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 8, 8])], weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_an_optimized_model_proved_beside_its_load_computes_the_original(tmp_path: Path):
    model, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    _conv_bn(model)
    result = optcc.optimize(str(model))
    result.save(out)
    assert result.report.verification["status"] == "passed"
    assert result.report.verification["reference"] == "proof"
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(out).graph.node}
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    want = ReferenceEvaluator(str(model)).run(None, {"x": x.astype(np.float64)})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_an_interrupt_during_the_proof_waits_for_the_load_and_writes_nothing(tmp_path: Path, monkeypatch,
                                                                             capsys):
    model, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    _conv_bn(model)
    started, loaded = threading.Event(), threading.Event()
    load = Verifier._load_error

    def slow_load(self, source):  # the load is still running when the interrupt comes
        assert threading.current_thread() is not threading.main_thread()
        started.set()
        time.sleep(0.2)
        try:
            return load(self, source)
        finally:
            loaded.set()

    def interrupted(self, *args, **kwargs):
        assert started.wait(10)
        raise KeyboardInterrupt

    monkeypatch.setattr(Verifier, "_load_error", slow_load)
    monkeypatch.setattr(Premise, "prove", interrupted)
    threads = set(threading.enumerate())
    code = cli.main([str(model), "-O2", "-o", str(out), "-q"])
    assert loaded.is_set()  # joined before the interrupt went on
    assert set(threading.enumerate()) == threads
    assert code == 130
    assert capsys.readouterr().err.splitlines() == ["optcc: interrupted; nothing written"]
    assert not out.exists()
