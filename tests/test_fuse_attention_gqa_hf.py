"""fuse-attention on transformers' own LlamaForCausalLM (4 query heads, 2 key/value heads)
exported by torch (dynamo at opset 18, TorchScript at opset 17) and upgraded to opset 23 at
-O2: both layers become a standard Attention on the un-repeated key/value and the logits stay
those of the torch model. Needs torch and transformers (the optional extra ``transformers``);
skipped without them."""

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


@pytest.mark.parametrize("exporter, opset", [("dynamo", 18), ("torchscript", 17)])
def test_every_layer_groups_its_kv_heads(tmp_path, exporter: str, opset: int) -> None:
    original = onnx.load(export(tmp_path / "llama.onnx", exporter, opset))  # external data inlined
    result = optcc.optimize(original, level=2, target_opset=23, verify=False)
    (stats,) = [r.stats for r in result.report.passes if r.name == "fuse-attention" and r.stats.get("grouped_kv")]
    assert list(stats["grouped_kv"].values()) == ["grouped: key/value heads shared by 2 query heads"] * 2
    attention = [n for n in result.model.graph.node if n.op_type == "Attention"]
    assert len(attention) == CONFIG["num_hidden_layers"]
    assert "Softmax" not in {n.op_type for n in result.model.graph.node}
    session = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    for node in attention:  # the key fed to the op has the kv heads, not the repeated ones
        assert not any(n.op_type == "Reshape" and node.input[1] in n.output for n in result.model.graph.node)
    for batch, seq, seed in ((2, 7, 1), (1, 1, 2), (3, 20, 3)):
        inputs = feeds(batch, seq, seed)
        np.testing.assert_allclose(session.run(None, inputs)[0], torch_logits(inputs), rtol=0, atol=1e-4)
