"""A lossy -O3 run verifies the float passes' result before the lossy step: a proof, and
where it finds none the verifier's samples at the float passes' tolerance. That check does
not try the same proof again (it would find none again): no model is proved twice. The
written model still agrees with onnxruntime on the original over a greedy decode."""

from __future__ import annotations

import collections
import importlib

import numpy as np
import onnxruntime as ort

import optcc
from fixtures.gpt2_decoder import gpt2_decoder, greedy_decode
from optcc.numerics.decode import NEXT_TOKEN_AGREEMENT
from optcc.runtime.shared_weights import content_digest

verify_module = importlib.import_module("optcc.numerics.verify")


def _tokens(model, prompt: np.ndarray, fed: np.ndarray | None = None) -> np.ndarray:  # noqa: ANN001
    """``model``'s greedy tokens over 16 steps on onnxruntime (``fed``: the tokens each step is fed)."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return greedy_decode(lambda feeds: session.run(None, feeds), prompt, 16, layers=2, heads=2, head=16, fed=fed)


def test_the_float_passes_result_is_proved_once_and_the_result_decodes_as_the_original(monkeypatch) -> None:
    proved = collections.Counter()
    prove = verify_module.prove_equivalent

    def counted(original, candidate, **kwargs):  # noqa: ANN001, ANN202
        proved[content_digest(candidate)] += 1
        return prove(original, candidate, **kwargs)

    monkeypatch.setattr(verify_module, "prove_equivalent", counted)
    original = gpt2_decoder()
    result = optcc.optimize(original, level=3, weight_only="int8")
    assert result.precision == {"weights": None}
    assert proved and max(proved.values()) == 1
    prompt = np.random.default_rng(7).integers(0, 96, (2, 5))
    want = _tokens(original, prompt)
    assert (_tokens(result.model, prompt, fed=want) == want).mean() >= NEXT_TOKEN_AGREEMENT
