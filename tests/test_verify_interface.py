"""A candidate whose interface differs from the original's is never passed: outputs in
another order (a caller reads them by position), an output or a fed input dropped (a
caller feeding it is refused), an output of another element type (float64 for float32,
int32 for int64). The proof path and the samples' path alike; the premise of each test
comes from onnx's reference evaluator, never from optcc."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

import optcc

SAMPLE = {"x": np.linspace(-2.0, 2.0, 16, dtype=np.float32).reshape(2, 8)}
USER = {"given": dict(inputs=[SAMPLE]), "generated": {}}


def _model(outputs: list[str], *, extra_input: bool = False, cast: int | None = None) -> onnx.ModelProto:
    """a = Relu(x), b = Neg(x), m = ArgMax(x), the floats or the integer Cast to ``cast``; outputs
    ``outputs`` in that order; with ``extra_input`` also an unused input z."""
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])]
    if extra_input:
        inputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 8]))
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["x"], ["b"]),
             helper.make_node("ArgMax", ["x"], ["m" if cast is None else "m0"], axis=1)]
    types = {"a": TensorProto.FLOAT, "b": TensorProto.FLOAT, "m": TensorProto.INT64}
    if cast is not None and cast != TensorProto.DOUBLE:
        nodes.append(helper.make_node("Cast", ["m0"], ["m"], to=cast))
        types["m"] = cast
    elif cast is not None:
        nodes[2].output[0] = "m"
    for name in ("a", "b"):
        if cast == TensorProto.DOUBLE:
            nodes[0 if name == "a" else 1].output[0] = name + "0"
            nodes.append(helper.make_node("Cast", [name + "0"], [name], to=cast))
            types[name] = cast
    shapes = {"a": [2, 8], "b": [2, 8], "m": [2, 1]}
    graph = helper.make_graph(nodes, "g", inputs,
                              [helper.make_tensor_value_info(n, types[n], shapes[n]) for n in outputs])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _by_position(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ReferenceEvaluator(model).run(None, feeds)


@pytest.mark.parametrize("samples", sorted(USER))
def test_outputs_in_another_order_are_not_passed(samples: str) -> None:
    original, candidate = _model(["a", "b", "m"]), _model(["b", "a", "m"])
    # the premise: a caller reading the first output gets another value
    assert not np.array_equal(_by_position(original, SAMPLE)[0], _by_position(candidate, SAMPLE)[0])
    report = optcc.verify(original, candidate, **USER[samples])
    assert not report.passed
    assert "!= original" in (report.reason or "")


@pytest.mark.parametrize("samples", sorted(USER))
def test_a_dropped_output_is_not_passed(samples: str) -> None:
    original, candidate = _model(["a", "b", "m"]), _model(["a", "m"])
    assert len(_by_position(candidate, SAMPLE)) < len(_by_position(original, SAMPLE))
    assert not optcc.verify(original, candidate, **USER[samples]).passed


def test_a_dropped_input_is_not_passed() -> None:
    original, candidate = _model(["a", "b", "m"], extra_input=True), _model(["a", "b", "m"])
    feeds = {**SAMPLE, "z": SAMPLE["x"]}
    # the premise: the original takes z; the candidate refuses a caller feeding it
    assert [i.name for i in original.graph.input] == ["x", "z"]
    assert [i.name for i in candidate.graph.input] == ["x"]
    assert not optcc.verify(original, candidate).passed
    assert not optcc.verify(original, candidate, inputs=[feeds]).passed


@pytest.mark.parametrize("cast", [TensorProto.DOUBLE, TensorProto.INT32], ids=["float64", "int32"])
@pytest.mark.parametrize("samples", sorted(USER))
def test_an_output_of_another_element_type_is_not_passed(cast: int, samples: str) -> None:
    original, candidate = _model(["a", "b", "m"]), _model(["a", "b", "m"], cast=cast)
    expected, got = _by_position(original, SAMPLE), _by_position(candidate, SAMPLE)
    # the premise: the same values in another dtype
    assert any(e.dtype != g.dtype for e, g in zip(expected, got))
    assert all(np.array_equal(e, g) for e, g in zip(expected, got))
    report = optcc.verify(original, candidate, **USER[samples])
    assert not report.passed
    assert "dtype" in (report.reason or "")
