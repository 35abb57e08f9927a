"""The command line: every exit code, levels, reports, default output path, listing.
(The bad-input catalogue lives in test_bad_inputs.py.)"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

import optcc
from optcc import cli
from optcc.infra import registry

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "fixtures" / "tinycnn.onnx"


@pytest.fixture
def example(tmp_path: Path) -> Path:
    path = tmp_path / "tinycnn.onnx"
    shutil.copy(EXAMPLE, path)
    return path


@pytest.fixture
def fresh_registry():
    """Tests that register passes get a registry rebuilt afterwards."""
    yield
    registry._registry = None


class SubInsteadOfAddPass(optcc.Pass):
    """A deliberately wrong pass: Add becomes Sub."""

    name = "test-sub-instead-of-add"

    def call(self, model: ir.Model) -> optcc.PassResult:
        changed = False
        for node in optcc.ir.nodes(model):
            if node.op_type == "Add":
                node.op_type, changed = "Sub", True
        return optcc.PassResult(model, changed)


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_exit_0_writes_verified_output_and_report(example: Path, tmp_path: Path, capsys):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    code = cli.main([str(example), "-O2", "-o", str(out), "--report", str(report)])
    assert code == 0
    stderr = capsys.readouterr().err
    assert "nodes 19 -> " in stderr and "verify: PASS" in stderr
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"Identity", "Dropout", "Shape", "Mul"}
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    data = json.loads(report.read_text())
    assert data["schema_version"] == 1 and data["level"] == 2
    assert data["verification"]["status"] == "passed"
    assert data["model_before"]["op_histogram"]["Identity"] == 2
    assert {p["name"] for p in data["passes"]} >= {"eliminate-identities", "eliminate-dead-nodes"}
    assert data["peak_rss_bytes"] > 0 and data["total_time_s"] > 0


@pytest.mark.parametrize("level", ["-O0", "-O1", "-O3"])
def test_other_levels_run(example: Path, tmp_path: Path, level: str):
    out = tmp_path / "out.onnx"
    assert cli.main([str(example), level, "-o", str(out), "-q"]) == 0
    model = onnx.load(out)
    if level == "-O0":
        assert len(model.graph.node) == 19
    if level == "-O3":
        assert {p.key: p.value for p in model.metadata_props}["optcc.target"] == "onnxruntime"


def test_default_output_is_beside_the_input_with_opt_suffix(example: Path):
    assert cli.main([str(example), "-q"]) == 0
    assert (example.parent / "tinycnn.opt.onnx").is_file()


def test_quiet_prints_nothing_on_success(example: Path, tmp_path: Path, capsys):
    assert cli.main([str(example), "-q", "-o", str(tmp_path / "o.onnx")]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def _verification_fails(monkeypatch) -> None:
    """optimize() as the CLI calls it, but the result fails verification: the pass manager
    reverts a wrong pass it can trace, so the CLI's exit-1 path is driven directly (the
    model is the wrong pass's, run without verification)."""
    real = cli.optimize

    def failing(*args, **kwargs):
        result = real(*args, **{**kwargs, "passes": [SubInsteadOfAddPass()], "verify": False})
        result.report.verification = {"status": "failed", "summary": "FAIL: 'logits' differs"}
        error = optcc.VerificationError("verification failed: FAIL: 'logits' differs")
        error.result = result
        raise error

    monkeypatch.setattr(cli, "optimize", failing)


def test_exit_1_on_failed_verification_writes_nothing(example: Path, tmp_path: Path, capsys, monkeypatch):
    _verification_fails(monkeypatch)
    before = _files(tmp_path)
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    code = cli.main([str(example), "-o", str(out), "--report", str(report)])
    assert code == 1
    err = capsys.readouterr().err
    assert "verification failed" in err and "--force" in err
    assert not out.exists()
    assert _files(tmp_path) == before | {"r.json"}, "only the report is written"
    assert json.loads(report.read_text())["verification"]["status"] == "failed"


def test_exit_1_with_force_writes_the_output(example: Path, tmp_path: Path, monkeypatch):
    _verification_fails(monkeypatch)
    out = tmp_path / "out.onnx"
    assert cli.main([str(example), "-o", str(out), "--force", "-q"]) == 1
    assert "Sub" in {n.op_type for n in onnx.load(out).graph.node}


def test_verify_each_reverts_the_wrong_pass_and_exits_0(example: Path, tmp_path: Path, fresh_registry):
    optcc.register(SubInsteadOfAddPass)
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    code = cli.main([str(example), "--passes", "test-sub-instead-of-add,eliminate-identities",
                     "--verify-each", "-o", str(out), "--report", str(report), "-q"])
    assert code == 0
    passes = json.loads(report.read_text())["passes"]
    assert passes[0]["status"] == "reverted" and "numerics" in passes[0]["reason"]
    assert "Add" in {n.op_type for n in onnx.load(out).graph.node}


def test_no_verify_skips_verification(example: Path, tmp_path: Path):
    report = tmp_path / "r.json"
    assert cli.main([str(example), "--no-verify", "-o", str(tmp_path / "o.onnx"), "--report", str(report), "-q"]) == 0
    assert json.loads(report.read_text())["verification"] is None


@pytest.mark.parametrize(
    "args, message",
    [
        (["--passes", "no-such-pass"], "unknown pass 'no-such-pass'"),
        (["--disable", "no-such-pass"], "cannot disable unknown pass"),
        (["--passes", "fuse-bn"], "did you mean fuse-pad or fuse-batchnorm?"),
        (["--disable", "fold-constant"], "cannot disable unknown pass 'fold-constant' (did you mean fold-constants"),
        (["-O", "7"], "usage error"),
        (["--input-shape", "image:1,x"], "--input-shape"),
        (["--providers", "tpu"], "execution provider 'tpu' is not available"),
    ],
)
def test_exit_2_on_bad_usage(example: Path, tmp_path: Path, capsys, args, message):
    before = _files(tmp_path)
    code = cli.main([str(example), "-o", str(tmp_path / "out.onnx"), *args])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert _files(tmp_path) == before


def test_exit_3_on_internal_error(example: Path, tmp_path: Path, capsys, monkeypatch):
    def explode(*args, **kwargs):
        raise KeyError("something optcc did not expect")

    monkeypatch.setattr(cli, "optimize", explode)
    out = tmp_path / "out.onnx"
    assert cli.main([str(example), "-o", str(out)]) == 3
    err = capsys.readouterr().err
    assert "internal error" in err and "report" in err and "Traceback" not in err
    assert not out.exists()


def test_list_passes_shows_name_level_and_description(capsys):
    assert cli.main(["--list-passes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(line for line in lines if line.startswith("eliminate-identities"))
    assert "O1" in row and "Identity" in row


def test_python_dash_m_entry_point(example: Path, tmp_path: Path):
    out = tmp_path / "o.onnx"
    proc = subprocess.run([sys.executable, "-m", "optcc", str(example), "-o", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "verify: PASS" in proc.stderr and out.is_file()


def test_fp16_flag_converts_and_verifies_with_fp16_tolerance(example: Path, tmp_path: Path):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    assert cli.main([str(example), "--fp16", "-o", str(out), "--report", str(report), "-q"]) == 0
    data = json.loads(report.read_text())
    assert data["verification"]["numerics"] == "fp16" and data["verification"]["status"] == "passed"
    model = onnx.load(out)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)


def test_fp16_io_float16_gives_a_float16_interface_with_the_same_names_and_shapes(example: Path, tmp_path: Path):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    assert cli.main([str(example), "--fp16", "--fp16-io", "float16", "-o", str(out), "--report", str(report), "-q"]) == 0
    assert json.loads(report.read_text())["verification"]["status"] == "passed"
    original, model = onnx.load(example), onnx.load(out)
    for before, after in ((original.graph.input, model.graph.input), (original.graph.output, model.graph.output)):
        assert [v.name for v in after] == [v.name for v in before]
        assert [v.type.tensor_type.shape for v in after] == [v.type.tensor_type.shape for v in before]
        assert all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for v in after)
    assert not any(n.op_type == "Cast" for n in model.graph.node), "no boundary Casts"
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    ref = ort.InferenceSession(str(example), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"image": x.astype(np.float16)})[0]
    assert got.dtype == np.float16
    assert np.abs(got.astype(np.float32) - ref).max() <= 1e-2 * np.abs(ref).max()


def test_fp16_keep_io_names_keeps_those_float32(example: Path):
    result = optcc.optimize(str(example), fp16=True, fp16_keep_io=["logits"])
    (record,) = [r for r in result.report.passes if r.name == "convert-float16"]
    assert record.status == "changed", record.reason
    types = {v.name: v.dtype for v in (*result.ir_model.graph.inputs, *result.ir_model.graph.outputs)}
    assert types == {"image": ir.DataType.FLOAT16, "logits": ir.DataType.FLOAT}


def test_a_pass_that_turns_the_interface_float16_unannounced_is_reverted(example: Path):
    class SneakyFloat16(optcc.Pass):
        name = "test-sneaky-float16"

        def call(self, model: ir.Model) -> optcc.PassResult:
            model.graph.inputs[0].type = ir.TensorType(ir.DataType.FLOAT16)
            return optcc.PassResult(model, True)

    result = optcc.optimize(str(example), passes=[SneakyFloat16()], verify=False)
    (record,) = result.report.passes
    assert record.status == "reverted" and "graph inputs changed" in record.reason


def test_int8_flag_calibrates_quantizes_and_verifies_on_every_calibration_sample(example: Path, tmp_path: Path):
    rng = np.random.default_rng(0)
    data_path = tmp_path / "calib.npz"
    np.savez(data_path, image=rng.standard_normal((10, 1, 3, 32, 32)).astype(np.float32))
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    # the tiny model runs as fast in INT8 as in float32: without --no-int8-speed-check the
    # speed check keeps it float about half the time
    code = cli.main([str(example), "--int8", "--calibration", str(data_path), "-o", str(out),
                     "--report", str(report), "-q", "--no-int8-speed-check"])
    assert code == 0
    data = json.loads(report.read_text())
    assert data["verification"]["numerics"] == "int8" and data["verification"]["samples"] == 10  # every calibration sample
    ops = {n.op_type for n in onnx.load(out).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_weights_int8_corrects_conv_biases_on_the_calibration_data(example: Path, tmp_path: Path):
    """--weights int8 with --calibration: int8 convolution weights, biases corrected on the
    samples (the mean output error against onnx's reference evaluator of the float model
    falls), and the result verified on those samples."""
    from onnx.reference import ReferenceEvaluator

    rng = np.random.default_rng(0)
    data = (rng.random((6, 1, 3, 32, 32)) + 0.5).astype(np.float32)  # a non-zero mean, as images have
    data_path = tmp_path / "calib.npz"
    np.savez(data_path, image=data)
    reference = ReferenceEvaluator(str(example))
    errors = {}
    for label, extra in (("plain", []), ("corrected", ["--calibration", str(data_path)])):
        out, report = tmp_path / f"{label}.onnx", tmp_path / f"{label}.json"
        code = cli.main([str(example), "--weights", "int8", *extra, "-o", str(out), "--report", str(report), "-q",
                         "--allow-float-fallback"])
        assert code == 0
        model = onnx.load(out)
        int8 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
        assert int8 and any(n.op_type == "DequantizeLinear" for n in model.graph.node)
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        diffs = [session.run(None, {"image": x})[0].astype(np.float64) - reference.run(None, {"image": x})[0]
                 for x in data]
        errors[label] = abs(float(np.mean(diffs)))
        if extra:
            verification = json.loads(report.read_text())["verification"]
            assert verification["samples"] == len(data)
    assert errors["corrected"] < errors["plain"]


def test_int8_options_reach_the_quantizer(example: Path, tmp_path: Path):
    """--int8-exclude keeps the named op type float, --int8-per-tensor gives scalar weight
    scales, --int8-activations int8 signed activations, --calibration-cache stores the
    statistics (and a second run reads them back: the output is the same bytes)."""
    rng = np.random.default_rng(0)
    data_path = tmp_path / "calib.npz"
    np.savez(data_path, image=rng.standard_normal((10, 1, 3, 32, 32)).astype(np.float32))
    cache = tmp_path / "cache"
    outputs = []
    for run in range(2):
        out = tmp_path / f"out{run}.onnx"
        code = cli.main([str(example), "--int8", "--calibration", str(data_path), "-o", str(out), "-q",
                         "--no-int8-speed-check", "--int8-exclude", "Gemm,MatMul", "--int8-per-tensor",
                         "--int8-activations", "int8", "--calibration-cache", str(cache)])
        assert code == 0
        outputs.append(out.read_bytes())
    assert len(list(cache.glob("calib-*.npz"))) == 1
    assert outputs[0] == outputs[1]
    model = onnx.load(tmp_path / "out0.onnx")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    conv_weights = [producers[n.input[1]] for n in model.graph.node if n.op_type == "Conv"]
    assert conv_weights and all(dq.op_type == "DequantizeLinear" and inits[dq.input[1]].ndim == 0
                                for dq in conv_weights)
    assert all(inits[n.input[2]].dtype == np.int8 for n in model.graph.node if n.op_type == "QuantizeLinear")
    for node in model.graph.node:
        if node.op_type in ("Gemm", "MatMul"):
            assert producers[node.input[0]].op_type != "DequantizeLinear"


def test_every_int8_metric_of_the_library_is_accepted_and_reaches_the_quantizer(example: Path, tmp_path: Path,
                                                                                  monkeypatch):
    from optcc.errors import BadInputError
    from optcc.numerics.task import METRICS

    data_path = tmp_path / "calib.npz"
    np.savez(data_path, image=np.random.default_rng(0).random((4, 1, 3, 32, 32)).astype(np.float32))
    seen = []

    def recording(*args, **kwargs):
        seen.append(kwargs["int8_options"]["metric"])
        raise BadInputError("stop here")

    monkeypatch.setattr(cli, "optimize", recording)
    for metric in METRICS:
        code = cli.main([str(example), "--int8", "--calibration", str(data_path), "--int8-metric", metric,
                         "-o", str(tmp_path / "out.onnx"), "-q"])
        assert code != 0 and not (tmp_path / "out.onnx").exists()
    assert seen == list(METRICS)


def test_int8_bias_correction_is_on_unless_turned_off(example: Path, tmp_path: Path):
    rng = np.random.default_rng(0)
    data_path = tmp_path / "calib.npz"
    np.savez(data_path, image=rng.standard_normal((10, 1, 3, 32, 32)).astype(np.float32))
    corrections = []
    for flags in ([], ["--no-int8-bias-correction"]):
        report = tmp_path / "r.json"
        code = cli.main([str(example), "--int8", "--calibration", str(data_path), "-o", str(tmp_path / "o.onnx"),
                         "--report", str(report), "-q", "--no-int8-speed-check", *flags])
        assert code == 0
        (step,) = [p for p in json.loads(report.read_text())["passes"] if p["name"] == "quantize-int8-calibrated"]
        corrections.append(step["stats"]["pass"].get("bias_correction"))
    assert corrections[0]["layers"] > 0 and corrections[0]["mean_error_after"] < corrections[0]["mean_error_before"]
    assert corrections[1] is None


@pytest.mark.parametrize(
    "args, message",
    [(["--int8"], "--int8 needs --calibration"), (["--calibration", "x.npz"], "--calibration is used with"),
     (["--int8-exclude", "Conv"], "--int8-exclude is used with --int8"),
     (["--calibration-cache", "d"], "--calibration-cache is used with --int8"),
     (["--no-int8-bias-correction"], "--no-int8-bias-correction is used with --int8")],
)
def test_quantization_flags_are_checked(example: Path, tmp_path: Path, capsys, args, message):
    assert cli.main([str(example), "-o", str(tmp_path / "o.onnx"), *args]) == 2
    assert message in capsys.readouterr().err


def test_fold_large_materializes_weights_the_size_policy_keeps(tmp_path: Path):
    light = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / "light_squeezenet.onnx"
    small, large = tmp_path / "small.onnx", tmp_path / "large.onnx"
    assert cli.main([str(light), "-o", str(small), "-q", "--no-verify"]) == 0
    assert cli.main([str(light), "-o", str(large), "-q", "--no-verify", "--fold-large"]) == 0
    kept = sum(n.op_type == "ConstantOfShape" for n in onnx.load(small).graph.node)
    folded = sum(n.op_type == "ConstantOfShape" for n in onnx.load(large).graph.node)
    assert kept > 0 and folded < kept
    assert large.stat().st_size > small.stat().st_size + 2**20


def test_an_unreachable_int8_target_exits_5_and_writes_nothing(example: Path, tmp_path: Path, capsys):
    rng = np.random.default_rng(0)
    data_path = tmp_path / "calib.npz"
    np.savez(data_path, image=rng.standard_normal((10, 1, 3, 32, 32)).astype(np.float32))
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    code = cli.main([str(example), "--int8", "--calibration", str(data_path), "--int8-target-sqnr", "200",
                     "--no-int8-speed-check", "-o", str(out), "--report", str(report), "-q"])
    assert code == 5
    err = capsys.readouterr().err
    assert not out.exists()
    assert "int8 not applied" in err and "--allow-float-fallback" in err
    assert "optcc -O2 (int8 declined: " in err  # the summary header says what was not applied
    data = json.loads(report.read_text())
    assert data["verification"]["status"] == "passed"
    # the report says the run failed, for a job that reads it instead of the exit code
    assert data["outcome"]["exit_code"] == 5 and data["outcome"]["output"] is None
    assert list(data["outcome"]["declined"]) == ["int8"]


def test_an_unreachable_int8_target_with_float_fallback_writes_the_float_model_and_says_why(
        example: Path, tmp_path: Path, capsys):
    rng = np.random.default_rng(0)
    data_path = tmp_path / "calib.npz"
    np.savez(data_path, image=rng.standard_normal((10, 1, 3, 32, 32)).astype(np.float32))
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    code = cli.main([str(example), "--int8", "--calibration", str(data_path), "--int8-target-sqnr", "200",
                     "--no-int8-speed-check", "-o", str(out), "--report", str(report), "-q",
                     "--allow-float-fallback"])
    assert code == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("optcc: warning: ") and "int8 not applied" in err[0], err
    data = json.loads(report.read_text())
    assert any(w.startswith("INT8 not applied") for w in data["warnings"]), data["warnings"]
    assert data["verification"]["status"] == "passed" and data["verification"]["numerics"] != "int8"
    assert data["outcome"] == {"exit_code": 0, "output": str(out), "declined": {"int8": data["outcome"]["declined"]["int8"]}}
    assert not any(n.op_type == "QuantizeLinear" for n in onnx.load(out).graph.node)


def test_o3_prints_nothing_but_optcc_on_a_decoder_with_symbolic_dims(tmp_path: Path):
    # -O3's onnxruntime fusions ask onnxruntime's symbolic shape inference for shapes; its
    # logger's warnings ("unsupported broadcast between total past + seq") are not optcc's to print
    from onnx.reference import ReferenceEvaluator

    from fixtures.llama_decoder import llama_decoder, past_names

    model, out = tmp_path / "llama.onnx", tmp_path / "llama.o3.onnx"
    onnx.save(llama_decoder(), model)
    # a process of its own: pytest's log capture would take the records a bare process prints
    run = subprocess.run([sys.executable, "-m", "optcc", str(model), "-O3", "-q", "-o", str(out)],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0 and run.stderr == "", run.stderr
    rng = np.random.default_rng(0)
    batch, seq, past = 2, 3, 4
    feeds = {"input_ids": rng.integers(0, 96, (batch, seq)), "attention_mask": np.ones((batch, past + seq), np.int64),
             "position_ids": np.tile(np.arange(past, past + seq), (batch, 1))}
    feeds.update({name: rng.standard_normal((batch, 2, past, 8)).astype(np.float32) for name in past_names(2)})
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
    want = ReferenceEvaluator(str(model)).run(["logits"], feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_a_model_onnxruntime_cannot_load_is_not_blamed_on_the_passes(tmp_path: Path, capsys):
    """A Relu of strings: onnxruntime refuses the model given, so a proof that the result
    computes what it computes cannot be checked on onnxruntime. Not verified (exit 4, the
    original named as what does not load), never "verification failed" (exit 1), which
    would blame the optimized model."""
    helper, strings = onnx.helper, onnx.TensorProto.STRING
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", strings, [2])],
                              [helper.make_tensor_value_info("y", strings, [2])])
    model_path, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), model_path)
    with pytest.raises(Exception, match="INVALID_GRAPH"):
        ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    for level in ("-O0", "-O2"):
        code = cli.main([str(model_path), level, "-o", str(out), "-q"])
        err = capsys.readouterr().err
        assert code == 4, err
        assert "onnxruntime cannot load the original model" in err and "optimized model" not in err
        assert not out.exists()
