"""Mixed int4/int8 weights: when int4 misses its check, the most sensitive layers are raised
to int8 until it passes. A MatMul chain whose layers are exact on a 4-bit grid but for one
with outlier values in every block: that layer alone is raised, the output meets the check
against numpy float64, the rest stays int4; a check no width can meet keeps the decline."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

import optcc
from optcc.passes.quantize_weights import QuantizeWeightsPass

WIDTH, BLOCK = 64, 32
LAYERS = ("W1", "W2", "W3", "W4")  # W4 makes the output: the head, int8 by policy
SENSITIVE = "W2"


def _grid(rng: np.random.Generator) -> np.ndarray:
    """A [WIDTH, WIDTH] weight on a 4-bit grid: every block of 32 rows of a column holds the
    levels 0 and 15 of ``(q - 8) * 0.02``, so int4 (and int8) blocks reproduce it."""
    q = rng.integers(0, 16, (WIDTH, WIDTH))
    q[0::BLOCK] = 0
    q[1::BLOCK] = 15
    return (q - 8) * 0.02


def _outliers(rng: np.random.Generator) -> np.ndarray:
    """Small normal values with one large one per block of each column: int4's 16 levels
    span the outlier, so the rest round to a level or two."""
    w = rng.normal(size=(WIDTH, WIDTH)) * 0.1
    w[5::BLOCK] = 3.0
    return w


def _weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {name: (_outliers(rng) if name == SENSITIVE else _grid(rng)) for name in LAYERS}


def _chain() -> onnx.ModelProto:
    """x -> MatMul(W1) -> Relu -> MatMul(W2) -> Relu -> MatMul(W3) -> Relu -> MatMul(W4) = y."""
    nodes, current = [], "x"
    for i, name in enumerate(LAYERS):
        nodes.append(oh.make_node("MatMul", [current, name], [f"h{i}"], name=f"mm_{name}"))
        current = f"h{i}"
        if i < len(LAYERS) - 1:
            nodes.append(oh.make_node("Relu", [current], [f"r{i}"]))
            current = f"r{i}"
    nodes[-1].output[0] = "y"
    graph = oh.make_graph(nodes, "chain", [oh.make_tensor_value_info("x", TP.FLOAT, ["N", WIDTH])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, ["N", WIDTH])],
                          [nh.from_array(w.astype(np.float32), name) for name, w in _weights().items()])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)])


def _float64(x: np.ndarray) -> np.ndarray:
    """The chain in float64 numpy, from the float32 weights it stores."""
    h = x.astype(np.float64)
    for i, name in enumerate(LAYERS):
        h = h @ _weights()[name].astype(np.float32).astype(np.float64)
        if i < len(LAYERS) - 1:
            h = np.maximum(h, 0)
    return h


def _samples(count: int = 8, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(8, WIDTH)).astype(np.float32)} for _ in range(count)]


def _run(model: onnx.ModelProto | bytes, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = model if isinstance(model, bytes) else model.SerializeToString()
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    return [session.run(None, f)[0] for f in feeds]


def _sqnr_db(model: onnx.ModelProto | bytes, feeds: list[dict[str, np.ndarray]]) -> float:
    """The output's SQNR against the float64 chain, over every sample."""
    want = np.concatenate([_float64(f["x"]) for f in feeds])
    got = np.concatenate(_run(model, feeds)).astype(np.float64)
    return float(10 * np.log10(np.sum(want ** 2) / np.sum((got - want) ** 2)))


def _level_types(model: onnx.ModelProto) -> dict[str, int]:
    """Each layer's stored level type (the DequantizeLinear reading its weight's levels)."""
    types = {t.name: t.data_type for t in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear":
            layer = next(name for name in LAYERS if node.input[0].startswith(f"{name}_q"))
            found[layer] = types[node.input[0]]
    return found


def _gate(minimum_db: float, feeds: list[dict[str, np.ndarray]], seen: list[float]):  # noqa: ANN202
    """A check of the test's own: the candidate's output SQNR against numpy float64."""
    def gate(candidate) -> str | None:  # noqa: ANN001
        sqnr = _sqnr_db(optcc.ir.serialize(candidate), feeds)
        seen.append(sqnr)
        return None if sqnr >= minimum_db else f"SQNR {sqnr:.1f} dB < {minimum_db} dB"
    return gate


def _quantized(gate=None, samples=None, held_out=None) -> tuple[onnx.ModelProto, dict]:  # noqa: ANN001
    model = optcc.ir.load(_chain())
    result = QuantizeWeightsPass(bits=4, gate=gate, samples=samples, held_out=held_out)(model)
    return optcc.ir.serialize(result.model), result.stats


@pytest.mark.parametrize("samples", [None, _samples(4, seed=9)], ids=["weight error", "output error"])
def test_the_sensitive_layer_alone_is_raised_to_int8(samples: list | None) -> None:
    feeds = _samples()
    all_int4, _ = _quantized()
    assert _level_types(all_int4) == {"W1": TP.UINT4, "W2": TP.UINT4, "W3": TP.UINT4, "W4": TP.UINT8}
    low = _sqnr_db(all_int4, feeds)
    seen: list[float] = []
    model, stats = _quantized(_gate(low + 10, feeds, seen), samples)
    assert _level_types(model) == {"W1": TP.UINT4, "W2": TP.UINT8, "W3": TP.UINT4, "W4": TP.UINT8}
    assert _sqnr_db(model, feeds) >= low + 10
    assert _sqnr_db(model, _samples(seed=5)) >= low + 10  # on other inputs too
    assert [c["int8_weights"] for c in stats["mixed"]["checks"]] == [0, 1]
    assert stats["mixed"]["raised"] == [SENSITIVE]
    assert stats["mixed"]["ranked_by"] == ("output error on the samples" if samples else "weight error (no samples)")
    assert stats["bit_widths"]["mm_W2"]["bits"] == 8 and "raised" in stats["bit_widths"]["mm_W2"]["why"]
    assert stats["bit_widths"]["mm_W4"] == {"bits": 8, "why": "head (head_bits)"}
    assert stats["quantized"] == {"MatMul int4": 2, "MatMul int8": 2}
    assert seen[0] == pytest.approx(low)


def test_int4_that_passes_is_written_as_without_a_check() -> None:
    seen: list[float] = []
    model, stats = _quantized(_gate(-100.0, _samples(), seen))
    assert model.SerializeToString() == _quantized()[0].SerializeToString()
    assert stats["mixed"]["summary"] == "int4 passed its check; no layer raised to int8" and len(seen) == 1


def test_a_check_no_width_meets_keeps_int4_and_says_declined() -> None:
    seen: list[float] = []
    model, stats = _quantized(_gate(200.0, _samples(), seen))
    assert _level_types(model) == {"W1": TP.UINT4, "W2": TP.UINT4, "W3": TP.UINT4, "W4": TP.UINT8}
    assert stats["mixed"]["declined"] is True
    # 1, 2, then all three body weights at int8: each misses
    assert [c["int8_weights"] for c in stats["mixed"]["checks"]] == [0, 1, 2, 3]
    assert all(s < 200.0 for s in seen)


def _checks(stats: dict) -> list[tuple[int, bool, bool]]:
    """(weights at int8, held-out check or the gate, passed) per check, in order."""
    return [(c["int8_weights"], bool(c.get("held_out")), c["passed"]) for c in stats["mixed"]["checks"]]


def test_a_held_out_check_confirms_the_gates_choice() -> None:
    """The gate fits its samples; other samples confirm the layer it raised."""
    feeds, others = _samples(), _samples(seed=5)
    low = _sqnr_db(_quantized()[0], feeds)
    model, stats = _quantized(_gate(low + 10, feeds, []), held_out=_gate(low + 10, others, []))
    assert _level_types(model) == {"W1": TP.UINT4, "W2": TP.UINT8, "W3": TP.UINT4, "W4": TP.UINT8}
    assert _sqnr_db(model, others) >= low + 10
    assert _checks(stats) == [(0, False, False), (1, False, True), (1, True, True)]
    assert "gate_chose" not in stats["mixed"]


def test_int4_that_passes_the_gate_alone_is_raised_until_the_held_out_check_passes() -> None:
    feeds, others = _samples(), _samples(seed=5)
    low = _sqnr_db(_quantized()[0], feeds)
    model, stats = _quantized(_gate(-100.0, feeds, []), held_out=_gate(low + 10, others, []))
    assert _level_types(model) == {"W1": TP.UINT4, "W2": TP.UINT8, "W3": TP.UINT4, "W4": TP.UINT8}
    assert _sqnr_db(model, others) >= low + 10
    assert _checks(stats) == [(0, False, True), (0, True, False), (1, False, True), (1, True, True)]
    assert stats["mixed"]["missed"].startswith("held-out check: SQNR")


def test_a_held_out_check_no_width_meets_declines() -> None:
    """The gate's choice and every count above it miss the held-out check: all-int4, declined."""
    feeds = _samples()
    low = _sqnr_db(_quantized()[0], feeds)
    model, stats = _quantized(_gate(low + 10, feeds, []), held_out=_gate(200.0, _samples(seed=5), []))
    assert _level_types(model) == {"W1": TP.UINT4, "W2": TP.UINT4, "W3": TP.UINT4, "W4": TP.UINT8}
    assert stats["mixed"]["declined"] is True and "held-out" in stats["mixed"]["summary"]
    assert _checks(stats) == [(0, False, False), (1, False, True), (1, True, False),
                              (2, False, True), (2, True, False), (3, False, True), (3, True, False)]


def test_optimize_raises_what_the_verification_needs() -> None:
    """Through ``optimize``: int4 alone misses the verification (SQNR judge), the mixed model
    passes it, meets the int8 tolerance against float64 on other inputs, and is the same bytes
    on a second run."""
    samples = _samples()
    with pytest.raises(optcc.PrecisionNotAppliedError):
        optcc.optimize(_chain(), weight_only={"bits": 4, "gate": None}, inputs=samples)
    results = [optcc.optimize(_chain(), weight_only="int4", inputs=samples) for _ in range(2)]
    data = [r.model.SerializeToString() for r in results]
    assert data[0] == data[1]
    assert _level_types(results[0].model) == {"W1": TP.UINT4, "W2": TP.UINT8, "W3": TP.UINT4, "W4": TP.UINT8}
    assert _sqnr_db(data[0], _samples(seed=5)) >= 25.0
    stats = next(r.stats for r in results[0].report.passes if r.name == "quantize-weights")
    assert stats["mixed"]["raised"] == [SENSITIVE]
    assert "1 of 3 body layers raised to int8" in results[0].report.summary()
