"""Converting the opset (``--target-opset``, and the upgrade the weight-only pass needs for
block-wise DequantizeLinear) keeps the graph's declared input and output shapes. onnx's
version converter runs shape inference, which names an unknown output dim ``unk__1``;
the invariant check then saw the interface change and reverted the pass. Found on a
skl2onnx 1.20 MLPClassifier export (``label`` declared ``[?]``): ``--weights int8`` was
declined ("reverted (broke an invariant: graph outputs changed ... ('unk__1',))") and
``--target-opset 21`` was reverted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
from onnx import TensorProto as TP

import optcc
from optcc import cli


def _classifier() -> onnx.ModelProto:
    """MatMul -> ArgMax: the label output's one dim is declared, but unknown (no name, no value)."""
    w = np.random.default_rng(0).normal(size=(30, 64)).astype(np.float32)
    graph = oh.make_graph([oh.make_node("MatMul", ["X", "W"], ["scores"]),
                           oh.make_node("ArgMax", ["scores"], ["label"], axis=1, keepdims=0)], "clf",
                          [oh.make_tensor_value_info("X", TP.FLOAT, [None, 30])],
                          [oh.make_tensor_value_info("label", TP.INT64, [None]),
                           oh.make_tensor_value_info("scores", TP.FLOAT, [None, 64])], [nh.from_array(w, "W")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _interface(proto: onnx.ModelProto) -> list:
    return [(v.name, [(d.dim_value, d.dim_param) for d in v.type.tensor_type.shape.dim])
            for v in (*proto.graph.input, *proto.graph.output)]


def test_convert_opset_keeps_declared_unknown_dims() -> None:
    proto = _classifier()
    model = optcc.ir.load(proto)
    optcc.ir.convert_opset(model, 21)
    converted = optcc.ir.serialize(model)
    assert optcc.ir.default_opset(model) == 21
    assert _interface(converted) == _interface(proto)


def test_target_opset_and_weights_int8_are_not_reverted(tmp_path: Path, capsys) -> None:
    path = tmp_path / "clf.onnx"
    onnx.save(_classifier(), path)
    assert cli.main([str(path), "--target-opset", "21", "-o", str(tmp_path / "o21.onnx")]) == 0
    err = capsys.readouterr().err
    assert "reverted upgrade-opset" not in err and "not upgraded" not in err, err
    out = onnx.load(tmp_path / "o21.onnx")
    assert [o.version for o in out.opset_import if o.domain in ("", "ai.onnx")] == [21]
    # the weight-only pass upgrades to opset 21 for block-wise DequantizeLinear: judged by
    # the numerics now (a random classifier's label may flip), never by the interface
    cli.main([str(path), "--weights", "int8", "-o", str(tmp_path / "w8.onnx"), "--allow-float-fallback"])
    err = capsys.readouterr().err
    assert "broke an invariant" not in err and "unk__" not in err, err
