"""Per-frame class scores ``[N, T, C]`` are read as a CTC recognizer's only when they look
like one: peaked posteriors, symbols as short spikes between blanks. A framewise
classifier (a VAD's states per frame) holds a decision over a segment's frames and is judged
by its decisions per frame (``argmax`` on the confident frames), which is what its user
reads: a CTC decode would merge a segment into one symbol and miss a shifted boundary."""

from __future__ import annotations

import numpy as np
import pytest

from optcc.numerics import task as tm


def _posteriors(path: list[int], classes: int, peak: float = 6.0, seed: int = 0) -> np.ndarray:
    """``[1, T, C]`` softmax rows whose top class follows ``path`` (logit ``peak`` above noise)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=0.3, size=(len(path), classes))
    logits[np.arange(len(path)), path] += peak
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True))[None].astype(np.float32)


CTC_PATH = [0, 0, 12, 0, 0, 40, 0, 7, 7, 0, 0, 3, 0, 0, 0, 21, 0, 0, 9, 0] * 2  # spikes between blanks
VAD_PATH = [0] * 8 + [17] * 9 + [23] * 7 + [0] * 6 + [17] * 10  # a state held over a segment's frames


def test_ctc_spikes_and_framewise_segments_are_told_apart():
    assert tm.choose_metric([_posteriors(CTC_PATH, 50, seed=s) for s in range(3)], "softmax_0") == "ctc"
    assert tm.choose_metric([_posteriors(VAD_PATH, 248, seed=s) for s in range(3)], "logits") == "argmax"
    # the same spikes from a soft posterior (few steps confident, as a framewise model over many
    # states is on ambiguous frames) are no recognizer's either
    soft = [_posteriors(CTC_PATH, 50, peak=1.0, seed=s) for s in range(3)]
    confident = np.concatenate([np.sort(p[0], -1)[:, -1] - np.sort(p[0], -1)[:, -2] >= 0.1 for p in soft])
    assert confident.mean() < 0.75 and tm.choose_metric(soft, "softmax_0") == "argmax"
    # time-major [T, 1, C] logits likewise
    assert tm.choose_metric(np.log(_posteriors(CTC_PATH, 50)).transpose(1, 0, 2), "logits") == "ctc"
    assert tm.choose_metric(np.log(_posteriors(VAD_PATH, 248)).transpose(1, 0, 2), "logits") == "argmax"


def test_a_framewise_output_is_judged_by_its_decision_per_frame():
    """A segment boundary shifted by two frames: the CTC decode is unchanged (the segment is
    one symbol either way), the per-frame decisions differ on those two frames."""
    ref = _posteriors(VAD_PATH, 248)
    shifted_path = list(VAD_PATH)
    shifted_path[17:19] = [17, 17]  # the second state starts two frames late
    got = _posteriors(shifted_path, 248)
    assert tm.ctc_greedy(ref) == tm.ctc_greedy(got)
    judge = tm.TaskJudge({"logits": [ref]}, {"logits": [ref]})
    row = judge({"logits": [got]})["metrics"]["logits:argmax"]
    top = np.sort(ref[0], -1)
    confident = top[:, -1] - top[:, -2] >= 0.1
    want = 1.0 - np.mean((ref[0].argmax(-1) == got[0].argmax(-1))[confident])
    assert row["items"] == int(confident.sum()) == len(VAD_PATH) and row["deviation"] == pytest.approx(want)
    assert want == pytest.approx(2 / len(VAD_PATH)) and row["passed"] is False


def test_an_autoregressive_decoders_tokens_are_not_read_as_ctc():
    """A table-structure decoder emits tokens up to its end token, then padding: a cell
    token may repeat back to back (three cells in a row), which a CTC decode would merge.
    Its padding never comes before a token, while a CTC recognizer's blank does, so its
    steps are judged one by one (argmax), and three cells against two is a difference."""
    start, row, cell, row_end, end, pad = 1, 2, 28, 4, 29, 0
    tokens = [start, row, cell, cell, cell, row_end, row, cell, cell, cell, row_end, end]
    path = tokens + [pad] * 28
    samples = [_posteriors(path, 30, seed=s) for s in range(3)]
    assert tm.choose_metric(samples, "softmax_1.tmp_0") == "argmax"
    fewer = tokens[:3] + tokens[4:] + [pad] * 29  # one cell fewer in the first row
    assert tm.ctc_greedy(samples[0]) == tm.ctc_greedy(_posteriors(fewer, 30))  # CTC cannot tell them apart
    judge = tm.TaskJudge({"softmax_1.tmp_0": samples[:1]}, {"softmax_1.tmp_0": samples[:1]})
    assert judge({"softmax_1.tmp_0": [_posteriors(fewer, 30)]})["metrics"]["softmax_1.tmp_0:argmax"]["passed"] is False
    # a CTC line whose symbols start at its first step still has blanks between them
    assert tm.choose_metric([_posteriors([12, 0, 40, 0, 0, 7, 0] * 4, 50, seed=s) for s in range(3)], "p") == "ctc"
