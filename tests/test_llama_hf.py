"""The transformer fusions on transformers' own LlamaForCausalLM (4 query heads, 2
key/value heads) exported by torch (dynamo at opset 18, TorchScript at opset 17): at -O3
both rotary sites of both layers fuse into com.microsoft RotaryEmbedding; upgraded to opset
23 at -O2, both layers become a standard Attention on the un-repeated key/value. Either
way the logits stay those of the torch model. Needs torch and transformers (the optional
extra ``transformers``); skipped without them."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import optcc

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

from fixtures.llama_hf import CONFIG, export, feeds, torch_logits  # noqa: E402


@pytest.fixture(scope="module", params=[("dynamo", 18), ("torchscript", 17)], ids=["dynamo18", "torchscript17"])
def exported(request, tmp_path_factory) -> onnx.ModelProto:
    exporter, opset = request.param
    return onnx.load(export(tmp_path_factory.mktemp("llama") / "llama.onnx", exporter, opset))  # data inlined


def _assert_torch_logits(model: onnx.ModelProto) -> None:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch, seq, seed in ((2, 7, 1), (1, 1, 2), (3, 20, 3)):
        inputs = feeds(batch, seq, seed)
        np.testing.assert_allclose(session.run(None, inputs)[0], torch_logits(inputs), rtol=0, atol=1e-4)


def test_every_rotary_site_fuses(exported: onnx.ModelProto) -> None:
    result = optcc.optimize(exported, level=3)
    stats = [r.stats for r in result.report.passes if r.name == "fuse-ort-rotary" and r.stats.get("applied")]
    assert sum(s["applied"].get("rotary", 0) for s in stats) == 4  # query and key of 2 layers
    fused = [n for n in result.model.graph.node if n.op_type == "RotaryEmbedding"]
    assert len(fused) == 4 and {n.domain for n in fused} == {"com.microsoft"}
    assert not any(n.op_type == "Neg" for n in result.model.graph.node)
    _assert_torch_logits(result.model)


def test_every_layer_groups_its_kv_heads(exported: onnx.ModelProto) -> None:
    result = optcc.optimize(exported, level=2, target_opset=23, verify=False)
    (stats,) = [r.stats for r in result.report.passes if r.name == "fuse-attention" and r.stats.get("grouped_kv")]
    assert list(stats["grouped_kv"].values()) == ["grouped: key/value heads shared by 2 query heads"] * 2
    attention = [n for n in result.model.graph.node if n.op_type == "Attention"]
    assert len(attention) == CONFIG["num_hidden_layers"]
    assert "Softmax" not in {n.op_type for n in result.model.graph.node}
    for node in attention:  # the key fed to the op has the kv heads, not the repeated ones
        assert not any(n.op_type == "Reshape" and node.input[1] in n.output for n in result.model.graph.node)
    _assert_torch_logits(result.model)
