"""``greedy_agreement``: free-running and forced greedy agreement of a decoder with another,
checked against independent decodes: fixtures.gpt2_decoder.greedy_decode (free-running, KV
cache fed back) and one full-sequence run without a cache (forced: every position's argmax
given the reference's tokens)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import optcc
from fixtures.gpt2_decoder import gpt2_decoder, greedy_decode
from optcc.numerics.decode import decode_plan, greedy_agreement
from reference import onnxruntime_outputs

LAYERS, HEADS, HIDDEN, STEPS, PROMPT = 2, 2, 32, 12, 6


def _perturbed(model: onnx.ModelProto, scale: float) -> onnx.ModelProto:
    """A copy whose Gemm weights carry relative noise ``scale`` (a lossy candidate)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    gemm_weights = {n.input[1] for n in out.graph.node if n.op_type == "Gemm"}
    rng = np.random.default_rng(5)
    for init in out.graph.initializer:
        if init.name in gemm_weights:
            w = numpy_helper.to_array(init)
            noisy = w + scale * np.abs(w).mean() * rng.standard_normal(w.shape).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(noisy.astype(np.float32), init.name))
    return out


def _first(prompt: np.ndarray) -> dict[str, np.ndarray]:
    batch, length = prompt.shape
    return {"input_ids": prompt.astype(np.int64), "position_ids": np.tile(np.arange(length), (batch, 1)),
            "attention_mask": np.ones((batch, length), np.int64),
            **{f"past_{k}_{i}": np.zeros((batch, HEADS, 0, HIDDEN // HEADS), np.float32)
               for i in range(LAYERS) for k in ("key", "value")}}


def _forced_argmax(model: onnx.ModelProto, prompt: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Next-token argmax at every step given the reference's tokens: one run over the whole
    sequence with an empty cache."""
    sequence = np.concatenate([prompt, tokens[:, :-1]], axis=1)
    logits = onnxruntime_outputs(model, _first(sequence))[0]
    return logits[:, PROMPT - 1:].argmax(-1)


@pytest.fixture(scope="module")
def original() -> onnx.ModelProto:
    return gpt2_decoder(layers=LAYERS, heads=HEADS, hidden=HIDDEN)


@pytest.fixture(scope="module")
def prompt() -> np.ndarray:
    return np.random.default_rng(2).integers(0, 96, (6, PROMPT))


def _agreement(original, candidate, prompt, margin_floor=0.0):
    names = [o.name for o in original.graph.output]
    plan = decode_plan(optcc.ir.load(original))
    assert plan is not None
    return greedy_agreement(lambda f: onnxruntime_outputs(original, dict(f)),
                            lambda f: onnxruntime_outputs(candidate, dict(f)),
                            names, plan, _first(prompt), steps=STEPS, margin_floor=margin_floor)


def test_a_model_agrees_with_itself(original, prompt):
    got = _agreement(original, original, prompt)
    assert (got.free, got.forced, got.decisive) == (1.0, 1.0, 1.0)
    assert got.first_divergence == [STEPS] * len(prompt)
    assert got.logit_sqnr_db == float("inf")


def test_free_and_forced_agreement_match_independent_decodes(original, prompt):
    candidate = _perturbed(original, 0.3)
    got = _agreement(original, candidate, prompt)
    decode = [greedy_decode(lambda f, m=m: onnxruntime_outputs(m, f), prompt, STEPS, LAYERS, HEADS, HIDDEN // HEADS)
              for m in (original, candidate)]
    want_free = decode[0] == decode[1]
    assert 0 < want_free.mean() < 1  # the noise flips some tokens, not all
    assert got.free == pytest.approx(want_free.mean())
    assert got.first_divergence == [int(np.argmax(~row)) if (~row).any() else STEPS for row in want_free]
    forced = _forced_argmax(candidate, prompt, decode[0])
    np.testing.assert_array_equal(_forced_argmax(original, prompt, decode[0]), decode[0])
    assert got.forced == pytest.approx((forced == decode[0]).mean())
    assert got.forced >= got.free  # forced steps never inherit an earlier flip
    assert got.decisive == pytest.approx(got.forced)  # margin floor 0: every step is decisive


def test_decisive_steps_are_those_above_the_margin_floor(original, prompt):
    candidate = _perturbed(original, 0.3)
    sequence = greedy_decode(lambda f: onnxruntime_outputs(original, f), prompt, STEPS, LAYERS, HEADS, HIDDEN // HEADS)
    full = np.concatenate([prompt, sequence[:, :-1]], axis=1)
    logits = onnxruntime_outputs(original, _first(full))[0][:, PROMPT - 1:].astype(np.float64)
    top = np.sort(logits, -1)
    margins = top[..., -1] - top[..., -2]
    floor = float(np.median(margins))
    got = _agreement(original, candidate, prompt, margin_floor=floor)
    keep = margins > floor
    forced = _forced_argmax(candidate, prompt, sequence)
    assert got.decisive_steps == int(keep.sum())
    assert got.decisive == pytest.approx((forced == sequence)[keep].mean())
    none = _agreement(original, candidate, prompt, margin_floor=float("inf"))
    assert (none.decisive, none.decisive_steps) == (None, 0)


def test_free_running_from_the_reference_steps_alone(original, prompt):
    """What a verifier holds: the original's step outputs; the candidate decodes on its own."""
    from optcc.numerics.decode import free_running, run_decode

    names = [o.name for o in original.graph.output]
    plan = decode_plan(optcc.ir.load(original))
    candidate = _perturbed(original, 0.3)
    reference, _ = run_decode(lambda f: onnxruntime_outputs(original, dict(f)), names, plan, _first(prompt), steps=STEPS)
    share, first = free_running(lambda f: onnxruntime_outputs(candidate, dict(f)), names, plan, _first(prompt), reference)
    decode = [greedy_decode(lambda f, m=m: onnxruntime_outputs(m, f), prompt, STEPS, LAYERS, HEADS, HIDDEN // HEADS)
              for m in (original, candidate)]
    same = decode[0] == decode[1]
    assert share == pytest.approx(same.mean())
    assert first == [int(np.argmax(~row)) if (~row).any() else STEPS for row in same]
