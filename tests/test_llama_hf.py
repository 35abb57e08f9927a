"""The transformer fusions on transformers' own LlamaForCausalLM (4 query heads, 2
key/value heads) exported by torch (dynamo at opset 18, TorchScript at opset 17): at -O3
both rotary sites of both layers fuse into com.microsoft RotaryEmbedding; upgraded to opset
23 at -O2, both layers become a standard Attention on the un-repeated key/value. Either
way the logits stay those of the torch model. Exported as a KV-cache decoder step
(``use_cache=True``), the generated verification inputs start a valid decode (positions
``past + arange(seq)`` found from the rotary angle they feed, the mask over past and current
tokens), optcc verifies the optimized model over a multi-step decode, and that decode, fed
back present -> past, matches torch step by step. Needs torch and transformers (the
optional extra ``transformers``); skipped without them."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import optcc
from optcc import cli
from optcc.numerics.inputs import DECODE_STEPS, generate_inputs, input_roles

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

from fixtures.llama_hf import CONFIG, PASTS, export, export_kv, feeds, torch_logits, torch_step  # noqa: E402


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


@pytest.fixture(scope="module", params=[("dynamo", 18), ("torchscript", 17)], ids=["dynamo18", "torchscript17"])
def exported_kv(request, tmp_path_factory) -> Path:
    exporter, opset = request.param
    return export_kv(tmp_path_factory.mktemp("llama_kv") / "llama_kv.onnx", exporter, opset)


def _run(path: Path):  # noqa: ANN202 - a run callable
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda inputs: session.run(None, inputs)


def _next_step(inputs: dict[str, np.ndarray], outputs: list[np.ndarray], token: np.ndarray) -> dict[str, np.ndarray]:
    """One token more: position + 1, the mask one 1 longer, present fed back as past."""
    mask = inputs["attention_mask"]
    return {"input_ids": token, "attention_mask": np.concatenate([mask, np.ones((mask.shape[0], 1), mask.dtype)], 1),
            "position_ids": inputs["position_ids"][:, -1:] + 1, **dict(zip(PASTS, outputs[1:]))}


def test_kv_decoder_inputs_start_a_valid_decode(exported_kv: Path) -> None:
    model = optcc.ir.load(str(exported_kv))
    assert input_roles(model) == {"input_ids": "index", "attention_mask": "mask", "position_ids": "position",
                                  **{p: "past" for p in PASTS}}
    run = _run(exported_kv)
    for first in generate_inputs(model, samples=2, seed=1):
        batch, seq = first["input_ids"].shape
        past = first[PASTS[0]].shape[2]
        assert all(first[p].shape[:3] == (batch, CONFIG["num_key_value_heads"], past) for p in PASTS)
        np.testing.assert_array_equal(first["position_ids"], np.broadcast_to(past + np.arange(seq), (batch, seq)))
        assert first["attention_mask"].shape == (batch, past + seq) and (first["attention_mask"] == 1).all()
        assert first["input_ids"].max() < CONFIG["vocab_size"]
        for got, want in zip(run(first), torch_step(first)):  # the export computes torch's step on them
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize(("options", "fused"), [
    (["-O2", "--target-opset", "23"], {"Attention": 2, "RotaryEmbedding": 4}),
    (["-O3"], {"com.microsoft.MultiHeadAttention": 2, "com.microsoft.RotaryEmbedding": 4}),
], ids=["O2-opset23", "O3"])
def test_kv_decode_is_verified_and_matches_torch(exported_kv: Path, options, fused, tmp_path) -> None:
    out, report = tmp_path / "opt.onnx", tmp_path / "report.json"
    assert cli.main([str(exported_kv), *options, "-o", str(out), "--report", str(report), "-q"]) == 0
    verification = json.loads(report.read_text())["verification"]
    assert verification["status"] == "passed" and verification["decode_steps"] == DECODE_STEPS
    ops = collections.Counter(f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in onnx.load(out).graph.node)
    assert {op: ops[op] for op in fused} == fused
    run = _run(out)
    (inputs,) = generate_inputs(optcc.ir.load(str(exported_kv)), seed=2)
    for _ in range(DECODE_STEPS):  # the optimized decode, fed torch's tokens, against torch
        want, got = torch_step(inputs), run(inputs)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-4)
        inputs = _next_step(inputs, got, want[0][:, -1:].argmax(-1))
