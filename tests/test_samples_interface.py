"""Samples read from an .npz are checked against the model file's graph inputs, read
without its weights: an initializer that is also a graph input (a default the samples may
leave out) need not be fed, a missing input or a wrong rank is refused, and the model
checked against holds no weight data. Numerics against numpy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import optcc
from optcc.errors import BadInputError
from optcc.numerics import load_npz_samples
from optcc.numerics.samples import _input_ranks
from optcc.runtime.session import make_session


def _model(w: np.ndarray, scale: np.ndarray) -> onnx.ModelProto:
    """y = (x @ W) * scale, with ``scale`` an initializer that is also a graph input."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Mul", ["m", "scale"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64]),
         helper.make_tensor_value_info("scale", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(scale, "scale")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_samples_are_checked_against_the_inputs_without_the_weights(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    w, scale = rng.standard_normal((64, 64)).astype(np.float32), np.array([0.5], np.float32)
    path = tmp_path / "m.onnx"
    onnx.save(_model(w, scale), path)
    x = rng.standard_normal((3, 2, 64)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    samples = load_npz_samples(tmp_path / "d.npz", path)  # "scale" has a default: not needed
    assert len(samples) == 3
    ranks, checked = _input_ranks(path)
    assert ranks == {"x": 2}
    assert all(v.const_value.raw.raw_data == b"" for v in checked.graph.initializers.values())
    session = make_session(optcc.ir.load(path))
    for sample, xi in zip(samples, x):
        np.testing.assert_allclose(session.run(None, sample)[0], (xi.astype(np.float64) @ w) * 0.5,
                                   rtol=1e-5, atol=1e-5)
    np.savez(tmp_path / "bad.npz", x=x[..., :32])  # 32 columns, the model takes 64
    with pytest.raises(BadInputError, match="has shape"):
        load_npz_samples(tmp_path / "bad.npz", path)
    np.savez(tmp_path / "other.npz", z=x)
    with pytest.raises(BadInputError, match="missing"):
        load_npz_samples(tmp_path / "other.npz", path)


def test_a_batch_read_as_one_sample_is_said_and_a_sample_axis_is_not(tmp_path: Path) -> None:
    from optcc.numerics import SampleAxisWarning

    rng = np.random.default_rng(0)
    path = tmp_path / "m.onnx"
    onnx.save(_model(rng.standard_normal((64, 64)).astype(np.float32), np.ones(1, np.float32)), path)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    np.savez(tmp_path / "batch.npz", x=x)  # the input's rank: one sample, batch 4
    np.savez(tmp_path / "axis.npz", x=x[:, None])  # a sample axis: 4 samples of batch 1
    with pytest.warns(SampleAxisWarning, match="batch 4"):
        (one,) = load_npz_samples(tmp_path / "batch.npz", path)
    np.testing.assert_array_equal(one["x"], x)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", SampleAxisWarning)
        four = load_npz_samples(tmp_path / "axis.npz", path)
    assert [s["x"].tolist() for s in four] == [[row] for row in x.tolist()]
    result = subprocess.run([sys.executable, "-m", "optcc", str(path), "--inputs", str(tmp_path / "batch.npz"),
                             "-o", str(tmp_path / "out.onnx")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "note: " in result.stderr and "batch 4" in result.stderr and "leading sample axis" in result.stderr
