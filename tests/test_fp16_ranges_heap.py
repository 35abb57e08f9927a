"""The float16 conversion's range observation of an external-data decoder returns a sample's
freed values to the system instead of leaving them in the C heap, where they added to every
later step's peak (on a 2.3 GB GPT-2 about 0.7 GB, held from the ranges to the end of the
run); and what it observed is what onnxruntime computes on the original."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import optcc
from fixtures.gpt2_decoder import gpt2_decoder
from optcc import fp16

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")

LAYERS, HIDDEN, HEADS, VOCAB = 4, 256, 4, 4096
BATCH, SEQ = 4, 256  # one sample's values: about 170 MB, each value under glibc's 32 MiB mmap ceiling


def _anonymous_bytes() -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def _feeds(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    head = HIDDEN // HEADS
    feeds = {"input_ids": rng.integers(0, VOCAB, size=(BATCH, SEQ), dtype=np.int64),
             "position_ids": np.tile(np.arange(SEQ, dtype=np.int64), (BATCH, 1)),
             "attention_mask": np.ones((BATCH, SEQ), np.int64)}
    feeds.update({f"past_{kind}_{i}": np.zeros((BATCH, HEADS, 0, head), np.float32)
                  for i in range(LAYERS) for kind in ("key", "value")})
    return feeds


def test_observed_values_go_back_to_the_system(tmp_path) -> None:
    path = tmp_path / "decoder.onnx"
    onnx.save_model(gpt2_decoder(layers=LAYERS, hidden=HIDDEN, heads=HEADS, vocab=VOCAB, positions=SEQ), path,
                    save_as_external_data=True, location="decoder.onnx.data", size_threshold=1024)
    model = optcc.ir.load(str(path))
    assert optcc.ir.uses_external_data(model)
    samples = [_feeds(1), _feeds(2)]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    before = _anonymous_bytes()
    seen = fp16.ranges.observe(model, samples, scratch)
    grown = _anonymous_bytes() - before
    one_sample = sum(seen.nbytes.values())
    assert one_sample > 128 << 20
    # what stays is the observation (ranges, every sample's graph outputs), not a sample's values
    kept = sum(a.nbytes for outputs in seen.outputs for a in outputs)
    assert grown < kept + one_sample // 4, (grown >> 20, kept >> 20, one_sample >> 20)

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the original's own kernels
    expected = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for sample, outputs in zip(samples, seen.outputs):
        logits = expected.run(["logits"], sample)[0]
        # float32 rounding apart (the probe's extra outputs may change onnxruntime's threading)
        np.testing.assert_allclose(outputs[0], logits, rtol=0, atol=1e-5 * float(np.abs(logits).max()))
    peak = max(float(np.abs(expected.run(["logits"], s)[0]).max()) for s in samples)
    assert seen.ranges["logits"].max_abs == pytest.approx(peak, rel=1e-5)
