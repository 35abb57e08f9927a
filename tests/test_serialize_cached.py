"""optcc.ir's cached serialization writes exactly the bytes onnx-ir writes, before and after
every kind of edit a pass makes, and falls back to onnx-ir outside the plain case."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import optcc
from optcc.ir.serialize_cached import model_parts, serialize_bytes

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def _reference(model: ir.Model) -> bytes:
    return ir.serde.serialize_model(model).SerializeToString()


def _same(model: ir.Model) -> None:
    """The cached bytes equal onnx-ir's, cold and warm, with and without weights set aside."""
    for _ in range(2):
        assert serialize_bytes(model) == _reference(model)
        assert optcc.ir.serialize(model).SerializeToString() == _reference(model)
        with optcc.ir.initializers_set_aside(model, lambda t: t.nbytes > 16, bodies=True):
            assert serialize_bytes(model) == _reference(model)


def _annotated_model() -> ir.Model:
    """Doc strings, metadata, value annotations with symbolic dims and denotations, a string
    initializer, an initializer that is also a graph input, a tensor attribute."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    x.type.tensor_type.shape.dim[1].denotation = "DATA_CHANNEL"
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.arange(16, dtype=np.float32))
    w.doc_string = "weight"
    b = helper.make_tensor("b", TensorProto.FLOAT, [4], np.ones(4, np.float32))
    labels = helper.make_tensor("labels", TensorProto.STRING, [2], [b"a", b"b"])
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm", doc_string="the matmul"),
        helper.make_node("Add", ["h", "b"], ["a"], name="add"),
        helper.make_node("Constant", [], ["k"], value=helper.make_tensor("kv", TensorProto.FLOAT, [1], [2.0])),
        helper.make_node("Mul", ["a", "k"], ["m"]),
        helper.make_node("Transpose", ["m"], ["t"], perm=[1, 0]),
        helper.make_node("Transpose", ["t"], ["y"], perm=[1, 0]),
    ]
    graph = helper.make_graph(
        nodes, "g", [x, helper.make_tensor_value_info("b", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], [w, b, labels],
        value_info=[helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", 4]),
                    helper.make_tensor_value_info("t", TensorProto.FLOAT, [4, "batch"])],
        doc_string="graph doc")
    graph.node[0].metadata_props.add(key="source", value="layer1")
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                              producer_name="test", doc_string="model doc")
    proto.ir_version = 8
    helper.set_model_props(proto, {"author": "me", "a": "b"})
    return optcc.ir.load(proto)


def test_annotated_model_is_written_as_onnx_ir_writes_it():
    model = _annotated_model()
    assert model_parts(model) is not None
    _same(model)


def test_every_kind_of_edit_is_seen():
    model = _annotated_model()
    _same(model)
    nodes = {n.name or n.outputs[0].name: n for n in model.graph}
    mm, add, mul = nodes["mm"], nodes["add"], nodes["m"]
    edits = [
        lambda: setattr(mm, "name", "renamed"),
        lambda: setattr(mm, "doc_string", "another doc"),
        lambda: mm.metadata_props.update({"source": "layer2"}),
        lambda: setattr(add.outputs[0], "name", "a2"),
        lambda: mul.replace_input_with(1, mul.inputs[0]),
        lambda: setattr(mm.outputs[0], "shape", ir.Shape(["n", 4])),
        lambda: setattr(mm.outputs[0], "shape", ir.Shape([1, 4])),
        lambda: setattr(mm.outputs[0].type, "dtype", ir.DataType.DOUBLE),
        lambda: setattr(mm.outputs[0], "type", ir.TensorType(ir.DataType.FLOAT)),
        lambda: setattr(mm.outputs[0], "doc_string", "value doc"),
        lambda: nodes["t"].attributes.__setitem__("perm", ir.AttrInt64s("perm", [0, 1])),
        lambda: setattr(nodes["t"].attributes["perm"], "doc_string", "attr doc"),
        lambda: setattr(model.graph.initializers["b"], "const_value", ir.tensor(np.zeros(4, np.float32), name="b")),
        lambda: model.graph.initializers["w"].const_value.metadata_props.update({"k": "v"}),
        lambda: setattr(model.graph, "name", "g2"),
        lambda: model.metadata_props.update({"z": "last"}),
        lambda: model.graph.outputs[0].metadata_props.update({"o": "p"}),
    ]
    for edit in edits:
        edit()
        _same(model)


def test_a_node_with_a_small_tensor_attribute_is_cached_and_its_tensor_edits_seen():
    """A Constant's value tensor: its node's bytes are kept, and rewritten after each edit
    of what can change in the tensor (name, doc string, metadata) or of the attribute."""
    from optcc.ir.serialize_cached import _NODE_KEY

    model = _annotated_model()
    const = next(n for n in model.graph if n.op_type == "Constant")
    _same(model)
    assert _NODE_KEY in const.meta  # cached: written once, then read from its meta
    tensor = lambda: const.attributes["value"].value  # noqa: E731
    edits = [
        lambda: setattr(tensor(), "name", "kv2"),  # a parsed tensor (its own TensorProto)
        lambda: tensor().metadata_props.update({"t": "u"}),
        lambda: const.attributes.__setitem__(
            "value", ir.AttrTensor("value", ir.tensor(np.array([3.0], np.float32), name="kv3"))),
        lambda: setattr(tensor(), "doc_string", "tensor doc"),  # an in-memory one
        lambda: tensor().metadata_props.update({"t": "v"}),
        lambda: setattr(tensor(), "name", None),
    ]
    for edit in edits:
        edit()
        _same(model)
    # a tensor larger than the cache holds is written anew each time, as onnx-ir writes it
    const.attributes["value"] = ir.AttrTensor("value", ir.tensor(np.arange(2048, dtype=np.float32), name="big"))
    _same(model)
    tensor().name = "big2"
    _same(model)


def test_an_optimized_model_is_written_as_onnx_ir_writes_it():
    model = optcc.ir.load(FIXTURES / "tinycnn.onnx")
    _same(model)
    for name in ["normalize", "lift-constants", "fold-constants", "fuse-batchnorm", "fuse-conv-affine",
                 "eliminate-dead-nodes", "fuse-ort-conv-activation"]:
        optcc.create_pass(name)(model)
        _same(model)


def _if_model() -> onnx.ModelProto:
    def branch(k: float) -> onnx.GraphProto:
        const = helper.make_node("Constant", [], [f"c{k:g}"], value=helper.make_tensor("c", TensorProto.FLOAT, [1], [k]))
        add = helper.make_node("Add", ["x", f"c{k:g}"], [f"out_{k:g}"])
        return helper.make_graph([const, add], f"b{k:g}", [],
                                 [helper.make_tensor_value_info(f"out_{k:g}", TensorProto.FLOAT, [1])])

    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=branch(1.0), else_branch=branch(-1.0)),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
                              [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_a_model_with_a_body_is_written_by_onnx_ir():
    model = optcc.ir.load(_if_model())
    assert model_parts(model) is None  # a body can change under its attribute: not cached
    _same(model)
    body = model.graph.node(2).attributes["then_branch"].value
    body.node(0).attributes["value"] = ir.AttrTensor("value", ir.tensor(np.array([5.0], np.float32)))
    _same(model)


def test_saved_file_parses_to_the_model_and_runs():
    """The streamed save writes the cached parts: the file is the model (onnxruntime
    against numpy)."""
    model = _annotated_model()
    model.graph.inputs.pop()  # b becomes a plain initializer
    serialize_bytes(model)  # warm caches
    mm = next(n for n in model.graph if n.name == "mm")
    mm.outputs[0].shape = ir.Shape(["batch", 4])  # an edit after the cache was filled
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "m.onnx"
        optcc.ir.save(model, out)
        assert out.read_bytes() == _streamed_reference(model)
        x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
        got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    w = np.arange(16, dtype=np.float64).reshape(4, 4)
    np.testing.assert_allclose(got, ((x.astype(np.float64) @ w + 1.0) * 2.0), rtol=1e-6)


def _streamed_reference(model: ir.Model) -> bytes:
    """The file the streamed writer makes, from onnx-ir's proto: the model without
    initializers, then one graph { initializer } fragment per initializer."""
    from optcc.ir.saving import _graph_initializer_field

    proto = ir.serde.serialize_model(model)
    initializers = [t.SerializeToString() for t in proto.graph.initializer]
    del proto.graph.initializer[:]
    return proto.SerializeToString() + b"".join(_graph_initializer_field(t) for t in initializers)


@pytest.mark.parametrize("blank", [False, True])
def test_checker_verdicts_are_unchanged(blank):
    """The checker reads the cached bytes: a broken model is still rejected."""
    from optcc.infra.invariants import checker_problems

    model = _annotated_model()
    assert checker_problems(model) == []
    next(n for n in model.graph if n.name == "mm").attributes["bogus"] = ir.AttrInt64("bogus", 1)
    if blank:
        serialize_bytes(model)
    assert checker_problems(model)


def test_mid_size_weights_written_from_memory_give_the_same_file():
    """Arrays above the cache size are written from memory: the file has the bytes of
    onnx-ir's serialization, fragment by fragment, and computes what numpy computes."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((32, 64)).astype(np.float32)  # 8 KiB
    w16 = rng.standard_normal((64, 16)).astype(np.float16)  # 2 KiB: cached, not streamed
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Cast", ["h"], ["h16"], to=TensorProto.FLOAT16),
         helper.make_node("MatMul", ["h16", "w16"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 16])],
        [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(w16, "w16")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    model = optcc.ir.load(proto)
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "m.onnx"
        optcc.ir.save(model, out)
        assert out.read_bytes() == _streamed_reference(model)
        x = rng.standard_normal((2, 32)).astype(np.float32)
        got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    want = (x.astype(np.float64) @ w).astype(np.float32).astype(np.float16).astype(np.float64) @ w16.astype(np.float64)
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=2e-2, atol=2e-2)
