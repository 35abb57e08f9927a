"""Weights stored as integer levels (``Mul(Cast<float>(q), scale)``) stay so where INT8
keeps their layer float: computed from the levels again, bit for bit the float32 constant
INT8's preparation folded them into."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import optcc
from optcc.quant import restore_stored, stored_weights

RNG = np.random.default_rng(11)
LEVELS = [RNG.integers(-127, 128, size=(16, 32), dtype=np.int8), RNG.integers(-127, 128, size=(32, 8), dtype=np.int8)]
SCALES = [(RNG.random(32, dtype=np.float32) * 0.01 + 0.001).astype(np.float32), np.float32(0.013)]


def _stored_mlp() -> onnx.ModelProto:
    """x [N, 16] -> MatMul(W1) -> Relu -> MatMul(W2) -> y, each W = Mul(Cast<float>(q), scale)."""
    nodes, inits = [], []
    for i, (q, s) in enumerate(zip(LEVELS, SCALES), 1):
        inits += [numpy_helper.from_array(q, f"q{i}"), numpy_helper.from_array(np.asarray(s, np.float32), f"s{i}")]
        nodes += [helper.make_node("Cast", [f"q{i}"], [f"qf{i}"], to=TensorProto.FLOAT, name=f"cast{i}"),
                  helper.make_node("Mul", [f"qf{i}", f"s{i}"], [f"W{i}"], name=f"dequantize{i}")]
    nodes += [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"), helper.make_node("Relu", ["h"], ["r"]),
              helper.make_node("MatMul", ["r", "W2"], ["y"], name="mm2")]
    graph = helper.make_graph(nodes, "stored", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_a_folded_stored_weight_is_computed_from_its_levels_again_bit_for_bit() -> None:
    model = optcc.ir.load(_stored_mlp())
    stored = stored_weights(model)
    assert len(stored) == 2
    folded = _stored_mlp()  # the same model with W1, W2 folded into float32 initializers, as INT8's preparation does
    products = {f"W{i}": np.multiply(q.astype(np.float32), s, dtype=np.float32)
                for i, (q, s) in enumerate(zip(LEVELS, SCALES), 1)}
    del folded.graph.node[:4]
    del folded.graph.initializer[:]
    folded.graph.initializer.extend(numpy_helper.from_array(a, n) for n, a in products.items())
    restored = optcc.ir.load(folded)
    assert restore_stored(restored, stored) == {"tensors": 2, "bytes_saved": sum(a.nbytes for a in products.values())
                                                - sum(q.nbytes for q in LEVELS) - 32 * 4 - 4}
    proto = optcc.ir.serialize(restored)
    onnx.checker.check_model(proto, full_check=True)
    assert {t.data_type for t in proto.graph.initializer} == {TensorProto.INT8, TensorProto.FLOAT}
    x = RNG.standard_normal((5, 16)).astype(np.float32)
    np.testing.assert_array_equal(_run(proto, x), _run(folded, x))  # exact: the same float32 products


def test_a_changed_constant_is_not_restored() -> None:
    stored = stored_weights(optcc.ir.load(_stored_mlp()))
    folded = _stored_mlp()
    del folded.graph.node[:4]
    del folded.graph.initializer[:]
    w1 = np.multiply(LEVELS[0].astype(np.float32), SCALES[0], dtype=np.float32)
    w1[0, 0] = np.nextafter(w1[0, 0], np.float32(1))  # one ulp off the stored weight
    w2 = np.multiply(LEVELS[1].astype(np.float32), SCALES[1], dtype=np.float32)
    folded.graph.initializer.extend([numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")])
    model = optcc.ir.load(folded)
    assert restore_stored(model, stored)["tensors"] == 1
    assert model.graph.initializers["W1"].const_value is not None  # still the float32 constant


def test_int8_keeps_a_float_layers_stored_weight_as_its_levels() -> None:
    source = _stored_mlp()
    samples = [{"x": RNG.random((4, 16), dtype=np.float32)} for _ in range(16)]
    result = optcc.optimize(source, int8_calibration=samples,
                            int8_options={"require_speedup": False, "exclude": ["mm2"], "metric": "sqnr"})
    written = result.model
    assert any(n.op_type == "QuantizeLinear" for n in written.graph.node)  # mm1 is INT8
    mm2 = next(n for n in written.graph.node if n.name == "mm2")
    weight = next(n for n in written.graph.node if n.output[0] == mm2.input[1])
    assert weight.op_type == "Mul"  # mm2 (kept float) reads its weight computed from int8 levels
    float_bytes = sum(t.ByteSize() for t in written.graph.initializer if t.data_type == TensorProto.FLOAT)
    assert float_bytes < LEVELS[1].size * 4  # not the 32x8 float32 weight
    # independent reference: the float64 product of the stored model
    for feeds in samples[-3:]:
        x = feeds["x"].astype(np.float64)
        w1, w2 = (q.astype(np.float64) * np.float64(s) for q, s in zip(LEVELS, SCALES))
        want = np.maximum(x @ w1, 0) @ w2
        got = _run(written, feeds["x"])
        assert 10 * np.log10(np.sum(want ** 2) / np.sum((got - want) ** 2)) > 25
