"""``--fp16`` on generated inputs: the conversion judges the samples the final verification
judges. Here an output is 0 on any one-row input (x minus its batch mean) and is, on two
rows, a difference of two nearly equal products that float16 weights cannot hold: a check
on batch-1 samples alone sees nothing to lose, the verification's batch sample sees it.
Found on PP-Structure SLANet, whose conversion passed on its 2 samples and was then
reverted by the verification's 3 (27.0 dB < 40 dB), so ``--fp16`` ended with exit 5.
The numbers are judged by numpy in float64."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
import onnxruntime as ort
from onnx import TensorProto as TP

import optcc


def _model() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    weights = {"W1": rng.normal(size=(16, 16)).astype(np.float32)}
    weights["W2"] = (weights["W1"] * (1 + 1e-3 * rng.normal(size=(16, 16)))).astype(np.float32)
    # W3, which float16 holds, is most of the weights: the float16 model is smaller
    weights["W3"] = (rng.normal(size=(16, 64)) * 0.25).astype(np.float32)
    nodes = [oh.make_node("MatMul", ["x", "W1"], ["a"]), oh.make_node("MatMul", ["x", "W2"], ["b"]),
             oh.make_node("Sub", ["a", "b"], ["d"]),
             oh.make_node("ReduceMean", ["x"], ["m"], axes=[0], keepdims=1), oh.make_node("Sub", ["x", "m"], ["c"]),
             oh.make_node("Mul", ["d", "c"], ["y"]), oh.make_node("MatMul", ["x", "W3"], ["z"])]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TP.FLOAT, ["n", 16])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, ["n", 16]),
                           oh.make_tensor_value_info("z", TP.FLOAT, ["n", 64])],
                          [nh.from_array(w, name) for name, w in weights.items()])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model, weights


def _sqnr_db(reference: np.ndarray, got: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(reference ** 2) / max(np.sum((reference - got) ** 2), 1e-300)))


def test_fp16_judges_the_verifications_generated_samples() -> None:
    model, w = _model()
    result = optcc.optimize(model, fp16=True)
    assert result.precision["fp16"] is None, result.precision  # converted, and the verification kept it
    proto = result.model  # a ModelProto, as given
    stored = {t.name: t.data_type for t in proto.graph.initializer}
    assert stored.get("W3") == TP.FLOAT16, stored  # what float16 holds is still converted
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(5)
    for rows in (2, 3, 5):
        x = rng.uniform(-1, 1, (rows, 16)).astype(np.float32)
        x64 = x.astype(np.float64)
        y = (x64 @ w["W1"].astype(np.float64) - x64 @ w["W2"].astype(np.float64)) * (x64 - x64.mean(0))
        z = x64 @ w["W3"].astype(np.float64)
        got_y, got_z = session.run(None, {"x": x})
        assert _sqnr_db(y, got_y) >= 40.0, rows
        assert _sqnr_db(z, got_z) >= 40.0, rows
