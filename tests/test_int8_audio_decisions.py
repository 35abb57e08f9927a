"""A voice activity detector's user reads its speech probability per chunk above 0.5 or
not, and feeds it audio decoded from 16-bit PCM. So an ``[N, 1]`` (or a few ``[N]``)
probability is judged by the chunks whose decision flips (``threshold``), and a float
waveform in [-1, 1] is perturbed by one PCM step (1/32768) for the noise floor, not by
one ulp. The reference is onnxruntime's float32 run of the original on fresh clips."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import optcc
from optcc.numerics import task as tm

SAMPLES, CHUNKS, HIDDEN = 1024, 8, 16
PCM_STEP = 1.0 / 32768.0
ALLOWED_FLIPS = 1.5 * 0.01  # DEFAULT_MARGIN times MIN_DEVIATION: float32 flips no chunk under one PCM step


def _clips(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    """``count`` samples of ``CHUNKS`` chunks of a tone at a random pitch and loudness over
    faint noise, in [-1, 1]."""
    rng = np.random.default_rng(seed)
    t = np.arange(SAMPLES) / 16000
    feeds = []
    for _ in range(count):
        tone = rng.uniform(0.05, 0.5, (CHUNKS, 1)) * np.sin(2 * np.pi * rng.uniform(90, 400, (CHUNKS, 1)) * t)
        wave = np.clip(tone + rng.normal(0, 0.01, (CHUNKS, SAMPLES)), -1, 1)
        feeds.append({"audio": (np.round(wave * 32768) / 32768).astype(np.float32)})  # decoded 16-bit PCM
    return feeds


def _probabilities(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, f)[0].ravel() for f in feeds]).astype(np.float64)


def _vad(outlier: float) -> onnx.ModelProto:
    """audio [N, 1024] -> MatMul -> Relu -> MatMul -> + bias -> Sigmoid: speech [N, 1].
    Hidden unit 0 is ``outlier`` times larger than the others and weighs as much less in the
    logit: a per-tensor INT8 scale sized for it rounds the units that decide coarsely. The
    bias puts the median calibration chunk at 0.5, so about half the chunks are speech."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((SAMPLES, HIDDEN)) / 8).astype(np.float32)
    w2 = (rng.standard_normal((HIDDEN, 1)) * 0.2).astype(np.float32)
    w1[:, 0] *= outlier
    w2[0] /= outlier

    def build(bias: float) -> onnx.ModelProto:
        nodes = [helper.make_node("MatMul", ["audio", "w1"], ["h0"]), helper.make_node("Relu", ["h0"], ["h"]),
                 helper.make_node("MatMul", ["h", "w2"], ["l0"]), helper.make_node("Add", ["l0", "b"], ["l"]),
                 helper.make_node("Sigmoid", ["l"], ["speech"])]
        graph = helper.make_graph(
            nodes, "vad", [helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["N", SAMPLES])],
            [helper.make_tensor_value_info("speech", TensorProto.FLOAT, ["N", 1])],
            [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (w2, "w2"), (np.array([bias], np.float32), "b"))])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    median = float(np.median(_probabilities(build(0.0), _clips(32, 1))))
    return build(-float(np.log(median / (1 - median))))


def _int8(model: onnx.ModelProto, **options: object) -> tuple[onnx.ModelProto, dict]:
    try:
        result = optcc.optimize(model, int8_calibration=_clips(32, 1),
                                int8_options={"require_speedup": False, **options})
    except optcc.PrecisionNotAppliedError as declined:
        result = declined.result  # type: ignore[attr-defined]
    (int8,) = [p for p in result.report.passes if "acceptance" in p.stats]
    return result.model, int8.stats["acceptance"]


def _quantized(model: onnx.ModelProto) -> bool:
    return any(n.op_type == "QuantizeLinear" for n in model.graph.node)


def test_a_probability_per_item_is_judged_by_its_decisions() -> None:
    rng = np.random.default_rng(0)
    per_chunk = [1 / (1 + np.exp(-rng.standard_normal((4, 1)))) for _ in range(3)]
    assert tm.metric_choice(per_chunk, "output") == \
        ("threshold", "[N, 1] or a few [N] in [0, 1]: one probability per item, decided at 0.5")
    assert tm.choose_metric([p.ravel() for p in per_chunk]) == "threshold"  # [4]: Silero v6's speech_probs
    activations = [1 / (1 + np.exp(-rng.standard_normal(100))) for _ in range(3)]  # a beat tracker's per frame
    assert tm.choose_metric(activations) == "sqnr"
    keys = [np.exp(v) / np.exp(v).sum() for v in rng.standard_normal((3, 12))]  # one softmax row: classes
    assert tm.choose_metric(keys) == "sqnr"
    assert tm.choose_metric([np.array([[1.5], [-0.2]], np.float32)]) == "sqnr"  # not probabilities
    # spread below 0.5: a sigmoid-bounded measurement, no decision; named so, a measurement too
    assert tm.choose_metric([0.02 + 0.45 * p for p in per_chunk]) == "sqnr"
    assert tm.choose_metric(per_chunk, "depth") == "sqnr"


def test_a_float_waveform_moves_by_one_pcm_step() -> None:
    rng = np.random.default_rng(3)
    signal = (rng.integers(-29491, 29491, (2, SAMPLES)) / 32768).astype(np.float32)  # 16-bit PCM read as float
    audio = signal.copy()
    audio[0, :2] = [1.0, -1.0]  # full scale: held within [-1, 1]
    column = signal[:, :, None]
    short = signal[:, :256]  # a feature vector's length, not a window of audio
    loud = signal * 4 + np.float32(0.1)  # not within [-1, 1] (nor whole numbers): no PCM recording read as float
    off_grid = signal + np.float32(PCM_STEP / 3)  # within [-1, 1] but no PCM step's multiple: an embedding, say
    moved, how = tm.perturb({"audio": audio, "column": column, "short": short, "loud": loud, "state": signal,
                             "off_grid": off_grid}, not_images={"state"})
    for name, original in (("audio", audio), ("column", column)):
        step = np.abs(moved[name].astype(np.float64) - original.astype(np.float64))
        assert np.allclose(step[np.abs(original) < 1], PCM_STEP, rtol=1e-3) and np.all(np.abs(moved[name]) <= 1)
        assert np.all(step[np.abs(original) == 1] <= PCM_STEP * (1 + 1e-3))
        assert how[name] == "+-1/32768 (float waveform in [-1, 1]: one 16-bit PCM step)"
    for name, original in (("short", short), ("loud", loud), ("state", signal), ("off_grid", off_grid)):
        assert np.array_equal(np.abs(moved[name] - original), np.spacing(np.abs(original))), name
        assert how[name] == "+-1 ulp"


@pytest.mark.parametrize("outlier", [4.0, 10.0])
def test_int8_ships_a_vad_only_within_float32s_decisions(outlier: float) -> None:
    """Outlier 4: INT8 ships, flipping at most the allowed share of fresh chunks. Outlier 10:
    INT8 flips more and is declined, while its probabilities' SQNR meets the 25 dB target,
    which ships it when the user names ``sqnr``."""
    model = _vad(outlier)
    got, acceptance = _int8(model, metric="auto")
    assert acceptance["metrics"] == {"speech": "threshold"}
    assert acceptance["perturbation"] == {"audio": "+-1/32768 (float waveform in [-1, 1]: one 16-bit PCM step)"}
    assert acceptance["floor"] == {"speech": {"threshold": 0.0}}
    fresh = _clips(32, 7)
    reference = _probabilities(model, fresh) > 0.5
    assert 0.3 < reference.mean() < 0.7
    assert _quantized(got) == (outlier == 4.0)
    flips = float(np.mean((_probabilities(got, fresh) > 0.5) != reference))
    assert flips <= ALLOWED_FLIPS
    by_sqnr, acceptance = _int8(model, metric="sqnr")
    assert acceptance["metrics"] == {"speech": "sqnr"} and _quantized(by_sqnr)
    if outlier == 10.0:
        values = _probabilities(by_sqnr, fresh)
        truth = _probabilities(model, fresh)
        assert 10 * np.log10(np.sum(truth ** 2) / np.sum((truth - values) ** 2)) >= 25.0
        assert float(np.mean((values > 0.5) != reference)) > ALLOWED_FLIPS
