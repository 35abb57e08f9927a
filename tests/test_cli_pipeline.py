"""The command line as a CI step relies on it: exit codes 4 (not verified) and 5 (requested
precision not applied) with their opt-ins, no onnxruntime log lines, checked and
overwritten input shapes, external-data control, --version/--help/-v/--list-passes, the
fold-growth warning, ``optcc.verify`` with any candidate form, and the ``inspect`` and
``compare`` verbs. References are numpy or onnx's ReferenceEvaluator, never optcc's
verifier."""

from __future__ import annotations

import inspect
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import optcc
from optcc import cli
from optcc.errors import BadInputError, PrecisionNotAppliedError, UnverifiedError
from optcc.infra.registry import available_passes
from optcc.ir.overwrite import overwrite_input_shapes

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "fixtures" / "tinycnn.onnx"


@pytest.fixture
def example(tmp_path: Path) -> Path:
    path = tmp_path / "tinycnn.onnx"
    shutil.copy(EXAMPLE, path)
    return path


def _model(nodes, inputs, outputs, inits=(), opsets=(("", 17),)) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets], ir_version=8)


def _save(path: Path, proto: onnx.ModelProto) -> Path:
    onnx.save(proto, str(path))
    return path


def _custom_op_model(path: Path) -> Path:
    nodes = [helper.make_node("Frobnicate", ["x"], ["f"], domain="com.example"), helper.make_node("Relu", ["f"], ["y"])]
    value = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3])  # noqa: E731
    return _save(path, _model(nodes, [value("x")], [value("y")], opsets=(("", 17), ("com.example", 1))))


def _failing_reshape_model(path: Path) -> Path:
    """onnxruntime loads it but its Reshape kernel fails on any input (7 elements wanted)."""
    nodes = [helper.make_node("Reshape", ["x", "s"], ["r"]), helper.make_node("Relu", ["r"], ["y"])]
    return _save(path, _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["a", "b"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["z"])],
                              [numpy_helper.from_array(np.array([7], np.int64), "s")]))


def _integer_model(path: Path) -> Path:
    """No float tensor anywhere: --fp16 has nothing to convert."""
    value = lambda n: helper.make_tensor_value_info(n, TensorProto.INT64, [4])  # noqa: E731
    nodes = [helper.make_node("Add", ["x", "c"], ["y"])]
    return _save(path, _model(nodes, [value("x")], [value("y")], [numpy_helper.from_array(np.arange(4), "c")]))


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# --------------------------------------------------------------------------- exit 4


def test_exit_4_when_verification_cannot_run_and_nothing_is_written(tmp_path: Path, capsys) -> None:
    model = _custom_op_model(tmp_path / "custom.onnx")
    before, out = _files(tmp_path), tmp_path / "out.onnx"
    assert cli.main([str(model), "-o", str(out)]) == 4
    err = capsys.readouterr().err
    assert _files(tmp_path) == before
    first = err.splitlines()[0]
    assert str(model) in first and "not verified" in first and "--allow-unverified" in first
    assert "nothing written" in err and "Traceback" not in err


def test_allow_unverified_writes_with_exactly_one_warning_and_no_onnxruntime_log(tmp_path: Path, capfd) -> None:
    """The Reshape kernel error is logged by onnxruntime itself at error level before it is
    raised; none of that may reach stderr (capfd sees the C++ side too). The user's samples
    always run, so the kernel does."""
    model = _failing_reshape_model(tmp_path / "reshape.onnx")
    out = tmp_path / "out.onnx"
    samples = tmp_path / "x.npz"
    np.savez(samples, x=np.ones((1, 2, 3), np.float32))  # one sample, with its sample axis
    assert cli.main([str(model), "-o", str(out), "--inputs", str(samples), "--allow-unverified", "-q"]) == 0
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"optcc: warning: {model}: not verified")
    assert "[E:onnxruntime" not in err and "[W:onnxruntime" not in err
    assert out.is_file()
    onnx.checker.check_model(onnx.load(str(out)))


def test_api_raises_unverified_error_carrying_the_result(tmp_path: Path) -> None:
    model = _custom_op_model(tmp_path / "custom.onnx")
    with pytest.raises(UnverifiedError) as caught:
        optcc.optimize(str(model))
    assert caught.value.exit_code == 4
    assert caught.value.result.report.verification["status"] == "skipped"  # type: ignore[attr-defined]
    result = optcc.optimize(str(model), allow_unverified=True)
    assert result.report.verification["status"] == "skipped"
    assert optcc.optimize(str(model), verify=False).report.verification is None  # an explicit opt-out


# --------------------------------------------------------------------------- exit 5


def test_exit_5_when_fp16_has_nothing_to_convert(tmp_path: Path, capsys) -> None:
    model = _integer_model(tmp_path / "ints.onnx")
    out = tmp_path / "out.onnx"
    assert cli.main([str(model), "--fp16", "-o", str(out)]) == 5
    err = capsys.readouterr().err
    assert not out.exists()
    assert "fp16 not applied" in err and "--allow-float-fallback" in err
    assert "optcc -O2 (fp16 declined: " in err
    with pytest.raises(PrecisionNotAppliedError) as caught:
        optcc.optimize(str(model), fp16=True)
    assert caught.value.exit_code == 5 and caught.value.result.precision == {  # type: ignore[attr-defined]
        "fp16": caught.value.result.precision["fp16"]}  # type: ignore[attr-defined]
    assert caught.value.result.applied_precision == []  # type: ignore[attr-defined]
    assert cli.main([str(model), "--fp16", "-o", str(out), "--allow-float-fallback", "-q"]) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("optcc: warning:") and "fp16 not applied" in lines[0]
    x = np.array([1, 2, 3, 4], np.int64)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, x + np.arange(4))


def test_applied_fp16_is_named_in_the_summary_header(example: Path, tmp_path: Path, capsys) -> None:
    assert cli.main([str(example), "--fp16", "-o", str(tmp_path / "o.onnx")]) == 0
    assert "optcc -O2 +fp16: " in capsys.readouterr().err
    result = optcc.optimize(str(example), fp16=True)
    assert result.applied_precision == ["fp16"] and result.declined_precision == {}


def test_fp16_applied_inside_if_branches_is_reported_applied(tmp_path: Path, capsys) -> None:
    """The branches' values carry no type annotation: float16 is found from the Casts the
    conversion wrote there, and the run exits 0 with the model written."""
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["": 17]>
        g (bool c, float[1, 8] x) => (float[1, 8] y) {
            y = If (c) <
                then_branch = t () => (float[1, 8] ty) {
                    two = Constant <value = float {2.0}> ()
                    doubled = Mul(x, two)
                    ty = Relu(doubled)
                },
                else_branch = e () => (float[1, 8] ey) {
                    three = Constant <value = float {3.0}> ()
                    ey = Add(x, three)
                }
            >
        }""")
    path, out = tmp_path / "branches.onnx", tmp_path / "out.onnx"
    onnx.save(model, path)
    assert cli.main([str(path), "--fp16", "-o", str(out)]) == 0
    assert "optcc -O2 +fp16: " in capsys.readouterr().err
    assert optcc.optimize(str(path), fp16=True).applied_precision == ["fp16"]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.linspace(-2, 2, 8, dtype=np.float32).reshape(1, 8)
    np.testing.assert_allclose(session.run(None, {"c": np.array(True), "x": x})[0], np.maximum(2 * x, 0), rtol=1e-3)
    np.testing.assert_allclose(session.run(None, {"c": np.array(False), "x": x})[0], x + 3, rtol=1e-3)


def test_allow_float_fallback_without_a_precision_is_a_usage_error(example: Path, tmp_path: Path, capsys) -> None:
    assert cli.main([str(example), "--allow-float-fallback", "-o", str(tmp_path / "o.onnx")]) == 2
    assert "--allow-float-fallback is used with" in capsys.readouterr().err


# --------------------------------------------------------------------------- input shapes


@pytest.mark.parametrize("flag", ["--input-shape", "--overwrite-input-shape"])
@pytest.mark.parametrize("value, needle", [("nope:1,3,32,32", "no such graph input"),
                                           ("image:1,3,32", "rank 4"),
                                           ("image:1,4,32,32", "axis 1 is fixed at 3")])
def test_bad_input_shapes_exit_2_with_one_line_naming_the_file(example: Path, tmp_path: Path, capsys,
                                                              flag: str, value: str, needle: str) -> None:
    before = _files(tmp_path)
    assert cli.main([str(example), flag, value, "-o", str(tmp_path / "o.onnx")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(example) in lines[0] and needle in lines[0], lines
    assert _files(tmp_path) == before


def test_an_unknown_input_sizing_verification_is_not_said_to_be_fixed(example: Path, tmp_path: Path, capsys) -> None:
    # --input-shape sizes the generated samples only: its refusal names the input, not a shape being fixed
    assert cli.main([str(example), "--input-shape", "nope:1,3,32,32", "-o", str(tmp_path / "o.onnx")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "no such graph input 'nope' (inputs: image)" in line and "fix" not in line, line
    assert not (tmp_path / "o.onnx").exists()


def _dynamic_reshape_model() -> onnx.ModelProto:
    """y = Relu(Reshape(x, [Shape(x)[0], -1])): x [N, 3, 4] -> y [N, 12]."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["n"], axis=0),
        helper.make_node("Concat", ["n", "minus_one"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["r"]),
        helper.make_node("Relu", ["r"], ["y"]),
    ]
    inits = [numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus_one")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 12])], inits)


def _ones_like_model() -> onnx.ModelProto:
    """y = x + ConstantOfShape(Shape(x), 1): only a known shape makes the ones a constant."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("ConstantOfShape", ["shape"], ["ones"],
                         value=numpy_helper.from_array(np.array([1.0], np.float32))),
        helper.make_node("Add", ["x", "ones"], ["y"]),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 4])])


def test_overwrite_input_shape_fixes_the_written_model_and_folding_specialises(tmp_path: Path) -> None:
    path = _save(tmp_path / "dyn.onnx", _ones_like_model())
    fixed, dynamic = tmp_path / "fixed.onnx", tmp_path / "dynamic.onnx"
    assert cli.main([str(path), "--overwrite-input-shape", "x:2,3,4", "-o", str(fixed), "-q"]) == 0
    assert cli.main([str(path), "--input-shape", "x:2,3,4", "-o", str(dynamic), "-q"]) == 0
    fixed_proto, dynamic_proto = onnx.load(str(fixed)), onnx.load(str(dynamic))
    dims = lambda v: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert dims(fixed_proto.graph.input[0]) == [2, 3, 4] and dims(fixed_proto.graph.output[0]) == [2, 3, 4]
    assert dims(dynamic_proto.graph.input[0]) == ["N", 3, 4], "--input-shape sizes verification only"
    assert "Shape" not in {n.op_type for n in fixed_proto.graph.node}, "the shape subgraph is folded"
    assert "Shape" in {n.op_type for n in dynamic_proto.graph.node}
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    got = ort.InferenceSession(str(fixed), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, x + 1)
    np.testing.assert_array_equal(ReferenceEvaluator(fixed_proto).run(None, {"x": x})[0], x + 1)


@pytest.mark.parametrize("flags, purpose", [(["--inputs"], "verification"), (["--int8", "--calibration"], "calibration")])
def test_overwrite_input_shape_refuses_user_samples_of_another_shape(example: Path, tmp_path: Path, capsys,
                                                                     flags: list[str], purpose: str) -> None:
    samples = tmp_path / "x.npz"
    np.savez(samples, image=np.zeros((2, 4, 3, 32, 32), np.float32))
    before = _files(tmp_path)
    assert cli.main([str(example), "--overwrite-input-shape", "image:1,3,32,32", *flags, str(samples),
                     "-o", str(tmp_path / "o.onnx")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    # one line naming the samples file (the model is fine), before any pass runs
    assert len(lines) == 1 and "overwritten to [1, 3, 32, 32]" in lines[0], lines
    assert str(samples) in lines[0] and f"{purpose} sample 0" in lines[0], lines
    assert _files(tmp_path) == before


def test_optimize_refuses_calibration_samples_of_another_shape_than_the_overwritten_one(example: Path) -> None:
    samples = [{"image": np.zeros((4, 3, 32, 32), np.float32)}]
    with pytest.raises(BadInputError, match=r"calibration sample 0: 'image' has shape \[4, 3, 32, 32\]"):
        optcc.optimize(str(example), overwrite_input_shapes={"image": [1, 3, 32, 32]}, int8_calibration=samples)


def test_overwrite_input_shapes_re_infers_intermediate_shapes_and_refuses_conflicts() -> None:
    model = optcc.ir.load(_dynamic_reshape_model())
    overwrite_input_shapes(model, {"x": [5, 3, 4]})
    values = {o.name: o for node in model.graph for o in node.outputs}
    assert list(values["shape"].shape.dims) == [3]
    assert list(values["y"].shape.dims) == [5, 12]
    with pytest.raises(BadInputError, match="fixed at 5"):
        overwrite_input_shapes(model, {"x": [6, 3, 4]}, label="m.onnx")
    assert list(model.graph.inputs[0].shape.dims) == [5, 3, 4], "a refused edit leaves the model as it was"


def test_overwrite_input_shape_writes_every_inferred_shape_quietly(example: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "fixed.onnx"
    assert cli.main([str(example), "--overwrite-input-shape", "image:1,3,32,32", "-o", str(out), "-q"]) == 0
    assert capsys.readouterr().err == ""  # no warning per value whose type was unknown
    proto = onnx.load(str(out))
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True)  # onnx's own inference on the result
    want = {v.name: v.type for v in inferred.graph.value_info}
    written = {v.name: v.type for v in proto.graph.value_info}
    assert written and written == {name: want[name] for name in written}
    assert set(want) <= set(written)


# --------------------------------------------------------------------------- external data


def test_external_data_on_with_threshold_and_location(example: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    assert cli.main([str(example), "-o", str(out), "-q", "--external-data", "on",
                     "--external-data-threshold", "0", "--external-data-location", "weights.bin"]) == 0
    assert (tmp_path / "weights.bin").is_file()
    proto = onnx.load(str(out), load_external_data=False)
    locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"weights.bin"}
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    ref = ort.InferenceSession(str(example), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_external_data_off_writes_one_file(example: Path, tmp_path: Path) -> None:
    assert cli.main([str(example), "-o", str(tmp_path / "out.onnx"), "-q", "--external-data", "off"]) == 0
    assert _files(tmp_path) == {"tinycnn.onnx", "out.onnx"}


@pytest.mark.parametrize("args, needle", [
    (["--external-data", "off", "--external-data-location", "w.bin"], "need external data"),
    (["--external-data-location", "sub/w.bin"], "must be a file name"),
    (["--external-data-threshold", "-1"], "0 or more"),
])
def test_bad_external_data_options_exit_2(example: Path, tmp_path: Path, capsys, args, needle) -> None:
    assert cli.main([str(example), "-o", str(tmp_path / "o.onnx"), *args]) == 2
    assert needle in capsys.readouterr().err


# --------------------------------------------------------------------------- information


def test_version_and_grouped_help_with_examples_and_exit_codes(capsys) -> None:
    assert cli.main(["--version"]) == 0
    assert optcc.__version__ in capsys.readouterr().out
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    for needle in ("examples:", "exit codes (", "input shapes:", "INT8:", "verification:", "optcc inspect",
                   "--allow-unverified", "--allow-float-fallback"):
        assert needle in text, needle
    for code in range(6):
        assert f"\n  {code}  " in text
    assert "photo=photos.npz \\\n        --int8-metric" in text  # a continued example reads as two lines


def test_list_passes_prints_the_whole_first_paragraph(capsys) -> None:
    assert cli.main(["--list-passes"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for info in available_passes().values():
        doc = inspect.getdoc(info.factory) or ""
        paragraph = " ".join(doc.split("\n\n")[0].split())
        assert f"{info.name} " in out and paragraph in out, info.name


def test_verbose_lists_every_pass_and_output_metrics(example: Path, tmp_path: Path, capsys) -> None:
    assert cli.main([str(example), "-v", "-o", str(tmp_path / "o.onnx")]) == 0
    err = capsys.readouterr().err
    assert "  eliminate-identities " in err and "output 'logits'" in err
    assert "output 'logits': proved equal" in err or "output 'logits' on CPUExecutionProvider" in err


def test_a_file_named_like_a_verb_is_still_a_model(example: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    shutil.copy(example, tmp_path / "inspect")
    assert cli.main(["inspect", "-o", "out.onnx", "-q"]) == 0
    assert (tmp_path / "out.onnx").is_file()


# --------------------------------------------------------------------------- fold growth


def test_fold_growth_over_5_percent_is_said_in_the_summary(tmp_path: Path, capsys) -> None:
    """ConstantOfShape([64, 64]) from a 16-byte shape: folding adds a 16 KiB weight."""
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["ones"],
                              value=numpy_helper.from_array(np.array([1.0], np.float32))),
             helper.make_node("Add", ["x", "ones"], ["y"])]
    value = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [64, 64])  # noqa: E731
    path = _save(tmp_path / "grow.onnx", _model(nodes, [value("x")], [value("y")],
                                                [numpy_helper.from_array(np.array([64, 64], np.int64), "shape")]))
    out = tmp_path / "out.onnx"
    assert cli.main([str(path), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    proto = onnx.load(str(out))
    if "ConstantOfShape" in {n.op_type for n in proto.graph.node}:
        pytest.skip("the size policy kept this ConstantOfShape computed at run time")
    assert "constant folding grew the weights by" in err
    x = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, x + 1)


def test_fold_growth_that_a_later_pass_drops_is_not_said() -> None:
    """A weight read by both branches of an If on a constant condition: folding Unsqueeze in
    each branch makes two copies (the weights double), inlining the branch taken drops one;
    the written model holds what it held before, so no growth is reported (Silero VAD)."""
    w = np.random.default_rng(0).standard_normal((128, 64)).astype(np.float32)
    value = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 128, 64])  # noqa: E731

    def branch(name: str, op: str) -> onnx.GraphProto:
        nodes = [helper.make_node("Unsqueeze", ["W", "axes"], [f"{name}_w"]),
                 helper.make_node(op, ["x", f"{name}_w"], [f"{name}_y"])]
        return helper.make_graph(nodes, name, [], [value(f"{name}_y")])

    if_node = helper.make_node("If", ["cond"], ["y"], then_branch=branch("then", "Add"), else_branch=branch("else", "Mul"))
    proto = _model([if_node], [value("x")], [value("y")],
                   [numpy_helper.from_array(np.array(True), "cond"), numpy_helper.from_array(np.array([0], np.int64), "axes"),
                    numpy_helper.from_array(w, "W")])
    result = optcc.optimize(proto)
    grown = sum(p.bytes_after - p.bytes_before for p in result.report.passes if p.name == "fold-constants")
    assert grown > 0.9 * w.nbytes  # the folds did grow the weights on the way (a copy, less the axes dropped)
    assert result.report.model_after.weight_bytes <= result.report.model_before.weight_bytes
    assert not any("grew the weights" in warning for warning in result.report.warnings)
    x = np.random.default_rng(1).standard_normal((1, 128, 64)).astype(np.float32)
    got = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, x + w[None])


# --------------------------------------------------------------------------- optcc.verify


@pytest.mark.parametrize("form", ["proto", "path", "ir"])
def test_verify_accepts_a_candidate_as_proto_path_or_ir(example: Path, tmp_path: Path, form: str) -> None:
    result = optcc.optimize(str(example))
    assert isinstance(result.model, onnx.ModelProto)
    candidate = {"proto": lambda: result.model, "ir": lambda: result.ir_model,
                 "path": lambda: (result.save(tmp_path / "c.onnx"), str(tmp_path / "c.onnx"))[1]}[form]()
    verdict = optcc.verify(str(example), candidate, numerics="fusion")
    assert verdict.status == "passed", verdict.reason


# --------------------------------------------------------------------------- inspect


def test_inspect_lists_interface_opsets_ops_and_sizes(example: Path, capsys) -> None:
    assert cli.main(["inspect", str(example), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    proto = onnx.load(str(example))
    assert [i["name"] for i in info["inputs"]] == [i.name for i in proto.graph.input]
    assert info["inputs"][0]["shape"] == ["N", 3, 32, 32] and info["inputs"][0]["dtype"] == "float"
    assert info["dynamic_dims"] == ["N"]
    assert info["opsets"] == {"ai.onnx": 17}
    assert info["nodes"] == len(proto.graph.node)
    expected: dict[str, int] = {}
    for node in proto.graph.node:
        expected[node.op_type] = expected.get(node.op_type, 0) + 1
    assert info["op_histogram"] == expected
    assert info["file_bytes"] == example.stat().st_size and info["external_data"] == []
    assert cli.main(["inspect", str(example)]) == 0
    text = capsys.readouterr().out
    assert "image" in text and "[N, 3, 32, 32]" in text and "Conv 3" in text


def test_inspect_names_external_data_files(example: Path, tmp_path: Path, capsys) -> None:
    proto = onnx.load(str(example))
    onnx.save(proto, str(tmp_path / "ext.onnx"), save_as_external_data=True, location="ext.weights",
              size_threshold=0)
    assert cli.main(["inspect", str(tmp_path / "ext.onnx"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["external_data"] == [{"file": "ext.weights", "bytes": (tmp_path / "ext.weights").stat().st_size}]


def test_inspect_of_a_bad_file_exits_2_naming_it(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    assert cli.main(["inspect", str(bad)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0]


# --------------------------------------------------------------------------- compare


def _sub_instead_of_add(example: Path, tmp_path: Path) -> Path:
    proto = onnx.load(str(example))
    for node in proto.graph.node:
        if node.op_type == "Add":
            node.op_type = "Sub"
    return _save(tmp_path / "wrong.onnx", proto)


def test_compare_matches_an_optimized_model_and_reports_numpy_metrics(example: Path, tmp_path: Path, capsys) -> None:
    optimized = tmp_path / "opt.onnx"
    assert cli.main([str(example), "-o", str(optimized), "-q"]) == 0
    x = np.random.default_rng(3).standard_normal((2, 2, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "x.npz", image=x)
    assert cli.main(["compare", str(example), str(optimized), "--inputs", str(tmp_path / "x.npz"),
                     "--numerics", "fusion", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["passed"] and data["samples"] == 2
    (metrics,) = data["outputs"]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    a, b = (ort.InferenceSession(str(m), options, providers=["CPUExecutionProvider"]) for m in (example, optimized))
    per_sample = []  # (max rel, max abs) against A, in float64
    for sample in x:
        ref = a.run(None, {"image": sample})[0].astype(np.float64)
        err = float(np.abs(b.run(None, {"image": sample})[0] - ref).max())
        per_sample.append((err / float(np.abs(ref).max()), err))
    worst_rel, its_abs = max(per_sample)  # the worst sample is reported
    assert metrics["max_rel"] == pytest.approx(worst_rel, rel=1e-9)
    assert metrics["max_abs"] == pytest.approx(its_abs, rel=1e-9)


def test_compare_exits_1_on_a_mismatch_with_a_table(example: Path, tmp_path: Path, capsys) -> None:
    wrong = _sub_instead_of_add(example, tmp_path)
    assert cli.main(["compare", str(example), str(wrong)]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH" in out and "logits" in out


def test_compare_rtol_atol_is_elementwise(example: Path, tmp_path: Path, capsys) -> None:
    assert cli.main(["compare", str(example), str(example), "--rtol", "0", "--atol", "0"]) == 0
    wrong = _sub_instead_of_add(example, tmp_path)
    assert cli.main(["compare", str(example), str(wrong), "--rtol", "1e-3", "--atol", "1e-5"]) == 1
    assert "values outside atol" in capsys.readouterr().out


@pytest.mark.parametrize("args, needle", [
    (["--numerics", "exact", "--rtol", "1e-3"], "exclude each other"),
    (["--samples", "0"], "--samples"),
    (["--input-shape", "nope:1,3,32,32"], "no such graph input"),
    (["--inputs", "bad.npz"], "bad.npz"),
    (["--rtol", "-1"], "rtol must be 0 or more"),
    (["--atol", "nan"], "atol must be 0 or more"),
    (["--int8-metric", "argmax"], "--numerics int8 alone"),
    (["--numerics", "int8", "--int8-metric", "@photo=added-boxes"], "no @GROUP"),
    (["--numerics", "int8", "--int8-metric", "nope"], "unknown metric 'nope'"),
    (["--numerics", "int8", "--int8-metric-margin", "0"], "--int8-metric-margin must be a positive number"),
])
def test_compare_bad_usage_exits_2_with_one_line(example: Path, tmp_path: Path, monkeypatch, capsys,
                                                 args, needle) -> None:
    monkeypatch.chdir(tmp_path)
    np.savez(tmp_path / "bad.npz", image=np.zeros((1, 2, 3, 32, 31), np.float32))
    assert cli.main(["compare", str(example), str(example), *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines


def test_compare_models_with_different_inputs_or_unrunnable_ops(example: Path, tmp_path: Path, capsys) -> None:
    custom = _custom_op_model(tmp_path / "custom.onnx")
    assert cli.main(["compare", str(example), str(custom)]) == 2
    assert "graph inputs differ" in capsys.readouterr().err
    assert cli.main(["compare", str(custom), str(custom)]) == 4
    err = capsys.readouterr().err
    assert "onnxruntime cannot" in err and "Frobnicate" in err


# --------------------------------------------------------------------------- corpus


@pytest.mark.corpus
def test_legacy_minus_one_dims_corpus_model_optimizes_without_input_shape(tmp_path: Path, capsys) -> None:
    """PP-OCR mobile cls declares x: [-1, 3, ?, ?]; the default command must verify and
    write it without --input-shape."""
    from fixtures import corpus

    try:
        path = corpus.fetch(corpus.find_model("ppocr-mobile-cls"))
    except corpus.CorpusUnavailable as e:
        pytest.skip(f"corpus model unavailable (offline?): {e}")
    out = tmp_path / "cls.onnx"
    code = cli.main([str(path), "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "verify: PASS" in err and "Traceback" not in err
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 48, 192)).astype(np.float32)
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_input_range_sets_the_generated_verification_values(tmp_path):
    """--input-range NAME:LO,HI reaches the generated inputs: a model that divides by its
    input verifies on (1, 2) and would see values near 0 otherwise; a bad range is exit 2."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Reciprocal", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    report = tmp_path / "r.json"
    assert cli.main([str(path), "-O1", "--input-range", "x:1,2", "--report", str(report), "-q"]) == 0
    result = optcc.optimize(str(path), level=1, input_ranges={"x": (1.0, 2.0)})
    assert result.report.verification["status"] == "passed"
    with optcc.Verifier(str(path), input_ranges={"x": (1.0, 2.0)}) as verifier:
        values = np.concatenate([f["x"] for f in verifier.feeds])
    assert values.min() >= 1.0 and values.max() <= 2.0
    assert cli.main([str(path), "--input-range", "x:2,1", "-q"]) == 2


@pytest.mark.corpus
@pytest.mark.parametrize("name", ["shufflenet", "bvlc-alexnet", "ppocr-mobile-cls"])
def test_fp16_never_makes_a_corpus_model_bigger(name: str, tmp_path: Path) -> None:
    """--fp16 writes at most 0.52x the file where it applies to stored float weights, and
    otherwise says why and writes nothing (exit 5); the weight generators of the onnx
    wheel's light models are not materialized for it: a light model stores no float weight,
    so where its layers run in float16 the file grows by their Casts alone."""
    from fixtures.corpus import CorpusUnavailable, fetch, find_model

    try:
        source = fetch(find_model(name))
    except CorpusUnavailable as e:
        pytest.skip(f"corpus model {name} unavailable: {e}")
    out = tmp_path / "fp16.onnx"
    code = cli.main([str(source), "--fp16", "-o", str(out), "-q"])
    given = onnx.load(str(source))
    tensors = [*given.graph.initializer, *(a.t for n in given.graph.node if n.op_type == "Constant" for a in n.attribute)]
    stored = sum(t.data_type == TensorProto.FLOAT and np.prod(t.dims) >= 64 for t in tensors)
    if code == 5:
        assert not out.exists()
        return
    assert code == 0
    written = onnx.load(out)
    if stored:
        assert out.stat().st_size <= 0.52 * Path(source).stat().st_size
        float16 = [t for t in written.graph.initializer if t.data_type == TensorProto.FLOAT16]
        assert float16, "no float16 weights in the float16 model"
    else:
        assert max((t.ByteSize() for t in written.graph.initializer), default=0) <= 1024  # nothing materialized
        casts = sum(n.op_type == "Cast" for n in written.graph.node) - sum(n.op_type == "Cast" for n in given.graph.node)
        assert casts > 0 and out.stat().st_size <= Path(source).stat().st_size + 128 * casts


def test_the_pass_managers_warnings_are_said_once_in_the_summary(example: Path, tmp_path: Path, capsys,
                                                                 monkeypatch) -> None:
    """A warning the pass manager issues is in the report's warnings, which the summary
    prints; Python's own display of it (category, file and source line) stays off stderr."""
    from optcc import cli
    from optcc.errors import PipelineWarning

    real = cli.optimize

    def warning_optimize(*args, **kwargs):
        warnings.warn("loop stopped unconverged after 3 iterations", PipelineWarning, stacklevel=2)
        return real(*args, **kwargs)

    monkeypatch.setattr(cli, "optimize", warning_optimize)
    with warnings.catch_warnings(record=True) as shown:  # what Python would display on stderr
        warnings.simplefilter("always")
        assert cli.main([str(example), "-o", str(tmp_path / "o.onnx")]) == 0
    assert not [w for w in shown if issubclass(w.category, PipelineWarning)]
    assert "PipelineWarning" not in capsys.readouterr().err
