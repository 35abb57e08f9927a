"""A signal sampled as 16-bit integers (PCM audio fed as int16, as MarbleNet VAD takes it)
moves by one step of its dtype in the noise floor; integer ids do not move. Left alone, an
int16 signal gave a floor of 0, and any INT8 deviation, however small, was infinitely far
beyond it."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
from onnx import TensorProto as TP

from optcc.numerics.task import perturb, perturbation_roles
from optcc.quant.driver import quantize_int8
from optcc.quant.fallback import Target

FRAME = 160  # samples per frame: 10 ms at 16 kHz


def test_16_bit_signals_move_one_step_held_at_the_dtype_limits():
    rng = np.random.default_rng(0)
    pcm = rng.integers(-2000, 2000, (1, 1, 400)).astype(np.int16)
    pcm[0, 0, :4] = [32767, 32767, -32768, -32768]
    unsigned = rng.integers(1, 60000, (2, 300)).astype(np.uint16)
    unsigned[0, :2] = [0, 65535]
    moved, how = perturb({"pcm": pcm, "u": unsigned}, seed=4)
    assert moved["pcm"].dtype == np.int16 and moved["u"].dtype == np.uint16
    for name, a, limits in (("pcm", pcm, np.iinfo(np.int16)), ("u", unsigned, np.iinfo(np.uint16))):
        step = moved[name].astype(np.int64) - a.astype(np.int64)
        inside = (a > limits.min) & (a < limits.max)
        assert np.array_equal(np.abs(step[inside]), np.ones(int(inside.sum()), np.int64))  # one LSB, either way
        assert set(np.unique(step[~inside]).tolist()) <= {-1, 0, 1}  # at a limit: held there, or moved inwards
        assert (step > 0).any() and (step < 0).any()
        assert how[name] == "+-1 LSB (16-bit integer signal)"
    again, _ = perturb({"pcm": pcm, "u": unsigned}, seed=4)
    assert np.array_equal(again["pcm"], moved["pcm"])  # a fixed seed: the floor is reproducible


def test_ids_and_other_integers_are_left_alone():
    rng = np.random.default_rng(1)
    feeds = {"ids64": rng.integers(0, 100, (1, 12)), "ids32": rng.integers(0, 100, (1, 12)).astype(np.int32),
             "mask": np.ones((1, 12), np.uint8), "flags": np.array([0, 1, 1], np.int8),
             "ids16": rng.integers(0, 100, (1, 12)).astype(np.int16)}  # an int16 input that indexes a table
    moved, how = perturb(feeds, seed=2, ids={"ids16"})
    for name, a in feeds.items():
        assert np.array_equal(moved[name], a) and moved[name].dtype == a.dtype, name
    assert how == {}


def test_uint8_pictures_move_one_grey_level_held_within_0_255():
    rng = np.random.default_rng(3)
    nchw = rng.integers(1, 255, (2, 3, 16, 12)).astype(np.uint8)
    nchw[0, 0, 0, :2] = [0, 255]
    nhwc = rng.integers(1, 255, (1, 10, 9, 3)).astype(np.uint8)
    moved, how = perturb({"nchw": nchw, "nhwc": nhwc}, seed=5)
    for name, a in (("nchw", nchw), ("nhwc", nhwc)):
        assert moved[name].dtype == np.uint8
        step = moved[name].astype(np.int64) - a.astype(np.int64)
        inside = (a > 0) & (a < 255)
        assert np.array_equal(np.abs(step[inside]), np.ones(int(inside.sum()), np.int64))  # one grey level
        assert set(np.unique(step[~inside]).tolist()) <= {-1, 0, 1}  # at 0 or 255: held there, or moved inwards
        assert (step > 0).any() and (step < 0).any()
        assert how[name] == "+-1 grey level (8-bit image)"


def test_uint8_masks_and_non_pictures_stay():
    rng = np.random.default_rng(4)
    mask = rng.integers(0, 2, (1, 1, 16, 16)).astype(np.uint8)  # picture-shaped, but a mask
    rows = rng.integers(0, 255, (1, 16, 16)).astype(np.uint8)  # 3-D: no channel axis
    roles = {"mask": "mask", "rows": "plain", "ids": "index"}
    moved, how = perturb({"mask": mask, "rows": rows}, seed=6, **perturbation_roles(roles))
    assert np.array_equal(moved["mask"], mask) and np.array_equal(moved["rows"], rows)
    assert how == {}


def _pcm_vad() -> onnx.ModelProto:
    """int16 audio [1, 1, T] -> float in [-1, 1) -> 10 ms frames -> per-frame 2-class scores,
    plus an int16 id per sample that picks a bias row from a table (Gather): ids never move."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((FRAME, 16)) * 0.5).astype(np.float32)
    w2 = (rng.standard_normal((16, 2)) * 0.5).astype(np.float32)
    table = rng.standard_normal((8, 2)).astype(np.float32)
    nodes = [oh.make_node("Cast", ["audio"], ["a"], to=TP.FLOAT), oh.make_node("Mul", ["a", "scale"], ["x"]),
             oh.make_node("Reshape", ["x", "frames"], ["f"]), oh.make_node("MatMul", ["f", "w"], ["h0"]),
             oh.make_node("Relu", ["h0"], ["h"]), oh.make_node("MatMul", ["h", "w2"], ["s0"]),
             oh.make_node("Cast", ["speaker"], ["k"], to=TP.INT64),
             oh.make_node("Gather", ["table", "k"], ["b"]), oh.make_node("Add", ["s0", "b"], ["scores"])]
    graph = oh.make_graph(nodes, "pcm_vad", [oh.make_tensor_value_info("audio", TP.INT16, [1, 1, 16 * FRAME]),
                                             oh.make_tensor_value_info("speaker", TP.INT16, [1])],
                          [oh.make_tensor_value_info("scores", TP.FLOAT, [1, 16, 2])],
                          [nh.from_array(np.array(1 / 32768, np.float32), "scale"),
                           nh.from_array(np.array([1, 16, FRAME], np.int64), "frames"),
                           nh.from_array(w, "w"), nh.from_array(w2, "w2"), nh.from_array(table, "table")])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 19)])


def _numpy_scores(model: onnx.ModelProto, audio: np.ndarray, speaker: np.ndarray) -> np.ndarray:
    """The model's float64 result, computed from its weights by numpy."""
    weights = {t.name: nh.to_array(t).astype(np.float64) for t in model.graph.initializer}
    frames = (audio.astype(np.float64) / 32768).reshape(1, 16, FRAME)
    return np.maximum(frames @ weights["w"], 0) @ weights["w2"] + weights["table"][speaker.astype(np.int64)]


def _expected_noise(model: onnx.ModelProto, audio: np.ndarray) -> float:
    """The expected squared change of the scores when every input sample moves by one LSB of
    random sign (independent signs: the sum of the squared gradient, linearized in float64)."""
    weights = {t.name: nh.to_array(t).astype(np.float64) for t in model.graph.initializer}
    frames = (audio.astype(np.float64) / 32768).reshape(16, FRAME)
    total = 0.0
    for frame in frames:
        active = (frame @ weights["w"]) > 0
        gradient = (weights["w"] * active) @ weights["w2"] / 32768  # d scores / d one LSB of each sample
        total += float(np.sum(gradient ** 2))
    return total


def test_int8_floor_of_an_int16_signal_is_its_one_step_noise():
    model = _pcm_vad()
    rng = np.random.default_rng(2)
    samples = [{"audio": (rng.standard_normal((1, 1, 16 * FRAME)) * 3000).astype(np.int16),
                "speaker": rng.integers(0, 8, (1,)).astype(np.int16)} for _ in range(10)]
    # a target no INT8 model meets: the floor decides, so it is measured
    _, stats = quantize_int8(model, samples, metric="sqnr", require_speedup=False, target=Target(min_sqnr_db=200.0))
    acceptance = stats["acceptance"]
    assert acceptance["perturbation"] == {"audio": "+-1 LSB (16-bit integer signal)"}  # the speaker id stays
    # the floor is float32's noise under one LSB of input noise on the held-out samples (the
    # last ones), as numpy expects it: not 0, which no INT8 model could stay within
    held = samples[-acceptance["judged_samples"]:]
    noise = sum(_expected_noise(model, feeds["audio"]) for feeds in held)
    signal = sum(float(np.sum(_numpy_scores(model, f["audio"], f["speaker"]) ** 2)) for f in held)
    assert 0.5 < acceptance["floor"]["scores"]["sqnr"] / (noise / signal) < 2.0
