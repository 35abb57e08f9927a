"""INT8 decisions never depend on the clock: the same call writes the same bytes, and a
clock or latency measurement that reports absurd values changes nothing."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np
import onnx.helper as oh
import onnx.numpy_helper as nh
from onnx import TensorProto as TP

import optcc
from optcc.quant import cost_model, fallback
from optcc.quant.driver import quantize_int8

TINYCNN = Path(__file__).resolve().parent.parent / "fixtures" / "tinycnn.onnx"


def _images(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"image": rng.random((1, 3, 32, 32)).astype(np.float32)} for _ in range(n)]


def _bytes(model: optcc.ir.Model) -> bytes:
    return optcc.ir.serialize(model).SerializeToString()


def _wide_conv() -> optcc.ir.Model:
    """Two 64-channel 3x3 convolutions on 64x64: compute-bound, the case INT8 pays for."""
    rng = np.random.default_rng(1)
    inits = [nh.from_array((rng.normal(size=(64, 3, 3, 3)) * 0.2).astype(np.float32), "W1"),
             nh.from_array((rng.normal(size=(64, 64, 3, 3)) * 0.05).astype(np.float32), "W2")]
    nodes = [oh.make_node("Conv", ["x", "W1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             oh.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             oh.make_node("Conv", ["r1", "W2"], ["y"], pads=[1, 1, 1, 1], name="conv2")]
    graph = oh.make_graph(nodes, "wide", [oh.make_tensor_value_info("x", TP.FLOAT, [1, 3, 64, 64])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, [1, 64, 64, 64])], inits)
    return optcc.ir.load(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 13)]))


def test_the_same_call_twice_writes_the_same_bytes() -> None:
    data = _images(6)
    # quantized, bias-corrected, evaluated: the whole path that writes a model
    first, stats1 = quantize_int8(str(TINYCNN), data, require_target=False, require_speedup=False)
    second, stats2 = quantize_int8(str(TINYCNN), data, require_target=False, require_speedup=False)
    assert stats1["modified"] and stats1["pass"]["bias_correction"]["layers"] > 0
    assert _bytes(first) == _bytes(second)


def test_an_absurd_clock_changes_no_decision(monkeypatch) -> None:
    rng = np.random.default_rng(4)
    data = [{"x": rng.random((1, 3, 64, 64)).astype(np.float32)} for _ in range(3)]
    # modelled for the VNNI class, where it pays: the clock must not undo that
    reference, ref_stats = quantize_int8(_wide_conv(), data, require_target=False, measure_latency=True,
                                         cpu="x86-vnni")
    assert ref_stats["modified"]  # shipped on the model's word, not the clock's
    ticks = itertools.count()
    # every clock read jumps by a day; every latency measurement claims INT8 is 1000x slower
    monkeypatch.setattr(time, "perf_counter", lambda: 86400.0 * next(ticks))
    monkeypatch.setattr(fallback, "median_seconds", lambda session, feeds, **kw: 1e3 * (1 + next(ticks) % 2))
    got, stats = quantize_int8(_wide_conv(), data, require_target=False, measure_latency=True, cpu="x86-vnni")
    assert _bytes(got) == _bytes(reference)
    assert stats["modified"] == ref_stats["modified"] and stats.get("declined") == ref_stats.get("declined")
    assert stats["latency"]["fully_quantized"]["modelled_speedup"] == \
        ref_stats["latency"]["fully_quantized"]["modelled_speedup"]


def test_the_modelled_fusion_matches_onnxruntimes() -> None:
    """The cost model's integer kernels are the ones onnxruntime actually fuses (its
    optimized graph, counted by count_integer_nodes), on the tiny CNN and a wide one."""
    for model, data in ((optcc.ir.load(str(TINYCNN)), _images(4)),
                        (_wide_conv(), [{"x": np.random.default_rng(2).random((1, 3, 64, 64)).astype(np.float32)}])):
        quantized, stats = quantize_int8(model, data, require_target=False, require_speedup=False,
                                         bias_correction=False, holdout_fraction=0)
        modelled = cost_model.modelled_seconds(quantized, {})  # fusion does not depend on sizes
        assert modelled.integer_kernels == fallback.count_integer_nodes(quantized)


def test_wide_convolutions_pay_and_overheads_do_not() -> None:
    """Compute-bound 64-channel convolutions are modelled faster in INT8 on a VNNI CPU;
    tinycnn at 32x32 (16 channels, a Q/DQ conversion around its float ops) is not, on
    either class, as measured."""
    data = [{"x": np.random.default_rng(3).random((1, 3, 64, 64)).astype(np.float32)} for _ in range(3)]
    _, wide = quantize_int8(_wide_conv(), data, require_target=False, cpu="x86-vnni")
    assert wide["latency"]["fully_quantized"]["modelled_speedup"] > 1.5 and wide["modified"]
    for cpu in cost_model.CPU_CLASSES:
        _, tiny = quantize_int8(str(TINYCNN), _images(6), require_target=False, cpu=cpu)
        assert tiny["latency"]["fully_quantized"]["modelled_speedup"] < 1.1 and tiny["declined"] == "speed"


def test_a_convolution_whose_relu_was_absorbed_keeps_its_multiply_accumulates() -> None:
    """Quantization absorbs a Relu into the Conv's Q range and renames the Conv's output;
    the graph output after its DQ keeps the calibrated name, so the MACs are counted."""
    from optcc.infra.registry import create_pass
    from optcc.quant.calibration import calibrate

    model = _wide_conv()
    relu = oh.make_node("Relu", ["y0"], ["y"], name="relu2")
    proto = optcc.ir.serialize(model)
    proto.graph.node[-1].output[0] = "y0"
    proto.graph.node.append(relu)
    float_model = optcc.ir.load(proto)
    data = [{"x": np.random.default_rng(5).random((1, 3, 64, 64)).astype(np.float32)} for _ in range(2)]
    calibration = calibrate(float_model, data, "minmax")
    counts = cost_model.element_counts(calibration.stats)
    quantized = create_pass("quantize-int8", ranges=calibration.ranges)(float_model.clone()).model
    assert not any(n.op_type == "Relu" for n in quantized.graph)
    macs = (27 + 64 * 9) * 64 * 64 * 64  # both convolutions: weights per output x outputs
    assert cost_model.features(float_model, counts)[0]["float_macs"] == macs
    assert cost_model.features(quantized, counts)[0]["int8_macs"] == macs
