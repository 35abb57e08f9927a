"""Models with external data: a small round trip in the default suite, and (slow) a model
over 2 GB optimized within a memory bound.

The slow tests run only when asked for: ``python -m pytest -m slow tests/test_large_model.py``
(or with ``OPTCC_SLOW=1``); each writes about 2.4 GB to a temporary folder and optimizes
it (-O2, then -O2 with float16), verified, within 1.5x its weights' size of peak RSS.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import optcc
from reference import FUSION_RTOL, assert_close, expected_outputs_float64

ROOT = Path(__file__).resolve().parent.parent


def _chain_model(width: int, layers: int, rng: np.random.Generator) -> onnx.ModelProto:
    """x -> (MatMul W_i -> Add b_i -> Relu) * layers, weights as initializers."""
    nodes, inits = [], []
    h = "x"
    for i in range(layers):
        w = rng.standard_normal((width, width)).astype(np.float32) / np.float32(np.sqrt(width))
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(rng.standard_normal(width).astype(np.float32), f"b{i}")]
        nodes += [
            helper.make_node("MatMul", [h, f"W{i}"], [f"mm{i}"]),
            helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"add{i}"]),
            helper.make_node("Relu", [f"add{i}"], [f"h{i}"]),
        ]
        h = f"h{i}"
    nodes.append(helper.make_node("Identity", [h], ["y"]))
    graph = helper.make_graph(
        nodes, "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, width])],
        inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}


def _external_locations(model: onnx.ModelProto) -> set[str]:
    return {
        entry.value
        for t in model.graph.initializer
        if t.data_location == TensorProto.EXTERNAL
        for entry in t.external_data
        if entry.key == "location"
    }


def test_forced_external_data_round_trip(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    model = src / "model.onnx"
    onnx.save_model(
        _chain_model(64, 3, np.random.default_rng(0)), str(model),
        save_as_external_data=True, all_tensors_to_one_file=True, location="weights.bin", size_threshold=0,
    )  # fmt: skip
    assert _external_locations(onnx.load(str(model), load_external_data=False)) == {"weights.bin"}
    before = _digests(src)

    result = optcc.optimize(model, level=2)
    out = dst / "model.opt.onnx"
    result.save(out)

    assert _digests(src) == before, "the input model or its external data changed"
    assert sorted(p.name for p in dst.iterdir()) == ["model.opt.onnx", "model.opt.onnx.data"]
    saved = onnx.load(str(out), load_external_data=False)
    assert _external_locations(saved) == {"model.opt.onnx.data"}
    assert out.stat().st_size < 16 * 1024, "weights were inlined into the .onnx file"
    umask = os.umask(0)
    os.umask(umask)
    for written in (out, dst / "model.opt.onnx.data"):  # not mkstemp's 0600
        assert written.stat().st_mode & 0o777 == 0o666 & ~umask, oct(written.stat().st_mode)
    onnx.checker.check_model(str(out), full_check=True)

    # -O2 fuses MatMul+Add into Gemm: the written model against the original in float64.
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)}
    want = expected_outputs_float64(onnx.load(str(model)), feeds)
    assert_close(_run(out, feeds), want, FUSION_RTOL, what="written model vs float64 original")

    # And it loads back through optcc (external data resolved beside the new file).
    again = optcc.optimize(out, level=2)
    again.save(tmp_path / "again.onnx")
    assert_close(_run(tmp_path / "again.onnx", feeds), want, FUSION_RTOL, what="re-optimized vs float64 original")


def test_large_weights_are_streamed_to_one_file_that_parses_to_the_same_model(tmp_path: Path) -> None:
    """optcc.ir.save writes weights of 1 MiB and more from memory as separate protobuf
    fragments; the file must parse to exactly the one-piece serialization (order, dtypes,
    names) and run the same."""
    import onnx_ir as ir

    rng = np.random.default_rng(0)
    big_f32 = rng.standard_normal((600, 600)).astype(np.float32)  # 1.4 MB
    big_f16 = rng.standard_normal((800, 700)).astype(np.float16)  # 1.1 MB
    big_i64 = rng.integers(-5, 5, (400, 400)).astype(np.int64)  # 1.3 MB
    small = rng.standard_normal(600).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["m"]),
        helper.make_node("Add", ["m", "b"], ["a"]),
        helper.make_node("Cast", ["H"], ["h32"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["h32"], ["hs"], keepdims=0),
        helper.make_node("Cast", ["I"], ["i32"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["i32"], ["is"], keepdims=0),
        helper.make_node("Add", ["hs", "is"], ["t"]),
        helper.make_node("Add", ["a", "t"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 600])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 600])],
        [numpy_helper.from_array(big_f32, "W"), numpy_helper.from_array(small, "b"),
         numpy_helper.from_array(big_f16, "H"), numpy_helper.from_array(big_i64, "I")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = ir.from_proto(proto)
    model.graph.initializers["W"].const_value = ir.Tensor(big_f32)  # in memory, as folding makes them
    path = tmp_path / "m.onnx"
    optcc.ir.save(model, path)
    assert not list(tmp_path.glob("*.data")), "one file, no external data"
    loaded = onnx.load(str(path))
    assert loaded.SerializeToString() == optcc.ir.serialize(model).SerializeToString()
    onnx.checker.check_model(str(path))
    x = rng.standard_normal((2, 600)).astype(np.float32)
    want = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_array_equal(got[0], want[0])


def test_passes_are_not_reverted_on_external_data_models(tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    onnx.save_model(
        _chain_model(64, 3, np.random.default_rng(0)), str(model),
        save_as_external_data=True, location="weights.bin", size_threshold=0,
    )  # fmt: skip
    result = optcc.optimize(model, level=2)
    assert result.report.reverted() == [], result.report.summary()
    assert "Identity" not in [n.op_type for n in result.model.graph.node]


def test_external_data_through_the_command_line(tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    onnx.save_model(
        _chain_model(32, 2, np.random.default_rng(2)), str(model),
        save_as_external_data=True, location="model.bin", size_threshold=0,
    )  # fmt: skip
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "optcc", str(model), "-o", str(out), "-q"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.onnx", "m.onnx.data"]
    onnx.checker.check_model(str(out), full_check=True)


# --------------------------------------------------------------------------- > 2 GB

WIDTH, LAYERS = 8192, 9  # 9 x 256 MiB of weights: 2.25 GiB, past protobuf's 2 GiB limit


def _write_large_model(folder: Path) -> tuple[Path, int]:
    """A >2 GB model written tensor by tensor (never whole in memory): the .onnx with
    external references, and one data file."""
    data = folder / "big.onnx.data"
    nodes, inits, offset = [], [], 0
    rng = np.random.default_rng(0)
    with open(data, "wb") as f:
        h = "x"
        for i in range(LAYERS):
            for name, shape in ((f"W{i}", (WIDTH, WIDTH)), (f"b{i}", (WIDTH,))):
                tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=shape)
                rows = shape[0] if len(shape) == 2 else 1
                for start in range(0, rows, 1024):
                    count = min(1024, rows - start)
                    chunk = rng.standard_normal((count, *shape[1:]) if len(shape) == 2 else shape)
                    f.write((chunk / np.sqrt(WIDTH)).astype(np.float32).tobytes())
                length = int(np.prod(shape)) * 4
                tensor.data_location = TensorProto.EXTERNAL
                for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(length))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, value
                offset += length
                inits.append(tensor)
            nodes += [
                helper.make_node("MatMul", [h, f"W{i}"], [f"mm{i}"]),
                helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"h{i}"]),
            ]
            h = f"h{i}"
    nodes.append(helper.make_node("Relu", [h], ["y"]))
    graph = helper.make_graph(
        nodes, "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, WIDTH])],
        inits,
    )  # fmt: skip
    model = folder / "big.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(model))
    return model, offset


MEASURE = """
import json, resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
print(json.dumps({"rc": done.returncode, "stderr": done.stderr[-2000:], "peak": peak}))
"""


@pytest.fixture(scope="module")
def large_model(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[tuple[Path, int]]:
    """The >2 GB model, written once for the slow tests and removed after them."""
    if "slow" not in (request.config.getoption("markexpr") or "") and not os.environ.get("OPTCC_SLOW"):
        pytest.skip("slow (writes 2.4 GB): run with -m slow or OPTCC_SLOW=1")
    folder = tmp_path_factory.mktemp("large")
    yield _write_large_model(folder)
    shutil.rmtree(folder, ignore_errors=True)


def _measured(command: list[str]) -> dict:
    """Run ``command`` in a grandchild, so that RUSAGE_CHILDREN sees only it: its exit
    status, stderr and peak RSS (file-backed pages included)."""
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, *command], capture_output=True, text=True, timeout=3600, cwd=ROOT, check=False
    )
    assert done.returncode == 0, done.stderr
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["rc"] == 0, measured["stderr"]
    return measured


@pytest.mark.slow
def test_model_over_2gb_optimizes_within_1_5x_its_weights(tmp_path: Path, large_model: tuple[Path, int]) -> None:
    model, weight_bytes = large_model
    assert weight_bytes > 2**31
    out = tmp_path / "out" / "big.opt.onnx"
    out.parent.mkdir()
    report = tmp_path / "report.json"
    # verified: onnxruntime reads the original's and the result's weights from their files
    measured = _measured([sys.executable, "-m", "optcc", str(model), "-O2", "-o", str(out), "-q",
                          "--report", str(report)])
    assert measured["peak"] < 1.5 * weight_bytes, (
        f"peak RSS {measured['peak'] / 2**30:.2f} GiB for {weight_bytes / 2**30:.2f} GiB of weights"
    )
    assert json.loads(report.read_text())["verification"]["status"] == "passed"
    saved = onnx.load(str(out), load_external_data=False)
    assert _external_locations(saved) == {"big.opt.onnx.data"}
    assert out.stat().st_size < 1024 * 1024
    data = out.parent / "big.opt.onnx.data"
    assert weight_bytes <= data.stat().st_size < 1.1 * weight_bytes
    assert [o.name for o in saved.graph.output] == ["y"]
    shutil.rmtree(out.parent)


@pytest.mark.slow
def test_model_over_2gb_converts_to_float16_verified_within_1_5x_its_weights(
    tmp_path: Path, large_model: tuple[Path, int]
) -> None:
    model, weight_bytes = large_model
    out = tmp_path / "out" / "big.opt.onnx"
    out.parent.mkdir()
    report = tmp_path / "report.json"
    measured = _measured([sys.executable, "-m", "optcc", str(model), "-O2", "--fp16", "-o", str(out), "-q",
                          "--report", str(report)])
    assert measured["peak"] < 1.5 * weight_bytes, (
        f"peak RSS {measured['peak'] / 2**30:.2f} GiB for {weight_bytes / 2**30:.2f} GiB of weights"
    )
    verification = json.loads(report.read_text())["verification"]
    assert verification["status"] == "passed" and verification["numerics"] == "fp16", verification
    saved = onnx.load(str(out), load_external_data=False)
    weights = {t.name: t for t in saved.graph.initializer}
    assert all(weights[f"W{i}"].data_type == TensorProto.FLOAT16 for i in range(LAYERS))
    data = out.parent / "big.opt.onnx.data"
    assert 0.5 * weight_bytes <= data.stat().st_size < 0.55 * weight_bytes
    # the first layer against numpy: float16 weights, float32 arithmetic
    x = np.random.default_rng(3).standard_normal((1, WIDTH)).astype(np.float32)
    offset = {e.key: e.value for e in weights["W0"].external_data}
    w0 = np.fromfile(data, dtype=np.float16, count=WIDTH * WIDTH, offset=int(offset["offset"])).reshape(WIDTH, WIDTH)
    original = np.fromfile(model.parent / "big.onnx.data", dtype=np.float32, count=WIDTH * WIDTH).reshape(WIDTH, WIDTH)
    np.testing.assert_array_equal(w0, original.astype(np.float16))
    del w0, original
    shutil.rmtree(out.parent)
