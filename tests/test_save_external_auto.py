"""``external_data=None`` (the CLI's ``--external-data auto``) writes external data when the
input had it, even when the result no longer reads any tensor from the input's file: a
held-out transformer whose weights were all external (khmersm) was written by ``--fp16``
as one file, while -O2 and INT8 kept a data file."""

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import optcc

RNG = np.random.default_rng(5)


def _external_mlp(tmp_path):
    w = (RNG.standard_normal((16, 64)) * 0.3).astype(np.float32)
    b = (RNG.standard_normal(64) * 0.1).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["m", "B"], ["a"]),
         helper.make_node("Tanh", ["a"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 64])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "in" / "m.onnx"
    path.parent.mkdir()
    onnx.save_model(proto, str(path), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    return path, w, b


def test_fp16_output_of_an_external_data_input_keeps_external_data(tmp_path):
    path, w, b = _external_mlp(tmp_path)
    result = optcc.optimize(str(path), fp16=True)
    assert result.applied_precision == ["fp16"]
    out = tmp_path / "out.onnx"
    result.save(out)
    assert (tmp_path / "out.onnx.data").is_file()
    proto = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in proto.graph.initializer)
    x = RNG.standard_normal((4, 16)).astype(np.float32)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, np.tanh(x.astype(np.float64) @ w + b), rtol=0, atol=5e-3)


def test_external_data_off_is_still_honoured(tmp_path):
    path, w, b = _external_mlp(tmp_path)
    result = optcc.optimize(str(path), fp16=True)
    out = tmp_path / "one.onnx"
    result.save(out, external_data=False)
    assert not (tmp_path / "one.onnx.data").exists()
    x = RNG.standard_normal((4, 16)).astype(np.float32)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, np.tanh(x.astype(np.float64) @ w + b), rtol=0, atol=5e-3)


def test_a_data_location_outside_the_folder_is_refused_and_nothing_is_left(tmp_path):
    import pytest

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    model = optcc.ir.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(optcc.errors.BadInputError, match="must be a file name beside the model"):
        optcc.ir.save(model, out / "m.onnx", external_data=True, location="../w.data")
    assert list(out.iterdir()) == []  # no output, and no temporary file beside it
