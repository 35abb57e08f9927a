"""optcc.ir.serialize_dims_only writes the model as onnx-ir does, except that the selected
main-graph initializers are TensorProtos of name, dtype and dims without data; the model
itself is left as it was; and shape inference reads the result as it reads the full model."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

import optcc


def _expected(model: ir.Model, selects) -> bytes:
    """onnx-ir's serialization, with the selected initializers' protos rewritten by hand."""
    proto = ir.serde.serialize_model(model)
    selected = {name for name, value in model.graph.initializers.items()
                if value.const_value is not None and value.const_value.dtype != ir.DataType.STRING
                and selects(value.const_value)}
    for tensor in proto.graph.initializer:
        if tensor.name in selected:
            name, dims, dtype = tensor.name, list(tensor.dims), tensor.data_type
            tensor.Clear()
            tensor.name, tensor.data_type = name, dtype
            tensor.dims.extend(dims)
    return proto.SerializeToString()


def _model(with_body: bool) -> ir.Model:
    """MatMul by a large weight, Add of a small bias, Reshape to a constant int64 target; a
    string initializer; optionally an If whose branches hold Constant nodes (not cached)."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [16, 32], np.arange(512, dtype=np.float32))
    b = helper.make_tensor("b", TensorProto.FLOAT, [32], np.ones(32, np.float32))
    target = helper.make_tensor("target", TensorProto.INT64, [2], [4, -1])
    labels = helper.make_tensor("labels", TensorProto.STRING, [2], [b"a", b"b"])
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Add", ["h", "b"], ["a"]),
        helper.make_node("Reshape", ["a", "target"], ["y"]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if with_body:
        def branch(k: float) -> onnx.GraphProto:
            const = helper.make_node("Constant", [], [f"c{k:g}"], value=helper.make_tensor("c", TensorProto.FLOAT, [1], [k]))
            return helper.make_graph([const], f"b{k:g}", [], [helper.make_tensor_value_info(f"c{k:g}", TensorProto.FLOAT, [1])])
        nodes.append(helper.make_node("If", ["cond"], ["z"], then_branch=branch(1.0), else_branch=branch(-1.0)))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1]))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])]
    if with_body:
        inputs.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    graph = helper.make_graph(nodes, "g", inputs, outputs, [w, b, target, labels])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return optcc.ir.load(proto)


def _large(tensor: ir.TensorProtocol) -> bool:
    return tensor.nbytes > 256


def _everything(tensor: ir.TensorProtocol) -> bool:
    return True


def test_selected_weights_are_written_without_data_cached_or_not():
    for with_body in (False, True):
        model = _model(with_body)
        for selects in (_large, _everything):
            for _ in range(2):  # cold, then from the cache
                data = optcc.ir.serialize_dims_only(model, selects)
                assert data == _expected(model, selects)
            written = {t.name: t for t in onnx.ModelProto.FromString(data).graph.initializer}
            assert list(written["w"].dims) == [16, 32] and not written["w"].raw_data
            assert not written["w"].float_data
            assert written["labels"].string_data == [b"a", b"b"]  # strings are always whole
        # the model is untouched: its weights keep their data, onnx-ir writes them whole
        full = {t.name: t for t in ir.serde.serialize_model(model).graph.initializer}
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(full["w"]),
                                      np.arange(512, dtype=np.float32).reshape(16, 32))


def test_a_renamed_initializer_is_written_under_its_new_name():
    model = _model(False)
    optcc.ir.serialize_dims_only(model, _everything)
    model.graph.initializers["w"].name = "w2"
    data = optcc.ir.serialize_dims_only(model, _everything)
    assert data == _expected(model, _everything)
    assert "w2" in {t.name for t in onnx.ModelProto.FromString(data).graph.initializer}


def test_shape_inference_reads_it_as_the_full_model():
    model = _model(False)
    full = onnx.shape_inference.infer_shapes(ir.serde.serialize_model(model), data_prop=True)
    blank = onnx.shape_inference.infer_shapes(optcc.ir.serialize_dims_only(model, _large), data_prop=True)

    def shapes(proto: onnx.ModelProto) -> dict[str, list[int]]:
        return {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim]
                for i in [*proto.graph.value_info, *proto.graph.output]}

    assert shapes(blank) == shapes(full)
    assert {name: shapes(blank)[name] for name in ("h", "a", "y")} == {"h": [2, 32], "a": [2, 32], "y": [4, 16]}
