"""Large list attributes of ai.onnx.ml nodes are held packed (their serialized bytes), not
as Python objects: the model is optimized and verified as before, and written with the
very attributes it was read with. References: the input model's own NodeProto, and the
input model run by onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper

import optcc
from optcc import ir as oir
from optcc.ir.packed_attributes import PACKED_MIN_ELEMENTS, PackedAttr

FEATURES = 8


def stumps(trees: int) -> onnx.ModelProto:
    """A regressor of ``trees`` stumps (3 nodes each), each splitting one feature at its own
    threshold, followed by an Identity the optimizer removes."""
    rng = np.random.default_rng(0)
    thresholds = rng.standard_normal(trees).astype(np.float32)
    leaves = rng.standard_normal((trees, 2)).astype(np.float32)
    node = helper.make_node(
        "TreeEnsembleRegressor", ["X"], ["scores"], domain="ai.onnx.ml", n_targets=1,
        nodes_treeids=np.repeat(np.arange(trees), 3).tolist(), nodes_nodeids=[0, 1, 2] * trees,
        nodes_featureids=np.repeat(np.arange(trees) % FEATURES, 3).tolist(),
        nodes_modes=["BRANCH_LEQ", "LEAF", "LEAF"] * trees,
        nodes_values=np.stack([thresholds, np.zeros(trees), np.zeros(trees)], axis=1).ravel().tolist(),
        nodes_truenodeids=[1, 0, 0] * trees, nodes_falsenodeids=[2, 0, 0] * trees,
        target_treeids=np.repeat(np.arange(trees), 2).tolist(), target_nodeids=[1, 2] * trees,
        target_ids=[0] * (2 * trees), target_weights=leaves.ravel().tolist())
    graph = helper.make_graph([node, helper.make_node("Identity", ["scores"], ["Y"])], "stumps",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, FEATURES])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("ai.onnx.ml", 1)])
    onnx.checker.check_model(model)
    return model


def _run(model: Path | onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, {"X": x})[0]


def test_large_tree_attributes_are_packed_and_written_as_read(tmp_path: Path) -> None:
    trees = PACKED_MIN_ELEMENTS // 2 + 1  # every list over the threshold: target_* (2 a tree), nodes_* (3)
    model = stumps(trees)
    path = tmp_path / "stumps.onnx"
    onnx.save(model, path)
    loaded = oir.load(path)
    ensemble = next(node for node in loaded.graph if node.op_type == "TreeEnsembleRegressor")
    packed = {name for name, attr in ensemble.attributes.items() if isinstance(attr, PackedAttr)}
    assert packed == {attr.name for attr in model.graph.node[0].attribute if attr.name != "n_targets"}
    for attr in model.graph.node[0].attribute:  # each reads back as onnx reads it
        if attr.name in packed:
            expected = helper.get_attribute_value(attr)
            if attr.type == onnx.AttributeProto.STRINGS:
                expected = [s.decode() for s in expected]
            assert list(ensemble.attributes[attr.name].value) == list(expected)

    out = tmp_path / "stumps.opt.onnx"
    optcc.optimize(path).save(out)
    written = onnx.load(out)
    assert [node.op_type for node in written.graph.node] == ["TreeEnsembleRegressor"]
    assert list(written.graph.node[0].attribute) == list(model.graph.node[0].attribute)  # as the input held them
    assert list(written.graph.node[0].output) == ["Y"]  # the Identity removed: the ensemble writes the output
    x = np.random.default_rng(1).standard_normal((64, FEATURES)).astype(np.float32)
    np.testing.assert_array_equal(_run(out, x), _run(path, x))


def test_loading_a_proto_leaves_it_as_it_was(monkeypatch) -> None:
    monkeypatch.setattr("optcc.ir.packed_attributes.PACKED_MIN_ELEMENTS", 4)
    model = stumps(8)
    before = model.SerializeToString()
    loaded = oir.load(model)
    assert any(isinstance(attr, PackedAttr) for node in loaded.graph for attr in node.attributes.values())
    assert model.SerializeToString() == before
    result = optcc.optimize(model)
    x = np.random.default_rng(2).standard_normal((16, FEATURES)).astype(np.float32)
    np.testing.assert_array_equal(_run(result.model, x), _run(model, x))
    assert model.SerializeToString() == before


def test_small_attributes_stay_python_objects() -> None:
    loaded = oir.load(stumps(8))
    assert not any(isinstance(attr, PackedAttr) for node in loaded.graph for attr in node.attributes.values())


def test_a_parse_that_lost_its_packed_lists_is_not_kept_for_the_proof(tmp_path: Path) -> None:
    """Packing empties the lists of the loader's own parse: that parse is then no longer the
    file's, so it is not handed on (the verifier's numbering of the original would read a
    tree ensemble without its trees); a file with nothing packed keeps its parse."""
    path = tmp_path / "stumps.onnx"
    onnx.save(stumps(PACKED_MIN_ELEMENTS // 2 + 1), path)
    _, parse = oir.load_keeping_parse(path)
    assert parse is None
    small = tmp_path / "small.onnx"
    onnx.save(stumps(4), small)
    _, parse = oir.load_keeping_parse(small)
    assert parse is not None and parse.SerializeToString() == onnx.load(small).SerializeToString()
    out = tmp_path / "o.onnx"
    optcc.optimize(str(path), level=2).save(out)
    x = np.random.default_rng(1).standard_normal((64, FEATURES)).astype(np.float32)
    np.testing.assert_array_equal(_run(out, x), _run(path, x))


def test_a_packed_attribute_renamed_is_written_as_renamed(tmp_path: Path) -> None:
    """A packed attribute given another name or a doc string is no longer its packed bytes:
    the model's writer writes what onnx-ir's own serializer writes for it (the reference)."""
    path = tmp_path / "stumps.onnx"
    onnx.save(stumps(PACKED_MIN_ELEMENTS // 2 + 1), path)
    loaded = oir.load(path)
    ensemble = next(node for node in loaded.graph if node.op_type == "TreeEnsembleRegressor")
    packed = ensemble.attributes["target_weights"]
    assert isinstance(packed, PackedAttr) and packed.as_packed
    packed.name = "weights"
    assert not packed.as_packed
    packed.name, packed.doc_string = "target_weights", "a note"
    assert not packed.as_packed
    written = onnx.ModelProto.FromString(oir.serialize(loaded).SerializeToString())
    want = ir.serde.serialize_attribute(packed)
    got = next(a for a in written.graph.node[0].attribute if a.name == "target_weights")
    assert got.doc_string == "a note" and got == want
