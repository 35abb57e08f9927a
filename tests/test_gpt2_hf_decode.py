"""transformers' GPT2LMHeadModel (random seeded weights) exported by torch with a KV cache:
the float32 export decodes the same 32 greedy tokens as the torch model, and optcc's -O2 and
-O3 models the same as the float32 export run by onnxruntime with optimizations off.
Needs torch and transformers (the optional extra ``transformers``); skipped without them."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import optcc
from fixtures.gpt2_decoder import greedy_decode
from reference import onnxruntime_outputs

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

from fixtures.gpt2_hf import CONFIG, export, torch_greedy  # noqa: E402

STEPS = 32
LAYERS, HEADS = CONFIG["n_layer"], CONFIG["n_head"]
HEAD = CONFIG["n_embd"] // HEADS


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> onnx.ModelProto:
    return onnx.load(export(tmp_path_factory.mktemp("gpt2") / "gpt2.onnx"))


@pytest.fixture(scope="module")
def prompt() -> np.ndarray:
    return np.random.default_rng(1).integers(0, CONFIG["vocab_size"], (4, 8))


def _decode(model: onnx.ModelProto, prompt: np.ndarray) -> np.ndarray:
    return greedy_decode(lambda feeds: onnxruntime_outputs(model, feeds), prompt, STEPS, LAYERS, HEADS, HEAD)


@pytest.fixture(scope="module")
def reference_tokens(original, prompt) -> np.ndarray:
    tokens = _decode(original, prompt)
    assert all(len(set(row)) >= 5 for row in tokens.tolist()), tokens  # a decode worth agreeing on
    return tokens


def test_export_decodes_as_the_torch_model(prompt, reference_tokens):
    np.testing.assert_array_equal(torch_greedy(prompt, STEPS), reference_tokens)


@pytest.mark.parametrize("level", [2, 3])
def test_optimized_export_agrees_on_every_greedy_token(original, prompt, reference_tokens, level):
    result = optcc.optimize(original, level=level)
    np.testing.assert_array_equal(_decode(result.model, prompt), reference_tokens)
