"""INT8 driver: the fallback returns the top-ranked layers to float until the target holds,
and the driver declines (returns the input model unchanged, with the reason) when INT8
misses the accuracy target or is not faster than float32."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
import pytest
from onnx import TensorProto as TP

import optcc
from reference import EXACT_RTOL, assert_close, lossy_metrics, onnxruntime_outputs
from optcc.quant.fallback import Target, compare_latency
from optcc.quant.driver import quantize_int8
from calls import first_arguments

# 16-wide random MatMuls lose ~8 dB each in INT8: the tests' target is 15 dB
TARGET = Target(min_sqnr_db=15.0, min_argmax_agreement=0.5)
MIN_SQNR_DB, MIN_COSINE = 15.0, 0.97


def _proto(model: optcc.ir.Model | onnx.ModelProto) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else optcc.ir.serialize(model)


def _assert_same_outputs(original: onnx.ModelProto, model, samples) -> None:
    """``model`` computes what the float32 ``original`` does, both on onnxruntime."""
    for feeds in samples:
        assert_close(onnxruntime_outputs(_proto(model), feeds), onnxruntime_outputs(original, feeds), EXACT_RTOL)


def _chain(sensitive: tuple[str, ...], n_layers: int) -> onnx.ModelProto:
    """MatMul layers mm1..mmN (ReLU after each but the last). In a sensitive layer, input
    feature 0 is always 0 (the previous layer's weight column 0 is zero) but the weight's
    row 0 is huge: its per-column INT8 scale rounds every real weight to zero."""
    rng = np.random.default_rng(7)
    nodes, inits, x = [], [], "x"
    weights = [(rng.normal(size=(16, 16)) * 0.3).astype(np.float32) for _ in range(n_layers)]
    for i in range(n_layers):
        name = f"mm{i + 1}"
        if name in sensitive:
            weights[i - 1][:, 0] = 0.0  # feature 0 of this layer's input is always 0
            weights[i][0, :] = 1000.0
    for i, w in enumerate(weights):
        name = f"mm{i + 1}"
        inits.append(nh.from_array(w, f"W{i + 1}"))
        out = "y" if i == n_layers - 1 else f"h{i + 1}"
        nodes.append(oh.make_node("MatMul", [x, f"W{i + 1}"], [out], name=name))
        if i < n_layers - 1:
            nodes.append(oh.make_node("Relu", [out], [f"r{i + 1}"], name=f"relu{i + 1}"))
            x = f"r{i + 1}"
    graph = oh.make_graph(nodes, "chain", [oh.make_tensor_value_info("x", TP.FLOAT, ["N", 16])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, ["N", 16])], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _conv_bn() -> onnx.ModelProto:
    """Conv -> BatchNormalization -> Relu -> Conv: the driver folds BN before quantizing."""
    rng = np.random.default_rng(3)
    inits = [
        nh.from_array((rng.normal(size=(8, 3, 3, 3)) * 0.3).astype(np.float32), "W1"),
        nh.from_array(rng.uniform(0.5, 1.5, 8).astype(np.float32), "gamma"),
        nh.from_array(rng.normal(size=8).astype(np.float32) * 0.1, "beta"),
        nh.from_array(rng.normal(size=8).astype(np.float32) * 0.1, "mean"),
        nh.from_array(rng.uniform(0.5, 1.5, 8).astype(np.float32), "var"),
        nh.from_array((rng.normal(size=(4, 8, 1, 1)) * 0.3).astype(np.float32), "W2"),
    ]
    nodes = [
        oh.make_node("Conv", ["x", "W1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        oh.make_node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["b1"], name="bn1"),
        oh.make_node("Relu", ["b1"], ["r1"], name="relu1"),
        oh.make_node("Conv", ["r1", "W2"], ["y"], name="conv2"),
    ]
    graph = oh.make_graph(nodes, "convbn", [oh.make_tensor_value_info("x", TP.FLOAT, [1, 3, 8, 8])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, [1, 4, 8, 8])], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    return model


def _rows(n: int, seed: int = 12) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(4, 16)).astype(np.float32)} for _ in range(n)]


def _images(n: int, seed: int = 5) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(n)]


def _ops(model: optcc.ir.Model | onnx.ModelProto) -> dict[str, int]:
    if isinstance(model, onnx.ModelProto):
        model = optcc.ir.load(model)
    return optcc.ir.op_histogram(model)


def test_fallback_returns_the_top_ranked_layers_until_the_target_holds() -> None:
    model = _chain(("mm2", "mm4"), 5)
    data = _rows(20)
    # min_speedup tiny: the speed check always accepts (this test is about accuracy)
    q, stats = quantize_int8(model, data, "minmax", min_speedup=1e-9, target=TARGET, metric=None)
    report = stats["fallback"]
    assert report["initial"]["passed"] is False
    assert {r["layer"] for r in report["sensitivity"][:2]} == {"mm2", "mm4"}
    assert set(report["kept_float"]) == {"mm2", "mm4"} and report["target_met"] is True
    # the estimate's search: the budget's 2 layers, worst by their own error, meet; then the worst layer alone
    # by the output ranking misses, so the budget's model is the result
    assert [(t["order"], t["float_layers"], t["passed"]) for t in report["tried"]] == [
        ("local", 2, True), ("estimate", 1, False)]
    assert {r["layer"] for r in report["sensitivity"][:2]} == {"mm2", "mm4"}
    assert all(r["local_sqnr_db"] < 10 for r in report["sensitivity"][:2])
    assert all(r["local_sqnr_db"] > 20 for r in report["sensitivity"][2:])
    assert stats["modified"] is True and "declined" not in stats
    assert set(stats["pass"]["layers"]) == {"mm1", "mm3", "mm5"}
    hist = _ops(q)
    assert hist["MatMul"] == 5 and hist["QuantizeLinear"] > 0
    for sqnr, cosine in lossy_metrics(model, q, data[-4:]):
        assert sqnr >= MIN_SQNR_DB and cosine >= MIN_COSINE, (sqnr, cosine)


def test_fallback_bisects_to_the_fewest_float_layers() -> None:
    model = _chain(("mm2", "mm4", "mm6"), 8)
    q, stats = quantize_int8(model, _rows(20), "minmax", min_speedup=1e-9, target=TARGET, metric=None,
                             ranking="measured")
    report = stats["fallback"]
    # measured ranking: 1, 2 miss, 4 meets; bisection tries 3, which meets: three layers float, not four
    assert [(t["float_layers"], t["passed"]) for t in report["tried"]] == [
        (1, False), (2, False), (4, True), (3, True)]
    assert set(report["kept_float"]) == {"mm2", "mm4", "mm6"} and stats["modified"]
    # the estimate: the budget (4) meets, then 1, 2 miss and 3 meets: the same three layers
    q, stats = quantize_int8(model, _rows(20), "minmax", min_speedup=1e-9, target=TARGET, metric=None)
    report = stats["fallback"]
    assert [(t["float_layers"], t["passed"]) for t in report["tried"]] == [
        (4, True), (1, False), (2, False), (3, True)]
    assert set(report["kept_float"]) == {"mm2", "mm4", "mm6"} and stats["modified"]


@pytest.mark.parametrize("n_layers, sensitive, tried", [
    # budget 8: the budget meets, the probes miss, then 6 (the mean of 4 and 8) and 5 meet
    (16, ("mm2", "mm4", "mm6", "mm8", "mm10"), [(8, True), (1, False), (2, False), (4, False), (6, True), (5, True)]),
    # budget 20: the budget meets, the probe 4 meets, then 3
    (40, ("mm2", "mm4", "mm6"), [(20, True), (1, False), (2, False), (4, True), (3, True)]),
    # budget 32: the budget meets, the probes miss, 11 (the geometric mean of 4 and 32) misses, 18 (that of 11
    # and 32) meets, then 14 and 12 (arithmetic means) meet
    (64, tuple(f"mm{i}" for i in range(2, 26, 2)), [(32, True), (1, False), (2, False), (4, False), (11, False),
                                                     (18, True), (14, True), (12, True)]),
])
def test_fallback_bisects_between_the_probes_and_the_budget(
        n_layers: int, sensitive: tuple[str, ...], tried: list[tuple[int, bool]]) -> None:
    """The budget (half the layers) meets, the probes (1, 2, 4) meet or miss, and bisection
    between them, in log space while the range spans more than a factor of 2, ends with exactly
    the sensitive layers float; the result is as accurate as the target asks against
    onnxruntime's float32 run of the original."""
    model = _chain(sensitive, n_layers)
    data = _rows(20)
    q, stats = quantize_int8(model, data, "minmax", min_speedup=1e-9, target=TARGET, metric=None)
    report = stats["fallback"]
    assert [(t["float_layers"], t["passed"]) for t in report["tried"]] == tried
    assert set(report["kept_float"]) == set(sensitive) and stats["modified"]
    assert set(stats["pass"]["layers"]) == {f"mm{i}" for i in range(1, n_layers + 1)} - set(sensitive)
    proto = _proto(q)  # in the model itself: a quantized MatMul reads its weight dequantized
    made_by = {o: n.op_type for n in proto.graph.node for o in n.output}
    float_weights = {n.name for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] not in made_by}
    assert float_weights == set(sensitive)
    for sqnr, cosine in lossy_metrics(model, q, data[-4:]):
        assert sqnr >= MIN_SQNR_DB and cosine >= MIN_COSINE, (sqnr, cosine)


def test_accuracy_decline_returns_the_input_model_with_the_reason() -> None:
    model = _chain(("mm2", "mm3"), 3)  # both sensitive; at most int(0.5 * 3) = 1 may go float
    with_budget = quantize_int8(model, _rows(20), "minmax", min_speedup=1e-9, target=TARGET, metric=None, max_float_layers=2)[1]
    assert with_budget["modified"] and set(with_budget["fallback"]["kept_float"]) == {"mm2", "mm3"}
    q, stats = quantize_int8(model, _rows(20), "minmax", min_speedup=1e-9, target=TARGET, metric=None,
                             ranking="measured")
    assert stats["modified"] is False and stats["declined"] == "accuracy"
    assert "misses the accuracy target" in stats["reason"]
    # two layers each miss the target alone, more than the one allowed float: no search
    assert "2 layers each miss the target when quantized alone, more than the 1 allowed" in stats["reason"]
    assert stats["fallback"]["target_met"] is False and stats["fallback"]["tried"] == []
    assert {r["layer"] for r in stats["fallback"]["sensitivity"] if not r["alone_passes"]} == {"mm2", "mm3"}
    assert _ops(q) == _ops(model)  # no Q/DQ: the model as given
    assert [i.name for i in q.graph.initializers.values()] == [i.name for i in model.graph.initializer]
    # the estimate: the budget's one layer float misses, so no smaller k is tried and no layer's error is
    # taken to the outputs
    q, stats = quantize_int8(model, _rows(20), "minmax", min_speedup=1e-9, target=TARGET, metric=None)
    assert stats["declined"] == "accuracy" and "even the 1 layers the budget allows" in stats["reason"]
    assert [(t["order"], t["float_layers"], t["passed"]) for t in stats["fallback"]["tried"]] == [
        ("local", 1, False)]
    assert all(r["output_sqnr_db"] == "nan" for r in stats["fallback"]["sensitivity"])
    assert _ops(q) == _ops(model)


def test_speed_decline_skips_the_fallback_and_keeps_the_model_as_given() -> None:
    model = _conv_bn()
    # min_speedup huge: INT8 would have to be a million times faster, so it is declined
    q, stats = quantize_int8(model, _images(10), "minmax", min_speedup=1e6)
    assert stats["modified"] is False and stats["declined"] == "speed"
    assert "not faster than float32" in stats["reason"] and "no fallback attempted" in stats["reason"]
    timing = stats["latency"]["fully_quantized"]
    assert 0 < timing["modelled_speedup"] < 1e6 and "measured" not in timing  # modelled, never timed
    assert "initial" not in stats["fallback"]  # the fallback never ran
    # the input model itself, not the BN-folded float copy calibration used
    assert _ops(q) == _ops(model) and _ops(q)["BatchNormalization"] == 1
    _assert_same_outputs(model, q, _images(3, seed=9))


def test_without_the_checks_the_quantized_model_comes_back() -> None:
    model = _chain(("mm2", "mm3"), 3)
    q, stats = quantize_int8(model, _rows(20), "minmax", require_speedup=False, require_target=False)
    assert stats["modified"] is True and stats["fallback"]["target_met"] is False
    assert _ops(q).get("QuantizeLinear", 0) > 0


def test_optimize_reports_why_int8_was_not_applied() -> None:
    """End to end through optimize(int8_calibration=...): the INT8 model would miss the
    target (or not be faster), so the pass leaves the model float, says why, and the
    result computes what the original does."""
    model = _chain(("mm2", "mm3"), 3)
    data = _rows(20)
    try:  # without the opt-in, a declined INT8 is an error carrying the result
        optcc.optimize(model, passes=[], int8_calibration=data, verify=True)
        raise AssertionError("a declined INT8 did not raise")
    except optcc.errors.PrecisionNotAppliedError as error:
        assert "kept float32" in str(error)
    result = optcc.optimize(model, passes=[], int8_calibration=data, verify=True, allow_float_fallback=True)
    (record,) = [r for r in result.report.passes if r.name == "quantize-int8-calibrated"]
    assert record.status == "unchanged"
    assert record.stats["modified"] is False and record.stats["declined"] in ("accuracy", "speed")
    assert "kept float32" in record.stats["reason"]
    assert "QuantizeLinear" not in _ops(result.model)
    _assert_same_outputs(model, result.model, data[-4:])


def test_compare_latency_interleaves_both_models() -> None:
    model = optcc.ir.load(_conv_bn())
    timing = compare_latency(model, model.clone(), _images(3), rounds=3, runs=2)
    assert timing["float32_s"] > 0 and timing["int8_s"] > 0 and timing["rounds"] == 3
    assert all(s >= 1.0 for s in timing["spread"])


def test_an_accuracy_decline_reads_as_separate_clauses() -> None:
    # the miss and what the fallback tried were run together: "... (target 30) even the 1 layers ..."
    model = _chain(("mm2", "mm3"), 3)
    stats = quantize_int8(model, _rows(20), "minmax", min_speedup=1e-9, target=TARGET, metric=None)[1]
    assert stats["declined"] == "accuracy"
    assert f"(target {TARGET.min_argmax_agreement:g}); even the 1 layers the budget allows" in stats["reason"], \
        stats["reason"]
    assert stats["reason"].endswith("do not meet it; kept float32")


def test_a_speed_decline_corrects_no_bias(monkeypatch) -> None:
    """The decline is decided on the fully quantized model before its bias correction (which
    can only add nodes): nothing is measured for a model that is not shipped."""
    import optcc.quant.driver as driver

    corrections = first_arguments(monkeypatch, driver, "correct_biases")
    model = _conv_bn()
    q, stats = quantize_int8(model, _images(10), "minmax", min_speedup=1e6)
    assert stats["declined"] == "speed" and corrections == []
    assert "bias_correction" not in stats["pass"]
    _assert_same_outputs(model, q, _images(3, seed=9))
    # accepted for speed, the model is corrected once and modelled as it ships
    shipped, accepted = quantize_int8(model, _images(10), "minmax", min_speedup=1e-9, require_target=False)
    assert len(corrections) == 1 and accepted["pass"]["bias_correction"]["layers"] == 2
    assert accepted["latency"]["fully_quantized"]["modelled_speedup"] > 0


def test_onnxruntime_graph_counted_only_for_a_model_returned(monkeypatch, tmp_path) -> None:
    """The integer kernels onnxruntime fuses are counted (a session that writes its optimized
    graph) for the INT8 model returned, as that graph holds them; for a declined one,
    never run again, no such session is built."""
    import onnxruntime as ort

    built: list[str] = []
    init = ort.InferenceSession.__init__

    def recorded(self, model, options=None, *args, **kwargs):  # noqa: ANN001, ANN202
        if options is not None and options.optimized_model_filepath:
            built.append(options.optimized_model_filepath)
        return init(self, model, options, *args, **kwargs)

    monkeypatch.setattr(ort.InferenceSession, "__init__", recorded)
    model = _chain(("mm2", "mm3"), 3)
    q, stats = quantize_int8(model, _rows(20), "minmax", min_speedup=1e-9, target=TARGET, metric=None)
    assert stats["declined"] == "accuracy" and _ops(q) == _ops(model)
    assert built == [] and "integer_op_histogram" not in stats
    q, stats = quantize_int8(model, _rows(20), "minmax", min_speedup=1e-9, target=TARGET, metric=None,
                             max_float_layers=2)
    assert stats["modified"] and len(built) == 1
    # onnxruntime's own extended graph of the model returned, counted here
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "fused.onnx")
    ort.InferenceSession(optcc.ir.serialize(q).SerializeToString(), options, providers=["CPUExecutionProvider"])
    fused = onnx.load(str(tmp_path / "fused.onnx"))
    counted = {}
    for node in fused.graph.node:
        if node.op_type.startswith(("QLinear", "QGemm", "MatMulInteger")) or node.op_type in (
                "QuantizeLinear", "DequantizeLinear"):
            counted[node.op_type] = counted.get(node.op_type, 0) + 1
    assert stats["integer_op_histogram"] == dict(sorted(counted.items()))
    assert stats["integer_nodes"] == sum(n for op, n in counted.items() if op.startswith(("QLinear", "QGemm", "MatMul")))
