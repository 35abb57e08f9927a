"""An output judged by SQNR (here a regressor's ``[N, C]`` MOS scores, as ``--int8-metric
mos=sqnr`` names it) rests its INT8 verdict on at least ``MIN_GROUP_HELD_OUT`` held-out
samples, or on half of them:
on the default fifth of 16 samples (3), a candidate whose ranges were calibrated on the
others passes while inputs of the same kind that reach beyond those ranges are clipped.

The data have heavy-tailed loudness (most frames at level 1, a few at 2 and 4, the user's
next ones up to 8): calibrated on 13 samples that include the loud ones and judged on the
3 quiet ones after them, INT8 passes and then clips the user's loud frames. Held out by
half, the loud ones are judged, not calibrated on, and the clipped candidate is declined.
The model returned is checked against onnxruntime's float32 run of the original on those
loud frames, which optcc never saw."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import optcc
from optcc.quant.driver import MIN_GROUP_HELD_OUT

SQNR = {"require_speedup": False, "metric": {"mos": "sqnr"}}
LEVELS = [1] * 8 + [1, 2, 1, 4, 1] + [1] * 3  # the 16 calibration samples' loudness, in order
FRESH_LEVELS = [1, 8, 2, 1, 4, 1, 8, 1]  # the user's next inputs: the same kind, the tail reached further


def _mos_model() -> onnx.ModelProto:
    """frames [N, 64] -> Relu(x W1 + b1) W2 + b2 -> [N, 3], b2 near 3: three MOS scores."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((64, 32)) / 8).astype(np.float32)
    b1 = (rng.standard_normal(32) / 10).astype(np.float32)
    w2 = (rng.standard_normal((32, 3)) / 4).astype(np.float32)
    b2 = np.array([3.2, 3.9, 2.9], np.float32)
    nodes = [helper.make_node("MatMul", ["frames", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["m"]),
             helper.make_node("Add", ["m", "b2"], ["mos"])]
    graph = helper.make_graph(nodes, "mos", [helper.make_tensor_value_info("frames", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("mos", TensorProto.FLOAT, ["N", 3])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"),
                               numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(b2, "b2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _frames(levels: list[int], seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"frames": (level * rng.uniform(-1, 1, (1, 64))).astype(np.float32)} for level in levels]


def _sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref ** 2) / max(float(np.sum((ref - got) ** 2)), 1e-300)))


def test_an_sqnr_verdict_rests_on_half_the_samples_and_declines_ranges_the_user_leaves(tmp_path) -> None:
    source = tmp_path / "mos.onnx"
    onnx.save(_mos_model(), str(source))
    data = _frames(LEVELS, 1)
    result = optcc.optimize(str(source), int8_calibration=data, int8_options=SQNR, allow_float_fallback=True)
    (int8,) = [p for p in result.report.passes if "acceptance" in p.stats]
    acceptance = int8.stats["acceptance"]
    assert acceptance["metrics"] == {"mos": "sqnr"}
    assert acceptance["held_out_samples"] == len(data) // 2 < MIN_GROUP_HELD_OUT
    assert "'mos' judged by SQNR on 3 held-out samples" in acceptance["held_out_widened"]
    # the model returned, against onnxruntime's float32 run of the original, on loud frames it never saw
    fresh = _frames(FRESH_LEVELS, 2)
    returned = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    original = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    ref = np.concatenate([original.run(None, f)[0] for f in fresh]).astype(np.float64)
    got = np.concatenate([returned.run(None, f)[0] for f in fresh]).astype(np.float64)
    assert _sqnr_db(ref, got) >= 25.0


def test_the_quiet_samples_alone_would_pass_a_candidate_the_loud_fresh_ones_fail(tmp_path) -> None:
    """What the wider held-out part guards against: INT8 with ranges calibrated on the first
    13 samples meets 25 dB on the 3 after them and misses it on the user's loud frames."""
    source = tmp_path / "mos.onnx"
    onnx.save(_mos_model(), str(source))
    data = _frames(LEVELS, 1)
    calibrated = optcc.optimize(str(source), int8_calibration=data[:13],
                                int8_options={**SQNR, "holdout_fraction": 0.0,
                                              "accuracy_fallback": False, "require_target": False},
                                allow_float_fallback=True)
    assert any(n.op_type == "QuantizeLinear" for n in calibrated.model.graph.node)
    candidate = ort.InferenceSession(calibrated.model.SerializeToString(), providers=["CPUExecutionProvider"])
    original = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])

    def sqnr(samples: list[dict[str, np.ndarray]]) -> float:
        ref = np.concatenate([original.run(None, f)[0] for f in samples]).astype(np.float64)
        return _sqnr_db(ref, np.concatenate([candidate.run(None, f)[0] for f in samples]).astype(np.float64))

    assert sqnr(data[13:]) >= 25.0 > sqnr(_frames(FRESH_LEVELS, 2))
