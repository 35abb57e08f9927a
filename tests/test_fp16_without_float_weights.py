"""FP16 of a model whose float values are all activations (no float weight: Relu(Add(x, x)),
or only integer constants). The conversion runs them in float16 behind a Cast at each
float32 input, and is verified like any float16 result: it is applied (exit 0), not
reported as "nothing in the model could be converted" (exit 5) while --allow-float-fallback
wrote the float16 model calling it the float model. A model with no float computation at
all has truly nothing to convert: declined, and the float model written unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP

import optcc
from optcc import cli
from reference import expected_outputs


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto] = (), elem: int = TP.FLOAT,
           out_shape: list[int] | None = None) -> onnx.ModelProto:
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", elem, [4, 8])],
                          [oh.make_tensor_value_info("y", elem, out_shape or [4, 8])], list(inits))
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _activations_only() -> onnx.ModelProto:
    return _model([oh.make_node("Add", ["x", "x"], ["a"]), oh.make_node("Relu", ["a"], ["y"])])


def _integer_constants_only() -> onnx.ModelProto:
    return _model([oh.make_node("Reshape", ["x", "shape"], ["r"]), oh.make_node("Mul", ["r", "r"], ["y"])],
                  [nh.from_array(np.array([8, 4], np.int64), "shape")], out_shape=[8, 4])


def _expected(name: str, x: np.ndarray) -> np.ndarray:
    """numpy in float16, as the converted model computes."""
    h = x.astype(np.float16)
    if name == "activations":
        return np.maximum(h + h, np.float16(0)).astype(np.float32)
    r = h.reshape(8, 4)
    return (r * r).astype(np.float32)


MODELS = {"activations": _activations_only, "integer_constants": _integer_constants_only}


def _feeds(n: int = 3) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"x": (rng.standard_normal((4, 8)) * 3).astype(np.float32)} for _ in range(n)]


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _check(model: onnx.ModelProto, name: str, x: np.ndarray) -> None:
    """The written model computes in float16 (onnx's reference evaluator: numpy's float16
    arithmetic, exactly), and onnxruntime runs it (its CPU kernels may compute float16 ops
    in float32: within float16's rounding of the float32 result)."""
    want = _expected(name, x)
    (got,) = expected_outputs(model, {"x": x})
    np.testing.assert_array_equal(got.astype(np.float32), want)
    ran = _run(model, {"x": x})
    assert ran.dtype == x.dtype
    np.testing.assert_allclose(ran.astype(np.float32), want, rtol=2e-3, atol=1e-3)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_float16_activations_are_applied_and_verified(name: str) -> None:
    result = optcc.optimize(MODELS[name](), fp16=True, inputs=_feeds())
    assert result.precision == {"fp16": None}
    assert result.report.verification["status"] == "passed"
    assert not any("not applied" in w for w in result.report.warnings), result.report.warnings
    written = result.model
    assert any(n.op_type == "Cast" and n.attribute[0].i == TP.FLOAT16 for n in written.graph.node)
    for feeds in _feeds(2):
        _check(written, name, feeds["x"])


def test_float16_interface_computes_in_float16_without_casts() -> None:
    result = optcc.optimize(_activations_only(), fp16=True, fp16_keep_io=False, inputs=_feeds())
    assert result.precision == {"fp16": None}
    written = result.model
    assert [v.type.tensor_type.elem_type for v in (*written.graph.input, *written.graph.output)] == [TP.FLOAT16] * 2
    _check(written, "activations", _feeds(1)[0]["x"].astype(np.float16))


def test_cli_exits_0_and_says_fp16(tmp_path: Path, capsys) -> None:
    source, out = tmp_path / "act.onnx", tmp_path / "out.onnx"
    onnx.save(_activations_only(), source)
    assert cli.main([str(source), "--fp16", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "+fp16" in err and "not applied" not in err and "declined" not in err, err
    _check(onnx.load(str(out)), "activations", _feeds(1)[0]["x"])


def test_no_float_computation_is_declined_and_the_model_kept(tmp_path: Path) -> None:
    ints = _model([oh.make_node("Add", ["x", "x"], ["y"])], elem=TP.INT64)
    result = optcc.optimize(ints, fp16=True, allow_float_fallback=True)
    assert result.precision["fp16"] == "nothing in the model could be converted"
    plain = optcc.optimize(ints)
    assert optcc.ir.serialize(result.ir_model).SerializeToString() == \
        optcc.ir.serialize(plain.ir_model).SerializeToString()
    x = np.arange(32, dtype=np.int64).reshape(4, 8)
    np.testing.assert_array_equal(_run(result.model, {"x": x}), x + x)
