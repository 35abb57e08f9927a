"""drop-zero-rnn-states: an LSTM/GRU/RNN initial state that is all zeros (a zero scalar
broadcast to a run-time shape, as tf2onnx exports Keras recurrent layers) is dropped, and
the shape chain that computed it goes with it; states that are not provably zero, and
recurrences whose weights are not finite constants, keep theirs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import optcc
from optcc.passes.drop_zero_rnn_states import DropZeroRnnStatesPass, all_zeros
from reference import FUSION_RTOL, assert_close, expected_outputs, onnxruntime_outputs

T, INPUT, HIDDEN = 5, 3, 4


def _rnn(op: str = "LSTM", zero: float = 0.0, recurrence: np.ndarray | None = None,
         state_from_input: bool = False) -> onnx.ModelProto:
    """``op`` over x [T, batch, INPUT], its initial states computed as tf2onnx writes them:
    Expand(zero, [batch, HIDDEN]) with batch read from x's shape, then Unsqueeze."""
    rng = np.random.default_rng(1)
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    w = (0.5 * rng.standard_normal((1, gates * HIDDEN, INPUT))).astype(np.float32)
    r = recurrence if recurrence is not None else (0.5 * rng.standard_normal((1, gates * HIDDEN, HIDDEN))).astype(np.float32)
    b = (0.1 * rng.standard_normal((1, 2 * gates * HIDDEN))).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w, "W"), (r, "R"), (b, "B"))] + [
        numpy_helper.from_array(np.array(zero, np.float32), "zero"),
        numpy_helper.from_array(np.array([1], np.int64), "one"), numpy_helper.from_array(np.array([2], np.int64), "two"),
        numpy_helper.from_array(np.array([HIDDEN], np.int64), "hidden"), numpy_helper.from_array(np.array([0], np.int64), "axis0")]
    nodes = [helper.make_node("Shape", ["x"], ["shape"]), helper.make_node("Slice", ["shape", "one", "two"], ["batch"]),
             helper.make_node("Concat", ["batch", "hidden"], ["state_shape"], axis=0),
             helper.make_node("Expand", ["zero", "state_shape"], ["zeros"]),
             helper.make_node("Unsqueeze", ["zeros", "axis0"], ["h0"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [T, "batch", INPUT])]
    if state_from_input:
        inputs.append(helper.make_tensor_value_info("h0", TensorProto.FLOAT, [1, "batch", HIDDEN]))
        nodes = []
    states = ["h0", "h0"] if op == "LSTM" else ["h0"]
    nodes.append(helper.make_node(op, ["x", "W", "R", "B", "", *states], ["y", "y_h"], hidden_size=HIDDEN))
    graph = helper.make_graph(nodes, "rnn", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                                                     helper.make_tensor_value_info("y_h", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feeds(model: onnx.ModelProto, batch: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    feeds = {"x": rng.standard_normal((T, batch, INPUT)).astype(np.float32)}
    if any(i.name == "h0" for i in model.graph.input):
        feeds["h0"] = rng.standard_normal((1, batch, HIDDEN)).astype(np.float32)
    return feeds


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_zero_initial_states_are_dropped_with_their_shape_chain(op: str) -> None:
    original = _rnn(op)
    result = optcc.optimize(original, level=1)
    ops = optcc.ir.op_histogram(optcc.ir.load(result.model))
    assert ops == {op: 1}, ops
    record = next(r for r in result.report.passes if r.name == "drop-zero-rnn-states" and r.status == "changed")
    assert record.stats == {"dropped": {op: 2 if op == "LSTM" else 1}}  # initial_h, and an LSTM's initial_c
    for batch in (1, 3):  # the batch the states were shaped for is any
        feeds = _feeds(original, batch)
        assert_close(onnxruntime_outputs(result.model, feeds), expected_outputs(original, feeds), FUSION_RTOL,
                     what=f"{op} without its zero states vs onnx's reference evaluator of the original")


def test_a_negative_zero_state_is_zero() -> None:
    model = optcc.ir.load(_rnn(zero=-0.0))
    assert DropZeroRnnStatesPass()(model).stats == {"dropped": {"LSTM": 2}}


@pytest.mark.parametrize("case", ["nonzero", "graph input", "infinite weight"])
def test_states_not_provably_zero_or_weights_not_finite_are_kept(case: str) -> None:
    recurrence = None
    if case == "infinite weight":
        recurrence = np.full((1, 4 * HIDDEN, HIDDEN), 0.1, np.float32)
        recurrence[0, 0, 0] = np.inf
    original = _rnn(zero=0.5 if case == "nonzero" else 0.0, recurrence=recurrence,
                    state_from_input=case == "graph input")
    result = DropZeroRnnStatesPass()(optcc.ir.load(original))
    assert not result.modified
    lstm = next(n for n in result.model.graph if n.op_type == "LSTM")
    assert lstm.inputs[5] is not None and lstm.inputs[6] is not None


def test_all_zeros_follows_element_moves_only() -> None:
    model = optcc.ir.load(onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["": 17]>
        g (float[2, 3] x) => (float[2, 6] a, float[2, 3] b, float[6] c) {
            z = ConstantOfShape <value = float[1] {0.0}> (shape)
            shape = Constant <value = int64[2] {2, 3}> ()
            a = Concat <axis = 1> (z, z)
            b = Add(z, x)
            flat = Constant <value = int64[1] {6}> ()
            c = Reshape(z, flat)
        }"""))
    outputs = {v.name: v for v in model.graph.outputs}
    assert all_zeros(outputs["a"]) and all_zeros(outputs["c"])
    assert not all_zeros(outputs["b"])  # an Add of a zero is not zero


def test_a_slice_of_a_stacked_zero_state_is_zero() -> None:
    """PyTorch's 2-layer bidirectional GRU (held-out arabic-name-romanizer encoder): h0 =
    ConstantOfShape([4, batch, H]) (float zeros), each layer's GRU reads a Slice of it."""
    rng = np.random.default_rng(2)
    w = (0.5 * rng.standard_normal((2, 3 * HIDDEN, INPUT))).astype(np.float32)
    r = (0.5 * rng.standard_normal((2, 3 * HIDDEN, HIDDEN))).astype(np.float32)
    b = (0.1 * rng.standard_normal((2, 6 * HIDDEN))).astype(np.float32)
    consts = {"W": w, "R": r, "B": b, "four": np.array([4], np.int64), "hidden": np.array([HIDDEN], np.int64),
              "one": np.array([1], np.int64), "two": np.array([2], np.int64), "zero": np.array([0], np.int64)}
    nodes = [helper.make_node("Shape", ["x"], ["shape"]), helper.make_node("Slice", ["shape", "one", "two"], ["batch"]),
             helper.make_node("Concat", ["four", "batch", "hidden"], ["state_shape"], axis=0),
             helper.make_node("ConstantOfShape", ["state_shape"], ["zeros"]),
             helper.make_node("Slice", ["zeros", "zero", "two", "zero"], ["h0"]),
             helper.make_node("GRU", ["x", "W", "R", "B", "", "h0"], ["y", "y_h"], hidden_size=HIDDEN,
                              direction="bidirectional", linear_before_reset=1)]
    graph = helper.make_graph(nodes, "gru", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [T, "batch", INPUT])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("y_h", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(a, n) for n, a in consts.items()])
    original = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = optcc.optimize(original, level=1)
    assert optcc.ir.op_histogram(optcc.ir.load(result.model)) == {"GRU": 1}
    for batch in (1, 3):
        feeds = _feeds(original, batch)
        assert_close(onnxruntime_outputs(result.model, feeds), expected_outputs(original, feeds), FUSION_RTOL,
                     what="GRU without its sliced zero state vs onnx's reference evaluator of the original")
    sliced_ones = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sliced_ones.graph.node[3].attribute.append(helper.make_attribute(
        "value", numpy_helper.from_array(np.array([1.0], np.float32))))
    h0 = next(n for n in optcc.ir.load(sliced_ones).graph if n.outputs[0].name == "h0").outputs[0]
    assert not all_zeros(h0)  # a slice of ones is not zero
