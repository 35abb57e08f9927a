"""A loaded model holds its weights once, detached from the parsed protobuf: plain
``raw_data`` tensors become in-memory arrays, every other tensor keeps its own TensorProto;
the model serializes to the same bytes as onnx-ir's own deserialization would; a caller's
ModelProto changed after loading does not change the model. Loading from a path checks
the bytes read before parsing them (a file with external data: the file itself, which
must be the file that was parsed). Large in-memory models get
sessions with their weights handed over, computing what a session of their bytes computes.
Numerics against numpy."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import optcc
from optcc.errors import BadInputError
from optcc.ir import loading
from optcc.runtime import session as session_module
from optcc.runtime.session import make_session, session_options

WIDTH = 1024  # 4 MiB float32 weights each: handed over to onnxruntime, not inlined


def _model(rng: np.random.Generator) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """y = tanh(x @ W1 + c) @ W2 + b, with c a Constant node, b stored in float_data with a
    doc_string, and a ConstantOfShape whose value tensor has an empty (present) name."""
    w1 = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
    w2 = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
    c = rng.standard_normal(WIDTH).astype(np.float32)
    b = rng.standard_normal(WIDTH).astype(np.float32)
    b_proto = helper.make_tensor("b", TensorProto.FLOAT, [WIDTH], b.tolist())  # float_data
    b_proto.doc_string = "bias"
    zero = numpy_helper.from_array(np.zeros(1, np.float32), "")
    zero.name = ""  # present but empty, as some exporters write it
    nodes = [
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(c, "c_value")),
        helper.make_node("MatMul", ["x", "W1"], ["m1"]),
        helper.make_node("Add", ["m1", "c"], ["a1"]),
        helper.make_node("Tanh", ["a1"], ["t"]),
        helper.make_node("MatMul", ["t", "W2"], ["m2"]),
        helper.make_node("Add", ["m2", "b"], ["s"]),
        helper.make_node("Shape", ["s"], ["shape"]),
        helper.make_node("ConstantOfShape", ["shape"], ["zeros"], value=zero),
        helper.make_node("Add", ["s", "zeros"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, WIDTH])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2"), b_proto])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return model, {"W1": w1, "W2": w2, "c": c, "b": b}


def _reference(w: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    f = {k: v.astype(np.float64) for k, v in w.items()}
    return np.tanh(x.astype(np.float64) @ f["W1"] + f["c"]) @ f["W2"] + f["b"]


def _tensors(model: ir.Model) -> dict[str, ir.TensorProtocol]:
    found = {name: v.const_value for name, v in model.graph.initializers.items()}
    for node in model.graph:
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.TENSOR:
                found[f"{node.op_type}.{attr.name}"] = attr.value
    return found


@pytest.mark.parametrize("form", ["path", "bytes", "proto"])
def test_loaded_tensors_are_detached_and_serialize_to_the_same_bytes(tmp_path: Path, form: str) -> None:
    proto, weights = _model(np.random.default_rng(0))
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    source = {"path": path, "bytes": proto.SerializeToString(), "proto": proto}[form]
    model = optcc.ir.load(source)
    tensors = _tensors(model)
    # plain raw_data tensors are arrays read once; the others keep a TensorProto of their own
    for name in ("W1", "W2", "Constant.value"):
        assert type(tensors[name]) is ir.Tensor
        assert tensors[name].numpy() is tensors[name].numpy()
    assert isinstance(tensors["b"], ir.TensorProtoTensor) and tensors["b"].doc_string == "bias"
    assert isinstance(tensors["ConstantOfShape.value"], ir.TensorProtoTensor)
    np.testing.assert_array_equal(tensors["W1"].numpy(), weights["W1"])
    np.testing.assert_array_equal(tensors["b"].numpy(), weights["b"])
    # the same bytes as onnx-ir's deserialization, which keeps every tensor's proto
    assert optcc.ir.serialize(model).SerializeToString() == \
        ir.serde.serialize_model(ir.serde.deserialize_model(proto)).SerializeToString()
    if form == "proto":  # the caller's proto is its own: changing it leaves the model alone
        proto.graph.initializer[0].raw_data = np.zeros((WIDTH, WIDTH), np.float32).tobytes()
        proto.graph.initializer[2].float_data[0] = 1e9
        proto.graph.node[0].attribute[0].t.raw_data = np.zeros(WIDTH, np.float32).tobytes()
    x = np.random.default_rng(1).standard_normal((2, WIDTH)).astype(np.float32)
    got = make_session(model).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, _reference(weights, x), rtol=1e-4, atol=1e-4)


def test_the_parse_kept_is_the_files_own_and_the_model_does_not_read_it(tmp_path: Path) -> None:
    """``load_keeping_parse`` keeps what parsing the file gives, byte for byte; emptying that
    parse afterwards (as the proof's numbering empties its large tensors) leaves the model's
    weights as they were; a file whose output type loading had to fill in keeps no parse."""
    proto, weights = _model(np.random.default_rng(0))
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    model, parse = optcc.ir.load_keeping_parse(path)
    assert parse is not None
    assert parse.SerializeToString() == onnx.load(path, load_external_data=False).SerializeToString()
    for tensor in parse.graph.initializer:
        tensor.Clear()
    for node in parse.graph.node:
        for attribute in node.attribute:
            attribute.t.Clear()
    x = np.random.default_rng(1).standard_normal((2, WIDTH)).astype(np.float32)
    np.testing.assert_allclose(make_session(model).run(None, {"x": x})[0], _reference(weights, x), rtol=1e-4, atol=1e-4)
    proto.graph.output[0].type.tensor_type.ClearField("shape")  # loading fills it in from inference
    onnx.save(proto, path)
    model, parse = optcc.ir.load_keeping_parse(path)
    assert parse is None
    np.testing.assert_allclose(make_session(model).run(None, {"x": x})[0], _reference(weights, x), rtol=1e-4, atol=1e-4)


def test_a_file_is_checked_from_the_bytes_read_before_they_are_parsed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checker gets the very bytes parsed (it does not read the file again), before
    they are parsed: its own parse is gone before optcc's is made. A file that the checker
    rejects is still refused, and one with a newer opset than onnx knows is refused with
    that reason first (the checker's verdict waits for the checks made before it)."""
    proto, weights = _model(np.random.default_rng(0))
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    check, parse = loading._check_structure, loading._parse_bytes
    seen: list[tuple[str, object]] = []

    def recording_check(source: object, label: str) -> None:
        seen.append(("check", source))
        check(source, label)

    def recording_parse(data: bytes, label: str) -> onnx.ModelProto:
        seen.append(("parse", data))
        return parse(data, label)

    monkeypatch.setattr(loading, "_check_structure", recording_check)
    monkeypatch.setattr(loading, "_parse_bytes", recording_parse)
    model = optcc.ir.load(path)
    assert seen == [("check", path.read_bytes()), ("parse", path.read_bytes())]
    x = np.random.default_rng(1).standard_normal((2, WIDTH)).astype(np.float32)
    np.testing.assert_allclose(make_session(model).run(None, {"x": x})[0], _reference(weights, x), rtol=1e-4, atol=1e-4)
    proto.graph.node[1].op_type = "NoSuchOp"
    onnx.save(proto, path)
    with pytest.raises(BadInputError, match="invalid ONNX model"):
        optcc.ir.load(path)
    proto.opset_import[0].version = onnx.defs.onnx_opset_version() + 1
    onnx.save(proto, path)
    with pytest.raises(BadInputError, match="newer than this onnx"):
        optcc.ir.load(path)


def test_a_file_with_external_data_changed_while_it_is_loaded_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checker reads a file with external data itself (it resolves the data files
    against the model's folder): it must be the file parsed."""
    proto, _ = _model(np.random.default_rng(0))
    path = tmp_path / "m.onnx"
    onnx.save(proto, path, save_as_external_data=True, location="m.data")
    check = loading._check_structure
    sources: list[object] = []

    def check_then_rewrite(source: object, label: str) -> None:
        check(source, label)
        sources.append(source)
        if source == str(path):  # the checker reads the file itself
            proto.graph.node[1].op_type = "Sub"
            onnx.save(proto, tmp_path / "other.onnx", save_as_external_data=True, location="m.data")
            os.replace(tmp_path / "other.onnx", path)  # another model in its place after the parse

    monkeypatch.setattr(loading, "_check_structure", check_then_rewrite)
    with pytest.raises(BadInputError, match="changed while it was being loaded"):
        optcc.ir.load(path)
    assert sources[-1] == str(path)


def test_large_in_memory_model_hands_its_weights_over(monkeypatch: pytest.MonkeyPatch) -> None:
    proto, weights = _model(np.random.default_rng(2))
    model = optcc.ir.load(proto)
    x = np.random.default_rng(3).standard_normal((2, WIDTH)).astype(np.float32)
    serialized = make_session(optcc.ir.serialize(model).SerializeToString()).run(None, {"x": x})[0]
    monkeypatch.setattr(session_module, "HANDOVER_MIN_BYTES", 1 << 20)
    session = make_session(model, options=session_options(arena=False))
    handed = {v.data_ptr() for v in session.optcc_weights[1].values()}  # (arrays, OrtValues by name)
    arrays = {name: model.graph.initializers[name].const_value.numpy() for name in ("W1", "W2")}
    assert handed == {a.ctypes.data for a in arrays.values()}
    got = session.run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, serialized)  # the kernels of a session of its bytes
    np.testing.assert_allclose(got, _reference(weights, x), rtol=1e-4, atol=1e-4)
    # with graph optimizations too: handed over, and the results of an optimized session of its bytes
    optimized = make_session(model, options=session_options(optimize=True))
    assert {v.data_ptr() for v in optimized.optcc_weights[1].values()} == {a.ctypes.data for a in arrays.values()}
    from_bytes = make_session(optcc.ir.serialize(model).SerializeToString(), options=session_options(optimize=True))
    np.testing.assert_array_equal(optimized.run(None, {"x": x})[0], from_bytes.run(None, {"x": x})[0])
    np.testing.assert_allclose(optimized.run(None, {"x": x})[0], _reference(weights, x), rtol=1e-4, atol=1e-4)
