"""A declined INT8 writes what the float passes alone write. INT8's preparation folds a
weight stored as int8 with a Cast and a Mul by a scale into a float32 initializer (4x the
bytes); the fold is made only for the quantizer, so when INT8 is declined (by the pass, or
reverted by the final verification) the written model is the one the same call without
INT8 writes, byte for byte: the int8 weight stays int8 and no fold-growth warning is given."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

import optcc
from optcc.quant.fallback import Target
from reference import EXACT_RTOL, assert_close, expected_outputs, onnxruntime_outputs
from test_int8_disable_prep import HIDDEN, IN, _model


def _samples(n: int = 20) -> list[dict[str, np.ndarray]]:
    """Feeds for ``_model`` (the int8-stored weight W1, 2 MiB as float32: past the level's
    1 MiB fold limit, so only INT8's preparation folds it)."""
    rng = np.random.default_rng(12)
    return [{"x": rng.standard_normal((4, IN)).astype(np.float32)} for _ in range(n)]


def _written(result: optcc.OptimizeResult, path) -> bytes:
    result.save(path)
    return path.read_bytes()


def _check_float_result(result: optcc.OptimizeResult, tmp_path, proto: onnx.ModelProto) -> None:
    assert result.precision["int8"] is not None  # declined, and the report says so
    assert any(w.startswith("INT8 not applied") for w in result.report.warnings), result.report.warnings
    assert not any("constant folding grew" in w for w in result.report.warnings), result.report.warnings
    plain = optcc.optimize(proto, inputs=_samples())
    got = _written(result, tmp_path / "declined.onnx")
    assert got == _written(plain, tmp_path / "plain.onnx")
    written = onnx.load_from_string(got)
    kept = [numpy_helper.to_array(t) for t in written.graph.initializer]
    assert any(a.dtype == np.int8 and a.shape == (IN, HIDDEN) for a in kept)
    assert not any(a.dtype == np.float32 and a.shape == (IN, HIDDEN) for a in kept)
    assert len(got) < 1.5 * IN * HIDDEN  # the int8 weight's bytes, not 4x them
    onnx.checker.check_model(written, full_check=True)
    for feeds in _samples(3):
        assert_close(onnxruntime_outputs(written, feeds), expected_outputs(proto, feeds), EXACT_RTOL)


def test_int8_declined_by_its_pass_leaves_the_stored_int8_weight(tmp_path) -> None:
    proto = _model()
    # no INT8 model reaches 300 dB: the pass declines for accuracy
    result = optcc.optimize(proto, int8_calibration=_samples(), allow_float_fallback=True,
                            int8_options={"require_speedup": False, "metric": None,
                                          "target": Target(min_sqnr_db=300.0)})
    record = next(r for r in result.report.passes if r.name == "quantize-int8-calibrated")
    assert record.status == "unchanged" and record.stats.get("declined") == "accuracy", record
    undone = [r for r in result.report.passes if r.name == "fold-constants" and r.status == "reverted"]
    assert undone and all(r.reason.startswith("undone") for r in undone)
    _check_float_result(result, tmp_path, proto)


def test_int8_reverted_by_the_verification_leaves_the_stored_int8_weight(tmp_path) -> None:
    proto = _model()
    # the pass ships INT8 (the task metric accepts it); the final verification, at a
    # tolerance of the caller's own, reverts it
    result = optcc.optimize(proto, int8_calibration=_samples(), allow_float_fallback=True,
                            int8_options={"require_speedup": False},
                            tolerances={"int8": optcc.Tolerance(max_rel=1e-6)})
    record = next(r for r in result.report.passes if r.name == "quantize-int8-calibrated")
    assert record.status == "reverted", record
    _check_float_result(result, tmp_path, proto)


def test_int8_that_ships_keeps_its_preparation(tmp_path) -> None:
    proto = _model()
    result = optcc.optimize(proto, int8_calibration=_samples(), int8_options={"require_speedup": False})
    assert result.precision["int8"] is None
    assert any(r.name == "fold-constants" and r.status == "changed" and r.bytes_after > r.bytes_before
               for r in result.report.passes)
    written = onnx.load_from_string(_written(result, tmp_path / "q.onnx"))
    assert any(n.op_type == "DequantizeLinear" for n in written.graph.node)
