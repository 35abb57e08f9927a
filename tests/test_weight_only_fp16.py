"""FP16 then weight-only (``fp16=True, weight_only=...``; ``--fp16 --weights``): the float16
layers read block-wise int4/int8 weights with float16 scales (portable DequantizeLinear, or
MatMulNBits with T1 = float16 at -O3), the layer FP16 keeps float32 reads its weight with
float32 scales. Numerics: onnxruntime's outputs against a float64 numpy forward pass of
the weights dequantized here from the written integers, scales and zero points."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP

import optcc
from optcc import cli
from optcc.passes.quantize_weights import QuantizeWeightsPass

B = 32  # block size
RNG = np.random.default_rng(7)
W1 = (RNG.normal(size=(256, 256)) * 0.05).astype(np.float32)
W2 = (RNG.normal(size=(192, 256)) * 0.05).astype(np.float32)  # Gemm transB: [N, K]
B2 = (RNG.normal(size=192) * 0.05).astype(np.float32)
W3 = (RNG.normal(size=(192, 128)) * 0.05).astype(np.float32)


def _mlp() -> onnx.ModelProto:
    nodes = [oh.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"), oh.make_node("Relu", ["h"], ["r"]),
             oh.make_node("Gemm", ["r", "W2", "b2"], ["g"], name="gemm", transB=1),
             oh.make_node("Tanh", ["g"], ["t"]), oh.make_node("MatMul", ["t", "W3"], ["y"], name="mm3")]
    graph = oh.make_graph(nodes, "mlp", [oh.make_tensor_value_info("x", TP.FLOAT, ["N", 256])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, ["N", 128])],
                          [nh.from_array(W1, "W1"), nh.from_array(W2, "W2"), nh.from_array(B2, "b2"),
                           nh.from_array(W3, "W3")])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)])


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: nh.to_array(t) for t in model.graph.initializer}


def _dequantize_linear(node: onnx.NodeProto, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.dtype]:
    """DequantizeLinear with blocks along ``axis``, in float64; and the scales' type."""
    attrs = {a.name: oh.get_attribute_value(a) for a in node.attribute}
    q = arrays[node.input[0]].astype(np.float64)
    scale = arrays[node.input[1]]
    zero = arrays[node.input[2]].astype(np.float64) if len(node.input) > 2 else np.zeros(scale.shape)
    axis, block = attrs["axis"], attrs["block_size"]
    s = np.repeat(scale.astype(np.float64), block, axis=axis)
    z = np.repeat(zero, block, axis=axis)
    index = [slice(None)] * q.ndim
    index[axis] = slice(0, q.shape[axis])
    return (q - z[tuple(index)]) * s[tuple(index)], scale.dtype


def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Unsigned levels of packed bytes, low nibble first for 4 bits; the first ``count``."""
    if bits == 8:
        return packed.astype(np.int64)[..., :count]
    low, high = packed & 0xF, packed >> 4
    return np.stack([low, high], axis=-1).reshape(*packed.shape[:-1], -1).astype(np.int64)[..., :count]


def _matmul_nbits(node: onnx.NodeProto, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.dtype]:
    """MatMulNBits' ``[K, N]`` weight, in float64, from its packed inputs; and the scales' type."""
    attrs = {a.name: oh.get_attribute_value(a) for a in node.attribute}
    k, n, bits, block = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
    blocks = -(-k // block)
    levels = _unpack(arrays[node.input[1]].reshape(n, -1), bits, blocks * block)  # [N, K padded]
    scale = arrays[node.input[2]].reshape(n, blocks)
    if len(node.input) > 3 and node.input[3]:
        zero = _unpack(arrays[node.input[3]].reshape(n, -1), bits, blocks)
    else:
        zero = np.full((n, blocks), 1 << (bits - 1))
    w = (levels - np.repeat(zero, block, axis=1)) * np.repeat(scale.astype(np.float64), block, axis=1)
    return w[:, :k].T, scale.dtype


def _layer_weights(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.dtype]]:
    """Per original weight name: its dequantized ``[K, N]`` (Gemm: as stored) and scale type."""
    arrays = _initializers(model)
    found = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear":
            found[node.input[0].split("_q")[0]] = _dequantize_linear(node, arrays)
        elif node.op_type == "MatMulNBits":
            w, dtype = _matmul_nbits(node, arrays)
            name = node.input[1].split("_q")[0]
            found[name] = (w.T if name == "W2" else w, dtype)  # W2 as Gemm stores it: [N, K]
    return found


def _run(model: onnx.ModelProto | str, x: np.ndarray) -> np.ndarray:
    """onnxruntime CPU as written: its full optimization would fuse a block-wise
    DequantizeLinear + MatMul into MatMulNBits with int8 activations (accuracy level 4)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _forward(x: np.ndarray, w1: np.ndarray, w2: np.ndarray, w3: np.ndarray) -> np.ndarray:
    h = np.maximum(x @ w1, 0)
    return np.tanh(h @ w2.T + B2.astype(np.float64)) @ w3


@pytest.mark.parametrize("level", [2, 3])
@pytest.mark.parametrize("bits", [4, 8])
def test_float16_layers_get_float16_scales_and_compute_the_dequantized_weights(level: int, bits: int) -> None:
    result = optcc.optimize(_mlp(), level=level, fp16=True, weight_only=f"int{bits}", fp16_block=["gemm"],
                            verify=False)
    assert result.applied_precision == ["fp16", "weights"]
    model = result.model
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulNBits" if level == 3 else "DequantizeLinear") == 3
    assert "MatMul" not in ops or level == 2
    weights = _layer_weights(model)
    # the body layers compute in float16 with float16 scales; the Gemm FP16 keeps float32 has float32 ones
    assert {name: dtype for name, (_, dtype) in weights.items()} == {
        "W1": np.float16, "W2": np.float32, "W3": np.float16}
    x = np.random.default_rng(0).normal(size=(4, 256)).astype(np.float32)
    got = _run(model, x)
    assert got.dtype == np.float32  # graph input and output keep their type
    want = _forward(x.astype(np.float64), *(weights[n][0] for n in ("W1", "W2", "W3")))
    unquantized = _forward(x.astype(np.float64), W1.astype(np.float64), W2.astype(np.float64), W3.astype(np.float64))
    error = np.abs(got - want).max()
    # float16 activations round each layer's input and output (2^-11 relative) and pass it on;
    # the error stays well below what the weights' rounding moves
    assert error <= 1e-2 * np.abs(want).max()
    if bits == 4:  # int8 weights move the output about as much as float16 activations do
        assert error < 0.25 * np.abs(got - unquantized).max()
    for name, original in (("W1", W1), ("W2", W2), ("W3", W3)):  # each level within half a step
        scales = next(nh.to_array(t) for t in model.graph.initializer if t.name.startswith(f"{name}_scale"))
        rounded = original.astype(weights[name][1]).astype(np.float64)  # what a float16 layer quantized
        assert np.abs(weights[name][0] - rounded).max() <= 0.5 * np.abs(scales.astype(np.float64)).max() * 1.001
    levels = [t for t in model.graph.initializer if t.data_type in (TP.INT4, TP.UINT4, TP.INT8, TP.UINT8)]
    assert levels and not any(t.data_type == TP.FLOAT16 and t.name.startswith("W") and "scale" not in t.name
                              for t in model.graph.initializer)  # no float16 copy of a weight left


@pytest.mark.parametrize("target", ["portable", "onnxruntime"])
def test_a_float32_layer_reading_a_float16_stored_weight_is_quantized_with_float32_scales(target: str) -> None:
    # how ConvertFloat16Pass stores the weight of a layer it keeps float32: Cast<float>(W16)
    w16 = W3.astype(np.float16)
    nodes = [oh.make_node("Cast", ["W16"], ["W"], to=TP.FLOAT), oh.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TP.FLOAT, ["N", 192])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, ["N", 128])], [nh.from_array(w16, "W16")])
    model = ir.serde.deserialize_model(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)]))
    result = QuantizeWeightsPass(bits=4, block_size=B, target=target)(model)
    assert result.modified and result.stats["scales"] == {"float32": 1}
    proto = ir.serde.serialize_model(result.model)
    assert [n.op_type for n in proto.graph.node] == (["MatMulNBits"] if target == "onnxruntime"
                                                     else ["DequantizeLinear", "MatMul"])
    assert "W16" not in _initializers(proto)  # the Cast and the float16 weight are gone
    node = proto.graph.node[0]
    arrays = _initializers(proto)
    w, dtype = _matmul_nbits(node, arrays) if target == "onnxruntime" else _dequantize_linear(node, arrays)
    assert dtype == np.float32
    # the levels round the float16 values: within half a step of them
    step = np.repeat(np.abs(arrays[node.input[2]]).reshape(-1, 128 if target == "portable" else 6), 1, 0)
    assert np.abs(w - w16.astype(np.float64)).max() <= 0.51 * step.max()
    x = np.random.default_rng(1).normal(size=(3, 192)).astype(np.float32)
    got = _run(proto, x)
    np.testing.assert_allclose(got, x.astype(np.float64) @ w, rtol=1e-4, atol=1e-4)


def _overflowing() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A layer whose output passes float16's range (FP16 keeps it and the next float32, and
    stores their weights float16 behind a Cast), then a float16 one."""
    rng = np.random.default_rng(3)
    weights = {"W1": (rng.normal(size=(256, 256)) * 3000).astype(np.float32),
               "W2": (rng.normal(size=(256, 128)) * 2e-5).astype(np.float32),
               "W3": (rng.normal(size=(128, 128)) * 0.05).astype(np.float32)}
    nodes = [oh.make_node("MatMul", ["x", "W1"], ["h"], name="big"), oh.make_node("Relu", ["h"], ["r"]),
             oh.make_node("MatMul", ["r", "W2"], ["s"], name="down"), oh.make_node("Tanh", ["s"], ["t"]),
             oh.make_node("MatMul", ["t", "W3"], ["y"], name="mm3")]
    graph = oh.make_graph(nodes, "overflow", [oh.make_tensor_value_info("x", TP.FLOAT, ["N", 256])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, ["N", 128])],
                          [nh.from_array(w, name) for name, w in weights.items()])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)]), weights


@pytest.mark.parametrize("level", [2, 3])
@pytest.mark.parametrize("bits", [4, 8])
def test_layers_kept_float32_for_overflow_stay_float32_next_to_float16_ones(level: int, bits: int) -> None:
    model, original = _overflowing()
    result = optcc.optimize(model, level=level, fp16=True, weight_only=f"int{bits}", verify=False)
    fp16_stats = next(r.stats for r in result.report.passes if r.name == "convert-float16")
    assert set(fp16_stats["kept_float32"]) >= {"big", "down"}
    written = result.model
    weights = {name.removesuffix("_float32"): value for name, value in _layer_weights(written).items()}
    assert {name: dtype for name, (_, dtype) in weights.items()} == {
        "W1": np.float32, "W2": np.float32, "W3": np.float16}
    assert not any(t.data_type == TP.FLOAT16 and t.name in ("W1", "W2") or "float16" in t.name
                   for t in written.graph.initializer)  # FP16's float16 copies went with their Casts
    x = np.random.default_rng(4).normal(size=(3, 256)).astype(np.float32)
    got = _run(written, x)
    h = np.maximum(x.astype(np.float64) @ weights["W1"][0], 0)
    assert np.abs(h).max() > 65504  # the float32 layers really hold what float16 cannot
    want = np.tanh(h @ weights["W2"][0]) @ weights["W3"][0]
    assert np.abs(got - want).max() <= 1e-2 * np.abs(want).max()


def test_a_float16_embedding_table_is_stored_as_int8_rows_with_float16_scales() -> None:
    rng = np.random.default_rng(6)
    table, w = rng.normal(size=(50, 64)).astype(np.float32), (rng.normal(size=(64, 32)) * 0.1).astype(np.float32)
    nodes = [oh.make_node("Gather", ["T", "ids"], ["e"], name="embed"), oh.make_node("MatMul", ["e", "W"], ["y"])]
    graph = oh.make_graph(nodes, "embed", [oh.make_tensor_value_info("ids", TP.INT64, ["N", 5])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, ["N", 5, 32])],
                          [nh.from_array(table, "T"), nh.from_array(w, "W")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)])
    result = optcc.optimize(model, fp16=True, weight_only="int4", verify=False)
    stats = next(r.stats for r in result.report.passes if r.name == "quantize-weights")
    assert stats["quantized"] == {"MatMul int8": 1, "Gather int8": 1}  # the MatMul is the head: 8 bits
    arrays = _initializers(result.model)
    rows, row_scale = arrays["T_q8"], arrays["T_row_scale"]
    assert rows.dtype == np.int8 and row_scale.dtype == np.float16 and row_scale.shape == (50, 1)
    assert np.abs(rows * row_scale.astype(np.float64) - table.astype(np.float16)).max() <= \
        0.5 * np.abs(row_scale.astype(np.float64)).max() * 1.001
    ids = rng.integers(0, 50, size=(2, 5))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(result.model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    got = session.run(None, {"ids": ids})[0]
    weights = _layer_weights(result.model)
    want = (rows[ids] * row_scale[ids].astype(np.float64)) @ weights["W"][0]
    assert np.abs(got - want).max() <= 1e-2 * np.abs(want).max()


def test_cli_fp16_with_weights_verifies_and_reports_both(tmp_path: Path, capsys) -> None:
    source, out, report = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "r.json"
    onnx.save(_mlp(), source)
    assert cli.main([str(source), "-O3", "--fp16", "--weights", "int8", "-o", str(out), "--report", str(report)]) == 0
    assert "+fp16 +weights" in capsys.readouterr().err
    data = json.loads(report.read_text())
    assert data["verification"]["status"] == "passed" and data["verification"]["numerics"] == "int8"
    weights = next(p for p in data["passes"] if p["name"] == "quantize-weights")
    assert weights["stats"]["scales"] == {"float16": 3}
    written = onnx.load(out)
    assert [n.op_type for n in written.graph.node].count("MatMulNBits") == 3
    x = np.random.default_rng(2).normal(size=(2, 256)).astype(np.float32)
    got = _run(str(out), x)
    weights_back = _layer_weights(written)
    want = _forward(x.astype(np.float64), *(weights_back[n][0] for n in ("W1", "W2", "W3")))
    assert np.abs(got - want).max() <= 1e-2 * np.abs(want).max()


def test_cli_int4_that_misses_its_judge_raises_layers_to_int8(tmp_path: Path, capsys) -> None:
    # int4 on a random MLP misses the weights' judge: its most sensitive body layers go to int8
    # until the mix passes, and that is written (verified) with a line saying so
    source, out, report = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "r.json"
    onnx.save(_mlp(), source)
    assert cli.main([str(source), "-O3", "--fp16", "--weights", "int4", "-o", str(out), "--report", str(report)]) == 0
    said = capsys.readouterr().err
    assert "weights: int4 missed its check" in said and "body layers raised to int8" in said
    data = json.loads(report.read_text())
    assert data["verification"]["status"] == "passed" and data["verification"]["numerics"] == "int8"
    stats = next(p for p in data["passes"] if p["name"] == "quantize-weights")["stats"]
    assert stats["mixed"]["raised"] and stats["quantized"]["MatMul int8"] >= 2  # the head and at least one more
    x = np.random.default_rng(3).normal(size=(2, 256)).astype(np.float32)
    want = _forward(x.astype(np.float64), W1.astype(np.float64), W2.astype(np.float64), W3.astype(np.float64))
    assert np.abs(_run(str(out), x) - want).max() <= 1e-2 * np.abs(want).max()


def test_cli_weights_that_miss_their_judge_leave_the_float16_model(tmp_path: Path, capsys) -> None:
    # int4 on a random MLP misses an 80 dB judge even with every body layer at int8: exit 5
    # without the opt-in; with it, the float16 model, byte for byte what --fp16 alone writes
    source, out, fp16_only = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "f.onnx"
    onnx.save(_mlp(), source)
    strict = ["--int8-target-sqnr", "80"]
    assert cli.main([str(source), "-O3", "--fp16", "--weights", "int4", *strict, "-o", str(out), "-q"]) == 5
    said = capsys.readouterr().err
    assert not out.exists() and "weights not applied" in said and "(the result would be fp16)" in said
    assert cli.main([str(source), "-O3", "--fp16", "--weights", "int4", *strict, "-o", str(out), "-q",
                     "--allow-float-fallback"]) == 0
    assert "the fp16 model is written" in capsys.readouterr().err
    assert cli.main([str(source), "-O3", "--fp16", "-o", str(fp16_only), "-q"]) == 0
    assert out.read_bytes() == fp16_only.read_bytes()
    x = np.random.default_rng(3).normal(size=(2, 256)).astype(np.float32)
    want = _forward(x.astype(np.float64), W1.astype(np.float64), W2.astype(np.float64), W3.astype(np.float64))
    assert np.abs(_run(str(out), x) - want).max() <= 1e-2 * np.abs(want).max()
