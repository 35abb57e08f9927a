"""convert-float16 on -O3 output: onnxruntime's fused com.microsoft ops (SkipLayerNormalization,
BiasGelu, MultiHeadAttention, ...) convert to float16 where onnxruntime runs them in float16
(probed), instead of staying float32 behind Casts. Judged against onnxruntime running the
float32 original with its optimizations off, and against the layer in float64 (NumPy)."""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

import optcc
from fixtures.transformers import bert_feeds, bert_layer, bert_reference
from optcc.passes.convert_float16 import ConvertFloat16Pass
from reference import lossy_metrics

F16, F32 = ir.DataType.FLOAT16, ir.DataType.FLOAT
CONTRIB = ("SkipLayerNormalization", "BiasGelu", "FastGelu", "MultiHeadAttention")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTCC_CACHE", str(tmp_path / "optcc-cache"))
    return tmp_path / "optcc-cache"


def _level(proto: onnx.ModelProto, level: int) -> ir.Model:
    return optcc.ir.load(optcc.optimize(proto, level=level, verify=False).model)


def _fused(proto: onnx.ModelProto) -> ir.Model:
    """-O3 and the opt-in SkipLayerNormalization fusion: every fused op the layer allows."""
    return optcc.optimize(_level(proto, 3), passes=["fuse-ort-skip-layernorm"], verify=False).ir_model


def _ops(model: ir.Model) -> collections.Counter:
    return collections.Counter(n.op_type for n in optcc.ir.nodes(model))


def _typed(model: ir.Model) -> dict[str, object]:
    """The element type onnxruntime gives every main-graph value (each exposed as an output)."""
    proto = optcc.ir.serialize(model)
    known = {o.name for o in proto.graph.output}
    for node in proto.graph.node:
        proto.graph.output.extend(onnx.ValueInfoProto(name=o) for o in node.output if o and o not in known)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
    return {o.name: names.get(o.type, o.type) for o in session.get_outputs()}


def _run(model: ir.Model, feeds: dict) -> np.ndarray:
    return ort.InferenceSession(optcc.ir.serialize(model).SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.mark.parametrize("style", ["sdpa", "eager"])
def test_fused_contrib_ops_convert_to_float16(style):
    proto, weights = bert_layer(style, opset=17)
    feeds = [bert_feeds(), bert_feeds(seed=2)]
    fused = _fused(proto)
    contrib = [n for n in fused.graph if n.domain == "com.microsoft"]
    assert {n.op_type for n in contrib} >= {"SkipLayerNormalization", "BiasGelu"}, _ops(fused)

    result = ConvertFloat16Pass(inputs=feeds)(fused)
    assert result.stats["kept_float32"] == {}
    converted = result.stats["converted"]
    for op, count in collections.Counter(n.op_type for n in contrib).items():
        assert converted.get(op) == count, (op, converted)
    typed = _typed(result.model)  # what onnxruntime computes: float16 through every fused op
    for node in (n for n in fused.graph if n.domain == "com.microsoft"):
        assert typed[node.outputs[0].name] == np.float16, node.op_type
    casts_o3 = _ops(result.model)["Cast"]
    casts_o2 = _ops(ConvertFloat16Pass(inputs=feeds)(_level(proto, 2)).model)["Cast"]
    assert casts_o3 <= casts_o2  # fused ops add no float32 islands

    # against onnxruntime running the float32 original with its optimizations off
    (sqnr, cosine), = lossy_metrics(proto, optcc.ir.serialize(result.model), feeds)
    assert sqnr >= 40 and cosine >= 0.9999, (sqnr, cosine)
    # and against the layer in float64
    got = _run(result.model, feeds[0]).astype(np.float64)
    ref = bert_reference(weights, feeds[0]["hidden_states"], feeds[0]["attention_mask"])
    assert np.abs(got - ref).max() <= 1e-2 * np.abs(ref).max()


def test_contrib_op_without_float16_kernel_stays_float32(_cache):
    """The probe's verdict decides: a cached "unsupported" for BiasGelu keeps it float32
    (Casts around it), the other fused ops still convert."""
    proto, _ = bert_layer("sdpa", opset=17)
    feeds = [bert_feeds()]
    fused = _fused(proto)
    assert any(n.op_type == "BiasGelu" for n in fused.graph)
    path = optcc.fp16.support.cache_path("CPUExecutionProvider", 17)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"com.microsoft::BiasGelu": {"status": "unsupported", "detail": "test"}}))

    result = ConvertFloat16Pass(inputs=feeds, providers=["CPUExecutionProvider"])(fused)
    kept = {k: v for k, v in result.stats["kept_float32"].items()}
    assert kept and all("no float16 kernel" in v for v in kept.values()), kept
    assert "BiasGelu" not in result.stats["converted"]
    assert result.stats["converted"].get("SkipLayerNormalization") == 2
    typed = _typed(result.model)
    gelu = next(n for n in result.model.graph if n.op_type == "BiasGelu")
    assert typed[gelu.outputs[0].name] == np.float32
    assert all(typed.get(v.name, np.float32) == np.float32 for v in gelu.inputs)
    (sqnr, cosine), = lossy_metrics(proto, optcc.ir.serialize(result.model), feeds)
    assert sqnr >= 40 and cosine >= 0.9999, (sqnr, cosine)


def test_fused_op_outside_the_float_list_passes_through():
    from optcc.fp16 import float16_slots

    node = ir.Node("com.microsoft", "MatMulNBits", [ir.Value(name="a", type=ir.TensorType(F32))],
                   outputs=[ir.Value(name="y", type=ir.TensorType(F32))])
    assert "passes through untouched" in float16_slots(node, 17, lambda v: v.dtype)


@pytest.mark.parametrize("style", ["sdpa", "eager"])
def test_o3_with_fp16_fuses_and_converts_attention(style):
    """optimize(level=3, fp16=True): attention fused, every fused op float16, the kept float32
    interface and the mask's own Casts only; outputs verified by optcc and judged here against
    onnxruntime on the float32 original."""
    proto, _ = bert_layer(style, opset=17)
    feeds = [bert_feeds(), bert_feeds(seed=2)]
    result = optcc.optimize(proto, level=3, fp16=True, inputs=feeds)
    ops = collections.Counter(n.op_type for n in result.model.graph.node)
    assert ops["Attention"] + ops["MultiHeadAttention"] == 1 and ops["LayerNormalization"] == 2, ops
    assert ops["Cast"] <= 4, ops
    (sqnr, cosine), = lossy_metrics(proto, result.model, feeds)
    assert sqnr >= 40 and cosine >= 0.9999, (sqnr, cosine)
