"""The fallback's work is bounded whatever the number of layers: the output ranking takes
at most ``OUTPUT_RANKING_RUNS`` layer runs (one per layer and sample shown), spent on the
first and last layers and those worst by their own error, and the search below the budget judges at most
``SEARCH_CANDIDATES`` candidates, shipping the fewest float layers measured to meet the
target."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
from onnx import TensorProto as TP

import optcc
from reference import lossy_metrics
from test_int8_output_ranking import _rows  # rows whose feature 0 is always 0
from optcc.quant import fallback
from optcc.quant.calibration import calibrate
from optcc.infra.registry import create_pass
from optcc.quant.fallback import Target

BRANCHES = 10
# the outlier of each branch's weight row 0 (the input's feature 0 is always 0): the larger it
# is, the coarser the INT8 step of every real weight, the worse the branch's own error
OUTLIERS = [3.0 * 1.35**i for i in range(BRANCHES)]
TARGET = Target(min_sqnr_db=22.0, min_argmax_agreement=0.0)


def _model() -> onnx.ModelProto:
    """``y = sum_i x W_i`` over ``BRANCHES`` MatMuls ``mm{i}``, ``W_i``'s row 0 set to
    ``OUTLIERS[i]``: every branch adds its own error to ``y``, the last ones most."""
    rng = np.random.default_rng(5)
    nodes, inits, total = [], [], None
    for i, outlier in enumerate(OUTLIERS):
        w = rng.normal(size=(16, 16)).astype(np.float32) * 0.3
        w[0, :] = outlier
        inits.append(nh.from_array(w, f"W{i}"))
        nodes.append(oh.make_node("MatMul", ["x", f"W{i}"], [f"b{i}"], name=f"mm{i}"))
        if total is not None:
            nodes.append(oh.make_node("Add", [total, f"b{i}"], [f"s{i}"], name=f"add{i}"))
        total = f"s{i}" if total is not None else f"b{i}"
    nodes.append(oh.make_node("Identity", [total], ["y"], name="out"))
    graph = oh.make_graph(nodes, "branches", [oh.make_tensor_value_info("x", TP.FLOAT, ["N", 16])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, ["N", 16])], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def test_the_fallback_does_bounded_work_and_ships_a_model_meeting_the_target(monkeypatch) -> None:
    """With a bound of 8 output-ranking runs (4 layers over the 2 samples shown) and 5
    search candidates: ``output_sqnr`` is asked about the first layer and the last in
    graph order and the two branches with the largest outliers (the worst own errors, as
    the weights make them), and nothing else; the
    quantizer builds the fully quantized model, the budget's and at most 5 more; the model
    shipped meets the SQNR target against onnxruntime's run of the original on the held-out
    samples, its float layers those the report names; and a second run ships the same bytes."""
    monkeypatch.setattr(fallback, "OUTPUT_RANKING_RUNS", 8)
    monkeypatch.setattr(fallback, "SEARCH_CANDIDATES", 5)
    proto, samples = _model(), _rows(20)
    float_model = optcc.ir.load(proto)
    calib, held = samples[:14], samples[14:]
    ranges = calibrate(float_model, calib, "minmax").ranges
    built: list[list[str]] = []

    def quantize(exclude=(), only=None):  # noqa: ANN001, ANN202
        built.append(list(exclude))
        result = create_pass("quantize-int8", ranges=ranges, exclude=list(exclude), only=only,
                             count_fused=False)(float_model.clone())
        return result.model, dict(result.stats)

    asked: list[tuple[list[str], int]] = []
    measure = fallback.output_sqnr

    def spy(reference, quantized, layer_outputs, shown, deltas=None):  # noqa: ANN001, ANN202
        asked.append((sorted(layer_outputs), len(shown)))
        return measure(reference, quantized, layer_outputs, shown, deltas=deltas)

    monkeypatch.setattr(fallback, "output_sqnr", spy)
    shipped, _, report = fallback.fallback(float_model, quantize, held, TARGET, max_float_layers=BRANCHES)
    assert report["initial"]["passed"] is False and report["target_met"] is True
    assert len(asked) == 1 and asked[0][1] == 2
    # the first layer and the last in graph order, and the two worst own errors (as the outliers make them)
    assert asked[0][0] == sorted(["mm0", f"add{BRANCHES - 1}", f"mm{BRANCHES - 2}", f"mm{BRANCHES - 1}"])
    searched = [row for row in report["tried"] if row["order"] == "estimate"]
    assert len(searched) == 5 and "search_bounded" in report and len(built) == 2 + len(searched)
    kept = report["kept_float"]
    assert built[-1] == kept or any(row["passed"] and row["kept_float"] == kept for row in report["tried"])
    graph = optcc.ir.serialize(shipped).graph
    weights = {i.name for i in graph.initializer}
    float_matmuls = {n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights}
    assert float_matmuls == {layer for layer in kept if layer.startswith("mm")}  # the others read a Q/DQ weight
    for sqnr, _ in lossy_metrics(proto, shipped, held):
        assert sqnr >= TARGET.min_sqnr_db, sqnr
    again, _, _ = fallback.fallback(float_model, quantize, held, TARGET, max_float_layers=BRANCHES)
    assert optcc.ir.serialize(again).SerializeToString() == optcc.ir.serialize(shipped).SerializeToString()
