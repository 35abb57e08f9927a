"""Token ids fed as float (Keras/tf2onnx models Cast them to int): the noise floor leaves
integer-valued float inputs alone. Moved by one ulp, id k would truncate to k - 1, and
float32 against itself would read other tokens: a floor so low that any INT8 model passed."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
from onnx import TensorProto as TP

import optcc
from optcc.numerics.task import perturb
from optcc.quant.driver import quantize_int8
from reference import expected_outputs_float64


def _float_ids_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    table = rng.standard_normal((64, 16)).astype(np.float32)
    w1 = (rng.standard_normal((128, 32)) * 0.3).astype(np.float32)
    w2 = (rng.standard_normal((32, 4)) * 0.3).astype(np.float32)
    nodes = [oh.make_node("Cast", ["ids"], ["i"], to=TP.INT64), oh.make_node("Gather", ["table", "i"], ["e"]),
             oh.make_node("Reshape", ["e", "shape"], ["f"]), oh.make_node("MatMul", ["f", "w1"], ["h0"]),
             oh.make_node("Relu", ["h0"], ["h"]), oh.make_node("MatMul", ["h", "w2"], ["logits"])]
    graph = oh.make_graph(nodes, "float_ids", [oh.make_tensor_value_info("ids", TP.FLOAT, ["N", 8])],
                          [oh.make_tensor_value_info("logits", TP.FLOAT, ["N", 4])],
                          [nh.from_array(table, "table"), nh.from_array(w1, "w1"), nh.from_array(w2, "w2"),
                           nh.from_array(np.array([-1, 128], np.int64), "shape")])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 19)])


def test_integer_valued_float_inputs_are_left_alone_and_others_move_one_ulp():
    ids = np.array([[1.0, 5.0, 63.0]], np.float32)
    audio = np.array([[0.25, -0.5, 1e-3]], np.float32)
    features = np.array([[0.37, 1.0, 0.0, 2.0, -0.81]], np.float32)  # flags among continuous features
    moved, how = perturb({"ids": ids, "audio": audio, "features": features})
    assert np.array_equal(moved["ids"], ids) and how["ids"] == "left alone (integer values)"
    assert np.array_equal(np.abs(moved["audio"] - audio), np.spacing(np.abs(audio)))
    whole = features == np.trunc(features)
    assert np.array_equal(moved["features"][whole], features[whole])
    assert np.array_equal(np.abs(moved["features"] - features)[~whole], np.spacing(np.abs(features[~whole])))


def test_the_dtype_maximum_is_not_moved_to_infinity():
    big = np.array([np.finfo(np.float64).max, 1.5], np.float64)
    moved, _ = perturb({"x": big}, seed=3)
    assert np.isfinite(moved["x"]).all()


def test_int8_on_float_ids_is_judged_against_a_floor_of_unchanged_ids():
    model = _float_ids_model()
    rng = np.random.default_rng(1)
    samples = [{"ids": rng.integers(1, 64, (16, 8)).astype(np.float32)} for _ in range(10)]
    quantized, stats = quantize_int8(model, samples, metric="auto", require_speedup=False)
    assert stats["acceptance"]["perturbation"]["ids"] == "left alone (integer values)"
    floor = stats["acceptance"]["floor"]["logits"]
    assert all(value == 0.0 for value in floor.values())  # float32 against itself: no noise at all
    if stats["modified"]:  # what ships agrees with the float model on the task: top-1 per row
        for feeds in samples[-2:]:
            want = expected_outputs_float64(model, feeds)[0]
            got = expected_outputs_float64(optcc.ir.serialize(quantized), feeds)[0]
            assert (want.argmax(-1) == got.argmax(-1)).mean() >= 0.9


def test_argmax_named_for_a_one_column_output_is_bad_input(tmp_path, capsys):
    """A sigmoid's [N, 1] output has no classes to take the argmax of: exit 2, naming it."""
    from optcc import cli

    graph = oh.make_graph([oh.make_node("MatMul", ["x", "w"], ["z"]), oh.make_node("Sigmoid", ["z"], ["y"])], "one",
                          [oh.make_tensor_value_info("x", TP.FLOAT, [4, 8])], [oh.make_tensor_value_info("y", TP.FLOAT, [4, 1])],
                          [nh.from_array(np.ones((8, 1), np.float32), "w")])
    source, data, out = tmp_path / "m.onnx", tmp_path / "c.npz", tmp_path / "o.onnx"
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]), source)
    np.savez(data, x=np.random.default_rng(0).random((6, 4, 8), dtype=np.float32))
    code = cli.main([str(source), "-o", str(out), "--int8", "--calibration", str(data), "--int8-metric", "argmax"])
    assert code == 2 and not out.exists()
    assert "INT8 metric 'argmax' does not fit output 'y' of shape [4, 1]: it needs at least 2 classes" in capsys.readouterr().err
