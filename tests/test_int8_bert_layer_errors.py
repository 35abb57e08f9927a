"""INT8 on a small BERT-like encoder layer (onnx.helper, sdpa-style -inf attention mask):
calibration in one session over masked scores, the per-layer error estimates of the
fallback from one combined session, and the same bytes from the same call."""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator

import optcc
from calibration_probes import whole_tensor_collectors
from fixtures.transformers import bert_feeds, bert_layer
from optcc.infra.registry import create_pass
from optcc.quant import fallback
from optcc.quant.calibration import calibrate, collect_statistics
from optcc.quant.driver import quantize_int8

HIDDEN = 32


def _samples(n: int) -> list[dict[str, np.ndarray]]:
    samples = []
    for i in range(n):
        feeds = bert_feeds(batch=2, seq=8, hidden=HIDDEN, seed=10 + i)
        feeds["attention_mask"][:, 8 - (i % 4):] = 0  # padded samples: -inf in the masked scores
        feeds["attention_mask"][:, 0] = 1
        samples.append(feeds)
    return samples


def _model() -> onnx.ModelProto:
    return bert_layer("sdpa", hidden=HIDDEN, heads=2)[0]


def test_masked_scores_calibrate_in_one_session_to_numpys_ranges(monkeypatch) -> None:
    """The -inf of the padded positions leave the ranges those of the finite values, as
    numpy computes them over the tensors fetched whole (the histogram path), and no
    session fetches tensors whole for minmax."""
    model, samples = _model(), _samples(6)
    with whole_tensor_collectors(monkeypatch) as whole:
        extremes = collect_statistics(model, samples, bins=0)
    assert whole == []
    histograms = collect_statistics(model, samples)
    assert extremes.ranges("minmax") == histograms.ranges("minmax")
    sizes = _sizes(model, samples)
    assert any(h.count < sizes[name] for name, h in extremes.histograms.items() if name in sizes), \
        "the masked scores hold infinities on padded samples, left out of the counts"


def _sizes(model: onnx.ModelProto, samples: list[dict[str, np.ndarray]]) -> dict[str, int]:
    """Elements per tensor over all samples (onnxruntime, every intermediate fetched)."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = [o for node in probe.graph.node for o in node.output if o]
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    sizes = dict.fromkeys(names, 0)
    for feeds in samples:
        for name, value in zip(names, session.run(names, feeds)):
            sizes[name] += int(np.asarray(value).size) if np.issubdtype(np.asarray(value).dtype, np.floating) else 0
    return sizes


def _bits(values: dict[str, float]) -> dict[str, str]:
    """Floats compared bit for bit (NaN equal to NaN)."""
    return {k: float(v).hex() for k, v in values.items()}


def _with_outputs(proto: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy that also outputs ``names``, at opset 19 (the reference evaluator's first
    DequantizeLinear; its ops here compute the same at 17 and 19)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    for opset in probe.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, 19)
    return probe


def _sqnr(refs: list[np.ndarray], gots: list[np.ndarray]) -> float:
    r = np.concatenate([np.asarray(a, np.float64).ravel() for a in refs])
    g = np.concatenate([np.asarray(a, np.float64).ravel() for a in gots])
    noise = float(np.sum((r - g) ** 2))
    return math.inf if noise == 0 else 10 * math.log10(float(np.sum(r**2)) / noise)


def test_layer_errors_equal_onnx_reference_evaluation() -> None:
    """``propagated_sqnr`` is what onnx's reference evaluator gives for the float and the
    quantized models run apart, and ``local_sqnr`` measures every layer it can trace."""
    proto, samples = _model(), _samples(5)
    float_model = optcc.ir.load(proto)
    ranges = calibrate(float_model, samples[:3], "minmax").ranges
    quantized = float_model.clone()
    result = create_pass("quantize-int8", ranges=ranges, count_fused=False)(quantized)
    layer_outputs = result.stats["layer_outputs"]
    assert len(layer_outputs) >= 6  # q, k, v, the two attention MatMuls, out, FFN
    held = samples[3:]
    propagated = fallback.propagated_sqnr(float_model, result.model, layer_outputs, held)
    local = fallback.local_sqnr(float_model, result.model, layer_outputs, held)
    assert set(propagated) == set(layer_outputs) and set(local) <= set(layer_outputs) and local

    pairs = list(layer_outputs.items())
    ref = ReferenceEvaluator(_with_outputs(proto, [f for _, (f, _) in pairs]))
    got = ReferenceEvaluator(_with_outputs(optcc.ir.serialize(result.model), [q for _, (_, q) in pairs]))
    float_names = [f for _, (f, _) in pairs]
    quant_names = [q for _, (_, q) in pairs]
    ref_values = [ref.run(float_names, feeds) for feeds in held]
    got_values = [got.run(quant_names, feeds) for feeds in held]
    for i, (layer, _) in enumerate(pairs):
        expected = _sqnr([v[i] for v in ref_values], [v[i] for v in got_values])
        if math.isnan(expected):  # a masked score: -inf on both sides
            assert math.isnan(propagated[layer]), layer
            continue
        assert abs(propagated[layer] - expected) < 0.5, (layer, propagated[layer], expected)
    assert sum(not math.isnan(v) for v in propagated.values()) >= 6


def test_the_same_call_on_a_bert_layer_writes_the_same_bytes() -> None:
    """Two runs of the INT8 driver (calibration, judge, fallback) on the BERT layer: the
    same decision, the same ranking and, when it ships, the same bytes."""
    proto, samples = _model(), _samples(10)
    runs = [quantize_int8(proto, samples, require_speedup=False) for _ in range(2)]
    (a, stats_a), (b, stats_b) = runs
    assert stats_a["modified"] == stats_b["modified"]
    assert stats_a["ranges"] == stats_b["ranges"]
    assert stats_a.get("fallback", {}).get("sensitivity") == stats_b.get("fallback", {}).get("sensitivity")
    assert optcc.ir.serialize(a).SerializeToString(deterministic=True) == \
        optcc.ir.serialize(b).SerializeToString(deterministic=True)


def test_layer_errors_of_a_model_with_unnamed_nodes_are_measured() -> None:
    """Exporters leave node names empty: the combined session must still load (its copies
    of unnamed nodes stay unnamed, not one name per op type), and measure what the named
    model's does."""
    proto, samples = _model(), _samples(5)
    named = optcc.ir.load(proto)
    for node in proto.graph.node:
        node.name = ""
    float_model = optcc.ir.load(proto)
    ranges = calibrate(float_model, samples[:3], "minmax").ranges
    result = create_pass("quantize-int8", ranges=ranges, count_fused=False)(float_model.clone())
    named_result = create_pass("quantize-int8", ranges=ranges, count_fused=False)(named.clone())
    layer_outputs = result.stats["layer_outputs"]
    held = samples[3:]
    local = fallback.local_sqnr(float_model, result.model, layer_outputs, held)
    assert local and all(math.isfinite(v) or math.isnan(v) for v in local.values())
    named_local = fallback.local_sqnr(named, named_result.model, named_result.stats["layer_outputs"], held)
    assert sorted(_bits(local).values()) == sorted(_bits(named_local).values())
