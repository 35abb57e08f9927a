"""Option values that cannot be meant, refused where they are parsed: an --input-range
that is not finite or exceeds the input's dtype (at every level, drawn from or not), an
SQNR target that is not finite or not above 0 dB (the command line and the API's
``Target``), a graph reading an undefined value (optcc's line alone, not onnx-ir's
warning too), all-constant calibration data (the error names the file). And two inputs
that are not refused: a corrupt --calibration-cache entry is recomputed, and an
overwritten input's interface note describes the written model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import optcc
from optcc import cli
from optcc.errors import BadInputError
from optcc.quant.fallback import Target
from tests.test_bad_inputs import _copy_example, _refused


def _images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((count, 1, 3, 32, 32)).astype(np.float32)


@pytest.mark.parametrize(("bounds", "level", "needle"), [
    ("-inf,inf", "-O3", "must be finite"),
    ("-1e308,1e308", "-O2", "width high - low exceeds the largest float64"),
    ("0,1e39", "-O3", "exceeds float32"),
    ("0,1e39", "-O2", "exceeds float32"),
])
def test_input_range_that_cannot_be_drawn_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    bounds: str, level: str, needle: str) -> None:
    model = _copy_example(tmp_path)
    _refused(capsys, [str(model), "--input-range", f"image:{bounds}", level, "-o", str(tmp_path / "out.onnx")],
             needle, model=model, names=str(model))


def test_input_range_beyond_an_integer_dtype_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    graph = helper.make_graph([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.INT8, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    model = tmp_path / "int8.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), model)
    _refused(capsys, [str(model), "--input-range", "x:0,300", "-o", str(tmp_path / "out.onnx")],
             "exceeds int8 (values from -128 to 127)", model=model)


@pytest.mark.parametrize(("bounds", "needle"), [((0.0, 1e39), "exceeds float32"),
                                                ((0.0, float("nan")), "must be finite"),
                                                ((-1e308, 1e308), "exceeds the largest float64")])
def test_the_api_refuses_the_same_ranges_at_every_level(bounds: tuple[float, float], needle: str) -> None:
    for level in (1, 2, 3):
        with pytest.raises(BadInputError, match=needle):
            optcc.optimize(str(_example()), level=level, input_ranges={"image": bounds})


def test_a_drawable_range_is_used_and_the_result_matches_the_original(tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    assert cli.main([str(_example()), "--input-range", "image:-2,2", "-O3", "-o", str(out)]) == 0
    feed = {"image": np.random.default_rng(1).uniform(-2, 2, (1, 3, 32, 32)).astype(np.float32)}
    want = ort.InferenceSession(str(_example()), providers=["CPUExecutionProvider"]).run(None, feed)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feed)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("target", ["nan", "inf", "-inf", "-5", "0"])
def test_sqnr_target_that_accepts_anything_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      target: str) -> None:
    model = _copy_example(tmp_path)
    data = tmp_path / "calib.npz"
    np.savez(data, image=_images(8))
    _refused(capsys, [str(model), "--int8", "--calibration", str(data), f"--int8-target-sqnr={target}",
                      "-o", str(tmp_path / "out.onnx")], "--int8-target-sqnr must be a finite number of dB above 0",
             model=model)


@pytest.mark.parametrize("target", [float("nan"), float("inf"), -5.0, 0.0])
def test_the_api_target_refuses_the_same_values(target: float) -> None:
    with pytest.raises(BadInputError, match="finite number of dB above 0"):
        Target(min_sqnr_db=target)
    assert Target(min_sqnr_db=0.5).min_sqnr_db == 0.5


def _undefined_input_model(tmp_path: Path, in_body: bool = False) -> Path:
    """A Relu reading 'nope', which nothing defines: in the main graph, or in an If's branch."""
    relu = helper.make_node("Relu", ["nope"], ["y"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    if in_body:
        branch = helper.make_graph([relu], "branch", [], [y])
        nodes = [helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)]
        inputs = [helper.make_tensor_value_info("c", TensorProto.BOOL, [])]
    else:
        nodes, inputs = [relu], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])]
    graph = helper.make_graph(nodes, "g", inputs, [y])
    path = tmp_path / "undefined.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize("in_body", [False, True])
@pytest.mark.parametrize("command", [[], ["inspect"], ["compare"]])
def test_undefined_input_is_said_on_optcc_line_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      caplog: pytest.LogCaptureFixture, command: list[str],
                                                      in_body: bool) -> None:
    model = _undefined_input_model(tmp_path, in_body)
    args = [*command, str(model), *([str(model)] if command == ["compare"] else []),
            *([] if command else ["-o", str(tmp_path / "out.onnx")])]
    _refused(capsys, args, "reads 'nope' before it is defined", model=model, names=str(model))
    # pytest takes log records off stderr: onnx-ir's warnings would be among them
    assert not [r for r in caplog.records if r.name.startswith("onnx_ir")]


def test_undefined_input_through_the_api_logs_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(BadInputError, match="reads 'nope' before it is defined"):
        optcc.optimize(str(_undefined_input_model(tmp_path)))
    assert not [r for r in caplog.records if "cannot be found in any scope" in r.getMessage()]


@pytest.mark.parametrize("count", [1, 16])
def test_constant_calibration_error_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   count: int) -> None:
    model = _copy_example(tmp_path)
    data = tmp_path / "c_zero.npz"
    np.savez(data, image=np.zeros((count, 1, 3, 32, 32), np.float32))
    _refused(capsys, [str(model), "--int8", "--calibration", str(data), "-o", str(tmp_path / "out.onnx")],
             "holds one value throughout", model=model, names=f"--calibration {data}")


def test_constant_calibration_for_weight_only_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _copy_example(tmp_path)
    data = tmp_path / "c_zero.npz"
    np.savez(data, image=np.zeros((16, 1, 3, 32, 32), np.float32))
    _refused(capsys, [str(model), "--weights", "int8", "--calibration", str(data), "-o", str(tmp_path / "out.onnx")],
             "holds one value throughout", model=model, names=f"--calibration {data}")


def test_a_range_beyond_float64_is_refused() -> None:
    with pytest.raises(BadInputError, match="give two numbers"):
        optcc.optimize(str(_example()), input_ranges={"image": (10**400, 10**401)})


def _int8_run(tmp_path: Path, data: Path, out: Path, cache: Path | None) -> int:
    return cli.main([str(_example()), "--int8", "--calibration", str(data), "-q", "-o", str(out),
                     *(["--calibration-cache", str(cache)] if cache is not None else [])])


@pytest.mark.parametrize("corrupt", ["garbage", "object array", "mismatched shapes"])
def test_corrupt_calibration_cache_entry_is_recomputed(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       corrupt: str) -> None:
    data, cache = tmp_path / "calib.npz", tmp_path / "cache"
    np.savez(data, image=_images(16))
    assert _int8_run(tmp_path, data, tmp_path / "uncached.onnx", None) == 0
    assert _int8_run(tmp_path, data, tmp_path / "first.onnx", cache) == 0
    (entry,) = cache.glob("calib-*.npz")
    if corrupt == "garbage":
        entry.write_bytes(b"garbage")
    elif corrupt == "object array":
        np.savez(entry, names=np.array([None], dtype=object))
    else:  # every field readable, one of them cut short
        with np.load(entry) as fields:
            arrays = dict(fields)
        np.savez(entry, **{**arrays, "minmax": arrays["minmax"][:1]})
    capsys.readouterr()
    assert _int8_run(tmp_path, data, tmp_path / "again.onnx", cache) == 0
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("optcc: warning: ") and entry.name in lines[0] \
        and "recomputed" in lines[0], lines
    assert (tmp_path / "again.onnx").read_bytes() == (tmp_path / "uncached.onnx").read_bytes()
    assert _int8_run(tmp_path, data, tmp_path / "reused.onnx", cache) == 0  # the entry was written again
    assert capsys.readouterr().err == ""


def test_overwritten_input_note_describes_the_written_model(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, -1, -1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 3, -1, -1])])
    model, out = tmp_path / "neg.onnx", tmp_path / "fixed.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), model)
    assert cli.main([str(model), "-v", "--overwrite-input-shape", "x:1,3,48,192", "-o", str(out)]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("interface: ")]
    written = onnx.load(out).graph
    assert [d.dim_value for d in written.input[0].type.tensor_type.shape.dim] == [1, 3, 48, 192]
    assert [d.dim_value for d in written.output[0].type.tensor_type.shape.dim] == [1, 3, 48, 192]
    assert notes == ["interface: input 'x': declared [-1, 3, -1, -1], written [1, 3, 48, 192] "
                     "(input shape overwritten)",
                     "interface: output 'y': declared [-1, 3, -1, -1], written [1, 3, 48, 192] "
                     "(input shape overwritten)"]


def _example() -> Path:
    return Path(__file__).resolve().parent.parent / "fixtures" / "tinycnn.onnx"
