"""``OrtShapes``: the rows sliced from a position table of ``k >= 2`` rows by a sequence length
``s`` (``Min(k, s)``) and added to a value of length ``s`` are proved to be ``s`` rows, so the
inference goes on past the Add; a table of one row, or a length that is not the one the Add
meets, is not merged. The dims are checked against the shapes onnx's reference evaluator
computes for several lengths."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from optcc.passes.ort_shapes import OrtShapes

WIDTH = 8


def _int64(name: str, values: list[int]) -> onnx.TensorProto:
    return helper.make_tensor(name, TensorProto.INT64, [len(values)], values)


def position_add(rows: int, length_from: str = "x") -> onnx.ModelProto:
    """``y = LayerNorm(x + table[:n])`` with ``x`` (b, s, WIDTH), ``table`` (rows, WIDTH) and
    ``n`` the length (axis 1) of input ``length_from``: ``x`` itself or ``ids`` (b, t)."""
    rng = np.random.default_rng(0)
    table = helper.make_tensor("table", TensorProto.FLOAT, [rows, WIDTH],
                               rng.standard_normal((rows, WIDTH)).astype(np.float32).ravel())
    nodes = [helper.make_node("Shape", [length_from], ["shape"], start=1, end=2),
             helper.make_node("Slice", ["table", "zero", "shape", "zero"], ["positions"]),
             helper.make_node("Add", ["x", "positions"], ["summed"]),
             helper.make_node("LayerNormalization", ["summed", "gamma", "beta"], ["y"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", WIDTH])]
    if length_from == "ids":
        inputs.append(helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "t"]))
    graph = helper.make_graph(
        nodes, "position_add", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None, None])],
        [table, _int64("zero", [0]), helper.make_tensor("gamma", TensorProto.FLOAT, [WIDTH], [1.0] * WIDTH),
         helper.make_tensor("beta", TensorProto.FLOAT, [WIDTH], [0.0] * WIDTH)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _dims(model: onnx.ModelProto) -> dict[str, list]:
    ir_model = ir.from_proto(model)
    shapes = OrtShapes(ir_model)
    values = {v.name: v for node in ir_model.graph for v in node.outputs}
    return {name: shapes.dims(values[name]) for name in ("positions", "summed", "y")}


def _runtime_shapes(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, tuple]:
    """Shapes of the named values on one run of onnx's reference evaluator."""
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    probe.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                              for n in ("positions", "summed"))
    names = ["y", "positions", "summed"]
    return {n: o.shape for n, o in zip(names, ReferenceEvaluator(probe).run(names, feeds))}


@pytest.mark.parametrize("rows", [2, 256])
def test_rows_sliced_by_the_sequence_length_are_the_sequence_length(rows: int) -> None:
    dims = _dims(position_add(rows))
    assert dims == {"positions": ["s", WIDTH], "summed": ["b", "s", WIDTH], "y": ["b", "s", WIDTH]}
    rng = np.random.default_rng(1)
    for batch, seq in ((1, 1), (2, rows), (3, min(rows, 7))):
        shapes = _runtime_shapes(position_add(rows), {"x": rng.standard_normal((batch, seq, WIDTH)).astype(np.float32)})
        sizes = {"b": batch, "s": seq}
        for name, shape in shapes.items():
            assert tuple(sizes.get(d, d) for d in dims[name]) == shape


def test_a_table_of_one_row_is_not_the_sequence_length() -> None:
    dims = _dims(position_add(1))
    # Min(1, s) broadcasts against s > 1 as one row: the rows are not s
    assert dims["positions"][0] != "s"
    shapes = _runtime_shapes(position_add(1), {"x": np.zeros((2, 5, WIDTH), np.float32)})
    assert shapes["positions"] == (1, WIDTH) and shapes["summed"] == (2, 5, WIDTH)


def test_rows_sliced_by_another_length_are_not_merged() -> None:
    dims = _dims(position_add(256, length_from="ids"))
    # Min(256, t) met by s: t = 1 broadcasts against any s, so neither is the other
    assert dims["positions"][0] not in ("s", "t")
    assert dims["summed"] is None or dims["summed"][1] is None or dims["summed"][1] != "t"
    shapes = _runtime_shapes(position_add(256, length_from="ids"),
                             {"x": np.zeros((2, 5, WIDTH), np.float32), "ids": np.zeros((2, 1), np.int64)})
    assert shapes["positions"] == (1, WIDTH) and shapes["summed"] == (2, 5, WIDTH)
