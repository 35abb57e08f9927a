"""A ``[N, C]`` row of scores on a scale (a speech-quality model's MOS per aspect, 1 to 5) is
judged by the values, not by which aspect scores highest: its rows are positive, some
above 1, within one order of magnitude, where a classifier's logits take both signs, its
log-probabilities are negative and its probabilities stay within [0, 1]. End to end, the
INT8 pass judges such a model by SQNR on one perturbation draw, the SQNR recomputed here
with numpy from onnxruntime's runs of the original and the written model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import optcc
from optcc.errors import PrecisionNotAppliedError
from optcc.numerics import task as tm

CPU = "CPUExecutionProvider"


def _rows(values: np.ndarray) -> list[np.ndarray]:
    return [values[i:i + 1].astype(np.float32) for i in range(len(values))]


def test_scores_on_a_scale_are_values_and_class_scores_stay_classes() -> None:
    rng = np.random.default_rng(0)
    mos = 1.0 + 4.0 * rng.uniform(0.05, 0.7, (16, 3))  # three aspects, 1.2 to 3.8: softmax confident on many
    assert tm._confident(mos).any()
    assert tm.choose_metric(_rows(mos), "Identity:0") == "sqnr"
    logits = rng.normal(size=(16, 3)) * 3
    assert tm.choose_metric(_rows(logits), "Identity:0") == "argmax"
    # the same logits all shifted positive (a bias far from 0) still span more than the scale's ratio
    assert tm.choose_metric(_rows(logits - logits.min() + 0.1), "Identity:0") == "argmax"
    log_probabilities = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    assert tm.choose_metric(_rows(log_probabilities), "logprobs") == "argmax"
    assert tm.choose_metric(_rows(np.exp(logits)), "scores") == "argmax"  # exponentiated: orders of magnitude
    sigmoid = 1.0 / (1.0 + np.exp(-logits))  # multi-label probabilities: within [0, 1]
    assert tm.choose_metric(_rows(sigmoid), "scores") == "argmax"
    # positive scores within the scale's ratio, named as a classifier's: shifted logits, percent
    offset = logits / 3 + 6.0
    assert tm.choose_metric(_rows(offset), "Identity:0") == "sqnr"
    assert tm.choose_metric(_rows(offset), "logits") == "argmax"
    assert tm.choose_metric(_rows(mos), "class_scores") == "argmax"
    assert tm.choose_metric(_rows(mos), "output_prob") == "argmax"


def _mos_model(path: Path, width: int = 1024, hidden: int = 16) -> None:
    """waveform [1, width] -> MatMul -> Relu -> MatMul -> Sigmoid * 4 + 1: three scores in (1, 5)."""
    rng = np.random.default_rng(1)
    w1 = (rng.normal(size=(width, hidden)) / np.sqrt(width) * 8).astype(np.float32)
    w2 = (rng.normal(size=(hidden, 3)) / np.sqrt(hidden)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["waveform", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["z"]), helper.make_node("Sigmoid", ["z"], ["s"]),
             helper.make_node("Mul", ["s", "four"], ["m"]), helper.make_node("Add", ["m", "one"], ["mos"])]
    graph = helper.make_graph(
        nodes, "mos", [helper.make_tensor_value_info("waveform", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("mos", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
         numpy_helper.from_array(np.float32(4.0), "four"), numpy_helper.from_array(np.float32(1.0), "one")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _clips(n: int, width: int = 1024) -> list[dict[str, np.ndarray]]:
    """Audio decoded from 16-bit PCM: values on the 1/32768 grid within [-1, 1]."""
    rng = np.random.default_rng(2)
    return [{"waveform": (np.round(rng.uniform(-0.5, 0.5, (1, width)) * 32768) / 32768).astype(np.float32)}
            for _ in range(n)]


def test_int8_judges_a_scoring_model_by_the_scores(tmp_path: Path) -> None:
    model = tmp_path / "mos.onnx"
    _mos_model(model)
    data = _clips(16)
    session = ort.InferenceSession(str(model), providers=[CPU])
    assert tm.choose_metric([session.run(None, d)[0] for d in data], "mos") == "sqnr"
    written = tmp_path / "out.onnx"
    try:
        result = optcc.optimize(str(model), int8_calibration=data, int8_options={"require_speedup": False})
        result.save(str(written))
        report = result.report.to_dict()
    except PrecisionNotAppliedError as declined:
        report = declined.result.report.to_dict()
    (int8,) = [p for p in report["passes"] if "acceptance" in p.get("stats", {})]
    acceptance = int8["stats"]["acceptance"]
    assert acceptance["metrics"] == {"mos": "sqnr"} and acceptance["floor_draws"] == 1
    if int8["status"] != "changed":
        return
    # shipped: the written model's SQNR over the held-out samples, against the original's outputs
    held = data[len(data) - acceptance["held_out_samples"]:]
    shipped = ort.InferenceSession(str(written), providers=[CPU])
    ref = np.concatenate([session.run(None, d)[0].ravel() for d in held]).astype(np.float64)
    got = np.concatenate([shipped.run(None, d)[0].ravel() for d in held]).astype(np.float64)
    judged = int8["stats"]["fallback"]["evaluation"]["task"]["metrics"]["mos:sqnr"]
    assert judged["deviation"] == pytest.approx(np.sum((ref - got) ** 2) / np.sum(ref ** 2), rel=1e-3)
