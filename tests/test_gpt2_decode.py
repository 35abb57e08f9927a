"""A GPT-2-class decoder with a KV cache (fixtures/gpt2_decoder.py, random seeded weights,
Conv1D projections as Gemm): optcc's -O2 and -O3 models choose the same 32 greedy tokens as
the float32 original run by onnxruntime with its optimizations off, each step feeding the
model's own ``present_*`` back as ``past_*``."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import optcc
from fixtures.gpt2_decoder import gpt2_decoder, greedy_decode
from reference import assert_close, onnxruntime_outputs

LAYERS, HEADS, HIDDEN, STEPS = 2, 2, 32, 32


@pytest.fixture(scope="module")
def original() -> onnx.ModelProto:
    return gpt2_decoder(layers=LAYERS, heads=HEADS, hidden=HIDDEN)


@pytest.fixture(scope="module")
def prompt() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 96, (4, 8))


def _decode(model: onnx.ModelProto, prompt: np.ndarray) -> np.ndarray:
    return greedy_decode(lambda feeds: onnxruntime_outputs(model, feeds), prompt, STEPS,
                         LAYERS, HEADS, HIDDEN // HEADS)


@pytest.fixture(scope="module")
def reference_tokens(original, prompt) -> np.ndarray:
    tokens = _decode(original, prompt)
    assert all(len(set(row)) >= 5 for row in tokens.tolist()), tokens  # not a model that repeats one token
    return tokens


@pytest.mark.parametrize("level", [2, 3])
def test_optimized_decoder_agrees_on_every_greedy_token(original, prompt, reference_tokens, level):
    result = optcc.optimize(original, level=level)
    ops = collections.Counter(n.op_type for n in result.model.graph.node)
    if level == 3:
        assert ops["MultiHeadAttention"] == LAYERS, ops
    np.testing.assert_array_equal(_decode(result.model, prompt), reference_tokens)
    # and the step outputs themselves (logits, presents) within the fusion tolerance
    feeds = {"input_ids": prompt, "position_ids": np.tile(np.arange(8), (len(prompt), 1)),
             "attention_mask": np.ones(prompt.shape, np.int64),
             **{f"past_{k}_{i}": np.zeros((len(prompt), HEADS, 0, HIDDEN // HEADS), np.float32)
                for i in range(LAYERS) for k in ("key", "value")}}
    assert_close(onnxruntime_outputs(result.model, feeds), onnxruntime_outputs(original, feeds), rtol=1e-4)


def test_dynamic_int8_quantizes_the_gemm_layers(original, prompt, reference_tokens):
    """GPT-2's Conv1D layers, written as Gemm, are quantized too (not skipped). Unverified:
    verified, this random-init decoder's near-ties keep it from the margin the layer search
    asks on its held-apart prompts, and dynamic INT8 is declined."""
    result = optcc.optimize(original, level=2, int8_dynamic=True, verify=False)
    ops = collections.Counter(n.op_type for n in result.model.graph.node)
    assert ops["Gemm"] == 0 and ops["MatMulInteger"] == 4 * LAYERS + 1, ops
    tokens = _decode(result.model, prompt)
    assert (tokens == reference_tokens).mean() >= 0.9


def test_decoder_runs_with_onnxruntime_optimizations(original, prompt, reference_tokens):
    """The fixture itself: onnxruntime's own optimized session decodes the same tokens."""
    session = ort.InferenceSession(original.SerializeToString(), providers=["CPUExecutionProvider"])
    tokens = greedy_decode(lambda f: session.run(None, f), prompt, STEPS, LAYERS, HEADS, HIDDEN // HEADS)
    np.testing.assert_array_equal(tokens, reference_tokens)
