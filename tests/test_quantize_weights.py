"""Weight-only INT4/INT8 (quantize-weights): block-wise levels equal to a numpy reference,
outputs against float64 numpy, MatMulNBits and portable DequantizeLinear on onnxruntime,
HQQ and GPTQ no worse than RTN on what they minimize."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

import optcc
from optcc.passes.quantize_weights import QuantizeWeightsPass
from optcc.quant import weight_only

K1, H1, H2, OUT = 80, 128, 64, 10  # K1 = 2.5 blocks of 32: the last block is partial


def _mlp(opset: int = 21, scale: float = 1.0) -> onnx.ModelProto:
    """x[8, K1] -> MatMul(W1) -> Relu -> Gemm(W2^T [H2, H1], alpha, beta, C2) -> Relu -> MatMul(W3) = logits."""
    rng = np.random.default_rng(7)
    inits = {
        "W1": rng.normal(size=(K1, H1)) * 0.1 * scale,
        "W2": rng.normal(size=(H2, H1)) * 0.1 * scale,
        "C2": rng.normal(size=(H2,)),
        "W3": rng.normal(size=(H2, OUT)) * 0.1 * scale,
    }
    graph = oh.make_graph(
        [oh.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
         oh.make_node("Relu", ["h"], ["r"]),
         oh.make_node("Gemm", ["r", "W2", "C2"], ["g"], name="gemm2", transB=1, alpha=0.5, beta=2.0),
         oh.make_node("Relu", ["g"], ["s"]),
         oh.make_node("MatMul", ["s", "W3"], ["logits"], name="head")],
        "mlp", [oh.make_tensor_value_info("x", TP.FLOAT, ["B", K1])],
        [oh.make_tensor_value_info("logits", TP.FLOAT, ["B", OUT])],
        [nh.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: nh.to_array(t).astype(np.float64) for t in model.graph.initializer}


def _forward(w: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """float64 forward pass of ``_mlp`` with weights ``w`` (W2 given as [H2, H1])."""
    h = np.maximum(x.astype(np.float64) @ w["W1"], 0)
    g = np.maximum(0.5 * h @ w["W2"].T + 2.0 * w["C2"], 0)
    return g @ w["W3"]


def _reference_rtn(w: np.ndarray, bits: int, block: int, symmetric: bool) -> np.ndarray:
    """Block-wise round-to-nearest of a [K, N] weight along K, dequantized in float64."""
    out = np.empty_like(w, dtype=np.float64)
    for start in range(0, w.shape[0], block):
        blk = w[start:start + block].astype(np.float64)
        if symmetric:
            lo, hi = blk.min(axis=0), blk.max(axis=0)
            v = np.where(np.abs(hi) > np.abs(lo), hi, lo)
            s = (v / -(2 ** (bits - 1))).astype(np.float32).astype(np.float64)
            s[s == 0] = 1
            q = np.clip(np.rint(blk / s), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
            out[start:start + block] = (q * s).astype(np.float32)
        else:
            lo, hi = np.minimum(blk.min(axis=0), 0), np.maximum(blk.max(axis=0), 0)
            s = ((hi - lo) / (2 ** bits - 1)).astype(np.float32).astype(np.float64)
            s[s == 0] = 1
            z = np.clip(np.rint(-lo / s), 0, 2 ** bits - 1)
            q = np.clip(np.rint(blk / s) + z, 0, 2 ** bits - 1)
            out[start:start + block] = ((q - z) * s).astype(np.float32)
    return out


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _dequantized_inputs(q: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The float weight each DequantizeLinear computes, decoded with numpy, by consumer node name."""
    inits = {t.name: t for t in q.graph.initializer}
    found = {}
    for node in q.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        attrs = {a.name: oh.get_attribute_value(a) for a in node.attribute}
        levels = nh.to_array(inits[node.input[0]]).astype(np.int64)
        scale = nh.to_array(inits[node.input[1]]).astype(np.float64)
        zero = nh.to_array(inits[node.input[2]]).astype(np.int64) if len(node.input) > 2 else 0
        axis, block = attrs["axis"], attrs["block_size"]
        expand = lambda a: np.repeat(a, block, axis=axis)[tuple(slice(0, d) for d in levels.shape)]  # noqa: E731
        value = ((levels - (expand(zero) if np.ndim(zero) else 0)) * expand(scale)).astype(np.float32)
        for consumer in q.graph.node:
            if node.output[0] in consumer.input:
                found[consumer.name] = value
    return found


def _unpack_nbits(q: onnx.ModelProto, node: onnx.NodeProto) -> np.ndarray:
    """The [K, N] weight a MatMulNBits node computes with, decoded with numpy."""
    attrs = {a.name: oh.get_attribute_value(a) for a in node.attribute}
    k, n, bits, block = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
    inits = {t.name: nh.to_array(t) for t in q.graph.initializer}
    packed = inits[node.input[1]].reshape(n, -1)
    levels = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(n, -1) if bits == 4 else packed
    kb = -(-k // block)
    scales = inits[node.input[2]].reshape(n, kb).astype(np.float64)
    if len(node.input) > 3:
        zp = inits[node.input[3]].reshape(n, -1)
        zp = (np.stack([zp & 0xF, zp >> 4], axis=-1).reshape(n, -1) if bits == 4 else zp)[:, :kb]
    else:
        zp = np.full((n, kb), 2 ** (bits - 1))
    w = (levels[:, :kb * block].astype(np.int64) - np.repeat(zp, block, axis=1)) * np.repeat(scales, block, axis=1)
    return w[:, :k].T.astype(np.float32)


def _sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    return float(10 * np.log10((ref ** 2).sum() / ((got - ref) ** 2).sum()))


X = np.random.default_rng(8).normal(size=(16, K1)).astype(np.float32)


@pytest.mark.parametrize("bits,symmetric", [(4, False), (4, True), (8, False), (8, True)])
def test_portable_blockwise_dequantize_matches_numpy(bits: int, symmetric: bool) -> None:
    model = _mlp()
    result = QuantizeWeightsPass(bits=bits, block_size=32, symmetric=symmetric)(optcc.ir.load(model))
    q = optcc.ir.serialize(result.model)
    onnx.checker.check_model(q, full_check=True)
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("DequantizeLinear") == 3 and ops.count("MatMul") == 2 and ops.count("Gemm") == 1
    assert not [t.name for t in q.graph.initializer if t.data_type == TP.FLOAT and len(t.dims) == 2 and t.dims[0] > 1
                and "scale" not in t.name]
    level_type = {(4, True): TP.INT4, (4, False): TP.UINT4, (8, True): TP.INT8, (8, False): TP.UINT8}
    head_bits = 8 if bits == 4 else bits
    assert result.stats["head"] == [{"node": "head", "bits": head_bits}]

    w = _weights(model)
    decoded = _dequantized_inputs(q)
    expected = {"mm1": _reference_rtn(w["W1"], bits, 32, symmetric),
                "gemm2": _reference_rtn(w["W2"].T, bits, 32, symmetric).T,
                "head": _reference_rtn(w["W3"], head_bits, 32, symmetric)}
    for name, ref in expected.items():
        np.testing.assert_array_equal(decoded[name], ref.astype(np.float32), err_msg=name)
    dq_types = {n.output[0]: next(t.data_type for t in q.graph.initializer if t.name == n.input[0])
                for n in q.graph.node if n.op_type == "DequantizeLinear"}
    assert sorted(dq_types.values()) == sorted([level_type[(bits, symmetric)]] * 2 + [level_type[(head_bits, symmetric)]])

    got = _run(q, X)
    quantized_ref = _forward({**w, "W1": expected["mm1"], "W2": expected["gemm2"], "W3": expected["head"]}, X)
    np.testing.assert_allclose(got, quantized_ref, rtol=1e-4, atol=1e-4 * np.abs(quantized_ref).max())
    assert _sqnr(_forward(w, X), got) > (18 if bits == 4 else 38)


@pytest.mark.parametrize("bits,symmetric", [(4, False), (4, True), (8, False)])
def test_matmul_nbits_on_onnxruntime(bits: int, symmetric: bool) -> None:
    model = _mlp(opset=17)
    result = QuantizeWeightsPass(bits=bits, symmetric=symmetric, target="onnxruntime",
                                 head_bits=None)(optcc.ir.load(model))
    q = optcc.ir.serialize(result.model)
    onnx.checker.check_model(q)
    nbits = [n for n in q.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 3 and all(n.domain == "com.microsoft" for n in nbits)
    assert {n.op_type for n in q.graph.node} == {"MatMulNBits", "Relu", "Mul", "Add"}
    w = _weights(model)
    by_source = {n.name.split("_nbits")[0]: _unpack_nbits(q, n) for n in nbits}
    np.testing.assert_array_equal(by_source["mm1"], _reference_rtn(w["W1"], bits, 32, symmetric).astype(np.float32))
    np.testing.assert_array_equal(by_source["gemm2"], _reference_rtn(w["W2"].T, bits, 32, symmetric).astype(np.float32))
    got = _run(q, X)
    quantized_ref = _forward({**w, "W1": by_source["mm1"], "W2": by_source["gemm2"].T, "W3": by_source["head"]}, X)
    np.testing.assert_allclose(got, quantized_ref, rtol=1e-3, atol=1e-3 * np.abs(quantized_ref).max())


def test_int4_file_is_under_a_third_of_float32() -> None:
    rng = np.random.default_rng(1)
    weights = [rng.normal(size=(512, 512)).astype(np.float32) for _ in range(3)]
    nodes, prev = [], "x"
    for i in range(3):
        nodes.append(oh.make_node("MatMul", [prev, f"W{i}"], [f"y{i}"]))
        prev = f"y{i}"
    graph = oh.make_graph(nodes, "big", [oh.make_tensor_value_info("x", TP.FLOAT, [1, 512])],
                          [oh.make_tensor_value_info(prev, TP.FLOAT, [1, 512])],
                          [nh.from_array(w, f"W{i}") for i, w in enumerate(weights)])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)])
    size = len(model.SerializeToString())
    for target in ("portable", "onnxruntime"):
        q = QuantizeWeightsPass(bits=4, target=target, head_bits=None)(optcc.ir.load(model)).model
        ratio = len(optcc.ir.serialize(q).SerializeToString()) / size
        assert ratio <= 0.3, (target, ratio)


def test_portable_upgrades_an_older_opset_and_runs() -> None:
    model = _mlp(opset=17)
    result = QuantizeWeightsPass(bits=4)(optcc.ir.load(model))
    assert result.stats["opset_upgraded_to"] == 21 and optcc.ir.default_opset(result.model) == 21
    q = optcc.ir.serialize(result.model)
    onnx.checker.check_model(q, full_check=True)
    assert _sqnr(_forward(_weights(model), X), _run(q, X)) > 18


def test_hqq_reconstructs_no_worse_than_rtn() -> None:
    rng = np.random.default_rng(2)
    w = rng.standard_t(df=3, size=(256, 96)) * 0.02  # heavy tails, as trained weights have
    for symmetric in (False, True):
        rtn = weight_only.quantize_rtn(w, 4, 32, symmetric).dequantize()
        hqq = weight_only.quantize_hqq(w, 4, 32, symmetric).dequantize()
        np.testing.assert_array_equal(rtn, _reference_rtn(w, 4, 32, symmetric).astype(np.float32))
        e_rtn, e_hqq = ((w - rtn) ** 2).sum(), ((w - hqq) ** 2).sum()
        assert e_hqq < e_rtn, (symmetric, e_hqq, e_rtn)


def _correlated_samples(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Inputs with correlated channels of very different magnitude (one distribution; ``seed``
    draws the samples)."""
    structure = np.random.default_rng(3)
    mix = structure.normal(size=(K1, K1)) / np.sqrt(K1)
    scales = np.exp(structure.normal(size=K1))
    rng = np.random.default_rng(seed)
    return [{"x": ((rng.normal(size=(16, K1)) @ mix) * scales).astype(np.float32)} for _ in range(n)]


def test_gptq_layer_output_error_is_below_rtn() -> None:
    model = _mlp()
    samples = _correlated_samples(8, 10)
    models = {alg: optcc.ir.serialize(QuantizeWeightsPass(bits=4, algorithm=alg, samples=samples)(optcc.ir.load(model)).model)
              for alg in ("rtn", "gptq")}
    x = np.concatenate([s["x"] for s in samples]).astype(np.float64)
    exact = x @ _weights(model)["W1"]
    errors = {alg: float(((x @ _dequantized_inputs(q)["mm1"].astype(np.float64) - exact) ** 2).sum())
              for alg, q in models.items()}
    assert errors["gptq"] < 0.8 * errors["rtn"], errors
    held_out = _correlated_samples(1, 11)[0]["x"]
    reference = _forward(_weights(model), held_out)
    assert _sqnr(reference, _run(models["gptq"], held_out)) > _sqnr(reference, _run(models["rtn"], held_out))


def test_gptq_without_samples_is_rtn_with_a_note() -> None:
    model = _mlp()
    gptq = QuantizeWeightsPass(bits=4, algorithm="gptq")(optcc.ir.load(model))
    rtn = QuantizeWeightsPass(bits=4)(optcc.ir.load(model))
    assert "RTN" in gptq.stats["note"]
    a, b = (_dequantized_inputs(optcc.ir.serialize(r.model)) for r in (gptq, rtn))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_embedding_and_tied_head() -> None:
    rng = np.random.default_rng(5)
    table = rng.normal(size=(50, 32)).astype(np.float32)
    other = rng.normal(size=(40, 32)).astype(np.float32)
    w = (rng.normal(size=(32, 32)) * 0.2).astype(np.float32)
    graph = oh.make_graph(
        [oh.make_node("Gather", ["E", "ids"], ["e"]),
         oh.make_node("Gather", ["P", "ids"], ["p"]),
         oh.make_node("Add", ["e", "p"], ["ep"]),
         oh.make_node("MatMul", ["ep", "W"], ["h"], name="body"),
         oh.make_node("Gemm", ["h", "E"], ["logits"], name="tied_head", transB=1)],
        "lm", [oh.make_tensor_value_info("ids", TP.INT64, [6])],
        [oh.make_tensor_value_info("logits", TP.FLOAT, [6, 50])],
        [nh.from_array(table, "E"), nh.from_array(other, "P"), nh.from_array(w, "W")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)])
    ids = np.array([0, 3, 39, 7, 7, 20], np.int64)

    plain = QuantizeWeightsPass(bits=4, embeddings=False)(optcc.ir.load(model))
    assert plain.stats["kept_float"] == {"weight tied to an embedding Gather (quantize embeddings to include it)": 1}

    result = QuantizeWeightsPass(bits=4, embeddings=True)(optcc.ir.load(model))
    assert result.stats["quantized"] == {"MatMul int4": 1, "Gather int8": 1, "tied table int8": 1}
    q = optcc.ir.serialize(result.model)
    onnx.checker.check_model(q, full_check=True)
    assert not {"E", "P", "W"} & {t.name for t in q.graph.initializer}

    def rows(a: np.ndarray) -> np.ndarray:  # int8 per row, symmetric, largest magnitude -> -128
        v = a[np.arange(len(a)), np.abs(a).argmax(axis=1)].astype(np.float64)
        s = (v / -128).astype(np.float32).astype(np.float64)[:, None]
        return (np.clip(np.rint(a / s), -128, 127) * s).astype(np.float32).astype(np.float64)

    e_hat, p_hat = rows(table), rows(other)
    w_hat = _reference_rtn(w, 4, 32, False)
    expected = ((e_hat[ids] + p_hat[ids]) @ w_hat) @ e_hat.T
    options = ort.SessionOptions()  # as written: onnxruntime's full optimization would fuse
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # DQ+MatMul (int8 activations)
    session = ort.InferenceSession(q.SerializeToString(), options, providers=["CPUExecutionProvider"])
    got = session.run(None, {"ids": ids})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_bad_options_are_refused() -> None:
    with pytest.raises(optcc.BadInputError, match="bits"):
        QuantizeWeightsPass(bits=3)
    with pytest.raises(optcc.BadInputError, match="block_size"):
        QuantizeWeightsPass(block_size=48)
    with pytest.raises(optcc.BadInputError, match="algorithm"):
        QuantizeWeightsPass(algorithm="awq")


def test_second_run_changes_nothing() -> None:
    q = QuantizeWeightsPass(bits=4)(optcc.ir.load(_mlp())).model
    again = QuantizeWeightsPass(bits=4)(q)
    assert not again.modified and again.stats["quantized"] == {}


def test_optimize_weight_only_option_picks_the_target_by_level() -> None:
    model = _mlp(opset=17)
    reference = _forward(_weights(model), X)
    for level, op in ((2, "DequantizeLinear"), (3, "MatMulNBits")):
        result = optcc.optimize(model, level=level, weight_only="int4", verify=False)
        ops = [n.op_type for n in result.model.graph.node]
        assert ops.count(op) == 3 and (level == 2 or "MatMul" not in ops)
        assert _sqnr(reference, _run(result.model, X)) > 18
    with pytest.raises(optcc.BadInputError, match="int4"):
        optcc.optimize(model, weight_only="int3", verify=False)


def test_column_chunks_give_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(6)
    w = rng.normal(size=(64, 40))
    x = rng.normal(size=(256, 64))
    hessian = x.T @ x / len(x)
    whole = {alg: weight_only.quantize(w, alg, 4, 32, hessian=hessian) for alg in weight_only.ALGORITHMS}
    monkeypatch.setattr(weight_only, "CHUNK_ELEMENTS", 64 * 7)  # 7 columns at a time
    for alg, expected in whole.items():
        got = weight_only.quantize(w, alg, 4, 32, hessian=hessian)
        np.testing.assert_array_equal(got.q, expected.q, err_msg=alg)
        np.testing.assert_array_equal(got.scales, expected.scales, err_msg=alg)
        np.testing.assert_array_equal(got.zero_points, expected.zero_points, err_msg=alg)


def test_same_input_same_bytes() -> None:
    samples = _correlated_samples(2, 12)
    for options in ({"algorithm": "hqq"}, {"algorithm": "gptq", "samples": samples}, {"target": "onnxruntime"}):
        runs = [optcc.ir.serialize(QuantizeWeightsPass(**options)(optcc.ir.load(_mlp(opset=17))).model)
                .SerializeToString() for _ in range(2)]
        assert runs[0] == runs[1], options


def test_matmul_nbits_leaves_no_unread_gemm_bias() -> None:
    # Gemm's beta * C becomes a new constant next to MatMulNBits: the C it replaced goes
    model = _mlp(opset=17)
    result = QuantizeWeightsPass(bits=8, target="onnxruntime")(optcc.ir.load(model))
    q = optcc.ir.serialize(result.model)
    read = {name for node in q.graph.node for name in node.input}
    assert [t.name for t in q.graph.initializer if t.name not in read] == []
    got = _run(q, X)
    by_source = {n.name.split("_nbits")[0]: _unpack_nbits(q, n) for n in q.graph.node if n.op_type == "MatMulNBits"}
    w = _weights(model)
    want = _forward({**w, "W1": by_source["mm1"], "W2": by_source["gemm2"].T, "W3": by_source["head"]}, X)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())


def test_a_search_summary_quotes_a_long_reason_cut_between_words() -> None:
    """A missed check's reason in a search's one-line summary: on one line, within
    ``SUMMARY_REASON_CHARS``, every word of it whole."""
    from optcc.passes.quantize_weights import SUMMARY_REASON_CHARS, summary_reason

    reason = "judged 'last_hidden_state'\n  by cosine " + " ".join(f"word{i}" for i in range(60))
    said = summary_reason(reason)
    assert len(said) <= SUMMARY_REASON_CHARS and "\n" not in said and said.endswith(" ...")
    assert set(said.removesuffix(" ...").split()) <= set(reason.split())
    assert summary_reason("short  reason") == "short reason"
