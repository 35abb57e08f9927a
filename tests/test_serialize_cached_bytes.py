"""The cached serializer writes exactly onnx-ir's bytes: a parsed tensor written as its own
TensorProto's bytes, models after each pass, and a cached node that is later given a
tensor or graph attribute."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir

import optcc
from optcc.ir.serialize_cached import model_parts, serialize_bytes

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def _model_reference(model: ir.Model) -> bytes:
    return ir.serde.serialize_model(model).SerializeToString()


def test_parsed_tensors_are_written_as_onnx_ir_writes_them():
    tensors = [
        oh.make_tensor("f", onnx.TensorProto.FLOAT, [2, 2], [1.0, -2.0, 0.5, 3.0]),  # float_data
        oh.make_tensor("r", onnx.TensorProto.FLOAT, [2], np.ones(2, np.float32).tobytes(), raw=True),
        oh.make_tensor("i", onnx.TensorProto.INT64, [3], [1, -1, 1 << 40]),
        oh.make_tensor("s", onnx.TensorProto.INT32, [], [7]),
        oh.make_tensor("q", onnx.TensorProto.INT4, [2], [1, -2]),  # packed: onnx-ir writes it
        # larger than CACHE_TENSOR_BYTES: written each time, not kept
        oh.make_tensor("F", onnx.TensorProto.FLOAT, [40, 50], np.linspace(-1, 1, 2000, dtype=np.float32)),
        oh.make_tensor("R", onnx.TensorProto.FLOAT, [2000], np.ones(2000, np.float32).tobytes(), raw=True),
        oh.make_tensor("D", onnx.TensorProto.INT64, [1000], list(range(1000))),
    ]
    tensors[0].doc_string = "kept as stored"
    tensors[-1].doc_string = "a large one with a doc string"
    nodes = [oh.make_node("Identity", [t.name], [f"{t.name}_out"]) for t in tensors]
    graph = oh.make_graph(nodes, "g", [], [oh.make_tensor_value_info(f"{t.name}_out", t.data_type, None)
                                           for t in tensors], tensors)
    model = ir.serde.deserialize_model(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)]))
    assert serialize_bytes(model) == _model_reference(model)
    assert serialize_bytes(model) == _model_reference(model)  # from the cache too


def test_models_after_each_pass_are_onnx_ir_bytes():
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


def test_value_annotations_of_every_kind_are_written_as_onnx_ir_writes_them():
    """Each value annotation the cached serializer writes itself (a tensor type, its shape
    unknown, a scalar, int dims of one and several varint bytes, named, empty-named and
    unnamed symbolic dims, non-ASCII names) or leaves to onnx-ir (a negative dim,
    denotations, doc strings, metadata, sequence and optional types, a shape without a
    type) is onnx-ir's bytes."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch", 3, 300, 1 << 40]))
    node = ir.Node("", "Identity", [x], num_outputs=14)
    annotations = [
        (ir.TensorType(ir.DataType.FLOAT), None),
        (ir.TensorType(ir.DataType.INT64), ir.Shape([])),
        (ir.TensorType(ir.DataType.FLOAT16), ir.Shape([0, 1, 127, 128, 16384, 1 << 62])),
        (ir.TensorType(ir.DataType.BOOL), ir.Shape(["n", None, "", "ünï"])),
        (ir.TensorType(ir.DataType.UNDEFINED), ir.Shape([2])),
        (ir.TensorType(ir.DataType.FLOAT), ir.Shape([-1, 4])),
        (ir.TensorType(ir.DataType.FLOAT), ir.Shape([2, 4], denotations=["DATA_BATCH", None])),
        (ir.TensorType(ir.DataType.FLOAT, denotation="TENSOR"), ir.Shape([2])),
        (ir.SequenceType(ir.TensorType(ir.DataType.FLOAT)), None),
        (ir.OptionalType(ir.TensorType(ir.DataType.INT32)), None),
        (None, None),
        (ir.TensorType(ir.DataType.DOUBLE), ir.Shape([5])),
        (ir.TensorType(ir.DataType.STRING), ir.Shape(["s"])),
        (ir.TensorType(ir.DataType.UINT8), ir.Shape([7])),
    ]
    for i, (output, (type_, shape)) in enumerate(zip(node.outputs, annotations)):
        output.name = f"y{i}" if i != 3 else "ÿ_naïve"
        output.type, output.shape = type_, shape
    node.outputs[11].doc_string = "a doc string"
    node.outputs[12].metadata_props["k"] = "v"
    graph = ir.Graph([x], [node.outputs[0]], nodes=[node], name="g", opset_imports={"": 21})
    model = ir.Model(graph, ir_version=10)
    assert serialize_bytes(model) == _model_reference(model)
    assert serialize_bytes(model) == _model_reference(model)  # from the cache too
    node.outputs[2].shape = ir.Shape([3, "m"])
    node.outputs[4].type = ir.TensorType(ir.DataType.FLOAT)
    assert serialize_bytes(model) == _model_reference(model)


def test_nodes_with_attributes_of_every_kind_are_written_as_onnx_ir_writes_them():
    """Nodes the cached serializer writes itself (ints of one and ten varint bytes, floats
    rounded to float32, zero and empty values, non-ASCII strings, small tensors, missing
    inputs, trailing unnamed outputs, names, domains, overloads and doc strings set or
    empty) or leaves to onnx-ir (infinite and NaN floats, a float beyond float32, bytes in a
    STRING attribute, attribute doc strings, metadata) are onnx-ir's bytes."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2]))
    attribute_sets = [
        [ir.AttrInt64("i", 0), ir.AttrInt64("n", -1), ir.AttrInt64("big", (1 << 63) - 1), ir.AttrInt64("low", -(1 << 63))],
        [ir.AttrFloat32("f", 0.1), ir.AttrFloat32("z", -0.0), ir.AttrFloat32("tiny", 1e-45), ir.AttrFloat32("max", 3.4e38)],
        [ir.AttrString("s", ""), ir.AttrString("u", "naïve ✓")],
        [ir.AttrInt64s("ints", []), ir.AttrInt64s("perm", [0, 3, 1, 2]), ir.AttrInt64s("neg", [-1, 1 << 40])],
        [ir.AttrFloat32s("floats", []), ir.AttrFloat32s("scales", [1.0, 0.3, -2.5])],
        [ir.AttrStrings("names", ["a", "", "ü"]), ir.AttrStrings("none", [])],
        [ir.AttrTensor("value", ir.tensor(np.array([1.5, -2.0], np.float32), name="v"))],
        [ir.AttrFloat32("inf", float("inf"))],
        [ir.AttrFloat32("nan", float("nan"))],
        [ir.AttrFloat32("huge", 1e300)],
        [ir.Attr("bytes", ir.AttributeType.STRING, b"\xff\x00")],
        [ir.AttrInt64("documented", 1, doc_string="an attribute doc")],
    ]
    nodes = []
    for i, attributes in enumerate(attribute_sets):
        inputs = [x, None, x] if i % 3 == 0 else [x] if i % 3 == 1 else []
        node = ir.Node("" if i % 2 else "custom.domain", f"Op{i}", inputs, attributes, num_outputs=3,
                       name=f"n{i}" if i % 4 else "", overload="v2" if i == 5 else "",
                       doc_string="a node doc" if i == 2 else None)
        node.outputs[0].name = f"out{i}"
        if i % 2:
            node.outputs[1].name = f"mid{i}"  # the third output stays unnamed: left out
        nodes.append(node)
    nodes[-1].metadata_props["source"] = "layer"
    graph = ir.Graph([x], [nodes[0].outputs[0]], nodes=nodes, name="g",
                     opset_imports={"": 21, "custom.domain": 1})
    model = ir.Model(graph, ir_version=10)
    assert serialize_bytes(model) == _model_reference(model)
    assert serialize_bytes(model) == _model_reference(model)  # from the cache too
    nodes[1].attributes["f"] = ir.AttrFloat32("f", 2.0)
    nodes[3].name = "renamed"
    assert serialize_bytes(model) == _model_reference(model)


def test_in_memory_tensors_are_written_as_onnx_ir_writes_them():
    """Initializers and tensor attributes held as arrays (scalars, empty ones, 4-bit and
    float16 ones, named and unnamed, small and larger than ``CACHE_TENSOR_BYTES``) are
    written as onnx-ir writes them, as are the ones it is left to (doc strings, metadata,
    strings)."""
    arrays = [
        ir.tensor(np.float32(2.5)),
        ir.tensor(np.zeros((0, 3), np.float32)),
        ir.tensor(np.arange(6, dtype=np.int64).reshape(2, 3) - 3),
        ir.tensor(np.array([True, False])),
        ir.tensor(np.linspace(-1, 1, 5000, dtype=np.float32).reshape(50, 100)),  # not cached
        ir.tensor(np.ones(7, np.float16)),
        ir.Tensor(np.array([1, -2, 3], np.int8), dtype=ir.DataType.INT4),
        ir.tensor(np.ones(3, np.float64), doc_string="documented"),
        ir.StringTensor([b"a", b"b"], shape=ir.Shape([2])),
    ]
    arrays[2].metadata_props["k"] = "v"
    initializers = []
    for i, tensor in enumerate(arrays):
        value = ir.Value(name=f"w{i}", type=ir.TensorType(tensor.dtype), shape=tensor.shape, const_value=tensor)
        initializers.append(value)
    attribute = ir.AttrTensor("value", ir.tensor(np.arange(3, dtype=np.int32)))  # unnamed
    constant = ir.Node("", "Constant", [], [attribute], num_outputs=1)
    constant.outputs[0].name = "c"
    node = ir.Node("", "Identity", [initializers[0]], num_outputs=1)
    node.outputs[0].name = "y"
    graph = ir.Graph([], [node.outputs[0], constant.outputs[0]], nodes=[constant, node], initializers=initializers,
                     name="g", opset_imports={"": 21})
    model = ir.Model(graph, ir_version=10)
    assert serialize_bytes(model) == _model_reference(model)
    assert serialize_bytes(model) == _model_reference(model)  # from the cache too
