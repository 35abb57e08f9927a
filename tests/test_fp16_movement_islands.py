"""ConvertFloat16Pass keeps float32 a group of data-movement nodes (Unsqueeze, Reshape,
Transpose, ...) whose every neighbour stays float32: converting it computes nothing in
float16 and only rounds the values it moves, behind a Cast on each side. The melspectrogram
front end of a wake-word model (int16-scale audio -> Unsqueeze -> STFT Conv kept float32 for
range) rounded its input to float16's step of 16 that way. The same front end, given only
--input-range, is where FP16 has to measure its ranges on that range."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
from onnx import TensorProto as TP

import optcc
from optcc.passes.convert_float16 import ConvertFloat16Pass
from reference import expected_outputs_float64


def _front_end() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x [1, 256] int16-scale -> Unsqueeze -> Conv (outputs past 65504: kept float32) ->
    Abs -> Add 1 -> Log (its input past 65504: kept float32) -> Mul 0.1 (converts)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 1, 32)).astype(np.float32)
    nodes = [
        oh.make_node("Unsqueeze", ["x", "axis1"], ["u"], name="unsqueeze"),
        oh.make_node("Conv", ["u", "w"], ["c"], name="conv"),
        oh.make_node("Abs", ["c"], ["a"], name="abs"),
        oh.make_node("Add", ["a", "one"], ["p"], name="add"),
        oh.make_node("Log", ["p"], ["l"], name="log"),
        oh.make_node("Mul", ["l", "tenth"], ["y"], name="scale"),
    ]
    inits = [nh.from_array(np.array([1], np.int64), "axis1"), nh.from_array(w, "w"),
             nh.from_array(np.array(1.0, np.float32), "one"), nh.from_array(np.array(0.1, np.float32), "tenth")]
    graph = oh.make_graph(nodes, "front", [oh.make_tensor_value_info("x", TP.FLOAT, [1, 256])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, [1, 8, 225])], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    t = np.arange(256)
    x = (20000 * np.sin(2 * np.pi * t / 37) + 3 * rng.standard_normal(256)).astype(np.float32)[None]
    return model, {"x": x}


def test_a_movement_node_between_float32_neighbours_stays_float32():
    model, feeds = _front_end()
    result = ConvertFloat16Pass(inputs=[feeds])(optcc.ir.load(model))
    proto = optcc.ir.serialize(result.model)
    onnx.checker.check_model(proto, full_check=True)
    kept = result.stats["kept_float32"]
    assert any("conv" in k for k in kept) and any("unsqueeze" in k for k in kept), kept
    assert result.stats["converted"].get("Mul") == 1  # the tail still converts
    unsqueeze = next(n for n in proto.graph.node if n.op_type == "Unsqueeze")
    assert unsqueeze.input[0] == "x"  # reads the float32 input itself, no Cast to float16 first
    weights = {t.name for t in proto.graph.initializer}
    casts = [n.input[0] for n in proto.graph.node if n.op_type == "Cast" and n.input[0] not in weights]
    assert len(casts) == 2 and "x" not in casts  # into the converted tail, and back to the output
    want = expected_outputs_float64(model, feeds)[0]
    got = expected_outputs_float64(proto, feeds)[0]
    sqnr_db = 10 * np.log10(np.sum(want ** 2) / np.sum((got - want) ** 2))
    assert sqnr_db >= 40.0 and np.abs(got - want).max() < 1e-2, (sqnr_db, np.abs(got - want).max())


def test_a_movement_node_feeding_a_converted_layer_converts():
    model, feeds = _front_end()
    # without the int16 scale nothing overflows: the Unsqueeze feeds a float16 Conv
    small = {"x": feeds["x"] / 20000}
    result = ConvertFloat16Pass(inputs=[small])(optcc.ir.load(model))
    assert result.stats["kept_float32"] == {}
    assert result.stats["converted"].get("Unsqueeze") == 1 and result.stats["converted"].get("Conv") == 1



def test_fp16_measures_its_ranges_on_the_given_input_range():
    """--input-range sizes FP16's generated samples as the verifier's: a layer the range
    takes past 65504 stays float32 in the pass, instead of the verifier finding inf there
    and declining FP16 for the whole model."""
    model, _ = _front_end()
    result = optcc.optimize(model, level=2, fp16=True, input_ranges={"x": (-30000.0, 30000.0)})
    assert result.applied_precision == ["fp16"], result.report.warnings
    stats = next(r.stats for r in result.report.passes if r.name == "convert-float16")
    assert any(">= 65504" in why for why in stats["kept_float32"].values())
    feeds = {"x": np.random.default_rng(3).uniform(-30000, 30000, (1, 256)).astype(np.float32)}
    want = expected_outputs_float64(model, feeds)[0]
    got = expected_outputs_float64(result.model, feeds)[0]
    sqnr_db = 10 * np.log10(np.sum(want ** 2) / np.sum((got - want) ** 2))
    assert np.isfinite(got).all() and sqnr_db >= 40.0, sqnr_db


def test_fp16_on_inputs_of_unknown_scale_says_so():
    model, feeds = _front_end()
    generated = optcc.optimize(model, level=2, fp16=True)
    assert generated.applied_precision == ["fp16"]
    assert any("standard-normal values for 'x'" in w for w in generated.report.warnings), generated.report.warnings
    for options in ({"input_ranges": {"x": (-1.0, 1.0)}}, {"inputs": [feeds]}):
        told = optcc.optimize(model, level=2, fp16=True, **options)
        assert not any("standard-normal" in w for w in told.report.warnings), told.report.warnings
