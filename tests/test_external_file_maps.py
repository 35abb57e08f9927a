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
import onnxruntime as ort
import pytest

import optcc
from optcc.ir.external_files import FILE_KEY
from optcc.runtime import make_session
from reference import FUSION_RTOL, assert_close, expected_outputs_float64
from test_large_model import _chain_model

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")

WIDTH = 1024  # 4 MiB float32 weights: handed to onnxruntime in place, not copied into its proto
DATA = "chain.data"


def _model(folder: Path, seed: int) -> Path:
    """x -> (MatMul W_i -> Add b_i -> Relu) * 2, weights in one external file."""
    path = folder / "chain.onnx"
    onnx.save_model(_chain_model(WIDTH, 2, np.random.default_rng(seed)), path,
                    save_as_external_data=True, location=DATA, size_threshold=0)
    return path


def _maps_of(data: Path) -> int:
    """How many mappings of ``data`` this process holds now."""
    target = str(data.resolve())
    with open("/proc/self/maps", encoding="utf-8") as f:
        return sum(1 for line in f if line.rstrip("\n").endswith(target))


def _feeds() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((2, WIDTH)).astype(np.float32)}


def _onnxruntime(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _checked(got: np.ndarray, path: Path, feeds: dict[str, np.ndarray], what: str, rtol: float = FUSION_RTOL) -> None:
    """``got`` against onnxruntime and numpy float64 on the original file at ``path``."""
    np.testing.assert_allclose(got, _onnxruntime(path, feeds), rtol=rtol, atol=rtol)
    assert_close([got], expected_outputs_float64(onnx.load(str(path)), feeds), rtol, what=what)
    gc.collect()  # onnxruntime's own map of the file goes with its session


def test_two_sessions_of_one_model_read_one_map_of_its_file(tmp_path: Path) -> None:
    path = _model(tmp_path, 0)
    data = tmp_path / DATA
    feeds = _feeds()
    model = optcc.ir.load(path)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    first = make_session(model, scratch=scratch)
    second = make_session(model, scratch=scratch)
    assert _maps_of(data) == 1, "each session mapped the data file on its own"
    file = model.graph.initializers["W0"].const_value.meta[FILE_KEY]
    assert all(v.const_value.meta[FILE_KEY] is file for v in model.graph.initializers.values())
    _checked(first.run(None, feeds)[0], path, feeds, "first session vs the original")
    _checked(second.run(None, feeds)[0], path, feeds, "second session vs the original")
    del first
    gc.collect()
    assert file.is_mapped() and _maps_of(data) == 1, "the map closed while a session still reads it"
    del second
    gc.collect()
    assert not file.is_mapped(), "the map outlived the sessions that read it"
    assert _maps_of(data) == 0


@pytest.mark.parametrize("fp16", [False, True])
def test_an_optimization_run_releases_every_map_of_the_weights(tmp_path: Path, fp16: bool) -> None:
    path = _model(tmp_path, 2)
    data = tmp_path / DATA
    assert _maps_of(data) == 0
    result = optcc.optimize(path, level=2, fp16=fp16)  # float16: its conversion reads every weight
    gc.collect()
    assert _maps_of(data) == 0, "a session of the run's checks (or its map) outlived the run"
    out = tmp_path / "out" / "chain.opt.onnx"
    out.parent.mkdir()
    result.save(out)
    # float16 weights and activations: about three significant digits through two layers
    _checked(_onnxruntime(out, _feeds()), path, _feeds(), "optimized vs the original", 1e-2 if fp16 else FUSION_RTOL)
