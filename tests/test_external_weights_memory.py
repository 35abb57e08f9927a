"""Models whose weights live in external files are never copied whole in memory: sessions
read the weights where they are, deduplication hashes them from the file, and the float16
conversion's candidates read float16 weights made once (no float32 copy of every weight).
Numerics are checked against numpy."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import optcc
from optcc.fp16.rewrite import RewriteStats, _to_float16
from optcc.fp16.weights import Float16Weights
from optcc.passes.convert_float16 import ConvertFloat16Pass
from optcc.passes.deduplicate_initializers import DeduplicateInitializersPass
from optcc.runtime import make_session

WIDTH = 512  # 1 MiB float32 weights: large enough to be handed to onnxruntime in place


def _mlp(rng: np.random.Generator, duplicate: bool = False) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x -> MatMul W1 -> Tanh -> MatMul W2 -> Add b -> y (W2 == W1 when ``duplicate``)."""
    w1 = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
    w2 = w1.copy() if duplicate else (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
    b = rng.standard_normal(WIDTH).astype(np.float32)
    weights = {"W1": w1, "W2": w2, "b": b}
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["m1"]), helper.make_node("Tanh", ["m1"], ["t"]),
         helper.make_node("MatMul", ["t", "W2"], ["m2"]), helper.make_node("Add", ["m2", "b"], ["y"])],
        "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, WIDTH])],
        [numpy_helper.from_array(a, n) for n, a in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), weights


def _reference(weights: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    return np.tanh(x.astype(np.float64) @ w["W1"]) @ w["W2"] + w["b"]


def _external(folder: Path, proto: onnx.ModelProto) -> Path:
    path = folder / "mlp.onnx"
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)  # saving with external data rewrites the proto it is given
    onnx.save_model(copy, path, save_as_external_data=True, location="mlp.data", size_threshold=0)
    return path


def _feeds(seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((4, WIDTH)).astype(np.float32)}


def test_session_reads_external_weights_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    proto, weights = _mlp(np.random.default_rng(0))
    model = optcc.ir.load(_external(tmp_path, proto))
    scratch = tmp_path / "scratch"
    scratch.mkdir()

    def no_copy(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model's weights were saved again for its session")

    monkeypatch.setattr(optcc.ir, "save", no_copy)
    session = make_session(model, scratch=scratch)
    assert list(scratch.iterdir()) == [], "the session left files behind"
    feeds = _feeds()
    got = session.run(None, feeds)[0]
    np.testing.assert_allclose(got, _reference(weights, feeds["x"]), rtol=1e-4, atol=1e-4)
    # onnx-ir's own memory maps of the weights were not opened (they would stay resident)
    assert all(v.const_value.raw is None for v in model.graph.initializers.values()
               if isinstance(v.const_value, ir.ExternalTensor) and v.const_value.nbytes >= 1 << 20)


def test_session_on_in_memory_model_over_the_threshold_shares_its_arrays(tmp_path: Path) -> None:
    proto, weights = _mlp(np.random.default_rng(2))
    model = optcc.ir.load(proto)
    arrays = {n: a.copy() for n, a in weights.items()}
    for name, value in model.graph.initializers.items():  # weights held as arrays, as passes make them
        value.const_value = ir.Tensor(arrays[name], name=name)
    from optcc.runtime import session as session_module

    with pytest.MonkeyPatch.context() as mp:  # as if the weights were near protobuf's limit
        mp.setattr(session_module.oir, "needs_external_data", lambda m: True)
        mp.setattr("optcc.runtime.shared_weights.INLINE_MAX_BYTES", 0)  # (so far over the inline bound)
        session = make_session(model, scratch=tmp_path)
    feeds = _feeds(3)
    np.testing.assert_allclose(session.run(None, feeds)[0], _reference(weights, feeds["x"]), rtol=1e-4, atol=1e-4)
    # onnxruntime reads W1 and W2 from the model's own arrays (b is small: in the graph)
    handed = {v.data_ptr() for v in session.optcc_weights[1].values()}  # (arrays, OrtValues by name)
    assert handed == {arrays["W1"].ctypes.data, arrays["W2"].ctypes.data}
    assert list(tmp_path.iterdir()) == []
    assert all(model.graph.initializers[n].const_value.numpy() is a for n, a in arrays.items())


def test_deduplication_reads_external_weights_from_the_file(tmp_path: Path) -> None:
    proto, weights = _mlp(np.random.default_rng(4), duplicate=True)
    model = optcc.ir.load(_external(tmp_path, proto))
    result = DeduplicateInitializersPass()(model)
    assert result.modified and result.stats == {"initializers": 1, "bytes": WIDTH * WIDTH * 4}
    kept = result.model.graph.initializers
    assert sorted(kept) == ["W1", "b"]
    assert [n.inputs[1].name for n in result.model.graph if n.op_type == "MatMul"] == ["W1", "W1"]
    assert all(v.const_value.raw is None for v in kept.values()), "a weight was memory-mapped"
    np.testing.assert_array_equal(kept["W1"].const_value.numpy(), weights["W2"])

    # one differing byte keeps both
    proto2, _ = _mlp(np.random.default_rng(4), duplicate=True)
    w2 = numpy_helper.to_array(proto2.graph.initializer[1]).copy()
    w2[WIDTH - 1, WIDTH - 1] = np.nextafter(w2[WIDTH - 1, WIDTH - 1], np.float32(np.inf))
    proto2.graph.initializer[1].CopyFrom(numpy_helper.from_array(w2, "W2"))
    other = tmp_path / "other"
    other.mkdir()
    assert not DeduplicateInitializersPass()(optcc.ir.load(_external(other, proto2))).modified


def test_float16_weights_spilled_equal_numpy_conversion(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    array = (rng.standard_normal(3 * (1 << 20) + 5) * 30000).astype(np.float32)  # more than one chunk
    array[:4] = [np.inf, -np.inf, np.nan, -1e6]
    path = tmp_path / "w.data"
    array.tofile(path)
    source = ir.ExternalTensor("w.data", 0, array.nbytes, ir.DataType.FLOAT, shape=ir.Shape(array.shape),
                               name="w", base_dir=str(tmp_path))
    store = Float16Weights(spill=True)
    half, note = store.get(source, "w")
    assert isinstance(half, ir.ExternalTensor) and half.dtype == ir.DataType.FLOAT16
    assert store.get(source, "w")[0] is half, "made twice"
    finite = np.isfinite(array)
    want = np.where(finite, np.clip(array, -65504, 65504), array).astype(np.float16)
    np.testing.assert_array_equal(half.numpy(), want)
    assert source.raw is None, "the float32 source was memory-mapped"
    stats = RewriteStats()
    in_memory = _to_float16(array, "w", stats)  # the rewrite's own conversion: same values, same note
    np.testing.assert_array_equal(in_memory, want)
    assert [note] == stats.clamped
    copy, _ = store.get(source, "w", in_memory=True)
    assert not isinstance(copy, ir.ExternalTensor)
    np.testing.assert_array_equal(copy.numpy(), want)
    folder = Path(half.path).parent
    del half, copy, store
    gc.collect()
    assert folder.exists() is False or not any(folder.iterdir()), "the spill folder outlived its tensors"


def _spy_candidates(monkeypatch: pytest.MonkeyPatch) -> list[ir.Model]:
    seen: list[ir.Model] = []
    original = ConvertFloat16Pass._output_sqnr

    def spy(self: ConvertFloat16Pass, candidate: ir.Model) -> dict[str, float]:
        seen.append(candidate)
        return original(self, candidate)

    monkeypatch.setattr(ConvertFloat16Pass, "_output_sqnr", spy)
    return seen


def test_float16_candidates_of_external_models_hold_no_float32_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proto, weights = _mlp(np.random.default_rng(6))
    feeds = _feeds(7)
    seen = _spy_candidates(monkeypatch)
    model = optcc.ir.load(_external(tmp_path, proto))
    result = ConvertFloat16Pass(inputs=[feeds])(model)
    assert result.stats["converted"] and "skipped" not in result.stats
    assert seen, "no candidate was evaluated"
    for candidate in seen:
        inits = candidate.graph.initializers
        big32 = [n for n, v in inits.items() if v.dtype == ir.DataType.FLOAT and v.const_value.size >= WIDTH]
        assert big32 == [], f"float32 copies of weights in a candidate: {big32}"
        for name in ("W1", "W2"):
            half = [v for v in inits.values() if v.name.startswith(name) and v.dtype == ir.DataType.FLOAT16]
            assert len(half) == 1 and isinstance(half[0].const_value, ir.ExternalTensor)
            np.testing.assert_array_equal(half[0].const_value.numpy(), weights[name].astype(np.float16))
            (use,) = half[0].uses()
            cast = use.node
            assert cast.op_type == "Cast" and cast.attributes["to"].as_int() == ir.DataType.FLOAT
            nodes = list(candidate.graph)
            reader = min(nodes.index(u.node) for u in cast.outputs[0].uses())
            assert nodes.index(cast) == reader - 1, "the Cast runs long before its reader"
    # the written weights are float16 numpy conversions; the output is within float16 error
    converted = result.model.graph.initializers
    for name in ("W1", "W2"):
        assert converted[name].dtype == ir.DataType.FLOAT16
        np.testing.assert_array_equal(converted[name].const_value.numpy(), weights[name].astype(np.float16))
    session = make_session(optcc.ir.serialize(result.model))
    got = session.run(None, feeds)[0].astype(np.float64)
    want = _reference(weights, feeds["x"])
    assert np.abs(got - want).max() < 1e-2 * np.abs(want).max()


def test_float16_decisions_on_external_models_match_in_memory_ones(tmp_path: Path) -> None:
    """The emulation through float16 weights and Casts computes what rounding the float32
    weights computed: the same fallback, kept nodes and converted model."""
    proto, _ = _mlp(np.random.default_rng(8))
    feeds = _feeds(9)
    # 72 dB: the accuracy fallback returns some nodes to float32 and stores their weights float16
    options = dict(inputs=[feeds], min_sqnr_db=72.0)
    in_memory = ConvertFloat16Pass(**options)(optcc.ir.load(proto))
    external = ConvertFloat16Pass(**options)(optcc.ir.load(_external(tmp_path, proto)))
    assert in_memory.stats["returned_to_float32"]
    assert in_memory.stats["float32_nodes_weights_stored_float16"]["rounded"] > 0
    for key in ("kept_float32", "returned_to_float32", "skipped", "evaluations", "converted",
                "float32_nodes_weights_stored_float16"):
        assert in_memory.stats.get(key) == external.stats.get(key), key
    a, b = in_memory.model, external.model
    assert [ir.serde.serialize_node(n).SerializeToString() for n in a.graph] == [
        ir.serde.serialize_node(n).SerializeToString() for n in b.graph]
    assert a.metadata_props == b.metadata_props
    assert list(a.graph.initializers) == list(b.graph.initializers)
    for name, value in a.graph.initializers.items():
        other = b.graph.initializers[name].const_value
        assert value.const_value.dtype == other.dtype, name
        np.testing.assert_array_equal(value.const_value.numpy(), other.numpy())


def test_float16_result_of_a_model_past_the_protobuf_limit_keeps_weights_external(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proto, weights = _mlp(np.random.default_rng(10))
    monkeypatch.setattr(optcc.ir, "EXTERNAL_DATA_THRESHOLD_BYTES", 1 << 20)  # as if past 1.8 GB
    feeds = _feeds(11)
    result = ConvertFloat16Pass(inputs=[feeds])(optcc.ir.load(_external(tmp_path, proto)))
    w1 = result.model.graph.initializers["W1"].const_value
    assert isinstance(w1, ir.ExternalTensor) and w1.dtype == ir.DataType.FLOAT16
    folder = Path(w1.path).parent
    assert folder != tmp_path
    out = tmp_path / "out"
    out.mkdir()
    optcc.ir.save(result.model, out / "m.onnx")
    got = make_session(str(out / "m.onnx")).run(None, feeds)[0].astype(np.float64)
    want = _reference(weights, feeds["x"])
    assert np.abs(got - want).max() < 1e-2 * np.abs(want).max()
    del result, w1
    gc.collect()
    assert not folder.exists(), "the float16 weights' folder outlived the model"
    assert os.listdir(tmp_path) and (tmp_path / "mlp.data").exists()


def test_model_with_small_constants_in_external_data_is_verified(tmp_path: Path) -> None:
    """onnxruntime cannot load a model file whose Unsqueeze axes live in external data (it
    reads them while loading the graph); the verifier's session of the original still runs."""
    rng = np.random.default_rng(12)
    w = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Unsqueeze", ["m", "axes"], ["u"]),
         helper.make_node("Relu", ["u"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, WIDTH])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array([0], np.int64), "axes")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = _external(tmp_path, proto)  # every tensor external, the 8-byte axes too
    with pytest.raises(Exception, match="external"):
        make_session(str(path))  # no scratch folder: onnxruntime's own load
    feeds = _feeds(13)
    want = np.maximum(feeds["x"].astype(np.float64) @ w.astype(np.float64), 0)[None]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    np.testing.assert_allclose(make_session(str(path), scratch=scratch).run(None, feeds)[0], want, rtol=1e-4, atol=1e-4)
    result = optcc.optimize(path, level=2)
    assert result.report.verification["status"] == "passed", result.report.verification
    out = tmp_path / "out"
    out.mkdir()
    result.save(out / "m.onnx")
    np.testing.assert_allclose(make_session(str(out / "m.onnx")).run(None, feeds)[0], want, rtol=1e-4, atol=1e-4)


def test_float16_candidates_of_in_memory_models_share_one_rounded_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every emulated candidate of a model held in memory reads the same float32 arrays of
    float16-rounded weights: a search over n candidates holds one rounded copy, not n."""
    proto, weights = _mlp(np.random.default_rng(10))
    feeds = _feeds(11)
    seen = _spy_candidates(monkeypatch)
    # 72 dB: the accuracy fallback judges several candidates
    result = ConvertFloat16Pass(inputs=[feeds], min_sqnr_db=72.0)(optcc.ir.load(proto))
    assert len(seen) >= 3, "the fallback judged too few candidates to compare"
    rounded_arrays: dict[str, list[np.ndarray]] = {"W1": [], "W2": []}
    for candidate in seen:
        for name in rounded_arrays:
            value = candidate.graph.initializers.get(name)
            if value is None or value.dtype != ir.DataType.FLOAT:
                continue
            array = value.const_value.numpy()
            if not np.array_equal(array, weights[name]):  # rounded (a float32 node's weight stays as given)
                np.testing.assert_array_equal(array, weights[name].astype(np.float16).astype(np.float32))
                rounded_arrays[name].append(array)
    assert any(len(arrays) >= 2 for arrays in rounded_arrays.values()), "no weight was rounded twice"
    for arrays in rounded_arrays.values():
        assert all(a.dtype == np.float32 and a is arrays[0] for a in arrays), "a candidate made its own copy"
    # the converted model against numpy float64 on the original weights
    session = make_session(optcc.ir.serialize(result.model))
    got = session.run(None, feeds)[0].astype(np.float64)
    want = _reference(weights, feeds["x"])
    assert np.abs(got - want).max() < 1e-2 * np.abs(want).max()
