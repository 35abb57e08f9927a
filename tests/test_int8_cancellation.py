"""Values that 8-bit rounding cannot carry stay float32 in QuantizeInt8Pass.

A layer norm written out as ``var = E[h^2] - E[h]^2`` (jax2tf exports it this way)
subtracts two numbers far larger than their difference: rounded to 8 bits over their
own range, they leave the variance a few levels. Then ``Sqrt(var + eps)`` divides by it,
so an 8-bit ``var + eps`` whose range reaches down to almost 0 is wrong by a large
factor where the variance is small. The model here is run on onnxruntime, quantized with
and without the planning rules, and compared with the same arithmetic in numpy float64.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

import optcc
from optcc.passes import quantize_int8
from optcc.passes.quantize_int8 import QuantizeInt8Pass
from optcc.quant.calibration import calibrate

SEED = 11
WIDTH = 64
EPS = 1e-6


def _gains() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SEED)
    # a permutation: exact in int8, so the only rounding before the layer norm is h's own
    w = np.eye(WIDTH, dtype=np.float32)[rng.permutation(WIDTH)]
    return w, np.float32(1.0 / WIDTH).reshape(())


def _layer_norm_model() -> onnx.ModelProto:
    """``h = x @ W``; ``var = ReduceSum(h * h) / n - (ReduceSum(h) / n)^2``;
    ``y = (h - mean) / Sqrt(var + eps)``."""
    w, inv_n = _gains()
    axes = np.array([-1], np.int64)
    nodes = [
        oh.make_node("MatMul", ["x", "W"], ["h"], name="dense"),
        oh.make_node("ReduceSum", ["h", "axes"], ["s"], keepdims=1, name="sum"),
        oh.make_node("Mul", ["s", "inv_n"], ["mean"], name="mean"),
        oh.make_node("Mul", ["h", "h"], ["h2"], name="square"),
        oh.make_node("ReduceSum", ["h2", "axes"], ["s2"], keepdims=1, name="sum_squares"),
        oh.make_node("Mul", ["s2", "inv_n"], ["mean_square"], name="mean_square"),
        oh.make_node("Mul", ["mean", "mean"], ["square_mean"], name="square_mean"),
        oh.make_node("Sub", ["mean_square", "square_mean"], ["var"], name="variance"),
        oh.make_node("Add", ["var", "eps"], ["var_eps"], name="add_eps"),
        oh.make_node("Sqrt", ["var_eps"], ["std"], name="std"),
        oh.make_node("Sub", ["h", "mean"], ["centred"], name="centre"),
        oh.make_node("Div", ["centred", "std"], ["y"], name="normalize"),
    ]
    inits = [nh.from_array(w, "W"), nh.from_array(axes, "axes"), nh.from_array(inv_n, "inv_n"),
             nh.from_array(np.float32(EPS).reshape(()), "eps")]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TP.FLOAT, ["N", WIDTH])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, ["N", WIDTH])], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 13)])


def _samples(n: int, seed: int) -> np.ndarray:
    """Rows with a common offset of 0.5 .. 1 and a spread of 0.05 .. 0.3 around it: the
    variance is 0.25 % .. 36 % of the mean square."""
    rng = np.random.default_rng(seed)
    offset = rng.uniform(0.5, 1.0, size=(n, 1))
    spread = np.logspace(-1.3, -0.5, n).reshape(n, 1)
    return (offset + spread * rng.normal(size=(n, WIDTH))).astype(np.float32)


def _reference(x: np.ndarray) -> np.ndarray:
    w, _ = _gains()
    h = x.astype(np.float64) @ w.astype(np.float64)
    mean = h.mean(-1, keepdims=True)
    var = (h * h).mean(-1, keepdims=True) - mean * mean
    return (h - mean) / np.sqrt(var + EPS)


def _worst_error(result: optcc.PassResult, x: np.ndarray) -> float:
    """The largest per-row RMS error of the quantized model on onnxruntime, against numpy
    float64 (the normalized rows have unit RMS)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(optcc.ir.serialize(result.model).SerializeToString(), so,
                                   providers=["CPUExecutionProvider"])
    y = session.run(None, {"x": x})[0].astype(np.float64)
    rms = np.sqrt(((y - _reference(x)) ** 2).mean(-1))
    return float(np.nan_to_num(rms, nan=np.inf).max())  # a negative variance: Sqrt gives NaN


def _quantize() -> optcc.PassResult:
    model = _layer_norm_model()
    ranges = calibrate(model, [{"x": _samples(16, SEED + 1)}], "minmax").ranges
    return QuantizeInt8Pass(ranges, count_fused=False)(optcc.ir.load(model))


def test_variance_inputs_and_sqrt_input_stay_float():
    result = _quantize()
    kept = result.stats["kept_float"]
    cancelling = [n for reason, n in kept.items() if "cancelling Sub" in reason]
    assert cancelling == [2]  # square and square_mean (its rescaled sum reaches the Sub)
    assert any("Sqrt input near 0" in reason for reason in kept)
    assert result.stats["quantized"] == {"MatMul": 1}  # the dense layer stays 8-bit


def test_rules_move_the_error_from_large_to_small(monkeypatch):
    x = _samples(16, SEED + 2)
    kept = _worst_error(_quantize(), x)
    monkeypatch.setattr(quantize_int8, "CANCELLATION_RATIO", float("inf"))
    monkeypatch.setattr(quantize_int8, "RELATIVE_STEPS", 0)
    rounded = _worst_error(_quantize(), x)
    # rounded: rows normalized by a wrong factor (errors of order 1 or more, NaN where the
    # variance came out negative); kept float: the 8-bit rounding of h only (its step is
    # about 1/7 of the smallest rows' spread, an RMS error of about 0.04)
    assert rounded > 0.3
    assert kept < 0.1
