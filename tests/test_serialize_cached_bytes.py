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
