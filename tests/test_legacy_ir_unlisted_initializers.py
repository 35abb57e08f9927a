"""A model below IR version 4 whose initializers are not all listed as graph inputs (older
converters wrote such files; onnxruntime runs them, treating every initializer as a
constant; onnx.checker refuses them). It loads, and what optcc writes is at IR 4, passes
the checker and computes what the original does. Outputs against NumPy in float64."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
import pytest
from onnx import TensorProto as TP
from onnx.reference import ReferenceEvaluator

from optcc import cli
from optcc import ir as oir


def _legacy_model() -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """IR 3, opset 8: ``y = LeakyRelu(Conv(x, W, B)) * s``. W and B are initializers not
    listed as inputs (what the checker refuses below IR 4); s is listed, as IR 3 asks."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    s = np.float32(0.5)
    graph = oh.make_graph(
        [oh.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
         oh.make_node("LeakyRelu", ["c"], ["r"], alpha=0.1),
         oh.make_node("Mul", ["r", "s"], ["y"])],
        "g",
        [oh.make_tensor_value_info("x", TP.FLOAT, [1, 3, 6, 5]), oh.make_tensor_value_info("s", TP.FLOAT, [])],
        [oh.make_tensor_value_info("y", TP.FLOAT, [1, 4, 6, 5])],
        [nh.from_array(w, "W"), nh.from_array(b, "B"), nh.from_array(np.array(s), "s")],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 8)], ir_version=3)
    with pytest.raises(onnx.checker.ValidationError, match="not in graph input"):
        onnx.checker.check_model(model)
    x = rng.standard_normal((1, 3, 6, 5)).astype(np.float32)
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    conv = np.zeros((1, 4, 6, 5)) + b.astype(np.float64)[None, :, None, None]
    for i in range(3):
        for j in range(3):
            conv += np.einsum("nchw,oc->nohw", padded[:, :, i:i + 6, j:j + 5], w[:, :, i, j].astype(np.float64))
    want = np.where(conv > 0, conv, 0.1 * conv) * float(s)
    return model, x, want


@pytest.mark.parametrize("level", ["-O0", "-O2"])
def test_written_model_is_ir4_valid_and_computes_the_same(tmp_path: Path, capsys, level: str) -> None:
    model, x, want = _legacy_model()
    path, out = tmp_path / "legacy.onnx", tmp_path / "out.onnx"
    onnx.save(model, str(path))
    code = cli.main([str(path), level, "-o", str(out), "-q"])
    assert code == 0, capsys.readouterr().err
    written = onnx.load(str(out))
    onnx.checker.check_model(written, full_check=True)
    assert written.ir_version >= 4
    assert [i.name for i in written.graph.input] == ["x"]  # s was a constant below IR 4, as W and B
    (got,) = ReferenceEvaluator(written).run(None, {"x": x})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_loading_leaves_the_callers_proto_as_it_was() -> None:
    model, _, _ = _legacy_model()
    before = model.SerializeToString()
    loaded = oir.load(model)
    assert model.SerializeToString() == before
    assert loaded.ir_version == 4 and [v.name for v in loaded.graph.inputs] == ["x"]


def test_other_checker_errors_are_still_reported(tmp_path: Path, capsys) -> None:
    model, _, _ = _legacy_model()
    model.graph.node[1].op_type = "NoSuchOp"
    path = tmp_path / "legacy.onnx"
    onnx.save(model, str(path))
    assert cli.main([str(path), "-o", str(tmp_path / "out.onnx"), "-q"]) == 2
    assert "NoSuchOp" in capsys.readouterr().err
