"""A model saved with external data is two files: a failed save leaves the pair that was
there as it was (never a model reading data written for another), and nothing else."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import helper

import optcc.ir as oir
from optcc.errors import BadInputError
import optcc.ir.saving as saving
from calls import refuse_replace


def _model(scale: float) -> ir.Model:
    w = np.full((4, 4), scale, np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
                              [onnx.numpy_helper.from_array(w, "w")])
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _output(path: Path) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": np.ones((1, 4), np.float32)})
    return y


def _saved_pair(tmp_path: Path) -> tuple[Path, Path, dict[str, bytes]]:
    out = tmp_path / "m.onnx"
    oir.save(_model(1.0), out, external_data=True, size_threshold_bytes=16)
    data = tmp_path / "m.onnx.data"
    np.testing.assert_array_equal(_output(out), np.full((1, 4), 4.0, np.float32))  # 1 x 4 ones times ones
    return out, data, {p.name: p.read_bytes() for p in (out, data)}


@pytest.mark.parametrize("refused", ["m.onnx", "m.onnx.data"])
def test_a_refused_move_leaves_the_pair_that_was_there(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       refused: str) -> None:
    out, data, before = _saved_pair(tmp_path)
    refuse_replace(monkeypatch, tmp_path / refused)
    with pytest.raises(BadInputError, match="cannot replace the existing file"):
        oir.save(_model(2.0), out, external_data=True, size_threshold_bytes=16)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (out, data)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    np.testing.assert_array_equal(_output(out), np.full((1, 4), 4.0, np.float32))


def test_a_save_stopped_while_writing_leaves_the_pair_that_was_there(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    out, data, before = _saved_pair(tmp_path)
    write = saving.ir.save

    def stopped(model: ir.Model, path: str | Path, **options: object) -> None:
        write(model, path, **options)  # both files written where they were staged, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(saving.ir, "save", stopped)
    with pytest.raises(OSError, match="No space left"):
        oir.save(_model(2.0), out, external_data=True, size_threshold_bytes=16)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (out, data)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]


def test_a_new_pair_replaces_the_old_one_whole(tmp_path: Path) -> None:
    out, _, _ = _saved_pair(tmp_path)
    oir.save(_model(2.0), out, external_data=True, size_threshold_bytes=16)
    np.testing.assert_array_equal(_output(out), np.full((1, 4), 8.0, np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
