"""fold-constants keeps its last shape inference with the graph, and a later call reuses
it only when nothing the passes in between changed can alter what inference finds: the
lifted Constant case reuses; a changed attribute, a changed graph input annotation, an
initializer given another tensor and a Shape reading a value inference was not asked
about run inference again. Results are
checked against onnx's reference evaluator on the model as the passes left it."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.reference
import onnx_ir as ir

from optcc.passes.fold_constants import FoldConstantsPass
import optcc.passes.shape_reuse as shape_reuse
from optcc.passes.lift_constants import LiftConstantsPass
from optcc.passes.shape_reuse import InferenceSnapshot
from calls import first_arguments


def _fold(model: ir.Model, monkeypatch, *, reuse: bool = True) -> int:
    """fold-constants on ``model`` in place; returns how many shape inferences it ran."""
    with monkeypatch.context() as patch:
        # fold-constants' inference (``shape_reuse.holding``)
        calls = first_arguments(patch, shape_reuse, "shape_findings")
        if not reuse:
            patch.setattr(InferenceSnapshot, "still_holds", lambda self, model, findings: False)
        FoldConstantsPass()(model)
    return len(calls)


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def _run(model: ir.Model | onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    return onnx.reference.ReferenceEvaluator(proto).run(None, feeds)


def test_a_lifted_constant_reuses_the_inference(monkeypatch):
    """Between two calls lift-constants turns the Reshape target into an initializer with
    the same tensor and name: inference reads both alike, so the second call runs none and
    writes the bytes a fresh inference gives."""
    text = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,12] x) => (float[N,3,4] y, int64[3] s) {
    t = Constant <value = int64[3] {0, 3, 4}> ()
    y = Reshape(x, t)
    s = Shape(y)
}"""
    results = []
    for reuse in (True, False):
        model = ir.from_proto(onnx.parser.parse_model(text))
        assert _fold(model, monkeypatch, reuse=reuse) == 1
        LiftConstantsPass()(model)
        second = _fold(model, monkeypatch, reuse=reuse)
        assert second == (0 if reuse else 1)
        results.append(ir.to_proto(model).SerializeToString())
    assert results[0] == results[1]
    x = np.random.default_rng(0).standard_normal((2, 12)).astype(np.float32)
    got = _run(onnx.ModelProto.FromString(results[0]), {"x": x})
    np.testing.assert_array_equal(got[0], x.reshape(2, 3, 4))
    np.testing.assert_array_equal(got[1], np.array([2, 3, 4], np.int64))


_POOLED = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,8,8] x) => (float[N,3,H,W] y, int64[4] s) {
    y = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (x)
    s = Shape(y)
}"""


def _add_gather(model: ir.Model, source: ir.Value, index: int) -> ir.Value:
    """A new graph output ``Gather(source, [index])``, as a pass between two calls might add."""
    indices = ir.Value(name="index", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([1]),
                       const_value=ir.tensor(np.array([index], np.int64), name="index"))
    model.graph.register_initializer(indices)
    gather = ir.node("Gather", [source, indices], attributes={"axis": 0})
    gather.outputs[0].name = "picked"
    gather.outputs[0].type = ir.TensorType(ir.DataType.INT64)
    model.graph.append(gather)
    model.graph.outputs.append(gather.outputs[0])
    return gather.outputs[0]


def _picked(model: ir.Model) -> np.ndarray:
    """The folded value of the graph output ``picked``."""
    [output] = [v for v in model.graph.outputs if v.name == "picked"]
    producer = output.producer()
    assert producer is not None and producer.op_type == "Constant", _ops(model)
    return producer.attributes["value"].value.numpy()


def test_a_changed_attribute_runs_inference_again(monkeypatch):
    """Between two calls a pass changes MaxPool's strides (a new attribute object) and
    reads dim 2 of its Shape: the kept inference (4) no longer holds; inference runs again
    and the fold gives 7, what the model now computes."""
    model = ir.from_proto(onnx.parser.parse_model(_POOLED))
    assert _fold(model, monkeypatch) == 1
    assert "Shape" in _ops(model)  # the batch dim is symbolic: nothing folds, the inference is kept
    _strides_changed_and_folded(model, monkeypatch, seed=1)


def _strides_changed_and_folded(model: ir.Model, monkeypatch, seed: int) -> None:
    """Change MaxPool's strides of ``_POOLED`` to 1 and read dim 2 of its Shape, as a pass
    between two calls might; the next call runs inference again and folds 7, what the
    model now computes (checked on onnx's reference evaluator)."""
    [pool] = [n for n in model.graph if n.op_type == "MaxPool"]
    pool.attributes["strides"] = ir.AttrInt64s("strides", [1, 1])
    [shape] = [n for n in model.graph if n.op_type == "Shape"]
    _add_gather(model, shape.outputs[0], 2)
    assert _fold(model, monkeypatch) == 1
    np.testing.assert_array_equal(_picked(model), np.array([7], np.int64))
    x = np.random.default_rng(seed).standard_normal((2, 3, 8, 8)).astype(np.float32)
    got = _run(model, {"x": x})
    assert got[0].shape == (2, 3, 7, 7)
    np.testing.assert_array_equal(got[2], np.array([got[0].shape[2]], np.int64))


def test_a_changed_graph_input_shape_runs_inference_again(monkeypatch):
    """Between two calls the graph input's batch dim becomes 5 (its shape set in place):
    inference runs again and the Shape folds to the dims the model now has."""
    model = ir.from_proto(onnx.parser.parse_model(_POOLED))
    assert _fold(model, monkeypatch) == 1
    model.graph.inputs[0].shape = ir.Shape([5, 3, 8, 8])
    assert _fold(model, monkeypatch) == 1
    assert "Shape" not in _ops(model)
    x = np.random.default_rng(2).standard_normal((5, 3, 8, 8)).astype(np.float32)
    got = _run(model, {"x": x})
    np.testing.assert_array_equal(got[1], np.array(got[0].shape, np.int64))
    np.testing.assert_array_equal(got[1], np.array([5, 3, 4, 4], np.int64))


def test_a_new_shape_of_an_unasked_value_runs_inference_again(monkeypatch):
    """Between two calls a pass adds ``Shape(x)`` (x was not read by a Shape before) and
    reads its dim 3: the kept inference was never asked about x, so it runs again and the
    Gather folds to 8."""
    model = ir.from_proto(onnx.parser.parse_model(_POOLED))
    assert _fold(model, monkeypatch) == 1
    shape = ir.node("Shape", [model.graph.inputs[0]])
    shape.outputs[0].name = "x_dims"
    model.graph.append(shape)
    _add_gather(model, shape.outputs[0], 3)
    assert _fold(model, monkeypatch) == 1
    np.testing.assert_array_equal(_picked(model), np.array([8], np.int64))
    x = np.random.default_rng(3).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(_run(model, {"x": x})[2], np.array([8], np.int64))


def test_a_replaced_initializer_tensor_runs_inference_again(monkeypatch):
    """Between two calls a pass gives the Reshape target's initializer another tensor of
    the same dtype and dims (its annotation unchanged) and reads dim 2 of the Shape: the
    kept inference (4) no longer holds; inference runs again and the fold gives 3."""
    model = ir.from_proto(onnx.parser.parse_model("""
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,12] x) => (float[N,A,B] y, int64[3] s) <int64[3] t = {0, 3, 4}> {
    y = Reshape(x, t)
    s = Shape(y)
}"""))
    assert _fold(model, monkeypatch) == 1
    target = model.graph.initializers["t"]
    target.const_value = ir.tensor(np.array([0, 4, 3], np.int64), name="t")
    [shape] = [n for n in model.graph if n.op_type == "Shape"]
    _add_gather(model, shape.outputs[0], 2)
    assert _fold(model, monkeypatch) == 1
    np.testing.assert_array_equal(_picked(model), np.array([3], np.int64))
    x = np.random.default_rng(4).standard_normal((2, 12)).astype(np.float32)
    got = _run(model, {"x": x})
    np.testing.assert_array_equal(got[0], x.reshape(2, 4, 3))
    np.testing.assert_array_equal(got[2], np.array([3], np.int64))


def test_a_call_that_reuses_and_changes_nothing_keeps_the_record(monkeypatch):
    """A second call reuses the kept inference and changes nothing: it records nothing
    again (the record it checked still describes the graph). A pass then changes MaxPool's
    strides and reads dim 2 of its Shape: the third call still sees the change against the
    first call's record, runs inference again, and the fold gives 7."""
    model = ir.from_proto(onnx.parser.parse_model(_POOLED))
    records = []
    real = InferenceSnapshot.record
    monkeypatch.setattr(InferenceSnapshot, "record", lambda self, m: (records.append(1), real(self, m))[1])
    assert _fold(model, monkeypatch) == 1
    assert len(records) == 1
    assert _fold(model, monkeypatch) == 0
    assert len(records) == 1
    _strides_changed_and_folded(model, monkeypatch, seed=5)
