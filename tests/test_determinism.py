"""Determinism and idempotence of whole pipelines, on files.

- Two runs of -O2 (and of every level) on the same input write byte-identical files.
- -O2 applied to its own output writes the same bytes again (the pipeline is at a fixed
  point after one run, including what a reload reveals).

On fixtures/tinycnn.onnx, an explicit model with a live If (outer-scope reads in both
branches), and a handful of generated models (fixtures/random_graphs.py, fixed seed).
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import onnx
import onnx.parser
from hypothesis import HealthCheck, given, settings

import optcc
from fixtures.random_graphs import models

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "fixtures" / "tinycnn.onnx"

LIVE_IF_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,3] x) => (float[2,3] y, float[2,3] mid)
  <float[3] scale = {0.5, -1.0, 2.0}, float zero = {0.0}, float[3] bias = {1.0, 2.0, 3.0}>
{
  s = ReduceSum <keepdims = 0> (x)
  c = Greater (s, zero)
  a = Add (x, bias)
  i = If (c) <
    then_branch = t () => (float[2,3] o1) { o1 = Relu (a) },
    else_branch = e () => (float[2,3] o2) { m = Mul (a, scale)  o2 = Identity (m) }
  >
  mid = Identity (i)
  d = Identity (mid)
  y = Sigmoid (d)
}
"""


def _optimize_file(source: Path, out: Path, level: int = 2) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = optcc.optimize(source, level=level)  # verified: raises on a mismatch
    assert not result.report.reverted(), result.report.summary()
    result.save(out)
    return out.read_bytes()


def _check_deterministic_and_idempotent(model: Path, tmp: Path, levels: tuple[int, ...] = (2,)) -> None:
    for level in levels:
        first = _optimize_file(model, tmp / f"first-O{level}.onnx", level)
        second = _optimize_file(model, tmp / f"second-O{level}.onnx", level)
        assert first == second, f"-O{level}: two runs on the same input differ"
        onnx.checker.check_model(onnx.load_from_string(first), full_check=True)
    once = (tmp / "first-O2.onnx").read_bytes() if 2 in levels else _optimize_file(model, tmp / "first-O2.onnx")
    twice = _optimize_file(tmp / "first-O2.onnx", tmp / "twice-O2.onnx")
    assert twice == once, "-O2 applied to its own output changed it again"


def test_tinycnn_every_level(tmp_path: Path) -> None:
    model = tmp_path / "tinycnn.onnx"
    shutil.copy(EXAMPLE, model)
    _check_deterministic_and_idempotent(model, tmp_path, levels=(0, 1, 2, 3))


def test_model_with_a_live_if(tmp_path: Path) -> None:
    model = tmp_path / "if.onnx"
    proto = onnx.parser.parse_model(LIVE_IF_MODEL)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(model))
    _check_deterministic_and_idempotent(model, tmp_path, levels=(1, 2, 3))
    optimized = onnx.load(str(tmp_path / "first-O2.onnx"))
    assert "If" in [n.op_type for n in optimized.graph.node]
    assert [o.name for o in optimized.graph.output] == ["y", "mid"]


def test_generated_models(tmp_path: Path) -> None:
    counter = iter(range(10**6))

    @settings(max_examples=12, derandomize=True, database=None, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(models(max_ops=10))
    def check(proto: onnx.ModelProto) -> None:
        folder = tmp_path / str(next(counter))
        folder.mkdir()
        model = folder / "model.onnx"
        onnx.save(proto, str(model))
        _check_deterministic_and_idempotent(model, folder)

    check()


def test_saved_bytes_do_not_depend_on_the_input_form(tmp_path: Path) -> None:
    """A path, a ModelProto and bytes of the same model give the same optimized bytes."""
    proto = onnx.load(str(EXAMPLE))
    outs = []
    for i, source in enumerate([EXAMPLE, proto, proto.SerializeToString()]):
        out = tmp_path / f"{i}.onnx"
        optcc.optimize(source, level=2).save(out)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] == outs[2]
