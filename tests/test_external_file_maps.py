"""Sessions of a model with external data read its weights through one memory map per
file, shared by every live session, and unmapped once the last of them is dropped: two
sessions of one model hold one map of its data file between them, none stays after they
go, and none stays after an optimization run (its checks' sessions are all released).
Outputs are checked against onnxruntime on the original file and numpy float64."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import optcc
from optcc.runtime import make_session
from optcc.ir.external_files import FILE_KEY

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")

WIDTH = 1024  # 4 MiB float32 weights: handed to onnxruntime in place, not copied into its proto
DATA = "mlp.data"


def _model(folder: Path, rng: np.random.Generator) -> tuple[Path, dict[str, np.ndarray]]:
    """x -> MatMul W1 -> Tanh -> MatMul W2 -> Add b -> y, weights in one external file."""
    weights = {"W1": (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32),
               "W2": (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32),
               "b": rng.standard_normal(WIDTH).astype(np.float32)}
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["m1"]), helper.make_node("Tanh", ["m1"], ["t"]),
         helper.make_node("MatMul", ["t", "W2"], ["m2"]), helper.make_node("Add", ["m2", "b"], ["y"])],
        "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, WIDTH])],
        [numpy_helper.from_array(a, n) for n, a in weights.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = folder / "mlp.onnx"
    onnx.save_model(proto, path, save_as_external_data=True, location=DATA, size_threshold=0)
    return path, weights


def _maps_of(data: Path) -> int:
    """How many mappings of ``data`` this process holds now."""
    target = str(data.resolve())
    with open("/proc/self/maps", encoding="utf-8") as f:
        return sum(1 for line in f if line.rstrip("\n").endswith(target))


def _feeds() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((4, WIDTH)).astype(np.float32)}


def _onnxruntime(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _float64(weights: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    return np.tanh(x.astype(np.float64) @ w["W1"]) @ w["W2"] + w["b"]


def test_two_sessions_of_one_model_read_one_map_of_its_file(tmp_path: Path) -> None:
    path, weights = _model(tmp_path, np.random.default_rng(0))
    data = tmp_path / DATA
    feeds = _feeds()
    want = _onnxruntime(path, feeds)  # before any map of ours: onnxruntime's own is gone with its session
    gc.collect()
    assert _maps_of(data) == 0
    model = optcc.ir.load(path)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    first = make_session(model, scratch=scratch)
    second = make_session(model, scratch=scratch)
    assert _maps_of(data) == 1, "each session mapped the data file on its own"
    for got in (first.run(None, feeds)[0], second.run(None, feeds)[0]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got, _float64(weights, feeds["x"]), rtol=1e-4, atol=1e-4)
    tensor = model.graph.initializers["W1"].const_value
    assert isinstance(tensor, ir.ExternalTensor)
    file = tensor.meta[FILE_KEY]
    assert all(v.const_value.meta[FILE_KEY] is file for v in model.graph.initializers.values())
    del first
    gc.collect()
    assert file.is_mapped() and _maps_of(data) == 1, "the map closed while a session still reads it"
    del second
    gc.collect()
    assert not file.is_mapped(), "the map outlived the sessions that read it"
    assert _maps_of(data) == 0


def test_an_optimization_run_releases_every_map_of_the_weights(tmp_path: Path) -> None:
    path, weights = _model(tmp_path, np.random.default_rng(2))
    data = tmp_path / DATA
    feeds = _feeds()
    want = _onnxruntime(path, feeds)
    gc.collect()
    assert _maps_of(data) == 0
    result = optcc.optimize(path, level=2)
    gc.collect()
    assert _maps_of(data) == 0, "a session of the run's checks (or its map) outlived the run"
    out = tmp_path / "out" / "mlp.opt.onnx"
    out.parent.mkdir()
    result.save(out)
    np.testing.assert_allclose(_onnxruntime(out, feeds), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_onnxruntime(out, feeds), _float64(weights, feeds["x"]), rtol=1e-4, atol=1e-4)
