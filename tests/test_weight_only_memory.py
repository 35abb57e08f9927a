"""Weight-only quantization holds a weight's levels in a quarter of its float32 bytes and
works on it a chunk of columns at a time: the working memory of ``quantize`` and of the
pass is bounded by the chunk, not by the weight, and the levels equal those of one piece.
The written model is checked on onnxruntime against numpy's dequantization of what it
stores (float64 matmul)."""

from __future__ import annotations


import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

from optcc.passes.quantize_weights import QuantizeWeightsPass
from optcc.quant import weight_only
from calls import traced_peak

K, N = 256, 1024  # 1 MiB of float32: 128 chunks of 2**11 elements


def _weight() -> np.ndarray:
    rng = np.random.default_rng(3)
    return (rng.standard_normal((K, N)) * rng.uniform(0.01, 2.0, N)).astype(np.float32)


@pytest.mark.parametrize("algorithm", ["rtn", "hqq"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_works_a_chunk_at_a_time(monkeypatch: pytest.MonkeyPatch, algorithm: str, symmetric: bool) -> None:
    w = _weight()
    whole = weight_only.quantize(w, algorithm, 4, 32, symmetric)  # CHUNK_ELEMENTS holds all of w
    monkeypatch.setattr(weight_only, "CHUNK_ELEMENTS", 1 << 11)
    chunked, peak = traced_peak(lambda: weight_only.quantize(w, algorithm, 4, 32, symmetric))
    assert chunked.q.dtype == (np.int8 if symmetric else np.uint8)
    np.testing.assert_array_equal(chunked.q, whole.q)
    np.testing.assert_array_equal(chunked.scales, whole.scales)
    if not symmetric:
        np.testing.assert_array_equal(chunked.zero_points, whole.zero_points)
    # kept: int8 levels (1/4 of w) and one scale and zero per 32 values (1/16 of w);
    # whole-weight float64 work arrays would be 2x w each
    assert peak < 0.5 * w.nbytes, peak / w.nbytes


def _model(w: np.ndarray) -> onnx.ModelProto:
    graph = oh.make_graph([oh.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                          [oh.make_tensor_value_info("x", TP.FLOAT, ["B", K])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, ["B", N])], [nh.from_array(w, "W")])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)])


def _dequantized(model: onnx.ModelProto, bits: int) -> np.ndarray:
    """The stored weight, dequantized with numpy in float64: (q - zero) * scale per block of 32 rows."""
    stored = {t.name: nh.to_array(t).astype(np.float64) for t in model.graph.initializer}
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear")
    q, scale = stored[dq.input[0]], stored[dq.input[1]]
    zero = stored[dq.input[2]] if len(dq.input) > 2 else np.zeros_like(scale)
    assert q.shape == (K, N) and scale.shape == (K // 32, N)
    assert 0 <= q.min() and q.max() <= 2 ** bits - 1
    return (q - np.repeat(zero, 32, axis=0)) * np.repeat(scale, 32, axis=0)


@pytest.mark.parametrize("bits", [4, 8])
def test_pass_memory_and_output(monkeypatch: pytest.MonkeyPatch, bits: int) -> None:
    w = _weight()
    model = ir.serde.deserialize_model(_model(w))
    model.graph.initializers["W"].const_value = ir.Tensor(w, name="W")  # read in place, as a mapped file is
    monkeypatch.setattr(weight_only, "CHUNK_ELEMENTS", 1 << 11)
    # head_bits=None: the lone MatMul makes the graph output, and `bits` applies to it
    result, peak = traced_peak(lambda: QuantizeWeightsPass(bits=bits, head_bits=None)(model))
    assert result.modified
    # the levels held once as int8/uint8 and written once (int4 arrays take a byte a value):
    # about half of w's bytes; int64 levels alone took 2x
    assert peak < 0.75 * w.nbytes, peak / w.nbytes
    written = ir.serde.serialize_model(result.model)
    x = np.random.default_rng(5).standard_normal((4, K)).astype(np.float32)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    got = ort.InferenceSession(written.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    expected = x.astype(np.float64) @ _dequantized(written, bits)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    # and the stored weight is a block-wise rounding of w: within half a step per value
    step = np.repeat(np.abs(nh.to_array(next(t for t in written.graph.initializer if t.name.endswith("_scale"))))
                     .astype(np.float64), 32, axis=0)
    assert np.all(np.abs(_dequantized(written, bits) - w) <= step / 2 + 1e-6 * np.abs(w))


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_levels_are_written_from_the_levels_held(symmetric: bool) -> None:
    w = _weight()
    levels = weight_only.quantize(w, "rtn", 4, 32, symmetric)
    stored, _ = levels.storage()
    assert np.shares_memory(stored, levels.q)  # the int4 array is the levels, not a second copy of them
    model = ir.serde.deserialize_model(_model(w))
    result = QuantizeWeightsPass(bits=4, head_bits=None, symmetric=symmetric)(model)
    written = onnx.load_from_string(ir.serde.serialize_model(result.model).SerializeToString())
    arrays = {t.name: nh.to_array(t) for t in written.graph.initializer}  # onnx unpacks the 4-bit bytes
    dq = next(n for n in written.graph.node if n.op_type == "DequantizeLinear")
    q, scale = arrays[dq.input[0]].astype(np.float64), arrays[dq.input[1]].astype(np.float64)
    zero = arrays[dq.input[2]].astype(np.float64) if len(dq.input) > 2 else np.zeros_like(scale)
    np.testing.assert_array_equal(q, levels.q.astype(np.float64))
    if symmetric:
        assert q.min() < 0  # negative levels: their bytes' high nibble is set in the int8 levels
    else:  # zero points are levels, held in a byte each, and written as they are
        assert levels.zero_points.dtype == np.uint8
        np.testing.assert_array_equal(zero, levels.zero_points.astype(np.float64))
    x = np.random.default_rng(5).standard_normal((4, K)).astype(np.float32)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    got = ort.InferenceSession(written.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    w_hat = (q - np.repeat(zero, 32, axis=0)) * np.repeat(scale, 32, axis=0)
    expected = x.astype(np.float64) @ w_hat
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
