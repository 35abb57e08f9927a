"""The cached serializer's direct encoders write exactly the bytes onnx-ir's serializer
writes for nodes, value annotations and in-memory tensors, and decline (None) every form
they do not write, which onnx-ir then serializes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import optcc
from optcc.ir.serialize_cached import _encoded_node, _encoded_tensor, _encoded_value_info, model_parts, serialize_bytes

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def _node(*attributes: ir.Attr, op: str = "Op", domain: str = "", name: str | None = "n",
          inputs: int = 2, outputs: tuple[str | None, ...] = ("y",)) -> ir.Node:
    values = [ir.Value(name=f"x{i}") for i in range(inputs)]
    node = ir.Node(domain, op, [*values, None, values[0]] if inputs else [], list(attributes),
                   num_outputs=len(outputs), name=name)
    for value, output in zip(node.outputs, outputs):
        value.name = output
    return node


def _node_bytes(node: ir.Node) -> bytes | None:
    return _encoded_node(node, tuple(node.attributes.data.values()))


def _reference(node: ir.Node) -> bytes:
    return ir.serde.serialize_node(node).SerializeToString()


PLAIN_NODES = [
    _node(),
    _node(name=None, inputs=0),
    _node(domain="com.microsoft", op="FusedConv"),
    _node(outputs=("y", "", None)),  # trailing unnamed outputs are left out
    _node(outputs=("", "z")),
    _node(ir.AttrInt64("axis", -1), ir.AttrInt64("big", (1 << 63) - 1), ir.AttrInt64("small", -(1 << 63)),
          ir.AttrInt64("zero", 0), ir.AttrInt64("wide", 300)),
    _node(ir.AttrInt64s("perm", [0, 2, 1, -3, 1 << 40]), ir.AttrInt64s("empty", [])),
    _node(ir.AttrFloat32("alpha", 0.1), ir.AttrFloat32("zero", 0.0), ir.AttrFloat32("negzero", -0.0),
          ir.AttrFloat32("tiny", 1e-45), ir.AttrFloat32("max", 3.4028234663852886e38)),
    _node(ir.AttrFloat32s("scales", [1.0, 2.5, -1e-7]), ir.AttrFloat32s("none", [])),
    _node(ir.AttrString("mode", "nearest"), ir.AttrString("empty", ""), ir.AttrString("text", "größe ✓")),
    _node(ir.AttrStrings("names", ["a", "", "ü"]), ir.AttrStrings("none", [])),
    _node(ir.Attr("count", ir.AttributeType.INT, 3)),
    _node(name="ä/node", op="Conv"),
]


@pytest.mark.parametrize("index", range(len(PLAIN_NODES)))
def test_plain_nodes_are_encoded_as_onnx_ir_writes_them(index):
    node = PLAIN_NODES[index]
    data = _node_bytes(node)
    assert data is not None
    assert data == _reference(node)


def _declined_nodes() -> list[ir.Node]:
    documented = _node()
    documented.doc_string = "doc"
    overloaded = _node()
    overloaded.overload = "o"
    with_metadata = _node()
    with_metadata.metadata_props["k"] = "v"
    attr_doc = ir.AttrInt64("axis", 1)
    attr_doc.doc_string = "attr doc"
    return [
        documented, overloaded, with_metadata, _node(attr_doc),
        _node(ir.RefAttr("alpha", "outer", ir.AttributeType.FLOAT)),
        _node(ir.AttrFloat32("inf", float("inf"))), _node(ir.AttrFloat32("nan", float("nan"))),
        _node(ir.AttrFloat32("huge", 1e39)), _node(ir.AttrFloat32s("scales", [1.0, float("-inf")])),
        _node(ir.AttrInt64("past", 1 << 63)), _node(ir.AttrInt64s("ints", [1, -(1 << 63) - 1])),
        _node(ir.Attr("s", ir.AttributeType.STRING, b"raw")),
        _node(ir.AttrTensor("value", ir.tensor(np.zeros(2, np.float32)))),
        _node(ir.AttrGraph("body", ir.Graph([], [], nodes=[]))),
    ]


@pytest.mark.parametrize("index", range(len(_declined_nodes())))
def test_other_nodes_are_declined(index):
    assert _node_bytes(_declined_nodes()[index]) is None


def _value(name: str, dtype: ir.DataType, dims: list | None) -> ir.Value:
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=None if dims is None else ir.Shape(dims))


def _value_bytes(value: ir.Value) -> bytes | None:
    shape = value.shape
    dims = None if shape is None else shape.dims
    denotations = None if shape is None else tuple(shape.get_denotation(i) for i in range(len(dims)))
    return _encoded_value_info(value.name, value.type, dims, denotations)


PLAIN_VALUES = [
    _value("x", ir.DataType.FLOAT, [1, 3, 224, 224]),
    _value("scalar", ir.DataType.INT64, []),
    _value("unranked", ir.DataType.FLOAT16, None),
    _value("sym", ir.DataType.FLOAT, ["batch", None, 0, -1, 1 << 40, "ü"]),
    _value("", ir.DataType.BOOL, [2]),
    _value("undefined", ir.DataType.UNDEFINED, [3]),
]


@pytest.mark.parametrize("index", range(len(PLAIN_VALUES)))
def test_plain_value_annotations_are_encoded_as_onnx_ir_writes_them(index):
    value = PLAIN_VALUES[index]
    data = _value_bytes(value)
    assert data is not None
    assert data == ir.serde.serialize_value(value).SerializeToString()


def test_a_dim_denotation_is_declined():
    value = _value("x", ir.DataType.FLOAT, [1, 3])
    value.shape.set_denotation(1, "DATA_CHANNEL")
    assert _value_bytes(value) is None
    model = _one_value_model(value)
    assert serialize_bytes(model) == _model_reference(model)


def _one_value_model(value: ir.Value) -> ir.Model:
    node = ir.Node("", "Identity", [value], num_outputs=1)
    node.outputs[0].name = "y"
    node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    node.outputs[0].shape = ir.Shape(["n", "ü"])
    graph = ir.Graph([value], node.outputs, nodes=[node], name="g")
    return ir.Model(graph, ir_version=8)


def _model_reference(model: ir.Model) -> bytes:
    return ir.serde.serialize_model(model).SerializeToString()


PLAIN_TENSORS = [
    ir.Tensor(np.arange(12, dtype=np.float32).reshape(3, 4), name="w"),
    ir.Tensor(np.array(7, dtype=np.int64), name="scalar"),
    ir.Tensor(np.array([-1, 2], dtype=np.int64)),
    ir.Tensor(np.zeros((0, 3), dtype=np.float16), name="empty"),
    ir.Tensor(np.array([True, False]), name="mask"),
    ir.Tensor(np.arange(6, dtype=np.uint8).reshape(2, 3)[:, ::2], name="strided"),
    ir.Tensor(np.ones(3, dtype=np.float64), name="ü"),
]


@pytest.mark.parametrize("index", range(len(PLAIN_TENSORS)))
def test_in_memory_tensors_are_encoded_as_onnx_ir_writes_them(index):
    tensor = PLAIN_TENSORS[index]
    data = _encoded_tensor(tensor)
    assert data is not None
    assert data == ir.serde.serialize_tensor(tensor).SerializeToString()


def test_other_tensors_are_declined():
    assert _encoded_tensor(ir.Tensor(np.array([1, 2], dtype=np.int8), dtype=ir.DataType.INT4)) is None
    assert _encoded_tensor(ir.StringTensor(np.array([b"a"]))) is None
    packed = ir.serde.serialize_tensor(ir.Tensor(np.array([1, 2], dtype=np.int8), dtype=ir.DataType.INT4, name="q"))
    assert _encoded_tensor(ir.serde.TensorProtoTensor(packed)) is None


def test_parsed_tensors_are_encoded_as_onnx_ir_writes_them():
    protos = [
        onnx.helper.make_tensor("f", onnx.TensorProto.FLOAT, [2, 2], [1.0, -2.0, 0.5, 3.0]),  # float_data
        onnx.helper.make_tensor("r", onnx.TensorProto.FLOAT, [2], np.ones(2, np.float32).tobytes(), raw=True),
        onnx.helper.make_tensor("i", onnx.TensorProto.INT64, [3], [1, -1, 1 << 40]),
        onnx.helper.make_tensor("", onnx.TensorProto.INT32, [], [7]),
    ]
    protos[0].doc_string = "kept as stored"
    for proto in protos:
        tensor = ir.serde.TensorProtoTensor(proto)
        assert _encoded_tensor(tensor) == ir.serde.serialize_tensor(tensor).SerializeToString()


def test_models_written_with_the_encoders_are_onnx_ir_bytes():
    model = optcc.ir.load(FIXTURES / "tinycnn.onnx")
    for name in ["normalize", "lift-constants", "fold-constants", "fuse-batchnorm", "fuse-conv-affine",
                 "eliminate-dead-nodes", "fuse-ort-conv-activation"]:
        optcc.create_pass(name)(model)
        assert serialize_bytes(model) == _model_reference(model)


def test_a_cached_node_given_a_body_or_a_tensor_attribute_is_seen():
    model = optcc.ir.load(FIXTURES / "tinycnn.onnx")
    assert serialize_bytes(model) == _model_reference(model)  # every node's bytes cached
    node = next(iter(model.graph))
    node.attributes["extra"] = ir.AttrTensor("extra", ir.tensor(np.array([1.0], np.float32)))
    assert serialize_bytes(model) == _model_reference(model)
    node.attributes["extra"] = ir.AttrGraph("extra", ir.Graph([], [], nodes=[], name="body"))
    assert model_parts(model) is None
    assert serialize_bytes(model) == _model_reference(model)
