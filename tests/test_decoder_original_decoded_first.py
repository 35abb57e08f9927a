"""A KV-cache decoder's weight-only search decodes the original on every prompt before any
weight is quantized: the original's session (its external data resident) is never built
beside a candidate's weights, and each prompt is decoded once per verifier. The written
model is checked against onnxruntime's own greedy decodes of the original."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import optcc
from fixtures.gpt2_decoder import gpt2_decoder, greedy_decode
from optcc.numerics.decode import NEXT_TOKEN_AGREEMENT, NEXT_TOKEN_PROMPTS, NEXT_TOKEN_STEPS
from optcc.quant import weight_only

LAYERS, HEADS, HIDDEN, VOCAB = 2, 2, 64, 96
NEXT_TOKEN_AGREEMENT_MISSES = 1 - NEXT_TOKEN_AGREEMENT  # the share of steps a passing result may differ on


@pytest.fixture
def decoder_path(tmp_path) -> str:
    """The fixture's decoder with its token table doubled: logit margins at which all-int4
    misses the search's check past the first prompt and raising a weight to int8 passes."""
    model = gpt2_decoder(layers=LAYERS, heads=HEADS, hidden=HIDDEN, vocab=VOCAB, seed=4)
    table = next(t for t in model.graph.initializer if t.name == "wte")
    table.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(table) * np.float32(2), "wte"))
    path = str(tmp_path / "decoder.onnx")
    onnx.save(model, path, save_as_external_data=True, location="decoder.onnx.data", size_threshold=1024)
    return path


def test_the_original_decodes_every_prompt_before_any_weight_is_quantized(decoder_path, monkeypatch) -> None:
    verify_module = sys.modules["optcc.numerics.verify"]
    events: list[tuple[str, int]] = []  # ("decode", id of the verifier) per prompt the original decodes
    reference, greedy, quantize = verify_module.Verifier._reference_tokens, verify_module.greedy_tokens, \
        weight_only.quantize
    inside: list[int] = []

    def reference_tokens(self, provider, count):  # noqa: ANN001, ANN202
        inside.append(id(self))
        try:
            return reference(self, provider, count)
        finally:
            inside.pop()

    def greedy_tokens(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if inside:  # the original's decode (a candidate's free-running decode is not inside)
            events.append(("decode", inside[-1]))
        return greedy(*args, **kwargs)

    monkeypatch.setattr(verify_module.Verifier, "_reference_tokens", reference_tokens)
    monkeypatch.setattr(verify_module, "greedy_tokens", greedy_tokens)
    monkeypatch.setattr(weight_only, "quantize", lambda *a, **k: events.append(("quantize", 0)) or quantize(*a, **k))
    rng = np.random.default_rng(11)
    prompts = [rng.integers(0, VOCAB, (2, 6)) for _ in range(8)]
    feeds = [_first_feeds(p) for p in prompts]
    result = optcc.optimize(decoder_path, level=2, inputs=feeds, weight_only="int4", allow_float_fallback=True)

    record = next(r for r in result.report.passes if r.name == "quantize-weights")
    mixed = record.stats["mixed"]
    # all-int4 reached a later prompt before it missed (where the original's other prompts were once
    # decoded, beside its weights), and the search raised weights to int8 until a candidate passed
    assert not mixed["checks"][0]["passed"] and "of prompt 1 of" not in mixed["checks"][0]["reason"], mixed
    assert mixed["raised"] and result.applied_precision == ["weights"], mixed
    first_quantize = next(i for i, (what, _) in enumerate(events) if what == "quantize")
    decodes = [who for what, who in events if what == "decode"]
    assert all(what != "decode" for what, _ in events[first_quantize:]), events
    # two verifiers (the search's prompts apart and the verification's), each prompt decoded once
    by_verifier = {who: decodes.count(who) for who in decodes}
    assert sorted(by_verifier.values()) == sorted([len(prompts), NEXT_TOKEN_PROMPTS]), by_verifier

    # independently: onnxruntime's greedy decodes of the original, and the result fed those tokens
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the original as written
    original = ort.InferenceSession(decoder_path, plain, providers=["CPUExecutionProvider"])
    out = decoder_path.replace("decoder.onnx", "written.onnx")
    result.save(out)
    written = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    differing = 0
    for p in prompts:
        want = greedy_decode(lambda f: original.run(None, f), p, NEXT_TOKEN_STEPS, LAYERS, HEADS, HIDDEN // HEADS)
        got = greedy_decode(lambda f: written.run(None, f), p, NEXT_TOKEN_STEPS, LAYERS, HEADS, HIDDEN // HEADS,
                            fed=want)
        differing += int((got != want).sum())
    assert result.report.verification["status"] == "passed"
    assert differing <= NEXT_TOKEN_AGREEMENT_MISSES * 2 * len(prompts) * NEXT_TOKEN_STEPS, differing


def _first_feeds(ids: np.ndarray) -> dict[str, np.ndarray]:
    """A prompt's first decode step: ``ids`` from an empty cache."""
    batch, length = ids.shape
    feeds = {"input_ids": ids.astype(np.int64),
             "position_ids": np.tile(np.arange(length, dtype=np.int64), (batch, 1)),
             "attention_mask": np.ones((batch, length), np.int64)}
    for i in range(LAYERS):
        for kind in ("key", "value"):
            feeds[f"past_{kind}_{i}"] = np.zeros((batch, HEADS, 0, HIDDEN // HEADS), np.float32)
    return feeds
