"""A search's check of a KV-cache decoder (``Verifier.held_apart``) whose next tokens judge
every output decides by them alone: it runs no short decode of the original or of the
candidate (no float32 outputs are made or held), and its verdict and reason are those of
the same check with the short decode compared; the verifier itself still compares the
short decode. The verdict agrees with the candidate's next tokens against a numpy float64
decode of the original on other prompts."""

from __future__ import annotations

import numpy as np

import optcc
from fixtures.attention_decoder import chain_decoder, chain_tokens, forced_agreement
from optcc.numerics.decode import NEXT_TOKEN_SEARCH_AGREEMENT, NEXT_TOKEN_STEPS
from optcc.numerics.verify import Verifier
from optcc.passes.quantize_dynamic import QuantizeDynamicPass

VOCAB, WIDTH, PROMPT = 8, 16, 4


def _weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    shapes = {"E": (VOCAB, WIDTH), "Wq": (WIDTH, WIDTH), "Wk": (WIDTH, WIDTH), "Wv": (WIDTH, WIDTH),
              "Wz": (WIDTH, WIDTH), "U": (WIDTH, VOCAB)}
    weights = {name: (rng.normal(size=shape) * (4 if name == "U" else 0.5)).astype(np.float32)
               for name, shape in shapes.items()}
    return {**weights, "D": np.ones(WIDTH, np.float32)}


def test_a_search_check_of_a_decoder_runs_no_short_decode() -> None:
    weights = _weights()
    original = chain_decoder(weights, ["z"])
    candidate = QuantizeDynamicPass()(optcc.ir.load(original)).model
    verifier = Verifier(original)
    apart = verifier.held_apart()
    searched = apart.check(candidate, "int8")
    assert searched.next_token is not None and searched.outputs == []
    assert apart._float32 is None  # the original's short decode never ran
    whole = Verifier(original).held_apart()
    whole._tokens_alone = False  # the same check with the short decode run and compared
    compared = whole.check(candidate, "int8")
    assert compared.outputs and whole._float32 is not None
    assert (searched.status, searched.reason, searched.next_token) == (compared.status, compared.reason,
                                                                       compared.next_token)
    verified = verifier.check(candidate, "int8")  # the verification's own check still compares the short decode
    assert verified.outputs and verified.next_token is not None
    prompt = np.random.default_rng(11).integers(0, VOCAB, (8, PROMPT))
    agreement = forced_agreement(optcc.ir.serialize(candidate), prompt,
                                 chain_tokens(weights, ["z"], prompt, NEXT_TOKEN_STEPS))
    assert (agreement >= NEXT_TOKEN_SEARCH_AGREEMENT) == (searched.status == "passed")
