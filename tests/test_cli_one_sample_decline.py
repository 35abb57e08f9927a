"""A calibration file of token ids ``[16, 32]`` has the input's rank, so it is read as one
sample of batch 16 (a note says so; how files are read is docs/cli.md's "Input files").
One such file is one sample: INT8 refuses it (exit 2), saying how to give 16. Two such
files are two samples: when INT8 is then declined, the decline itself says that the
judgement rested on those samples and how to give 16: in the message, the report's outcome
and the warning of --allow-float-fallback. The model's INT8 error is checked against numpy
first, so the decline is the model's, not the message's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from optcc.cli import main

VOCAB, WIDTH, CLASSES = 100, 64, 8


def _token_model(rng: np.random.Generator) -> tuple[onnx.ModelProto, np.ndarray]:
    """logits = relu(emb[ids] @ w1) @ w2, one embedding row 300x the others: 8-bit steps
    sized for it leave the other rows a few levels each."""
    emb = rng.standard_normal((VOCAB, WIDTH)).astype(np.float32)
    emb[0] *= 300
    w1 = (rng.standard_normal((WIDTH, WIDTH)) * 0.2).astype(np.float32)
    w2 = (rng.standard_normal((WIDTH, CLASSES)) * 0.2).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["emb", "ids"], ["e"]), helper.make_node("MatMul", ["e", "w1"], ["h"]),
         helper.make_node("Relu", ["h"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["logits"])], "tokens",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", CLASSES])],
        [numpy_helper.from_array(emb, "emb"), numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), emb


def test_a_file_read_as_one_sample_is_refused_saying_how_to_give_many(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    model, _ = _token_model(rng)
    path = tmp_path / "tokens.onnx"
    onnx.save(model, path)
    np.savez(tmp_path / "ids.npz", ids=rng.integers(0, VOCAB, (16, 32)).astype(np.int64))
    out = tmp_path / "q.onnx"
    assert main([str(path), "--int8", "--calibration", str(tmp_path / "ids.npz"), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "INT8 needs at least 2 distinct calibration samples" in err and "the data hold 1" in err
    assert (f"{tmp_path / 'ids.npz'} was read as one sample of batch 16: for 16 samples, give each array a "
            "leading sample axis") in err
    assert not out.exists()


def test_a_decline_on_files_read_as_one_sample_each_says_so(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    model, emb = _token_model(rng)
    path = tmp_path / "tokens.onnx"
    onnx.save(model, path)
    ids = [rng.integers(0, VOCAB, (16, 32)).astype(np.int64) for _ in range(2)]
    for i, part in enumerate(ids):
        np.savez(tmp_path / f"ids{i}.npz", ids=part)
    # 256 levels over the range the embeddings take (row 0's) leave every other row's whole
    # range under 2 steps: INT8 of this model misses any accuracy target, a real decline
    gathered = emb[np.concatenate(ids)]
    step = (gathered.max() - min(gathered.min(), 0.0)) / 255
    assert np.ptp(emb[1:]) / step < 2

    report = tmp_path / "r.json"
    args = [str(path), "--int8", "--calibration", str(tmp_path), "-o", str(tmp_path / "q.onnx"),
            "--report", str(report)]
    assert main(args) == 5
    err = capsys.readouterr().err
    files = ", ".join(f"{tmp_path / f'ids{i}.npz'} was read as one sample of batch 16" for i in range(2))
    said = (f"INT8 was judged on 2 calibration samples: {files}; "
            "for 16 samples, give each array a leading sample axis")
    assert "note: " in err and said in err
    outcome = json.loads(report.read_text())["outcome"]
    assert outcome["exit_code"] == 5 and said in outcome["declined"]["int8"]

    assert main([*args, "--allow-float-fallback"]) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("optcc: warning:")]
    assert len(warning) == 1 and said in warning[0]


def test_a_file_with_a_sample_axis_adds_nothing_to_a_decline(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    model, _ = _token_model(rng)
    path = tmp_path / "tokens.onnx"
    onnx.save(model, path)
    np.savez(tmp_path / "ids.npz", ids=rng.integers(0, VOCAB, (16, 1, 32)).astype(np.int64))  # 16 samples
    report = tmp_path / "r.json"
    assert main([str(path), "--int8", "--calibration", str(tmp_path / "ids.npz"), "-o", str(tmp_path / "q.onnx"),
                 "--report", str(report), "--allow-float-fallback"]) == 0
    err = capsys.readouterr().err
    declined = json.loads(report.read_text())["outcome"]["declined"]
    assert "int8" in declined and "note: " not in err
    assert "judged on" not in declined["int8"] and "sample axis" not in err
