"""The bad-input catalogue, through the command line.

Every refused input must give: exit code 2, exactly one line on stderr that names the
problem (and the file), no traceback, no output file (the folder listing is unchanged)
and the input's bytes unchanged. The one deliberate exception is a model with an unknown
custom-domain op: with --allow-unverified it passes through untouched (exit 0, the op
still in the output) with verification *skipped*, because onnxruntime cannot run an op it
does not know; the summary says so (without the flag: exit 4, nothing written).
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from optcc import cli
from optcc import ir as oir

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "fixtures" / "tinycnn.onnx"


# --------------------------------------------------------------------------- helpers


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _listing(*folders: Path) -> dict[str, set[str]]:
    return {str(f): {p.name for p in f.iterdir()} for f in folders if f.is_dir()}


def _refused(capsys: pytest.CaptureFixture[str], args: list[str], needle: str,
             model: Path | None = None, watch: tuple[Path, ...] = (), names: str | None = None) -> str:
    """Run the CLI and assert the refusal contract; returns the stderr line."""
    folders = tuple(watch) + ((model.parent,) if model is not None and model.parent.is_dir() else ())
    before, digest = _listing(*folders), _digest(model) if model else None
    code = cli.main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    line = lines[0]
    assert "Traceback" not in err and line.startswith("optcc: ")
    assert needle.lower() in line.lower(), line
    if names is not None:
        assert names in line, line
    assert _listing(*folders) == before, "an output file was created"
    if model is not None:
        assert _digest(model) == digest, "the input changed"
    return line


def _copy_example(tmp_path: Path, name: str = "model.onnx") -> Path:
    path = tmp_path / name
    shutil.copy(EXAMPLE, path)
    return path


def _tiny(nodes: list[onnx.NodeProto], inputs: list[str] = ("x",), outputs: list[str] = ("y",),
          opsets: list[tuple[str, int]] = (("", 17),), ir_version: int = 8,
          inits: list[onnx.TensorProto] = ()) -> onnx.ModelProto:
    f = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3])  # noqa: E731
    graph = helper.make_graph(nodes, "g", [f(n) for n in inputs], [f(n) for n in outputs], list(inits))
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets], ir_version=ir_version
    )


def _write(path: Path, model: onnx.ModelProto) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


# --------------------------------------------------------------------------- unreadable files


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"", "empty file"),
        (np.random.default_rng(0).bytes(4096), "not"),
        (b"this is a text file, not a model\n", "not"),
    ],
    ids=["empty", "random-bytes", "text"],
)
def test_unreadable_model_file(tmp_path: Path, capsys, content: bytes, needle: str) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(content)
    _refused(capsys, [str(model)], needle, model, names=str(model))


def test_truncated_protobuf(tmp_path: Path, capsys) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(EXAMPLE.read_bytes()[: EXAMPLE.stat().st_size // 2])
    _refused(capsys, [str(model)], "truncated", model, names=str(model))


def test_map_typed_input_is_named(tmp_path: Path, capsys) -> None:
    """A map that is not a trailing ZipMap's output (here a graph input, which a DictVectorizer
    reads): onnxruntime runs it, optcc's IR has no map type; the refusal names the value and
    the export option."""
    vectorizer = helper.make_node("DictVectorizer", ["features"], ["X"], domain="ai.onnx.ml", int64_vocabulary=[3, 7])
    maps = helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, []))
    graph = helper.make_graph([vectorizer], "g", [helper.make_value_info("features", maps)],
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("ai.onnx.ml", 1)])
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(None, {"features": {7: 2.5}})[0].tolist() == [[0.0, 2.5]]
    path = _write(tmp_path / "vectorizer.onnx", model)
    _refused(capsys, [str(path)], "'features' holds maps", path, names=str(path))


def test_npz_named_onnx(tmp_path: Path, capsys) -> None:
    model = tmp_path / "model.onnx"
    buffer = io.BytesIO()
    np.savez(buffer, x=np.zeros(3, np.float32))
    model.write_bytes(buffer.getvalue())
    _refused(capsys, [str(model)], "npz", model, names=str(model))


def test_directory_as_model(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "model.onnx"
    folder.mkdir()
    _refused(capsys, [str(folder)], "not a file", watch=(tmp_path, folder), names=str(folder))


def test_missing_model_file(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nope.onnx"
    _refused(capsys, [str(missing)], "no such file", watch=(tmp_path,), names=str(missing))


# --------------------------------------------------------------------------- invalid graphs


def test_graph_with_a_cycle(tmp_path: Path, capsys) -> None:
    nodes = [
        helper.make_node("Add", ["x", "b"], ["a"], name="first"),
        helper.make_node("Relu", ["a"], ["b"], name="second"),
        helper.make_node("Identity", ["b"], ["y"], name="third"),
    ]
    model = _write(tmp_path / "model.onnx", _tiny(nodes))
    _refused(capsys, [str(model)], "cycle", model, names=str(model))


def test_node_input_nothing_defines(tmp_path: Path, capsys) -> None:
    model = _write(tmp_path / "model.onnx", _tiny([helper.make_node("Add", ["x", "ghost"], ["y"])]))
    line = _refused(capsys, [str(model)], "ghost", model, names=str(model))
    assert "undefined" in line or "not output of any" in line


def test_duplicate_output_names(tmp_path: Path, capsys) -> None:
    nodes = [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["x"], ["y"])]
    model = _write(tmp_path / "model.onnx", _tiny(nodes))
    _refused(capsys, [str(model)], "'y'", model, names=str(model))


def test_missing_default_domain_opset_import(tmp_path: Path, capsys) -> None:
    proto = _tiny([helper.make_node("Relu", ["x"], ["y"])], opsets=[("com.example", 1)])
    model = _write(tmp_path / "model.onnx", proto)
    _refused(capsys, [str(model)], "opset import for the default domain", model, names=str(model))


def test_opset_newer_than_installed_onnx(tmp_path: Path, capsys) -> None:
    newest = onnx.defs.onnx_opset_version()
    proto = _tiny([helper.make_node("Relu", ["x"], ["y"])], opsets=[("", newest + 5)])
    model = _write(tmp_path / "model.onnx", proto)
    _refused(capsys, [str(model)], f"opset {newest + 5} is newer", model, names=str(model))


def test_ir_version_newer_than_installed_onnx(tmp_path: Path, capsys) -> None:
    proto = _tiny([helper.make_node("Relu", ["x"], ["y"])], ir_version=onnx.IR_VERSION + 3)
    model = _write(tmp_path / "model.onnx", proto)
    _refused(capsys, [str(model)], f"IR version {onnx.IR_VERSION + 3}", model, names=str(model))


def test_unknown_custom_domain_op_passes_through_with_verification_skipped(tmp_path: Path, capsys) -> None:
    nodes = [
        helper.make_node("Identity", ["x"], ["i"]),
        helper.make_node("Frobnicate", ["i"], ["f"], domain="com.example", strength=3),
        helper.make_node("Relu", ["f"], ["y"]),
    ]
    model = _write(tmp_path / "model.onnx", _tiny(nodes, opsets=[("", 17), ("com.example", 1)]))
    digest = _digest(model)
    out = tmp_path / "out.onnx"
    code = cli.main([str(model), "-o", str(out), "--allow-unverified"])  # exit 4 without it
    err = capsys.readouterr().err
    assert code == 0, err
    assert "Traceback" not in err and "skipped" in err, err
    assert _digest(model) == digest
    result = onnx.load(str(out))
    custom = [n for n in result.graph.node if n.domain == "com.example"]
    assert len(custom) == 1 and custom[0].op_type == "Frobnicate"
    assert helper.get_attribute_value(custom[0].attribute[0]) == 3
    assert "com.example" in {o.domain for o in result.opset_import}
    assert [n.op_type for n in result.graph.node] == ["Frobnicate", "Relu"]  # Identity went


def test_initializer_data_shorter_than_its_shape(tmp_path: Path, capsys) -> None:
    w = numpy_helper.from_array(np.ones((2, 3), np.float32), "w")
    w.raw_data = w.raw_data[:5]
    model = _write(tmp_path / "model.onnx", _tiny([helper.make_node("Add", ["x", "w"], ["y"])], inits=[w]))
    _refused(capsys, [str(model)], "too small", model, names=str(model))


# --------------------------------------------------------------------------- external data


def _external_model(folder: Path, location: str) -> Path:
    """A model whose weight 'w' lives in external file ``location`` (not created here)."""
    w = numpy_helper.from_array(np.ones((2, 3), np.float32), "w")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "24")):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    proto = _tiny([helper.make_node("Add", ["x", "w"], ["y"])], inits=[w])
    return _write(folder / "model.onnx", proto)


def test_external_data_file_missing(tmp_path: Path, capsys) -> None:
    model = _external_model(tmp_path, "weights.bin")
    _refused(capsys, [str(model)], "missing", model, names="weights.bin")


def test_external_data_file_truncated(tmp_path: Path, capsys) -> None:
    model = _external_model(tmp_path, "weights.bin")
    (tmp_path / "weights.bin").write_bytes(b"\0" * 10)  # 24 bytes needed
    _refused(capsys, [str(model)], "shorter", model, watch=(tmp_path,), names="weights.bin")


def test_external_data_that_is_a_folder(tmp_path: Path, capsys) -> None:
    model = _external_model(tmp_path, "weights.bin")
    (tmp_path / "weights.bin").mkdir()
    _refused(capsys, [str(model)], "missing", model, names="weights.bin")


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_external_data_escaping_the_model_folder_is_a_security_error(tmp_path: Path, capsys, kind: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.bin"
    secret.write_bytes(np.ones(6, np.float32).tobytes())
    folder = tmp_path / "model"
    folder.mkdir()
    if kind == "dotdot":
        location = "../outside/secret.bin"
    elif kind == "absolute":
        location = str(secret)
    else:
        (folder / "link.bin").symlink_to(secret)
        location = "link.bin"
    model = _external_model(folder, location)
    line = _refused(capsys, [str(model)], "refusing external data", model, watch=(outside,))
    assert location in line


# --------------------------------------------------------------------------- output paths


def test_output_folder_missing(tmp_path: Path, capsys) -> None:
    model = _copy_example(tmp_path)
    out = tmp_path / "no-such-folder" / "out.onnx"
    _refused(capsys, [str(model), "-o", str(out)], "output folder does not exist", model, names=str(out))


def test_output_parent_is_a_regular_file(tmp_path: Path, capsys) -> None:
    model = _copy_example(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    out = blocker / "out.onnx"
    _refused(capsys, [str(model), "-o", str(out)], "output folder", model, names=str(out))
    assert blocker.read_text() == "not a folder"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores permissions")
def test_output_folder_read_only(tmp_path: Path, capsys) -> None:
    model = _copy_example(tmp_path)
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        _refused(capsys, [str(model), "-o", str(folder / "out.onnx")], "not writable", model, watch=(folder,))
    finally:
        folder.chmod(0o755)


def test_output_path_is_a_directory(tmp_path: Path, capsys) -> None:
    model = _copy_example(tmp_path)
    _refused(capsys, [str(model), "-o", str(tmp_path)], "directory", model)


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_output_path_that_is_no_regular_file_is_refused(tmp_path: Path, capsys, kind: str) -> None:
    """The rename that writes the output would replace a link (not the file it points to)
    or a device or pipe: refused, and the link, its target and the pipe stay as they were."""
    model = _copy_example(tmp_path)
    sub = tmp_path / "sub"
    sub.mkdir()
    out = sub / "out.onnx"
    if kind == "symlink":
        target = tmp_path / "elsewhere.onnx"
        target.write_bytes(b"kept")
        out.symlink_to(target)
        needle = "symbolic link"
    else:
        os.mkfifo(out)
        needle = "not a regular file"
    _refused(capsys, [str(model), "-o", str(out)], needle, model, watch=(sub,))
    if kind == "symlink":
        assert out.is_symlink() and (tmp_path / "elsewhere.onnx").read_bytes() == b"kept"
    else:
        assert not out.is_file() and out.exists()


@pytest.mark.parametrize("spelling", ["same", "dotdot", "symlink", "hardlink"])
def test_output_equal_to_input_is_refused(tmp_path: Path, capsys, spelling: str) -> None:
    sub = tmp_path / "sub"
    sub.mkdir()
    model = _copy_example(tmp_path)
    if spelling == "same":
        out = str(model)
    elif spelling == "dotdot":
        out = str(sub / ".." / "model.onnx")
    elif spelling == "symlink":
        (sub / "alias.onnx").symlink_to(model)
        out = str(sub / "alias.onnx")
    else:
        os.link(model, sub / "alias.onnx")
        out = str(sub / "alias.onnx")
    _refused(capsys, [str(model), "-o", out], "input model", model, watch=(sub,))


def test_output_and_input_through_a_symlinked_folder(tmp_path: Path, capsys) -> None:
    model = _copy_example(tmp_path)
    (tmp_path / "alias").symlink_to(tmp_path, target_is_directory=True)
    _refused(capsys, [str(tmp_path / "alias" / "model.onnx"), "-o", str(model)], "input model", model)


def test_report_path_equal_to_input(tmp_path: Path, capsys) -> None:
    model = _copy_example(tmp_path)
    _refused(capsys, [str(model), "-o", str(tmp_path / "out.onnx"), "--report", str(model)], "input model", model)


# --------------------------------------------------------------------------- --inputs data


def _input_spec(model: Path) -> tuple[str, list[int]]:
    value = onnx.load(str(model)).graph.input[0]
    return value.name, [d.dim_value or 1 for d in value.type.tensor_type.shape.dim]


@pytest.mark.parametrize("problem", ["wrong-name", "wrong-shape", "wrong-dtype", "no-sample-axis"])
def test_bad_verification_data(tmp_path: Path, capsys, problem: str) -> None:
    model = _copy_example(tmp_path)
    name, shape = _input_spec(model)
    good = np.random.default_rng(0).standard_normal([2, *shape]).astype(np.float32)
    arrays = {
        "wrong-name": {"not_" + name: good},
        "wrong-shape": {name: good[:, ..., :-1]},
        "wrong-dtype": {name: good.astype(np.float64)},
        "no-sample-axis": {name: np.float32(1.0)},
    }[problem]
    data = tmp_path / "data.npz"
    np.savez(data, **arrays)
    needle = {"wrong-name": "missing", "wrong-shape": "shape", "wrong-dtype": "dtype",
              "no-sample-axis": "sample axis"}[problem]
    _refused(capsys, [str(model), "--inputs", str(data)], needle, model, watch=(tmp_path,))


def test_pickled_object_array_is_never_unpickled(tmp_path: Path, capsys) -> None:
    model = _copy_example(tmp_path)
    name, _ = _input_spec(model)
    marker = tmp_path / "unpickled"
    payload = np.empty(1, dtype=object)
    payload[0] = _Boom(str(marker))
    data = tmp_path / "data.npz"
    np.savez(data, **{name: payload})
    _refused(capsys, [str(model), "--inputs", str(data)], "pickle", model, watch=(tmp_path,))
    assert not marker.exists()


def test_a_file_that_is_no_npz_is_named_so_and_never_unpickled(tmp_path: Path, capsys) -> None:
    model = _copy_example(tmp_path)
    text = tmp_path / "junk.npz"
    text.write_text("junk\n")
    _refused(capsys, [str(model), "--inputs", str(text)], "not an .npz file", model, watch=(tmp_path,))
    marker = tmp_path / "unpickled"
    raw = tmp_path / "raw.npz"  # a bare pickle, which np.load would unpickle if allowed
    import pickle

    raw.write_bytes(pickle.dumps(_Boom(str(marker))))
    _refused(capsys, [str(model), "--inputs", str(raw)], "not an .npz file", model, watch=(tmp_path,))
    assert not marker.exists()


def test_npz_holding_no_arrays_is_named_as_such(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _copy_example(tmp_path)
    empty = tmp_path / "empty.npz"
    np.savez(empty)  # a valid archive with no members
    _refused(capsys, [str(model), "--inputs", str(empty)], "holds no arrays", model, watch=(tmp_path,))


class _Boom:
    """Unpickling it would create a file: proof that nothing was unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # noqa: ANN204
        return (open, (self.path, "w"))


def test_verification_data_missing_or_empty_folder(tmp_path: Path, capsys) -> None:
    model = _copy_example(tmp_path)
    missing = tmp_path / "nope.npz"
    _refused(capsys, [str(model), "--inputs", str(missing)], "no such file", model, names=str(missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    _refused(capsys, [str(model), "--inputs", str(empty)], "no .npz", model, watch=(empty,))


def test_bad_verification_data_file_is_not_an_npz(tmp_path: Path, capsys) -> None:
    model = _copy_example(tmp_path)
    data = tmp_path / "data.npz"
    data.write_text("hello")
    _refused(capsys, [str(model), "--inputs", str(data)], "npz", model, names=str(data))


# --------------------------------------------------------------------------- as a subprocess


def test_refusal_through_python_dash_m(tmp_path: Path) -> None:
    """The real entry point: one line, exit 2, nothing written (no in-process shortcuts)."""
    model = tmp_path / "model.onnx"
    model.write_bytes(b"\x08\x07garbage")
    before = _listing(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "optcc", str(model)], capture_output=True, text=True, timeout=120,
        cwd=ROOT, check=False,
    )
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(model) in lines[0] and "Traceback" not in done.stderr, done.stderr
    assert _listing(tmp_path) == before


# --------------------------------------------------------------------------- missing interface types


def _untyped_interface_model() -> onnx.ModelProto:
    """Conv -> Relu whose input has a dtype but no shape and whose output has no type at
    all: onnx.checker refuses it, onnxruntime runs it."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_value_info("y", onnx.TypeProto())], [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model)
    return model


def _conv_relu(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """float64 Conv (3x3, pad 1) + Relu in NumPy."""
    n, c, h, wd = x.shape
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((n, w.shape[0], h, wd))
    for i in range(3):
        for j in range(3):
            out += np.einsum("nchw,oc->nohw", padded[:, :, i:i + h, j:j + wd], w[:, :, i, j].astype(np.float64))
    return np.maximum(out, 0.0)


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external-data"])
def test_missing_interface_types_are_filled(tmp_path: Path, capsys, external: bool) -> None:
    model = _untyped_interface_model()
    w = numpy_helper.to_array(model.graph.initializer[0])
    path = tmp_path / "model.onnx"
    if external:
        onnx.save(model, path, save_as_external_data=True, location="model.data", size_threshold=0)
    else:
        _write(path, model)
    digest = _digest(path)
    out = tmp_path / "out.onnx"
    code = cli.main([str(path), "-O1", "-o", str(out), "-q"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert _digest(path) == digest
    written = onnx.load(str(out))
    onnx.checker.check_model(written)
    (x_info,), (y_info,) = written.graph.input, written.graph.output
    assert len(x_info.type.tensor_type.shape.dim) == 4
    assert y_info.type.tensor_type.elem_type == TensorProto.FLOAT
    x = np.random.default_rng(1).standard_normal((1, 3, 5, 6)).astype(np.float32)
    (y,) = ReferenceEvaluator(written).run(None, {"x": x})
    np.testing.assert_allclose(y, _conv_relu(x, w), rtol=1e-5, atol=1e-5)


def test_missing_interface_types_are_noted_and_the_callers_proto_kept() -> None:
    model = _untyped_interface_model()
    before = model.SerializeToString()
    loaded = oir.load(model)
    assert model.SerializeToString() == before
    notes = loaded.meta[oir.FILLED_INTERFACE_KEY]
    assert notes == ["input 'x': float32[?,?,?,?] (rank from shape inference)",
                     "output 'y': float32[?,4,?,?] from shape inference"]
    onnx.checker.check_model(oir.serialize(loaded))


def test_missing_input_shape_whose_rank_nothing_fixes(tmp_path: Path, capsys) -> None:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = _write(tmp_path / "model.onnx", helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    _refused(capsys, [str(model)], "rank cannot be inferred", model, names="'x'")


def test_no_output_may_overwrite_the_input_or_its_external_data(tmp_path: Path, capsys) -> None:
    model = tmp_path / "good.onnx"
    proto = onnx.load(EXAMPLE)
    onnx.save(proto, model, save_as_external_data=True, location="good.bin", size_threshold=0)
    data = tmp_path / "good.bin"
    kept = _digest(data)
    cases = [
        (["-o", str(data)], "reads its weights from"),
        (["-o", str(tmp_path / "g.onnx"), "--report", str(data)], "reads its weights from"),
        (["-o", str(tmp_path / "g.onnx"), "--external-data", "on", "--external-data-location", "good.onnx"],
         "is the input model"),
        (["-o", str(tmp_path / "g.onnx"), "--external-data", "on", "--external-data-location", "good.bin"],
         "reads its weights from"),
    ]
    for extra, needle in cases:
        _refused(capsys, [str(model), *extra], needle, model)
        assert _digest(data) == kept, extra
    import onnxruntime as ort

    x = np.ones((1, 3, 32, 32), np.float32)  # the input still loads, with its data, and computes what it did
    got = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    want = ReferenceEvaluator(onnx.load(EXAMPLE)).run(None, {"image": x})[0]  # onnx.save moved proto's data out
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_the_files_a_model_reads_its_weights_from_are_read_from_its_parse(tmp_path: Path) -> None:
    """``read_weight_files`` (which files an output must not overwrite) reads the locations from
    the file's parse, without building the model, and finds what loading it finds."""
    (tmp_path / "w").mkdir()
    model = tmp_path / "good.onnx"
    onnx.save(onnx.load(EXAMPLE), model, save_as_external_data=True, location="w/good.bin", size_threshold=0)
    assert oir.read_weight_files(model) == oir.external_data_files(oir.load(model)) == {
        (tmp_path / "w" / "good.bin").resolve()}
    assert oir.read_weight_files(EXAMPLE) == set()
    assert oir.read_weight_files(tmp_path / "missing.onnx") == set()  # loading it says why


@pytest.mark.parametrize("flags", [["--int8-dynamic", "--weights", "int8"], ["--fp16", "--int8-dynamic"],
                                   ["--int8", "--weights", "int8"], ["--fp16", "--int8"],
                                   ["--fp16", "--int8-dynamic", "--weights", "int8"]])
def test_two_precisions_exclude_each_other(tmp_path: Path, capsys, flags: list[str]) -> None:
    model = _copy_example(tmp_path)
    data = tmp_path / "calib.npz"
    np.savez(data, image=np.ones((2, 1, 3, 32, 32), np.float32))
    _refused(capsys, [str(model), *flags, "--calibration", str(data)], "exclude each other", model)


def test_an_empty_pass_list_is_refused(tmp_path: Path, capsys) -> None:
    model = _copy_example(tmp_path)
    _refused(capsys, [str(model), "--passes", " , "], "names no pass", model)


def test_the_api_never_saves_over_its_input_model(tmp_path: Path) -> None:
    import optcc
    from optcc.errors import BadInputError

    model = _copy_example(tmp_path)
    kept = _digest(model)
    result = optcc.optimize(str(model), verify=False)
    with pytest.raises(BadInputError, match="input model"):
        result.save(str(model))
    assert _digest(model) == kept
    result.save(str(tmp_path / "out.onnx"))  # elsewhere it writes, and the result runs as the input does
    x = np.ones((1, 3, 32, 32), np.float32)
    np.testing.assert_allclose(ReferenceEvaluator(str(tmp_path / "out.onnx")).run(None, {"image": x})[0],
                               ReferenceEvaluator(str(model)).run(None, {"image": x})[0], rtol=1e-5, atol=1e-6)


def test_the_api_never_saves_over_its_input_data_file(tmp_path: Path) -> None:
    import optcc
    from optcc.errors import BadInputError

    model = tmp_path / "good.onnx"
    onnx.save(onnx.load(EXAMPLE), model, save_as_external_data=True, location="good.bin", size_threshold=0)
    data = tmp_path / "good.bin"
    kept = _digest(data)
    result = optcc.optimize(str(model), verify=False)
    attempts = [(str(data), {}), (str(tmp_path / "out.onnx"), {"external_data": True, "external_data_location": "good.bin"})]
    for path, options in attempts:
        with pytest.raises(BadInputError, match="reads its weights from"):
            result.save(path, **options)
        assert _digest(data) == kept, (path, options)
    result.save(str(tmp_path / "out.onnx"), external_data=True)  # its own data file beside it: allowed
    x = np.ones((1, 3, 32, 32), np.float32)
    np.testing.assert_allclose(ReferenceEvaluator(str(tmp_path / "out.onnx")).run(None, {"image": x})[0],
                               ReferenceEvaluator(onnx.load(EXAMPLE)).run(None, {"image": x})[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("flags, needle", [
    (["--fp16-block", "Conv"], "--fp16-block is used with --fp16"),
    (["--calibration-method", "entropy"], "--calibration-method is used with --int8"),
    (["--no-int8-speed-check"], "--no-int8-speed-check is used with --int8"),
])
def test_a_mode_option_without_its_mode_is_refused(tmp_path: Path, capsys, flags: list[str], needle: str) -> None:
    # without --fp16/--int8 these options change nothing: a run that ignored them would look like it obeyed
    model = _copy_example(tmp_path)
    _refused(capsys, [str(model), "-o", str(tmp_path / "o.onnx"), *flags], needle, model)


@pytest.mark.parametrize("options, needle", [
    ({"passes": "eliminate-identities"}, "passes must be a list of pass names"),
    ({"disable": "fold-constants"}, "disable must be a list of pass names"),
    ({"fp16": True, "int8_dynamic": True}, "exclude each other"),
    ({"int8_dynamic": True, "weight_only": "int8"}, "exclude each other"),
    ({"level": "2"}, "unknown optimization level '2'"),
])
def test_api_option_mistakes_are_named(tmp_path: Path, options: dict, needle: str) -> None:
    import optcc
    from optcc.errors import BadInputError

    model = _copy_example(tmp_path)
    kept = _digest(model)
    with pytest.raises(BadInputError) as raised:
        optcc.optimize(str(model), **options)
    assert needle in str(raised.value) and "\n" not in str(raised.value)
    assert _digest(model) == kept and _listing(tmp_path) == {str(tmp_path): {"model.onnx"}}


@pytest.mark.parametrize("options, needle", [
    ({"int8_method": "foo"}, "unknown calibration method 'foo'"),
    ({"int8_options": {"activation_type": "int4"}}, "activation_type must be 'uint8' or 'int8'"),
    ({"int8_options": {"metric": "nope"}}, "unknown INT8 metric 'nope'"),
    ({"int8_options": {"metric": {"logits": "top1"}}}, "unknown INT8 metric 'top1'"),
    ({"weight_only": {"bits": "4"}}, "got '4'"),
])
def test_api_bad_quantization_option_values_are_bad_input(tmp_path: Path, options: dict, needle: str) -> None:
    # an option mistake is the caller's (BadInputError, exit 2), not INT8 declined for this model (exit 5)
    import optcc
    from optcc.errors import BadInputError

    model = _copy_example(tmp_path)
    kept = _digest(model)
    images = np.random.default_rng(0).random((4, 1, 3, 32, 32)).astype(np.float32)
    calibration = [{"image": image} for image in images] if "weight_only" not in options else None
    with pytest.raises(BadInputError) as raised:
        optcc.optimize(str(model), int8_calibration=calibration, **options)
    assert needle in str(raised.value), str(raised.value)
    assert _digest(model) == kept and _listing(tmp_path) == {str(tmp_path): {"model.onnx"}}


def test_samples_with_other_input_names_read_as_a_sentence(tmp_path: Path, capsys) -> None:
    model = _copy_example(tmp_path)
    data = tmp_path / "wrong.npz"
    np.savez(data, img=np.zeros((2, 1, 3, 32, 32), np.float32))
    line = _refused(capsys, [str(model), "--inputs", str(data), "-o", str(tmp_path / "o.onnx")],
                    "names do not match the model's inputs", model)
    assert f"verification sample 0 in {data}: names do not match the model's inputs: missing ['image']; " \
           "unexpected ['img']" in line, line
    np.savez(data, image=np.zeros((2, 1, 3, 32, 32), np.float32), label=np.zeros((2, 1), np.int64))
    line = _refused(capsys, [str(model), "--inputs", str(data), "-o", str(tmp_path / "o.onnx")],
                    "names do not match the model's inputs", model)
    assert line.endswith("names do not match the model's inputs: unexpected ['label']"), line  # no empty list


def test_a_report_path_that_cannot_be_written_is_called_the_report(tmp_path: Path, capsys) -> None:
    model = _copy_example(tmp_path)
    for report, needle in ((model, "report path is the input model"),
                           (tmp_path / "missing" / "r.json", "report folder does not exist")):
        _refused(capsys, [str(model), "-o", str(tmp_path / "o.onnx"), "--report", str(report)], needle, model)


def test_samples_of_another_dtype_say_how_to_convert_them(tmp_path: Path, capsys) -> None:
    model = _copy_example(tmp_path)
    data = tmp_path / "f64.npz"
    np.savez(data, image=np.zeros((2, 1, 3, 32, 32), np.float64))
    _refused(capsys, [str(model), "--inputs", str(data), "-o", str(tmp_path / "o.onnx")],
             "has dtype float64, the model expects float32 (convert it: arr.astype('float32'))", model)


def test_quiet_and_verbose_exclude_each_other(tmp_path: Path, capsys) -> None:
    model = _copy_example(tmp_path)
    _refused(capsys, [str(model), "-q", "-v", "-o", str(tmp_path / "o.onnx")], "-q and -v exclude each other", model)


def test_a_pass_that_needs_options_cannot_be_named_in_passes(tmp_path: Path, capsys) -> None:
    # quantize-int8-calibrated needs its samples: named alone it was an internal error (exit 3)
    model = _copy_example(tmp_path)
    line = _refused(capsys, [str(model), "--passes", "quantize-int8-calibrated", "-o", str(tmp_path / "o.onnx")],
                    "pass 'quantize-int8-calibrated' needs options", model)
    assert "samples" in line, line
    import optcc
    from optcc.errors import BadInputError

    with pytest.raises(BadInputError, match="needs options"):
        optcc.optimize(str(model), passes=["quantize-int8-calibrated"])


def test_a_calibration_cache_that_is_no_folder_is_bad_input(tmp_path: Path, capsys) -> None:
    # it was INT8 declined (exit 5) for a FileExistsError raised inside the quantizer
    model = _copy_example(tmp_path)
    data, cache = tmp_path / "calib.npz", tmp_path / "cache.txt"
    np.savez(data, image=np.random.default_rng(0).random((4, 1, 3, 32, 32)).astype(np.float32))
    cache.write_text("not a folder")
    _refused(capsys, [str(model), "--int8", "--calibration", str(data), "--calibration-cache", str(cache),
                      "-o", str(tmp_path / "o.onnx")], "is not a folder", model, names=str(cache))
    assert cache.read_text() == "not a folder"


@pytest.mark.parametrize("metric", ["boxes", "ctc", "detection-map"])
def test_an_int8_metric_that_cannot_judge_the_outputs_shape_is_bad_input(tmp_path: Path, capsys, metric: str) -> None:
    # the bundled example's logits are [N, 10]: 'boxes' raised numpy's ValueError inside the quantizer
    # and read as int8 declined (exit 5); 'ctc' and 'detection-map' judged a classifier as text or a map
    model = _copy_example(tmp_path)
    data = tmp_path / "calib.npz"
    np.savez(data, image=np.random.default_rng(0).random((4, 1, 3, 32, 32)).astype(np.float32))
    line = _refused(capsys, [str(model), "--int8", "--calibration", str(data), "--int8-metric", metric,
                             "-o", str(tmp_path / "o.onnx")], f"INT8 metric '{metric}' does not fit output 'logits'",
                    model)
    assert "[1, 10]" in line and str(model) in line, line  # the shape onnxruntime returns


def test_an_int8_metric_is_fitted_to_the_outputs_returned_not_to_a_wrong_declared_shape(tmp_path: Path) -> None:
    # a CRNN declares its time-major [T, 1, C] logits as [1, seqlen] (ddddocr does): onnxruntime runs it,
    # and '--int8-metric ctc' was refused by the declared rank (exit 2); it judges what the model returns
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(size=(16, 6)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"])], "crnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", 1, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "seqlen"])], [weight])
    model = tmp_path / "crnn.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), model)
    data = tmp_path / "calib.npz"
    np.savez(data, x=rng.normal(size=(12, 20, 1, 16)).astype(np.float32))
    out = tmp_path / "o.onnx"
    code = cli.main([str(model), "--int8", "--calibration", str(data), "--int8-metric", "ctc",
                     "--no-int8-speed-check", "--allow-float-fallback", "-q", "-o", str(out)])
    assert code == 0 and out.is_file()
    written = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = rng.normal(size=(20, 1, 16)).astype(np.float32)
    (got,) = written.run(None, {"x": x})
    expected = x.astype(np.float64) @ numpy_helper.to_array(weight).astype(np.float64)
    assert got.shape == (20, 1, 6)
    # INT8 or float32 kept: either way the decoded steps are float64's on a confident step
    confident = np.sort(expected, -1)[..., -1] - np.sort(expected, -1)[..., -2] > 1.0
    assert np.array_equal(got.argmax(-1)[confident], expected.argmax(-1)[confident])


@pytest.mark.parametrize("flags, said", [
    (["--fp16", "--fp16-block", "Gemm,NoSuchOp"], "fp16 block 'NoSuchOp' matches no op type"),
    (["--int8", "--int8-exclude", "Gemm,NoSuchOp", "--no-int8-speed-check"], "int8 exclude 'NoSuchOp' matches no op type"),
])
def test_a_block_or_exclude_entry_that_matches_nothing_is_warned(tmp_path: Path, capsys, flags, said) -> None:
    # a typo kept nothing float, silently; the entry that matches (Gemm) still does its work
    model = _copy_example(tmp_path)
    data, out = tmp_path / "calib.npz", tmp_path / "o.onnx"
    np.savez(data, image=np.random.default_rng(0).uniform(-1, 1, (8, 1, 3, 32, 32)).astype(np.float32))
    assert cli.main([str(model), *flags, "--calibration", str(data), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert said in err and "'Gemm'" not in err, err
    written = onnx.load(out)
    (gemm,) = [n for n in written.graph.node if n.op_type == "Gemm"]
    weights = {t.name: t for t in written.graph.initializer}
    assert weights[gemm.input[1]].data_type == TensorProto.FLOAT  # kept float32, not float16 nor int8
    x = np.random.default_rng(1).uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32)
    import onnxruntime as ort

    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    want = ReferenceEvaluator(onnx.load(EXAMPLE)).run(None, {"image": x})[0]
    np.testing.assert_allclose(got, want, rtol=0.1, atol=0.05 * float(np.abs(want).max()))


@pytest.mark.parametrize("flags", [["--inputs"], ["--int8", "--calibration"], ["--fp16", "--calibration"],
                                   ["--weights", "int8", "--calibration"]])
def test_a_samples_file_with_no_samples_is_named(tmp_path: Path, capsys, flags: list[str]) -> None:
    # it read 'no verification inputs given (empty iterable)' or 'INT8 calibration data holds no samples'
    # without the file, and --fp16 --calibration went on with generated inputs (exit 0)
    model = _copy_example(tmp_path)
    data = tmp_path / "empty.npz"
    np.savez(data, image=np.zeros((0, 1, 3, 32, 32), np.float32))
    _refused(capsys, [str(model), *flags, str(data), "-o", str(tmp_path / "o.onnx")], "holds no samples", model,
             names=str(data))


def test_an_option_a_pass_does_not_take_is_bad_input() -> None:
    """create_pass calls the factory straight away; an option its signature refuses is still
    said as bad input naming it, and a pass that takes it is made with it."""
    from optcc.errors import BadInputError
    from optcc.infra.registry import create_pass

    with pytest.raises(BadInputError, match="pass 'fold-constants': .*no_such_option"):
        create_pass("fold-constants", no_such_option=1)
    assert create_pass("fold-constants", fold_large=True).fold_large is True


def test_a_declined_int8_says_float32_once(tmp_path: Path, capsys) -> None:
    model = _copy_example(tmp_path)
    data = tmp_path / "calib.npz"
    np.savez(data, image=np.random.default_rng(5).random((8, 1, 3, 32, 32), dtype=np.float32))
    code = cli.main([str(model), "--int8", "--calibration", str(data), "--int8-cpu", "x86-avx2",
                     "-o", str(tmp_path / "o.onnx")])
    line = capsys.readouterr().err.splitlines()[0]
    assert code == 5 and "int8 not applied" in line, line
    assert line.count("kept float32") == 1 and "the result would be" not in line, line
    assert not (tmp_path / "o.onnx").exists()


def test_a_declined_int8_on_a_float16_model_says_it_stays_float16(tmp_path: Path, capsys) -> None:
    # a model that computes in float16 (a Keras export saved in half precision) had its declined
    # INT8 said as '(the result would be float32)'
    rng = np.random.default_rng(3)
    weight = numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float16), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "half",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", 8])], [weight])
    model = tmp_path / "half.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(model))
    data = tmp_path / "calib.npz"
    np.savez(data, x=rng.standard_normal((8, 2, 16)).astype(np.float16))
    code = cli.main([str(model), "--int8", "--calibration", str(data), "-o", str(tmp_path / "o.onnx")])
    line = capsys.readouterr().err.splitlines()[0]
    assert code == 5 and "int8 not applied" in line, line
    assert "float32" not in line and "(the result would be float16)" in line, line
    assert not (tmp_path / "o.onnx").exists()


def test_int8_declined_as_not_faster_on_matrix_products_names_the_modes_that_quantize_them(tmp_path: Path,
                                                                                            capsys) -> None:
    rng = np.random.default_rng(9)
    weights = [numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), f"w{i}") for i in range(2)]
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w0"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
                               helper.make_node("MatMul", ["r", "w1"], ["y"])], "mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])], weights)
    model = tmp_path / "mlp.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), model)
    data = tmp_path / "calib.npz"
    np.savez(data, x=rng.random((8, 1, 64), dtype=np.float32))
    code = cli.main([str(model), "--int8", "--calibration", str(data), "-o", str(tmp_path / "o.onnx")])
    line = capsys.readouterr().err.splitlines()[0]
    assert code == 5 and "INT8 is not faster" in line, line
    assert "--int8-dynamic or --weights int8" in line, line
    assert not (tmp_path / "o.onnx").exists()
