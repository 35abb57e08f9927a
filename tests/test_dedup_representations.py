"""deduplicate-initializers compares contents whatever holds them: a TensorProto's
raw_data, its typed fields (float_data, int64_data, ...) or an in-memory array; equal
contents merge, and the readers' results stay those of numpy on the original weights."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from optcc.passes.deduplicate_initializers import DeduplicateInitializersPass
from reference import onnxruntime_outputs


def _typed_field_tensor(name: str, array: np.ndarray) -> TensorProto:
    """The array in the TensorProto's typed field, not raw_data."""
    return helper.make_tensor(name, helper.np_dtype_to_tensor_dtype(array.dtype), array.shape,
                              array.reshape(-1).tolist(), raw=False)


def _model(arrays: dict[str, np.ndarray], typed: set[str], in_memory: set[str]) -> ir.Model:
    """y = x + a1 + a2 + ... over the given (4,)-broadcastable initializers."""
    inits = [_typed_field_tensor(n, a) if n in typed else numpy_helper.from_array(a, n)
             for n, a in arrays.items()]
    nodes, last = [], "x"
    for i, name in enumerate(arrays):
        nodes.append(helper.make_node("Add", [last, name], [f"s{i}"]))
        last = f"s{i}"
    dtype = helper.np_dtype_to_tensor_dtype(next(iter(arrays.values())).dtype)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", dtype, [4])],
                              [helper.make_tensor_value_info(last, dtype, [4])], inits)
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    for value in model.graph.initializers.values():
        if value.name in in_memory:
            value.const_value = ir.Tensor(value.const_value.numpy().copy(), name=value.name)
    return model


def _check(arrays: dict[str, np.ndarray], typed: set[str], in_memory: set[str], merged: int) -> None:
    model = _model(arrays, typed, in_memory)
    x = np.arange(4).astype(next(iter(arrays.values())).dtype)
    expected = x
    for array in arrays.values():  # the graph's order of additions
        expected = expected + array
    result = DeduplicateInitializersPass()(model)
    assert result.modified == bool(merged)
    assert len(result.model.graph.initializers) == len(arrays) - merged
    np.testing.assert_array_equal(onnxruntime_outputs(result.model, {"x": x})[0], expected)


def test_raw_typed_and_in_memory_copies_merge():
    w = np.array([0.5, -1.25, 3.0, 7.5], np.float32)
    arrays = {"raw": w, "typed": w.copy(), "memory": w.copy(), "other": w + 1}
    _check(arrays, typed={"typed"}, in_memory={"memory"}, merged=2)


def test_integer_and_half_contents_merge_across_representations():
    ints = np.array([1, -2, 3, 1 << 40], np.int64)
    _check({"a": ints, "b": ints.copy(), "c": ints.copy()}, typed={"b"}, in_memory={"c"}, merged=2)
    halves = np.array([0.5, -0.0, 2.0, 1024.0], np.float16)
    _check({"a": halves, "b": halves.copy(), "c": np.abs(halves)}, typed={"b"}, in_memory=set(), merged=1)
