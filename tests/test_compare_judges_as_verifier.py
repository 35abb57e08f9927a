"""``optcc compare A B --numerics KIND`` judges B the way optcc's verifier judges an
optimized model: the same per-element allowances for "fusion" (a saturated probability map
may be off by its kernel's float32 resolution), the task judge for "fp16" on the user's
samples and for "int8". Each case is also checked against an independent reference (numpy
in float64, argmax of the inputs) that shows what the judge decided is true, and that a
real miscompile still fails."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
import onnx_ir as ir
import onnxruntime as ort
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from onnx import TensorProto as TP

import optcc
from optcc import cli
from optcc.compare import compare_models
from optcc.numerics import verify

CHANNELS = 8
EPS32 = float(np.finfo(np.float32).eps)


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"W": rng.normal(0, 0.2, (CHANNELS, 3, 3, 3)).astype(np.float32),
            "B": np.full(CHANNELS, -17.0, np.float32),  # deep in Sigmoid's tail: a saturated map
            "s": rng.uniform(0.5, 1.5, CHANNELS).astype(np.float32),
            "t": rng.uniform(-1, 0, CHANNELS).astype(np.float32),
            "m": rng.normal(0, 0.1, CHANNELS).astype(np.float32),
            "v": rng.uniform(0.5, 2, CHANNELS).astype(np.float32)}


def _conv_bn(last: str, epsilon: float = 1e-5, weights: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """Conv -> BatchNormalization -> ``last`` (Sigmoid: a probability map; Relu: features)."""
    weights = weights or _weights()
    nodes = [oh.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
             oh.make_node("BatchNormalization", ["c", "s", "t", "m", "v"], ["n"], epsilon=epsilon),
             oh.make_node(last, ["n"], ["y"])]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TP.FLOAT, ["b", 3, 32, 32])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, ["b", CHANNELS, 32, 32])],
                          [nh.from_array(a, n) for n, a in weights.items()])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _conv_bn_float64(x: np.ndarray, last: str, epsilon: float = 1e-5) -> np.ndarray:
    """What ``_conv_bn`` computes, in float64 with numpy."""
    w = {k: v.astype(np.float64) for k, v in _weights().items()}
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = sliding_window_view(padded, (3, 3), axis=(2, 3))  # [b, 3, 32, 32, 3, 3]
    c = np.einsum("bihwkl,oikl->bohw", windows, w["W"]) + w["B"][None, :, None, None]
    per = (lambda a: a[None, :, None, None])
    n = per(w["s"]) * (c - per(w["m"])) / np.sqrt(per(w["v"]) + epsilon) + per(w["t"])
    return 1.0 / (1.0 + np.exp(-n)) if last == "Sigmoid" else np.maximum(n, 0.0)


def _images(count: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.uniform(0, 1, (1, 3, 32, 32)).astype(np.float32)} for _ in range(count)]


def _run(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_a_fused_saturated_map_passes_compare_as_it_passes_the_verifier(tmp_path: Path, capsys) -> None:
    original, fused = tmp_path / "map.onnx", tmp_path / "map.opt.onnx"
    onnx.save(_conv_bn("Sigmoid"), original)
    assert cli.main([str(original), "-O2", "-o", str(fused), "-q"]) == 0
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(str(fused)).graph.node}
    feeds = _images(3)
    worst_rel = 0.0
    for sample in feeds:
        a, b = _run(original, sample), _run(fused, sample)
        exact = _conv_bn_float64(sample["x"], "Sigmoid")
        assert np.abs(exact).max() < 2e-3  # saturated: the map holds Sigmoid's tail alone
        # B is right: within a few float32 steps of the exact map, as A is
        assert np.abs(b - exact).max() <= 4 * EPS32 and np.abs(a - exact).max() <= 4 * EPS32
        worst_rel = max(worst_rel, float(np.abs(b - a).max() / np.abs(a).max()))
    assert worst_rel > 1e-4  # so the plain rule (max rel 1e-4 of the scale) would fail it

    result = compare_models(str(original), str(fused), inputs=feeds, numerics="fusion")
    checked = verify(str(original), optcc.ir.load(str(fused)), numerics="fusion", inputs=feeds, providers=["cpu"])
    assert result.passed and checked.passed
    (metrics,) = result.outputs
    assert metrics.max_rel == pytest.approx(worst_rel, rel=1e-6)
    assert "resolution of the bounded kernel" in result.judges["y"]

    np.savez(tmp_path / "x.npz", x=np.concatenate([f["x"] for f in feeds])[:, None])
    assert cli.main(["compare", str(original), str(fused), "--numerics", "fusion",
                     "--inputs", str(tmp_path / "x.npz")]) == 0
    out = capsys.readouterr().out
    assert "judged by:" in out and "verifier: PASS" in out and out.rstrip().endswith("3 sample(s))"), out


def test_a_changed_batchnorm_epsilon_still_fails(tmp_path: Path, capsys) -> None:
    # features around 0, with small variances: epsilon counts
    weights = {**_weights(), "B": np.zeros(CHANNELS, np.float32), "v": np.full(CHANNELS, 2e-3, np.float32)}
    original, wrong = tmp_path / "features.onnx", tmp_path / "wrong.onnx"
    onnx.save(_conv_bn("Relu", 1e-5, weights), original)
    onnx.save(_conv_bn("Relu", 1e-3, weights), wrong)
    feeds = _images(3)
    for sample in feeds:  # the change is real: far beyond any rounding of the float64 result
        a, b = _run(original, sample), _run(wrong, sample)
        assert np.abs(b - a).max() / np.abs(a).max() > 0.05
    for numerics in ("exact", "fusion", "fp16"):
        result = compare_models(str(original), str(wrong), inputs=feeds, numerics=numerics)
        checked = verify(str(original), optcc.ir.load(str(wrong)), numerics=numerics, inputs=feeds,
                         providers=["cpu"])
        assert not result.passed and not checked.passed, numerics
    assert cli.main(["compare", str(original), str(wrong), "--numerics", "fusion"]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def _offset_model(offset: float, float16: bool) -> onnx.ModelProto:
    """y = (x + offset) - offset over class scores [n, 10], the sum stored as float16 when
    ``float16``: B loses the scores' low bits as a float16 conversion of a large offset would."""
    k = nh.from_array(np.array([offset], np.float32), "k")
    nodes = [oh.make_node("Add", ["x", "k"], ["s"])]
    if float16:
        nodes += [oh.make_node("Cast", ["s"], ["h"], to=TP.FLOAT16), oh.make_node("Cast", ["h"], ["s32"], to=TP.FLOAT)]
    nodes.append(oh.make_node("Sub", ["s32" if float16 else "s", "k"], ["y"]))
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TP.FLOAT, ["n", 10])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, ["n", 10])], [k])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


def _scores(samples: int = 4, rows: int = 64) -> list[dict[str, np.ndarray]]:
    """Class scores with one clear winner per row."""
    rng = np.random.default_rng(0)
    feeds = []
    for _ in range(samples):
        x = rng.normal(0, 0.5, (rows, 10)).astype(np.float32)
        x[np.arange(rows), rng.integers(0, 10, rows)] = 8.0
        feeds.append({"x": x})
    return feeds


def _sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    return 10 * np.log10(np.sum(ref ** 2) / np.sum((got - ref) ** 2))


@pytest.mark.parametrize("offset, top1_kept", [(1000.0, True), (60000.0, False)])
def test_fp16_on_the_users_samples_is_judged_by_the_task(tmp_path: Path, offset: float, top1_kept: bool) -> None:
    original, lossy = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(_offset_model(offset, False), original)
    onnx.save(_offset_model(offset, True), lossy)
    feeds = _scores()
    got = [_run(lossy, f) for f in feeds]
    exact = [f["x"].astype(np.float64) for f in feeds]
    # SQNR misses the fp16 rule (40 dB) either way; the top-1 class is what tells them apart
    assert _sqnr_db(np.concatenate(exact), np.concatenate(got)) < 40
    kept = all(np.array_equal(g.argmax(-1), e.argmax(-1)) for g, e in zip(got, exact))
    assert kept == top1_kept

    result = compare_models(str(original), str(lossy), inputs=feeds, numerics="fp16")
    checked = verify(str(original), optcc.ir.load(str(lossy)), numerics="fp16", inputs=feeds, providers=["cpu"])
    assert result.passed == checked.passed == top1_kept
    if top1_kept:
        (metrics,) = result.outputs
        assert metrics.accepted_by == "task" and result.judges["y"].startswith("task")
        assert "argmax 0 <=" in result.judges["y"]
    else:
        assert "nor did the task judge accept it: argmax" in result.judges["y"]
    # on generated inputs the verifier has no task to judge by: the SQNR rule alone, in both
    generated = compare_models(str(original), str(lossy), numerics="fp16")
    assert not generated.passed and generated.judges["y"].startswith("SQNR")


def test_int8_is_judged_by_the_task_against_the_originals_noise_floor(tmp_path: Path, capsys) -> None:
    original, lossy = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(_offset_model(10000.0, False), original)
    onnx.save(_offset_model(10000.0, True), lossy)
    feeds = _scores()
    got = np.concatenate([_run(lossy, f) for f in feeds])
    exact = np.concatenate([f["x"] for f in feeds]).astype(np.float64)
    assert np.array_equal(got.argmax(-1), exact.argmax(-1)) and _sqnr_db(exact, got) < 25
    np.savez(tmp_path / "x.npz", x=np.stack([f["x"] for f in feeds]))
    result = compare_models(str(original), str(lossy), inputs=feeds, numerics="int8")
    assert result.passed and result.judges["y"].startswith("task against A's noise floor, 'y' by argmax (")
    # the metric is the user's to choose, as with --int8-metric: SQNR misses its 25 dB target
    args = ["compare", str(original), str(lossy), "--inputs", str(tmp_path / "x.npz"), "--numerics", "int8"]
    assert cli.main([*args, "--int8-metric", "sqnr", "--json"]) == 1
    assert cli.main(args) == 0
    assert "class scores, confident on some sample): argmax 0 <=" in capsys.readouterr().out


def test_outputs_only_one_model_has_are_a_mismatch_and_the_shared_ones_are_still_judged(tmp_path: Path) -> None:
    def graph(outputs: list[str], scale: float) -> onnx.ModelProto:
        nodes = [oh.make_node("Mul", ["x", "k"], ["y"]), oh.make_node("Add", ["x", "k"], ["z"]),
                 oh.make_node("Neg", ["x"], ["w"])]
        g = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TP.FLOAT, [2, 3])],
                          [oh.make_tensor_value_info(n, TP.FLOAT, [2, 3]) for n in outputs],
                          [nh.from_array(np.array(scale, np.float32), "k")])
        return oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)])

    a, b, c = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "c.onnx"
    onnx.save(graph(["y", "z"], 2.0), a)
    onnx.save(graph(["z", "w", "y"], 2.0), b)  # A's outputs in another order, and one more
    onnx.save(graph(["y"], 3.0), c)  # one output fewer, and y = 3x where A's is 2x
    x = np.arange(6, dtype=np.float32).reshape(2, 3) + 1
    result = compare_models(str(a), str(b), inputs={"x": x}, numerics="fusion")
    assert not result.passed and result.only_in_b == ["w"] and not result.only_in_a
    assert result.reordered == ["z", "y"]
    assert [(m.name, m.passed, m.max_rel) for m in result.outputs] == [("y", True, 0.0), ("z", True, 0.0)]
    result = compare_models(str(a), str(c), inputs={"x": x}, numerics="fusion")
    assert not result.passed and result.only_in_a == ["z"]
    (y,) = result.outputs
    assert not y.passed and y.max_rel == pytest.approx(float(np.abs(3 * x - 2 * x).max() / (2 * x).max()))


@pytest.mark.parametrize("numerics", ["exact", None])
def test_the_same_outputs_in_another_order_are_a_mismatch(numerics: str | None) -> None:
    """As in verification: equal values under swapped positions fail, and a caller's
    ir.Model is not changed by the comparison."""
    def graph(outputs: list[str]) -> onnx.ModelProto:
        nodes = [oh.make_node("Relu", ["x"], ["y"]), oh.make_node("Neg", ["x"], ["z"])]
        g = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TP.FLOAT, [2, 3])],
                          [oh.make_tensor_value_info(n, TP.FLOAT, [2, 3]) for n in outputs])
        return oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)])

    a = ir.from_proto(graph(["y", "z"]))
    x = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    judged = dict(numerics=numerics) if numerics else dict(rtol=0.0, atol=0.0)
    result = compare_models(a, graph(["z", "y"]), inputs={"x": x}, **judged)
    assert not result.passed and result.reordered == ["z", "y"]
    assert all(m.passed for m in result.outputs)  # each value equal by name: np.maximum(x, 0), -x
    assert [v.name for v in a.graph.outputs] == ["y", "z"]
    assert compare_models(a, graph(["y", "z"]), inputs={"x": x}, **judged).passed
