"""fuse-ort-rotary on transformers' own LlamaForCausalLM exported by torch (dynamo at opset 18,
TorchScript at opset 17): both rotary sites of both layers fuse at -O3 and the logits stay
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

from fixtures.llama_hf import export, feeds, torch_logits  # noqa: E402


@pytest.mark.parametrize("exporter, opset", [("dynamo", 18), ("torchscript", 17)])
def test_every_rotary_site_fuses(tmp_path, exporter: str, opset: int) -> None:
    original = onnx.load(export(tmp_path / "llama.onnx", exporter, opset))
    result = optcc.optimize(original, level=3)
    stats = [r.stats for r in result.report.passes if r.name == "fuse-ort-rotary" and r.stats.get("applied")]
    assert sum(s["applied"].get("rotary", 0) for s in stats) == 4  # query and key of 2 layers
    fused = [n for n in result.model.graph.node if n.op_type == "RotaryEmbedding"]
    assert len(fused) == 4 and {n.domain for n in fused} == {"com.microsoft"}
    assert not any(n.op_type == "Neg" for n in result.model.graph.node)
    session = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch, seq, seed in ((2, 7, 1), (1, 1, 2), (3, 20, 3)):
        inputs = feeds(batch, seq, seed)
        np.testing.assert_allclose(session.run(None, inputs)[0], torch_logits(inputs), rtol=0, atol=1e-4)
