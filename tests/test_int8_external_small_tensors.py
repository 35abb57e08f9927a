"""INT8 on a model whose weights live in an external file, small tensors (biases, LayerNorm
scales under 1 KiB) included: the sessions built from ``light_proto`` must not keep those
as references to a data file that their scratch folder (or bytes) cannot resolve. A held-out
transformer (khmersm, every tensor external) had ``--int8`` declined with 'External data
path validation failed' (exit 5) before."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import optcc
import optcc.ir as oir
from optcc.runtime.session import session_options
from optcc.runtime.shared_weights import light_proto, weighted_session

RNG = np.random.default_rng(11)


def _mlp() -> onnx.ModelProto:
    w1 = (RNG.standard_normal((32, 64)) * 0.2).astype(np.float32)   # 8 KiB: handed over
    b1 = (RNG.standard_normal(64) * 0.1).astype(np.float32)         # 256 B: stays in the proto
    w2 = (RNG.standard_normal((64, 16)) * 0.2).astype(np.float32)
    b2 = (RNG.standard_normal(16) * 0.1).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["m1"]), helper.make_node("Add", ["m1", "B1"], ["a1"]),
         helper.make_node("Relu", ["a1"], ["r1"]),
         helper.make_node("MatMul", ["r1", "W2"], ["m2"]), helper.make_node("Add", ["m2", "B2"], ["y"])],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 16])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(b1, "B1"),
         numpy_helper.from_array(w2, "W2"), numpy_helper.from_array(b2, "B2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _external(tmp_path, proto):
    path = tmp_path / "mlp.onnx"
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    onnx.save_model(copy, str(path), save_as_external_data=True, location="mlp.onnx.data", size_threshold=0)
    return path


def test_light_proto_session_of_an_all_external_model_matches_the_reference(tmp_path, monkeypatch):
    proto = _mlp()
    model = oir.load(str(_external(tmp_path, proto)))
    x = RNG.standard_normal((8, 32)).astype(np.float32)
    expected = ReferenceEvaluator(proto).run(None, {"x": x})[0]
    for inline_max in (0, 1 << 30):  # weights handed over from a scratch folder; copied into bytes
        monkeypatch.setattr("optcc.runtime.shared_weights.INLINE_MAX_BYTES", inline_max)
        light, weights = light_proto(model)
        assert "W1" in weights and "B1" not in weights
        got = weighted_session(light, weights, session_options()).run(None, {"x": x})[0]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # the model itself still reads its tensors from the file
    assert oir.uses_external_data(model)


def test_int8_of_an_all_external_model_is_applied(tmp_path):
    proto = _mlp()
    path = _external(tmp_path, proto)
    samples = [{"x": RNG.standard_normal((8, 32)).astype(np.float32)} for _ in range(10)]
    result = optcc.optimize(str(path), int8_calibration=samples, int8_options={"require_speedup": False})
    assert result.applied_precision == ["int8"], result.declined_precision
    ops = {n.op_type for n in result.ir_model.graph}
    assert "QuantizeLinear" in ops or "DynamicQuantizeLinear" in ops or "MatMulInteger" in ops
    out = tmp_path / "q.onnx"
    result.save(out)
    session = __import__("onnxruntime").InferenceSession(str(out), providers=["CPUExecutionProvider"])
    reference = ReferenceEvaluator(proto)
    for feed in samples:
        expected = reference.run(None, feed)[0]
        got = session.run(None, feed)[0]
        sqnr = 10 * np.log10(np.sum(expected ** 2) / np.sum((got - expected) ** 2))
        assert sqnr > 20, sqnr
