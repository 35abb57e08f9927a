"""The noise floor from several perturbation draws: float32's own errors under some draw
are excused, a real degradation is not; every expected value is computed here with numpy
from the outputs, not by the judge."""

from __future__ import annotations

import numpy as np
import pytest

from optcc.numerics import task as tm


def _logits(rows: int, seed: int = 0) -> np.ndarray:
    """``[rows, 4]`` logits, each row confidently one class (top-1 probability far above the second)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(rows, 4)).astype(np.float32)
    logits[np.arange(rows), rng.integers(0, 4, rows)] += 6.0
    return logits


def _flip(logits: np.ndarray, row: int) -> np.ndarray:
    out = logits.copy()
    top = int(out[row].argmax())
    out[row, (top + 1) % 4] = out[row, top] + 0.5
    return out


def _top1_agreement(ref: np.ndarray, got: np.ndarray) -> float:
    return float(np.mean(ref.argmax(-1) == got.argmax(-1)))


def _still(ref: np.ndarray, seed: int) -> np.ndarray:
    """float32 under noise that flips nothing: every logit moved by at most 0.01."""
    return ref + np.float32(0.01) * np.random.default_rng(seed).uniform(-1, 1, ref.shape).astype(np.float32)


def test_one_confident_top1_flipped_in_12_is_rejected_when_no_draw_flips_it() -> None:
    ref = _logits(12)
    got = _flip(ref, 0)
    assert 1.0 - _top1_agreement(ref, got) == pytest.approx(1 / 12)  # numpy's count
    judge = tm.TaskJudge({"logits": [ref]}, {"logits": [_still(ref, 1)]}, draws=[{"logits": [_still(ref, d)]}
                                                                                  for d in (2, 3, 4)])
    assert judge.floor["logits"]["argmax"] == 0.0  # no draw leaves the others' envelope
    verdict = judge({"logits": [got]})
    row = verdict["metrics"]["logits:argmax"]
    assert row["deviation"] == pytest.approx(1 / 12, abs=1e-6) and row["items"] == 12
    assert row["passed"] is False and verdict["passed"] is False


def test_a_top1_float32_flips_itself_under_one_draw_is_excused() -> None:
    ref = _logits(12)
    got = _flip(ref, 0)
    # draw 3 of 4 flips the same sample: float32 itself is not sure of it under one grey level
    draws = [{"logits": [_still(ref, 2)]}, {"logits": [_flip(_still(ref, 3), 0)]}, {"logits": [_still(ref, 4)]}]
    judge = tm.TaskJudge({"logits": [ref]}, {"logits": [_still(ref, 1)]}, draws=draws)
    # leave one out: the flipping draw's error is outside the other three draws' envelope
    assert judge.floor["logits"]["argmax"] == pytest.approx(1 / 12, abs=1e-6)
    verdict = judge({"logits": [got]})
    row = verdict["metrics"]["logits:argmax"]
    assert row["deviation"] == 0.0 and row["deviation_with_float32s_own"] == pytest.approx(1 / 12, abs=1e-6)
    assert verdict["passed"] is True
    # flips on samples no draw flips are real degradations: 1 of 12 beyond the envelope
    # is within 1.5 x the floor (1/12, a draw's own rate), 2 are not
    twice = _flip(_flip(ref, 0), 1)
    assert twice[1].argmax() != ref[1].argmax() and all(d["logits"][0][1].argmax() == ref[1].argmax() for d in draws)
    assert judge({"logits": [twice]})["passed"] is True
    assert judge({"logits": [_flip(twice, 2)]})["passed"] is False


def test_one_draw_keeps_the_plain_judgement() -> None:
    ref = _logits(12)
    draw = _flip(_still(ref, 3), 0)
    judge = tm.TaskJudge({"logits": [ref]}, {"logits": [draw]})
    assert judge.floor["logits"]["argmax"] == pytest.approx(1.0 - _top1_agreement(ref, draw))
    verdict = judge({"logits": [_flip(ref, 0)]})
    assert "deviation_with_float32s_own" not in verdict["metrics"]["logits:argmax"]


def _yolo(scores: list[float], anchors: int = 30) -> np.ndarray:
    """``[1, 4 + 1, anchors]``: anchor i scored ``scores[i]`` (the rest 0.01), boxes 100 pixels apart."""
    pred = np.full((1, 5, anchors), 0.01, np.float32)
    pred[0, 0] = 100.0 * np.arange(anchors) + 50.0
    pred[0, 1] = 50.0
    pred[0, 2:4] = 30.0
    pred[0, 4, :len(scores)] = scores
    return pred


def test_a_box_found_above_the_deployment_score_counts_though_a_draw_finds_it_lower() -> None:
    kept = [0.9] * 12
    ref = _yolo([*kept, 0.11])  # anchor 12: below the deployment score (0.25) in float32
    got = _yolo([*kept, 0.46])  # the INT8 model reports it
    moved = _yolo([*kept, 0.12])
    risen = _yolo([*kept, 0.2])  # one draw lifts it, still below 0.25: no user sees it from float32
    # numpy's count: 12 + 13 boxes at 0.25, one of them unmatched
    assert tm.deviations("boxes", [ref], [got])["box_f1"] == pytest.approx(1 / 25)
    judge = tm.TaskJudge({"output0": [ref]}, {"output0": [moved]},
                         draws=[{"output0": [moved]}, {"output0": [risen]}, {"output0": [moved]}])
    assert not judge.excuses() and judge.wants_draws()  # boxes: a mean floor over the draws, nothing excused
    verdict = judge({"output0": [got]})
    row = verdict["metrics"]["output0:box_f1"]
    assert row["deviation"] == pytest.approx(1 / 25) and row["floor"] == 0.0 and row["items"] == 25
    assert "deviation_with_float32s_own" not in row and verdict["passed"] is False
    # a draw that lifts it above 0.25 puts float32's own crossing in the floor: 1 of 4
    # draws makes the mean 1/100, the allowance 1.5/100, and the candidate's 1/25 exceeds it
    crossed = _yolo([*kept, 0.3])
    judge = tm.TaskJudge({"output0": [ref]}, {"output0": [moved]},
                         draws=[{"output0": [moved]}, {"output0": [crossed]}, {"output0": [moved]}])
    assert judge.floor["output0"]["box_f1"] == pytest.approx(1 / 25 / 4)
    assert judge({"output0": [got]})["passed"] is False
    # every draw crossing: the floor is float32's own rate, and the candidate is within it
    judge = tm.TaskJudge({"output0": [ref]}, {"output0": [crossed]}, draws=[{"output0": [crossed]}] * 3)
    assert judge.floor["output0"]["box_f1"] == pytest.approx(1 / 25) and judge({"output0": [got]})["passed"] is True


def _page(boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    """A ``[1, 1, 64, 96]`` probability map with each ``(y0, y1, x0, x1)`` filled with 0.9."""
    m = np.zeros((1, 1, 64, 96), np.float32)
    for y0, y1, x0, x1 in boxes:
        m[0, 0, y0:y1, x0:x1] = 0.9
    return m


def test_a_detection_maps_boxes_are_judged_plain_against_the_mean_floor() -> None:
    lines = [(4 + 5 * i, 7 + 5 * i, 4, 40) for i in range(11)]  # 11 lines of text, 3 pixels high
    fragile = (4, 7, 50, 90)  # a 12th line right of the first
    ref = _page([*lines, fragile])
    merged = _page([*lines, (4, 7, 4, 90)])  # the fragile line merges with the first: 2 boxes lost, 1 found
    got = _page(lines)  # the candidate loses the fragile line
    # numpy's counts: F1 = 2 TP / (n_ref + n_got); the merging draw 2 * 10 / (12 + 11), the candidate 2 * 11 / (12 + 11)
    judge = tm.TaskJudge({"map": [ref]}, {"map": [ref]}, draws=[{"map": [ref]}, {"map": [merged]}])
    assert not judge.excuses()
    assert judge.floor["map"]["box_f1"] == pytest.approx((1 - 20 / 23) / 3)  # the mean over 3 draws
    row = judge({"map": [got]})["metrics"]["map:box_f1"]
    assert row["deviation"] == pytest.approx(1 - 22 / 23) and "deviation_with_float32s_own" not in row
    assert row["passed"] is True  # 1/23 <= 1.5 x 1/23


def test_a_line_float32_decodes_differently_under_some_draw_is_excused() -> None:
    eye = np.eye(5, dtype=np.float32)
    lines = [[1, 0, 2, 0, 3, 0], [2, 0, 2, 0, 4, 0], [3, 0, 4, 0, 1, 0]] * 4  # 12 lines
    ref = eye[np.array(lines)]
    moved = ref.copy()
    moved[0, 0] = eye[4]  # one draw reads line 0 differently
    got = moved.copy()
    assert tm.deviations("ctc", [ref], [got])["ctc_exact"] == pytest.approx(1 / 12)
    judge = tm.TaskJudge({"p": [ref]}, {"p": [ref]}, draws=[{"p": [moved]}])
    assert judge({"p": [got]})["metrics"]["p:ctc_exact"]["deviation"] == 0.0
    other = ref.copy()
    other[5, 2] = eye[1]  # line 5, which no draw changes
    assert judge({"p": [other]})["metrics"]["p:ctc_exact"]["deviation"] == pytest.approx(1 / 12)


def test_few_lines_can_reject_a_decode_float32_never_changes_but_not_accept_alone() -> None:
    """3 lines (fewer than MIN_ITEMS): one decoded differently where no float32 draw
    changes any line fails the judge, although SQNR alone would accept (a 0 dB target
    here); a line a draw itself changes is excused, and the output is then judged by SQNR."""
    eye = np.eye(5, dtype=np.float32)
    ref = eye[np.array([[1, 0, 2, 0, 3, 0], [2, 0, 2, 0, 4, 0], [3, 0, 4, 0, 1, 0]])]
    noisy = [ref * np.float32(0.9) + np.float32(0.02) * d for d in (1, 2, 3)]  # the same decode, some noise
    line_2 = noisy[0].copy()
    line_2[2, 0] = eye[2] * np.float32(0.9) + np.float32(0.02)  # line 2 read differently
    assert tm.ctc_greedy(line_2[2:]) != tm.ctc_greedy(ref[2:])  # the test's own decode
    judge = tm.TaskJudge({"p": [ref]}, {"p": [noisy[0]]}, draws=[{"p": [n]} for n in noisy[1:]], min_sqnr_db=0.0)
    assert judge.floor["p"]["ctc_exact"] == 0.0
    verdict = judge({"p": [line_2]})
    row = verdict["metrics"]["p:ctc_exact"]
    assert row["items"] == 3 and row["deviation"] == pytest.approx(1 / 3, abs=1e-5) and row["passed"] is False
    assert verdict["metrics"]["p:sqnr"]["passed"] is True and verdict["passed"] is False
    # a draw that reads line 2 that way itself: excused, and the SQNR within the floor
    excusing = tm.TaskJudge({"p": [ref]}, {"p": [noisy[0]]}, draws=[{"p": [line_2]}, {"p": [noisy[2]]}],
                            min_sqnr_db=0.0)
    verdict = excusing({"p": [line_2]})
    assert verdict["metrics"]["p:ctc_exact"]["deviation"] == 0.0 and verdict["passed"] is True
    # one draw only: nothing is excused, and few lines are not judged (SQNR decides)
    single = tm.TaskJudge({"p": [ref]}, {"p": [noisy[0]]}, min_sqnr_db=0.0)({"p": [line_2]})
    assert single["metrics"]["p:ctc_exact"]["judged"] is False and single["passed"] is True


def test_other_components_take_the_mean_floor_over_draws() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(1, 8, 4, 4)).astype(np.float32)  # judged by SQNR
    draws = [ref + np.float32(s) * rng.normal(size=ref.shape).astype(np.float32) for s in (0.01, 0.02, 0.03)]
    noise = [float(np.sum((ref.astype(np.float64) - d) ** 2) / np.sum(ref.astype(np.float64) ** 2)) for d in draws]
    judge = tm.TaskJudge({"y": [ref]}, {"y": [draws[0]]}, draws=[{"y": [d]} for d in draws[1:]])
    assert judge.floor["y"]["sqnr"] == pytest.approx(np.mean(noise), rel=1e-5)


def test_perturbation_draws_are_independent_grey_levels() -> None:
    rng = np.random.default_rng(0)
    samples = [{"image": (rng.integers(0, 256, (1, 3, 16, 16)) / 255.0).astype(np.float32)} for _ in range(2)]
    draws, how = tm.perturbation_draws(samples, 3)
    assert len(draws) == 3 and all(len(d) == 2 for d in draws) and set(how) == {"image"}
    for i, feeds in enumerate(samples):
        image = feeds["image"]
        span = image.max(axis=(0, 2, 3), keepdims=True) - image.min(axis=(0, 2, 3), keepdims=True)
        assert np.array_equal(draws[0][i]["image"], tm.perturb(feeds, seed=i)[0]["image"])  # draw 0: the verifier's
        signs = [np.sign(d[i]["image"] - image) for d in draws]
        for d in draws:
            assert np.allclose(np.abs(d[i]["image"] - image), span / 255.0, atol=1e-7)
        assert not np.array_equal(signs[0], signs[1]) and not np.array_equal(signs[1], signs[2])
    again, _ = tm.perturbation_draws(samples, 3)
    assert all(np.array_equal(a[i]["image"], b[i]["image"]) for a, b in zip(draws, again) for i in range(2))


def test_a_judge_of_some_samples_keeps_its_draws() -> None:
    refs = [_logits(12, seed) for seed in range(3)]
    # draw 1 flips sample 2's first row; nothing else flips
    draws = [[_flip(_still(r, 10 * d + i), 0) if d == 1 and i == 2 else _still(r, 10 * d + i)
              for i, r in enumerate(refs)] for d in range(3)]
    judge = tm.TaskJudge({"logits": refs}, {"logits": draws[0]}, draws=[{"logits": d} for d in draws[1:]])
    subset = judge.select([0, 2])
    direct = tm.TaskJudge({"logits": [refs[0], refs[2]]}, {"logits": [draws[0][0], draws[0][2]]},
                          draws=[{"logits": [d[0], d[2]]} for d in draws[1:]])
    assert subset.draw_count == direct.draw_count == 3
    assert subset.floor == direct.floor and subset.floor["logits"]["argmax"] == pytest.approx(1 / 24)
    got = {"logits": [refs[0], _flip(refs[2], 0)]}
    assert subset(got) == direct(got) and subset(got)["metrics"]["logits:argmax"]["deviation"] == 0.0


def _tiny_classifier_samples(n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"image": (rng.integers(0, 256, (1, 3, 32, 32)) / 255.0).astype(np.float32)} for _ in range(n)]


def test_the_driver_and_the_verifier_measure_an_argmax_floor_on_several_draws() -> None:
    from pathlib import Path

    import optcc
    from optcc.quant.driver import quantize_int8

    tinycnn = Path(__file__).resolve().parent.parent / "fixtures" / "tinycnn.onnx"
    data = _tiny_classifier_samples(12)
    _, stats = quantize_int8(str(tinycnn), data, require_speedup=False)
    assert stats["acceptance"]["floor_draws"] == tm.FLOOR_DRAWS
    _, plain = quantize_int8(str(tinycnn), data, require_speedup=False, metric="sqnr")
    assert plain["acceptance"]["floor_draws"] == 1  # an SQNR floor would only be averaged
    result = optcc.optimize(str(tinycnn), int8_calibration=data, int8_options={"require_speedup": False})
    stats = next(r.stats for r in result.report.passes if r.name == "quantize-int8-calibrated")
    assert stats["acceptance"]["reference"].startswith("the verifier's")  # one judge, its draws shared
    assert stats["acceptance"]["floor_draws"] == tm.FLOOR_DRAWS
