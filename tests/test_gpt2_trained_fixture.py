"""fixtures/gpt2_trained: the corpus and the held-out prompts (no torch needed for these)."""

from __future__ import annotations

import numpy as np

from fixtures import gpt2_trained


def test_prompts_are_held_out_byte_windows_of_the_corpus() -> None:
    data = np.frombuffer(gpt2_trained.corpus(), np.uint8)
    assert len(data) > 100_000  # enough standard-library text on any supported Python
    held_out = data[len(data) * 9 // 10:].tobytes()
    prompts = gpt2_trained.prompts(6, 16)
    assert prompts.shape == (6, 16) and prompts.dtype == np.int64
    assert all(bytes(row.astype(np.uint8)) in held_out for row in prompts)
    np.testing.assert_array_equal(prompts, gpt2_trained.prompts(6, 16))  # deterministic
    assert prompts.max() < gpt2_trained.CONFIG["vocab_size"]
