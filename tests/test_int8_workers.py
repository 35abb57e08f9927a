"""INT8 runs its samples side by side on the CPUs it may use (``optcc.runtime.parallel``),
and the result never depends on how many: with one worker, two or four, ``optimize
--int8`` writes the same bytes and reports the same decisions (the report without its
timings). What ships is judged independently: the INT8 model and the float original both
run on onnxruntime (``reference.lossy_metrics``), its SQNR at least the target, and the
report's own SQNR of it that very number."""

from __future__ import annotations

import json
import os
import threading
from typing import Any

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
import pytest
from onnx import TensorProto as TP

import optcc
from optcc.quant.fallback import Target
from optcc.runtime import parallel
from reference import lossy_metrics

TIMING_WORDS = ("time", "second", "rss")


def conv_stack() -> onnx.ModelProto:
    """Six 3x3 convolutions (ReLU between), 8 channels on 16x16: its first layers' errors
    grow on the way, so a 30 dB target returns some of them to float."""
    rng = np.random.default_rng(5)
    nodes, inits, x = [], [], "x"
    for i in range(6):
        inits += [nh.from_array(rng.normal(0, 0.35, (8, 8, 3, 3)).astype(np.float32), f"W{i}"),
                  nh.from_array(rng.normal(0, 0.1, 8).astype(np.float32), f"B{i}")]
        nodes.append(oh.make_node("Conv", [x, f"W{i}", f"B{i}"], [f"c{i}"], pads=[1, 1, 1, 1], name=f"conv{i}"))
        x = f"c{i}"
        if i < 5:
            nodes.append(oh.make_node("Relu", [x], [f"r{i}"], name=f"relu{i}"))
            x = f"r{i}"
    graph = oh.make_graph(nodes, "stack", [oh.make_tensor_value_info("x", TP.FLOAT, [1, 8, 16, 16])],
                          [oh.make_tensor_value_info(x, TP.FLOAT, [1, 8, 16, 16])], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])


def samples() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(9)
    return [{"x": rng.uniform(-1, 1, (1, 8, 16, 16)).astype(np.float32)} for _ in range(10)]


def untimed(value: Any) -> Any:
    """A report without its timings and memory figures: what must not change."""
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if not any(w in k.lower() for w in TIMING_WORDS)}
    if isinstance(value, list):
        return [untimed(v) for v in value]
    return value


def run_with(cpus: int, monkeypatch: pytest.MonkeyPatch, target_db: float) -> tuple[bytes, dict[str, Any], int]:
    """``optimize --int8`` as a process allowed ``cpus`` CPUs runs it: its model's bytes, its
    report without timings, and the most threads that ran its samples at once."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    busy, most, lock = 0, 0, threading.Lock()
    each = parallel.each_ordered

    def counted(fn, items, take, **kw):
        def run(item):
            nonlocal busy, most
            with lock:
                busy += 1
                most = max(most, busy)
            try:
                return fn(item)
            finally:
                with lock:
                    busy -= 1
        return each(run, items, take, **kw)

    for module in ("optcc.numerics.verify", "optcc.quant.fallback", "optcc.quant.calibration",
                   "optcc.quant.bias_correction"):
        monkeypatch.setattr(f"{module}.each_ordered", counted, raising=False)
    monkeypatch.setattr(parallel, "each_ordered", counted)
    result = optcc.optimize(conv_stack(), int8_calibration=samples(), allow_float_fallback=True,
                            int8_options={"require_speedup": False, "metric": None,
                                          "target": Target(min_sqnr_db=target_db)})
    monkeypatch.undo()
    return result.model.SerializeToString(), untimed(json.loads(result.report.to_json())), most


def int8_stats(report: dict[str, Any]) -> dict[str, Any]:
    return next(p for p in report["passes"] if p["name"] == "quantize-int8-calibrated")["stats"]


@pytest.mark.parametrize("target_db", [30.0, 38.0])
def test_the_same_bytes_and_decisions_whatever_the_workers(monkeypatch: pytest.MonkeyPatch, target_db: float) -> None:
    one, report, most = run_with(1, monkeypatch, target_db)
    assert most == 1
    for cpus in (2, 4):
        got, got_report, most = run_with(cpus, monkeypatch, target_db)
        assert most > 1  # samples did run side by side
        assert got == one
        assert got_report == report
    stats = int8_stats(report)
    fallback = stats["fallback"]
    assert len(fallback["tried"]) >= 1 and fallback["kept_float"]  # the search ran: ranking, candidates
    if target_db == 38.0:  # out of reach: declined, the original written
        assert stats["declined"] == "accuracy" and not stats["modified"]
        assert not any(n.op_type == "QuantizeLinear" for n in onnx.load_from_string(one).graph.node)
        return
    assert stats["modified"] and fallback["target_met"]
    shipped = onnx.load_from_string(one)
    assert any(n.op_type == "QuantizeLinear" for n in shipped.graph.node)
    # judged independently on the held-out samples (the last 20%): onnxruntime on the original
    held = samples()[-2:]
    (sqnr_db, _), = lossy_metrics(conv_stack(), shipped, held)
    assert sqnr_db >= target_db
    reported = fallback["evaluation"]["sqnr_db"]
    assert list(reported.values()) == [pytest.approx(sqnr_db, abs=0.05)]
