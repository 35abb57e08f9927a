"""Declared shapes that contradict the graph. Paddle's exports declare every output
``FLOAT[]`` (rank 0) while it returns rank 2-4 tensors: onnxruntime runs them, onnx's
checker passes them by default and refuses them with ``full_check``. optcc writes what the
full check accepts: a contradicted output keeps its dtype and gets the rank shape inference
proves, every dim unknown; a contradicted value_info loses its shape. A declaration that
nothing contradicts (a real scalar; a rank inference cannot find) is written as declared."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import optcc
from reference import EXACT_RTOL, assert_close, expected_outputs, onnxruntime_outputs


def _paddle_like() -> onnx.ModelProto:
    """MatMul -> Add -> Softmax on x[N, 8]: y is [N, 4], declared FLOAT[]; the sum s is a
    real scalar, declared so; the value_info of h declares rank 3 for a rank-2 value."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "B"], ["z"]),
         helper.make_node("Softmax", ["z"], ["y"], axis=-1),
         helper.make_node("ReduceSum", ["z"], ["s"], keepdims=0)],
        "paddle_like", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, []),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, [])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
        value_info=[helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", 1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)  # the default check passes
    return model


def _declared(info: onnx.ValueInfoProto) -> tuple[int, list | None]:
    t = info.type.tensor_type
    return t.elem_type, ([d.dim_value or d.dim_param or None for d in t.shape.dim] if t.HasField("shape") else None)


def test_the_premise_full_check_refuses_the_input() -> None:
    with pytest.raises(Exception, match="rank"):
        onnx.checker.check_model(_paddle_like(), full_check=True)


@pytest.mark.parametrize("level", [0, 2, 3])
def test_contradicted_declarations_are_made_unknown(tmp_path, level: int) -> None:
    proto = _paddle_like()
    given = proto.SerializeToString()
    result = optcc.optimize(proto, level=level)
    assert proto.SerializeToString() == given  # the caller's proto is untouched
    path = tmp_path / "out.onnx"
    result.save(path)
    written = onnx.load(str(path))
    onnx.checker.check_model(written, full_check=True)
    outputs = {v.name: _declared(v) for v in written.graph.output}
    assert outputs["y"] == (TensorProto.FLOAT, [None, None])  # the rank proved, no dim invented
    assert outputs["s"] == (TensorProto.FLOAT, [])  # a real scalar stays as declared
    infos = {v.name: _declared(v) for v in written.graph.value_info}
    assert infos.get("h", (TensorProto.FLOAT, None))[1] in (None, ["N", 4])  # never the declared rank 3
    rng = np.random.default_rng(5)
    for n in (1, 3):
        feeds = {"x": rng.standard_normal((n, 8)).astype(np.float32)}
        got = onnxruntime_outputs(written, feeds)
        want = expected_outputs(proto, feeds)
        assert [g.shape for g in got] == [(n, 4), ()]
        assert_close(got, want, EXACT_RTOL)


def test_a_rank_inference_cannot_find_is_kept_as_declared(tmp_path) -> None:
    """Reshape to a shape computed at run time from an input's values: inference finds no
    rank for y, so nothing contradicts its declaration and it is written as given."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])], "reshape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6]),
         helper.make_tensor_value_info("shape", TensorProto.INT64, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(proto, full_check=True)
    result = optcc.optimize(proto, inputs=[{"x": np.arange(6, dtype=np.float32),
                                            "shape": np.array([2, 3], np.int64)}])
    path = tmp_path / "out.onnx"
    result.save(path)
    written = onnx.load(str(path))
    assert _declared(written.graph.output[0]) == (TensorProto.FLOAT, [])
    onnx.checker.check_model(written, full_check=True)


def _negative_dims() -> onnx.ModelProto:
    """Softmax(x @ W) with x declared [-1, 8] and y declared [-1, -1] (Paddle's -1 for a
    free axis), where shape inference knows y's second dim is 4."""
    w = np.random.default_rng(5).standard_normal((8, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Softmax", ["h"], ["y"], axis=-1)],
        "negative_dims", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, -1])], [numpy_helper.from_array(w, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_negative_declared_dims_are_made_unknown(tmp_path) -> None:
    proto = _negative_dims()
    with pytest.raises(Exception, match="differ"):
        onnx.checker.check_model(proto, full_check=True)  # the premise: 4 vs -1
    result = optcc.optimize(proto)
    path = tmp_path / "out.onnx"
    result.save(path)
    written = onnx.load(str(path))
    onnx.checker.check_model(written, full_check=True)
    assert [_declared(v) for v in (*written.graph.input, *written.graph.output)] == [
        (TensorProto.FLOAT, [None, 8]), (TensorProto.FLOAT, [None, None])]
    feeds = {"x": np.random.default_rng(6).standard_normal((3, 8)).astype(np.float32)}
    assert_close(onnxruntime_outputs(written, feeds), expected_outputs(proto, feeds), rtol=EXACT_RTOL)


def test_the_report_names_each_declaration_load_changed() -> None:
    """What loading changed in the declared interface is said, in the report's JSON and
    summary: the user's model and the written one differ there."""
    report = optcc.optimize(_negative_dims()).report
    assert report.interface == [
        "input 'x': declared [-1, 8], written [?, 8] (negative dims made unknown)",
        "output 'y': declared [-1, -1], written [?, ?] (negative dims made unknown)"]
    assert json.loads(report.to_json())["interface"] == report.interface
    assert all(f"interface: {line}" in report.summary() for line in report.interface)
    paddle = optcc.optimize(_paddle_like()).report
    assert any(line.startswith("output 'y'") and "rank 2" in line for line in paddle.interface), paddle.interface
