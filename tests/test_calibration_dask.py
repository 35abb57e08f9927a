"""Calibration sharded over a real local Dask cluster (scheduler and two worker processes
on this machine), against a single-process run and numpy's own extremes. Needs the
optional extra ``pip install -e ".[dask]"``; skipped without it."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

distributed = pytest.importorskip("distributed")

import optcc  # noqa: E402
from optcc.quant.calibration import calibrate, collect_statistics_sharded  # noqa: E402
from optcc.quant.driver import quantize_int8  # noqa: E402


def _cnn():
    """Conv-Relu-Conv: every activation has its own range."""
    rng = np.random.default_rng(0)
    inits = [nh.from_array((rng.normal(size=(6, 3, 3, 3)) * 0.4).astype(np.float32), "W1"),
             nh.from_array(rng.normal(size=6).astype(np.float32) * 0.1, "B1"),
             nh.from_array((rng.normal(size=(4, 6, 1, 1)) * 0.5).astype(np.float32), "W2")]
    nodes = [oh.make_node("Conv", ["x", "W1", "B1"], ["h"], pads=[1, 1, 1, 1]),
             oh.make_node("Relu", ["h"], ["r"]),
             oh.make_node("Conv", ["r", "W2"], ["y"])]
    graph = oh.make_graph(nodes, "cnn", [oh.make_tensor_value_info("x", TP.FLOAT, ["N", 3, 8, 8])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, ["N", 4, 8, 8])], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


def _samples(n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    # one late sample widens every range, so shards disagree until merged
    return [{"x": (rng.normal(size=(1, 3, 8, 8)) * (8.0 if i == n - 2 else 1.0)).astype(np.float32)}
            for i in range(n)]


def _bits(ranges: dict) -> dict:
    return {name: np.array(r, np.float64).tobytes() for name, r in ranges.items()}


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                       dashboard_address=None, silence_logs=40)
    with cluster, distributed.Client(cluster) as dask_client:
        yield dask_client


def test_ranges_on_a_dask_cluster_are_byte_identical_to_one_process(client) -> None:
    model, data = _cnn(), _samples(10)
    executor = client.get_executor()
    for method, bins in (("minmax", 0), ("minmax", 256), ("percentile", 256), ("entropy", 256), ("mse", 256)):
        single = calibrate(model, data, method, bins=bins)
        sharded = calibrate(model, data, method, bins=bins, executor=executor, shards=4)
        assert _bits(sharded.ranges) == _bits(single.ranges), method
    with distributed.get_task_stream(client) as tasks:
        stats = collect_statistics_sharded(model, data, executor, shards=3, bins=0)
    assert stats.samples == len(data)
    ran = [t for t in tasks.data if "_collect_shard" in t["key"]]
    assert len(ran) == 3 and {t["worker"] for t in ran} <= set(client.scheduler_info()["workers"])
    # numpy's own extremes over every sample (float64 conv, the test's oracle)
    w1 = nh.to_array(model.graph.initializer[0]).astype(np.float64)
    b1 = nh.to_array(model.graph.initializer[1]).astype(np.float64)
    xs = np.concatenate([s["x"] for s in data]).astype(np.float64)
    padded = np.pad(xs, ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))  # N,C,H,W,3,3
    h = np.einsum("nchwij,ocij->nohw", windows, w1) + b1[None, :, None, None]
    for name, values in (("x", xs), ("h", h)):
        assert stats.histograms[name].min == pytest.approx(values.min(), rel=1e-5, abs=1e-6)
        assert stats.histograms[name].max == pytest.approx(values.max(), rel=1e-5, abs=1e-6)


def test_quantize_int8_on_a_dask_cluster_writes_the_same_bytes(client) -> None:
    model, data = _cnn(), _samples(10)
    options = dict(require_speedup=False, require_target=False, accuracy_fallback=False, metric=None)
    local, local_stats = quantize_int8(model, data, **options)
    remote, remote_stats = quantize_int8(model, data, executor=client.get_executor(), shards=4, **options)
    assert _bits(remote_stats["ranges"]) == _bits(local_stats["ranges"])
    assert optcc.ir.serialize(remote).SerializeToString() == optcc.ir.serialize(local).SerializeToString()
