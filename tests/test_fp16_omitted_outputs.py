"""FP16 and a node with an omitted optional output (g2p-id's Keras LSTM encoder: only its final
states are read, so -O1's dead-node elimination omits its sequence output ``Y``, named '';
silero-vad's LSTMs likewise). An omitted output holds no value, so it has no type: it must
not stop the node's type parameter from converting, nor hide the node from the report (the
whole encoder stayed float32 and the report listed only the Transpose and Squeezes around
the LSTM)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
import pytest
from onnx import TensorProto as TP

import optcc
from optcc.passes.convert_float16 import ConvertFloat16Pass
from reference import expected_outputs_float64, onnxruntime_outputs

HIDDEN, FEATURES, STEPS = 8, 5, 6


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("OPTCC_CACHE", str(tmp_path_factory.getbasetemp() / "optcc-cache"))


def _lstm_final_states_only() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weight = lambda *shape: (0.4 * rng.standard_normal(shape)).astype(np.float32)  # noqa: E731
    inits = [nh.from_array(weight(1, 4 * HIDDEN, FEATURES), "W"), nh.from_array(weight(1, 4 * HIDDEN, HIDDEN), "R"),
             nh.from_array(weight(1, 8 * HIDDEN), "B")]
    nodes = [oh.make_node("LSTM", ["x", "W", "R", "B"], ["", "h", "c"], hidden_size=HIDDEN)]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TP.FLOAT, [STEPS, 1, FEATURES])],
                          [oh.make_tensor_value_info("h", TP.FLOAT, [1, 1, HIDDEN]),
                           oh.make_tensor_value_info("c", TP.FLOAT, [1, 1, HIDDEN])], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 14)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_an_lstm_without_its_sequence_output_converts():
    proto = _lstm_final_states_only()
    result = ConvertFloat16Pass()(optcc.ir.load(proto))
    out = optcc.ir.serialize(result.model)
    onnx.checker.check_model(out, full_check=True)
    lstm = next(n for n in out.graph.node if n.op_type == "LSTM")
    assert list(lstm.output) == ["", *lstm.output[1:]]  # still omitted
    weights = {t.name: t.data_type for t in out.graph.initializer}
    assert weights[lstm.input[1]] == TP.FLOAT16 and weights[lstm.input[2]] == TP.FLOAT16
    assert result.stats["converted"].get("LSTM") == 1
    feeds = {"x": np.random.default_rng(1).standard_normal((STEPS, 1, FEATURES)).astype(np.float32)}
    for got, want in zip(onnxruntime_outputs(out, feeds), expected_outputs_float64(proto, feeds)):
        np.testing.assert_allclose(got, want, atol=5e-3)


def test_a_kept_lstm_without_its_sequence_output_is_reported():
    result = ConvertFloat16Pass(block={"LSTM"})(optcc.ir.load(_lstm_final_states_only()))
    assert result.stats["kept_float32_ops"] and set(result.stats["kept_float32_ops"].values()) == {"LSTM"}
    assert set(result.stats["kept_float32"].values()) == {"blocked by the user"}
