"""Per-frame probabilities of one class (MarbleNet VAD's score_active [1, T, 1]) are judged
by the user's decision, speech or not at 0.5, frame by frame: one frame crossing 0.5
counts 1/T; value noise that crosses nothing counts 0 (by SQNR against a floor of ~1e-6
it failed any INT8 model)."""

from __future__ import annotations

import numpy as np

from optcc.numerics.task import TaskJudge, choose_metric

T = 40


def _scores(seed: int = 0, samples: int = 3) -> list[np.ndarray]:
    """Frame probabilities held over segments (speech and silence), none near 0.5."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(samples):
        speech = np.repeat(rng.integers(0, 2, T // 8), 8).astype(bool)
        p = np.where(speech, rng.uniform(0.7, 0.99, T), rng.uniform(0.01, 0.3, T))
        out.append(p.reshape(1, T, 1).astype(np.float32))
    return out


def _numpy_flips(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    r = np.concatenate([a.ravel() for a in ref]) > 0.5
    g = np.concatenate([a.ravel() for a in got]) > 0.5
    return float(np.mean(r != g))


def test_frame_probabilities_are_judged_by_their_decision():
    scores = _scores()
    assert choose_metric(scores, "score_active") == "threshold"
    assert choose_metric([s * 3.0 for s in scores], "energy") == "sqnr"  # not probabilities
    assert choose_metric([np.concatenate([s, 1 - s], -1) for s in scores], "probs") != "threshold"


def test_one_frame_across_counts_one_frame_and_value_noise_counts_nothing():
    ref = _scores()
    judge = TaskJudge({"score": ref}, {"score": ref})
    assert judge.plan == {"score": "threshold"}
    noisy = [np.clip(s + np.float32(1e-3) * np.sign(0.5 - s), 0, 1) for s in ref]  # away from 0.5
    row = judge({"score": noisy})["metrics"]["score:threshold"]
    assert row["deviation"] == _numpy_flips(ref, noisy) == 0.0 and row["items"] == 3 * T and row["passed"]
    crossed = [s.copy() for s in ref]
    frame = int(np.argmax(crossed[1][0, :, 0] > 0.5))
    crossed[1][0, frame, 0] = 0.4  # one speech frame now silence
    row = judge({"score": crossed})["metrics"]["score:threshold"]
    assert abs(row["deviation"] - _numpy_flips(ref, crossed)) < 1e-6  # the report keeps 6 significant digits
    assert abs(row["deviation"] - 1 / (3 * T)) < 1e-6


def test_a_frame_float32_flips_itself_under_the_noise_is_excused():
    ref = _scores()
    ref[0][0, 5, 0] = np.float32(0.5000001)  # on the edge: float32 flips it under one draw
    own = [s.copy() for s in ref]
    own[0][0, 5, 0] = np.float32(0.4999999)
    judge = TaskJudge({"score": ref}, {"score": own}, draws=[{"score": ref}])
    got = [s.copy() for s in ref]
    got[0][0, 5, 0] = np.float32(0.49)  # the candidate flips the same frame
    row = judge({"score": got})["metrics"]["score:threshold"]
    assert row["deviation"] == 0.0 and abs(row["deviation_with_float32s_own"] - _numpy_flips(ref, got)) < 1e-6
    got[2][0, 0, 0] = np.float32(1.0) - got[2][0, 0, 0]  # and one float32 never flips
    row = judge({"score": got})["metrics"]["score:threshold"]
    assert abs(row["deviation"] - 1 / (3 * T)) < 1e-6
