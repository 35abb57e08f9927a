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
