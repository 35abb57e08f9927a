"""Calibrators: known distributions, streaming state, merge, cache, chunked collection, errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

from calibration_probes import whole_tensor_collectors
from calls import traced_peak

import optcc
from optcc.quant.calibration import (
    CalibrationStats,
    TensorHistogram,
    calibrate,
    calibration_tensors,
    collect_statistics,
    split_holdout,
)


def _mlp(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w1 = nh.from_array(rng.normal(size=(8, 16)).astype(np.float32), "W1")
    w2 = nh.from_array(rng.normal(size=(16, 4)).astype(np.float32), "W2")
    graph = oh.make_graph(
        [
            oh.make_node("MatMul", ["x", "W1"], ["h"]),
            oh.make_node("Relu", ["h"], ["r"]),
            oh.make_node("MatMul", ["r", "W2"], ["y"]),
        ],
        "mlp",
        [oh.make_tensor_value_info("x", TP.FLOAT, ["N", 8])],
        [oh.make_tensor_value_info("y", TP.FLOAT, ["N", 4])],
        [w1, w2],
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


def _samples(n: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(2, 8)).astype(np.float32)} for _ in range(n)]


def _reference(model: onnx.ModelProto, samples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Every intermediate of every sample, computed with numpy (the test's oracle)."""
    w1 = nh.to_array(model.graph.initializer[0]).astype(np.float64)
    w2 = nh.to_array(model.graph.initializer[1]).astype(np.float64)
    xs = np.stack([s["x"] for s in samples]).astype(np.float64)
    h = xs @ w1
    r = np.maximum(h, 0)
    return {"x": xs, "h": h, "r": r, "y": r @ w2}


# --------------------------------------------------------------------------- ranges


def test_minmax_is_exact_over_streamed_samples() -> None:
    model, samples = _mlp(), _samples(12)
    stats = collect_statistics(model, samples)
    ref = _reference(model, samples)
    ranges = stats.ranges("minmax")
    assert set(ranges) == {"x", "h", "r", "y"}
    for name, values in ref.items():
        lo, hi = ranges[name]
        np.testing.assert_allclose([lo, hi], [values.min(), values.max()], rtol=1e-5, atol=1e-6)
    assert stats.samples == 12


def test_minmax_inside_onnxruntime_equals_histogram_extremes() -> None:
    """bins=0: min/max reduced inside the graph, the same as the histogram's min/max, also
    when a sample holds NaN or an infinity (ignored, like TensorHistogram.add does)."""
    model, samples = _mlp(), _samples(6)
    samples[2] = {"x": samples[2]["x"].copy()}
    samples[2]["x"][0, 0] = np.nan  # h, r, y of that row become NaN too
    samples[4] = {"x": samples[4]["x"].copy()}
    samples[4]["x"][1, 3] = -np.inf  # fetched whole for that sample
    with_histograms = collect_statistics(model, samples)
    extremes = collect_statistics(model, samples, bins=0)
    assert extremes.ranges("minmax") == with_histograms.ranges("minmax")
    assert all(math.isfinite(v) for r in extremes.ranges("minmax").values() for v in r)
    assert extremes.nbytes() < with_histograms.nbytes() / 100
    with pytest.raises(optcc.BadInputError, match="min/max only"):
        extremes.ranges("percentile")
    assert calibrate(model, samples).stats.bins == 0  # minmax needs no histograms
    assert calibrate(model, samples, "mse").stats.bins > 0


def test_tensors_with_an_infinity_are_measured_over_their_finite_values_in_one_session(monkeypatch) -> None:
    """A masked attention score holds -inf on every padded sample: its min, max and count
    are those of its finite values (numpy over every intermediate), computed inside the
    one calibration session, rebuilt once when the first infinity shows, never a session
    that fetches tensors whole; NaN is skipped too, and a tensor with no finite value
    still gets its (empty) statistics, as the histogram path gives it."""
    import optcc.quant.calibration as calibration

    model, samples = _mlp(), _samples(6)
    for i in (1, 3, 5):
        samples[i] = {"x": samples[i]["x"].copy()}
        samples[i]["x"][0, i % 4] = -np.inf
    samples[3]["x"][1, 7] = np.nan
    builds = []
    original_build = calibration._ExtremesCollector._build

    def build(self):  # noqa: ANN001, ANN202
        builds.append(list(self.finite_aware))
        return original_build(self)

    monkeypatch.setattr(calibration._ExtremesCollector, "_build", build)
    with whole_tensor_collectors(monkeypatch) as whole:
        extremes = collect_statistics(model, samples, bins=0)
    assert whole == [] and builds == [[], ["x", "h", "r", "y"]], builds
    monkeypatch.setattr(calibration._ExtremesCollector, "_build", original_build)
    # the oracle: numpy over the tensors onnxruntime computes, fetched whole (histogram path)
    histograms = collect_statistics(model, samples)
    for name, hist in histograms.histograms.items():
        mine = extremes.histograms[name]
        assert (mine.min, mine.max, mine.count) == (hist.min, hist.max, hist.count), name
    x = np.stack([s["x"] for s in samples])
    assert extremes.histograms["x"].count == np.isfinite(x).sum() < x.size
    assert extremes.ranges("minmax") == histograms.ranges("minmax")

    nothing_finite = [{"x": np.full((2, 8), -np.inf, np.float32)}, *_samples(2)]
    assert collect_statistics(model, nothing_finite, bins=0).ranges("minmax") == \
        collect_statistics(model, nothing_finite).ranges("minmax")


def test_non_float_tensors_are_not_collected(monkeypatch) -> None:
    """Shape arithmetic (int64) in a model has no statistics: it is not fetched (no second
    session beside the in-graph min/max one), and the float ranges are numpy's."""
    rng = np.random.default_rng(0)
    w = nh.from_array(rng.normal(size=(8, 32)).astype(np.float32), "W")  # 1 KiB: shared with the session
    graph = oh.make_graph(
        [
            oh.make_node("MatMul", ["x", "W"], ["h"]),
            oh.make_node("Shape", ["h"], ["shape"]),
            oh.make_node("Reshape", ["h", "shape"], ["y"]),
        ],
        "shapes",
        [oh.make_tensor_value_info("x", TP.FLOAT, ["N", 8])],
        [oh.make_tensor_value_info("y", TP.FLOAT, ["N", 32])],
        [w],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    samples = _samples(3)
    with whole_tensor_collectors(monkeypatch) as built:
        stats = collect_statistics(model, samples, bins=0)
    assert built == [] and "shape" not in stats.histograms
    h = np.stack([s["x"] for s in samples]).astype(np.float64) @ nh.to_array(w).astype(np.float64)
    lo, hi = stats.ranges("minmax")["h"]
    assert math.isclose(lo, h.min(), rel_tol=1e-5) and math.isclose(hi, h.max(), rel_tol=1e-5)



@pytest.mark.parametrize("dist", ["uniform", "normal"])
def test_percentile_matches_numpy_within_one_bin(dist: str) -> None:
    rng = np.random.default_rng(3)
    data = rng.uniform(-3, 5, 200_000) if dist == "uniform" else rng.normal(1.0, 2.0, 200_000)
    hist = TensorHistogram()
    for chunk in np.array_split(data, 7):
        hist.add(chunk)
    for p in (99.0, 99.9, 99.99):
        lo, hi = hist.range("percentile", percentile=p)
        expected_lo, expected_hi = np.percentile(data, [100 - p, p])
        assert abs(lo - expected_lo) <= hist.bin_width
        assert abs(hi - expected_hi) <= hist.bin_width


def test_entropy_and_mse_clip_inside_the_data_range() -> None:
    rng = np.random.default_rng(4)
    gauss = rng.normal(0.0, 1.0, 100_000)
    data = np.concatenate([gauss, [60.0, -45.0, 80.0]])  # a Gaussian with outliers
    hist = TensorHistogram()
    hist.add(data)
    for method in ("entropy", "mse"):
        lo, hi = hist.range(method)
        assert data.min() <= lo <= 0.0 <= hi <= data.max(), method
        assert hi >= 3.0 and lo <= -3.0, method  # keeps the bulk of the Gaussian
    lo, hi = hist.range("entropy")
    assert hi < 0.5 * data.max() and lo > 0.5 * data.min()  # the outliers are clipped
    # heavy tails: the MSE-optimal clipping is strictly inside min..max
    laplace = TensorHistogram()
    laplace.add(rng.laplace(0.0, 1.0, 200_000))
    lo, hi = laplace.range("mse")
    assert laplace.min < lo < 0 < hi < laplace.max


def test_unknown_method_is_a_bad_input() -> None:
    hist = TensorHistogram()
    hist.add(np.arange(10.0))
    with pytest.raises(optcc.BadInputError):
        hist.range("kl")
    with pytest.raises(optcc.BadInputError):
        calibrate(_mlp(), _samples(2), "median")


# --------------------------------------------------------------------------- streaming


def _stream(n: int):
    rng = np.random.default_rng(5)
    for _ in range(n):
        yield {"x": rng.normal(size=(2, 8)).astype(np.float32)}


def test_state_size_does_not_grow_with_the_number_of_samples() -> None:
    model = _mlp()
    small = collect_statistics(model, _stream(4))
    large, peak_large = traced_peak(lambda: collect_statistics(model, _stream(200)))
    assert large.samples == 200 and small.samples == 4
    assert large.nbytes() == small.nbytes()  # tensors x bins, whatever the sample count
    for hist in large.histograms.values():
        assert hist.counts.shape == (large.bins,)
    # 200 samples of activations would be far more than a few histograms' worth
    assert peak_large < 4 * 1024 * 1024


def test_rebinning_when_the_range_grows_is_exact() -> None:
    rng = np.random.default_rng(6)
    parts = [rng.normal(0, s, 5000) for s in (0.01, 1.0, 30.0)]
    streamed = TensorHistogram()
    for part in parts:
        streamed.add(part)
    once = TensorHistogram()
    once.add(np.concatenate(parts))
    assert streamed.exponent == once.exponent
    np.testing.assert_array_equal(streamed.counts, once.counts)


def test_chunked_collection_equals_one_session() -> None:
    model, samples = _mlp(), _samples(6)
    whole = collect_statistics(model, samples)
    chunked = collect_statistics(model, samples, memory_budget_bytes=64)  # one tensor per session
    assert set(whole.histograms) == set(chunked.histograms)
    for name, hist in whole.histograms.items():
        np.testing.assert_array_equal(hist.counts, chunked.histograms[name].counts)
        assert (hist.min, hist.max) == (chunked.histograms[name].min, chunked.histograms[name].max)


# --------------------------------------------------------------------------- merge and cache


def test_merged_shards_equal_one_pass_over_all() -> None:
    model, samples = _mlp(), _samples(10)
    samples[7] = {"x": samples[7]["x"] * 20}  # a later shard widens the range
    a = collect_statistics(model, samples[:4])
    b = collect_statistics(model, samples[4:])
    merged = a.merge(b)
    whole = collect_statistics(model, samples)
    assert merged.samples == whole.samples == 10
    for name, hist in whole.histograms.items():
        np.testing.assert_array_equal(merged.histograms[name].counts, hist.counts)
    for method in ("minmax", "percentile", "entropy", "mse"):
        assert merged.ranges(method) == whole.ranges(method)


def test_save_and_load_without_pickle(tmp_path: Path) -> None:
    stats = collect_statistics(_mlp(), _samples(3))
    path = tmp_path / "stats.npz"
    stats.save(path)
    with np.load(path, allow_pickle=False) as data:  # plain arrays only
        assert data["counts"].dtype == np.int64
    loaded = CalibrationStats.load(path)
    assert loaded.ranges("percentile") == stats.ranges("percentile")
    assert loaded.samples == 3


def test_second_calibration_hits_the_cache(tmp_path: Path) -> None:
    model, samples = _mlp(), _samples(4)
    first = calibrate(model, samples, "entropy", cache_dir=tmp_path)
    assert not first.cache_hit and first.cache_path and Path(first.cache_path).is_file()
    second = calibrate(model, samples, "entropy", cache_dir=tmp_path)
    assert second.cache_hit and second.cache_path == first.cache_path
    assert second.ranges == first.ranges
    other_method = calibrate(model, samples, "minmax", cache_dir=tmp_path)
    assert not other_method.cache_hit  # the key covers the method
    other_data = calibrate(model, _samples(4, seed=9), "entropy", cache_dir=tmp_path)
    assert not other_data.cache_hit  # and the data
    streamed = calibrate(model, _stream(3), "entropy", cache_dir=tmp_path)
    assert not streamed.cache_hit and streamed.cache_path is None  # one-shot iterators are not cached


# --------------------------------------------------------------------------- inputs


def test_npz_file_input(tmp_path: Path) -> None:
    model = _mlp()
    rng = np.random.default_rng(7)
    xs = rng.normal(size=(5, 2, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=xs)
    from_file = calibrate(model, tmp_path / "calib.npz", "minmax")
    from_list = calibrate(model, [{"x": x} for x in xs], "minmax")
    assert from_file.ranges == from_list.ranges
    assert from_file.stats.samples == 5


@pytest.mark.parametrize(
    "feeds, message",
    [
        ({"y": np.zeros((2, 8), np.float32)}, "missing"),
        ({"x": np.zeros((2, 8), np.float64)}, "dtype"),
        ({"x": np.zeros((2, 8, 1), np.float32)}, "rank|shape"),
        ({"x": np.zeros((2, 9), np.float32)}, "shape"),
    ],
)
def test_mismatched_samples_are_bad_input(feeds: dict, message: str) -> None:
    with pytest.raises(optcc.BadInputError, match=message):
        collect_statistics(_mlp(), [feeds])


def test_empty_data_is_bad_input() -> None:
    with pytest.raises(optcc.BadInputError):
        collect_statistics(_mlp(), [])


def test_calibration_tensors_and_holdout() -> None:
    model = optcc.ir.load(_mlp())
    assert calibration_tensors(model) == ["x", "h", "r", "y"]
    calib, held = split_holdout(list(range(10)))
    assert calib == list(range(8)) and held == [8, 9]


def _same_statistics(a, b) -> None:
    assert a.samples == b.samples and sorted(a.histograms) == sorted(b.histograms)
    for name, h in a.histograms.items():
        g = b.histograms[name]
        assert (h.min, h.max, h.count, h.exponent) == (g.min, g.max, g.count, g.exponent), name
        assert np.array_equal(h.counts, g.counts), name


@pytest.mark.parametrize("bins", [0, 256])
def test_sharded_calibration_on_an_executor_equals_one_process(bins: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from optcc.quant.calibration import calibrate, collect_statistics, collect_statistics_sharded

    model, data = _mlp(), _samples(11)
    single = collect_statistics(model, data, bins=bins)
    with ThreadPoolExecutor(max_workers=2) as pool:
        sharded = collect_statistics_sharded(model, data, pool, shards=3, bins=bins)
        _same_statistics(single, sharded)
        for method in (["minmax"] if bins == 0 else ["minmax", "percentile", "entropy", "mse"]):
            assert calibrate(model, data, method, bins=bins, executor=pool, shards=4).ranges == \
                calibrate(model, data, method, bins=bins).ranges
    reference = _reference(model, data)  # numpy's own min/max over every sample
    for name, values in reference.items():
        if name in sharded.histograms:
            assert sharded.histograms[name].min == pytest.approx(float(values.min()), rel=1e-5, abs=1e-6)
            assert sharded.histograms[name].max == pytest.approx(float(values.max()), rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_sharded_calibration_in_worker_processes() -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from optcc.quant.calibration import collect_statistics, collect_statistics_sharded

    model, data = _mlp(), _samples(8)
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        sharded = collect_statistics_sharded(model, data, pool, shards=2, bins=512)
    _same_statistics(collect_statistics(model, data, bins=512), sharded)


def test_an_onnxruntime_calibration_data_reader_is_accepted():
    """quantize_int8 takes onnxruntime's CalibrationDataReader protocol (get_next() until
    None) as it takes a list: the same samples give the same model."""
    from onnxruntime.quantization import CalibrationDataReader

    from optcc.quant import quantize_int8

    rng = np.random.default_rng(4)
    samples = [{"image": rng.random((1, 3, 32, 32)).astype(np.float32)} for _ in range(6)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(samples)

        def get_next(self):  # noqa: ANN202 - onnxruntime's protocol
            return next(self.items, None)

    options = dict(require_speedup=False, bias_correction=False, metric=None, accuracy_fallback=False,
                   require_target=False)
    from_reader, _ = quantize_int8("fixtures/tinycnn.onnx", Reader(), **options)
    from_list, _ = quantize_int8("fixtures/tinycnn.onnx", samples, **options)
    assert optcc.ir.serialize(from_reader).SerializeToString() == optcc.ir.serialize(from_list).SerializeToString()


def test_below_opset_11_infinite_tensors_are_fetched_whole() -> None:
    """Without IsInf (opset < 10) the finite values of a tensor holding -inf come from the
    tensor fetched whole: the same ranges as the histogram path."""
    model = _mlp()
    model.opset_import[0].version = 10
    samples = _samples(4)
    samples[2] = {"x": samples[2]["x"].copy()}
    samples[2]["x"][0, 1] = -np.inf
    extremes = collect_statistics(model, samples, bins=0)
    histograms = collect_statistics(model, samples)
    assert extremes.ranges("minmax") == histograms.ranges("minmax")
    assert {n: h.count for n, h in extremes.histograms.items()} == {n: h.count for n, h in histograms.histograms.items()}
