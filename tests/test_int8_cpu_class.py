"""The INT8 speed decision is modelled for a CPU class: a fixed default on every machine,
or chosen (``cpu=``, ``--int8-cpu``); the report names it and, next to the default, the
class of the machine's CPU read from its feature flags (never by timing)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
import onnx.reference
import pytest
from onnx import TensorProto as TP

import optcc
from optcc import cli
from optcc.quant.cost_model import CPU_CLASSES, DEFAULT_CPU_CLASS, class_of, cpu_class
from optcc.quant.driver import quantize_int8
from optcc.runtime.cpu import CpuFeatures


@pytest.mark.parametrize("machine, flags, expected", [
    ("x86_64", {"avx2", "avx512f", "avx512_vnni"}, "x86-vnni"),  # Cascade Lake, Ice Lake, Zen 4
    ("x86_64", {"avx2", "avx_vnni"}, "x86-vnni"),  # Alder Lake: VNNI on 256 bits, no AVX-512
    ("AMD64", {"AVX2", "AVX512_VNNI"}, "x86-vnni"),  # Windows' machine name, upper-case flags
    ("x86_64", {"avx2", "fma"}, "x86-avx2"),  # Zen 2/3, Haswell to Coffee Lake
    ("x86_64", {"avx2", "avx512f", "avx512bw"}, "x86-avx2"),  # Skylake-X: AVX-512 without VNNI
    ("aarch64", {"asimd", "asimddp"}, None),  # ARM: no measured class
    ("arm64", set(), None),
])
def test_the_class_comes_from_the_flags(machine: str, flags: set[str], expected: str | None) -> None:
    assert class_of(CpuFeatures.of(machine, flags)) == expected


def test_the_default_class_is_the_same_on_every_machine() -> None:
    arm = cpu_class(cpu=CpuFeatures.of("aarch64", {"asimddp"}))
    assert (arm.name, arm.source, arm.machine) == (DEFAULT_CPU_CLASS, "default", None)
    assert "no measured class" in arm.describe()
    avx2 = cpu_class(cpu=CpuFeatures.of("x86_64", {"avx2"}))
    assert (avx2.name, avx2.source, avx2.machine) == (DEFAULT_CPU_CLASS, "default", "x86-avx2")
    assert "this machine's CPU is x86-avx2: --int8-cpu x86-avx2 models it" in avx2.describe()
    vnni = cpu_class(cpu=CpuFeatures.of("x86_64", {"avx2", "avx512_vnni"}))
    assert (vnni.name, vnni.machine) == (DEFAULT_CPU_CLASS, "x86-vnni")
    assert cpu_class("x86-avx2", cpu=CpuFeatures.of("x86_64", {"avx2", "avx512_vnni"})).source == "chosen"
    with pytest.raises(optcc.BadInputError, match="unknown INT8 CPU class 'neon'"):
        cpu_class("neon")


def test_without_proc_cpuinfo_the_flags_come_from_numpy(monkeypatch) -> None:
    from numpy._core._multiarray_umath import __cpu_features__ as numpy_features

    from optcc.runtime import cpu

    monkeypatch.setattr(cpu, "_cpuinfo", lambda: None)
    flags = cpu.this_cpu().flags
    assert ("avx2" in flags) == bool(numpy_features.get("AVX2"))
    assert ("avx512_vnni" in flags) == bool(numpy_features.get("AVX512VNNI"))


def _convs(channels: int = 32, size: int = 56) -> onnx.ModelProto:
    """Three 3x3 convolutions of ``channels`` channels on ``size`` x ``size``, each followed by
    a Sigmoid (a float island: Q/DQ around it): compute-bound enough that INT8 pays where
    integer dot products are fast, not enough to pay for the conversions where they are not."""
    rng = np.random.default_rng(1)
    inits = [nh.from_array((rng.normal(size=(channels, 3, 3, 3)) * 0.2).astype(np.float32), "W1")]
    nodes = [oh.make_node("Conv", ["x", "W1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             oh.make_node("Sigmoid", ["c1"], ["r1"], name="act1")]
    for i in (2, 3):
        inits.append(nh.from_array((rng.normal(size=(channels, channels, 3, 3)) * 0.06).astype(np.float32), f"W{i}"))
        nodes += [oh.make_node("Conv", [f"r{i - 1}", f"W{i}"], [f"c{i}"], pads=[1, 1, 1, 1], name=f"conv{i}"),
                  oh.make_node("Sigmoid", [f"c{i}"], [f"r{i}"], name=f"act{i}")]
    graph = oh.make_graph(nodes, "convs", [oh.make_tensor_value_info("x", TP.FLOAT, [1, 3, size, size])],
                          [oh.make_tensor_value_info("r3", TP.FLOAT, [1, channels, size, size])], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 13)])


def _samples(n: int = 6) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(4)
    return [{"x": rng.random((1, 3, 56, 56)).astype(np.float32)} for _ in range(n)]


def test_the_class_decides_and_is_named() -> None:
    """The same model, data and options: INT8 under the VNNI class, float32 under AVX2."""
    proto, data = _convs(), _samples()
    fast, fast_stats = quantize_int8(proto, data, require_target=False, cpu="x86-vnni")
    slow, slow_stats = quantize_int8(proto, data, require_target=False, cpu="x86-avx2")
    assert fast_stats["latency"]["fully_quantized"]["modelled_speedup"] >= 1.1 > \
        slow_stats["latency"]["fully_quantized"]["modelled_speedup"]
    assert fast_stats["modified"] and not slow_stats["modified"] and slow_stats["declined"] == "speed"
    assert fast_stats["latency"]["cpu"] == {**fast_stats["latency"]["cpu"], "class": "x86-vnni", "source": "chosen"}
    assert "for x86-avx2 (chosen)" in slow_stats["reason"]
    assert "for x86-vnni (chosen)" in fast_stats["speed"]
    _, unchecked = quantize_int8(proto, data, require_target=False, require_speedup=False, cpu="x86-avx2")
    assert unchecked["modified"] and unchecked["speed"].endswith("for x86-avx2 (chosen), none required")
    # the declined model is the input, untouched; the shipped one computes the same function
    assert not any(n.op_type == "QuantizeLinear" for n in slow.graph)
    reference = onnx.reference.ReferenceEvaluator(proto)
    feeds = data[0]
    expected = reference.run(None, {"x": feeds["x"].astype(np.float64).astype(np.float32)})[0]
    import onnxruntime as ort

    got = ort.InferenceSession(optcc.ir.serialize(fast).SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    error = got.astype(np.float64) - expected
    assert 10 * np.log10(np.sum(expected.astype(np.float64) ** 2) / np.sum(error ** 2)) > 25


def test_every_class_has_every_constant_positive() -> None:
    for name, constants in CPU_CLASSES.items():
        assert all(value > 0 for value in vars(constants).values()), name


@pytest.fixture
def convs_files(tmp_path: Path) -> tuple[Path, Path]:
    model, calib = tmp_path / "convs.onnx", tmp_path / "calib.npz"
    onnx.save(_convs(), model)
    np.savez(calib, x=np.stack([s["x"] for s in _samples(8)]))
    return model, calib


def test_the_cli_chooses_the_class_and_writes_the_same_bytes(convs_files, tmp_path: Path, capsys) -> None:
    model, calib = convs_files
    outs = [tmp_path / "a.onnx", tmp_path / "b.onnx"]
    for out in outs:
        assert cli.main([str(model), "--int8", "--calibration", str(calib), "--int8-cpu", "x86-vnni",
                         "-o", str(out)]) == 0
    assert outs[0].read_bytes() == outs[1].read_bytes()
    assert "int8 speed: modelled speedup" in capsys.readouterr().err
    code = cli.main([str(model), "--int8", "--calibration", str(calib), "--int8-cpu", "x86-avx2",
                     "-o", str(tmp_path / "c.onnx")])
    assert code == cli.EXIT_PRECISION_NOT_APPLIED and not (tmp_path / "c.onnx").exists()
    assert "for x86-avx2 (chosen)" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--int8", "--calibration", "CALIB", "--int8-cpu", "z80"], "argument --int8-cpu: invalid choice: 'z80'"),
    (["--int8-cpu", "x86-avx2"], "--int8-cpu is used with --int8"),
])
def test_the_cli_refuses_an_unknown_class(convs_files, tmp_path: Path, capsys, args: list[str], message: str) -> None:
    model, calib = convs_files
    args = [str(calib) if a == "CALIB" else a for a in args]
    code = cli.main([str(model), *args, "-o", str(tmp_path / "o.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()


def test_python_refuses_an_unknown_class_before_calibrating() -> None:
    with pytest.raises(optcc.BadInputError, match="unknown INT8 CPU class"):
        optcc.optimize(_convs(), int8_calibration=_samples(), int8_options={"cpu": "z80"})


@pytest.mark.parametrize("flags, warned", [({"avx2"}, True), ({"avx2", "avx512_vnni"}, False)])
def test_a_machine_whose_class_would_decline_is_warned_and_the_bytes_stay(
        convs_files, tmp_path: Path, capsys, monkeypatch, flags: set[str], warned: bool) -> None:
    """The default class ships INT8 where this machine's class (x86-avx2: read from its
    flags, here set) would decline it: one warning line names --int8-cpu; the bytes are
    those of a machine of the default class, where nothing is said."""
    from optcc.quant import cost_model

    model, calib = convs_files
    reference = tmp_path / "reference.onnx"  # the default class chosen: no machine is asked
    assert cli.main([str(model), "--int8", "--calibration", str(calib), "--int8-cpu", DEFAULT_CPU_CLASS,
                     "-o", str(reference)]) == 0
    capsys.readouterr()
    monkeypatch.setattr(cost_model, "this_cpu", lambda: CpuFeatures.of("x86_64", flags))
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    assert cli.main([str(model), "--int8", "--calibration", str(calib), "-o", str(out), "--report", str(report)]) == 0
    assert out.read_bytes() == reference.read_bytes()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("optcc: warning:")]
    stats = next(p["stats"] for p in json.loads(report.read_text())["passes"] if "latency" in p["stats"])
    if not warned:
        assert lines == [] and "speed_machine" not in stats
        return
    # x86-avx2 chosen declines it (on the model before bias correction, which adds nodes)
    assert cli.main([str(model), "--int8", "--calibration", str(calib), "--int8-cpu", "x86-avx2",
                     "-o", str(tmp_path / "avx2.onnx")]) == cli.EXIT_PRECISION_NOT_APPLIED
    declined = re.search(r"modelled speedup (\d+\.\d+)x for x86-avx2 \(chosen\)", capsys.readouterr().err)
    said = re.search(r"x86-avx2, it is (\d+\.\d+)x, below the required 1.1x", lines[0] if lines else "")
    assert declined is not None and said is not None and max(float(declined[1]), float(said[1])) < 1.1
    assert stats["latency"]["fully_quantized"]["modelled_speedup"] >= 1.1
    assert len(lines) == 1 and "--int8-cpu x86-avx2 would decline it" in lines[0] and stats["speed_machine"] in lines[0]
    assert stats["speed_machine"] in json.loads(report.read_text())["warnings"]  # a CI step reading the JSON sees it
