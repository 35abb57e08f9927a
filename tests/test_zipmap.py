"""Classifiers that end in ZipMap (skl2onnx's and onnxmltools' default export): the part
before the ZipMaps is optimized and verified, the ZipMaps are put back unchanged, and the
written model runs in onnxruntime with the original's map outputs. References: the original
model run by onnxruntime, and numpy for the linear classifier."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import optcc
from optcc import cli
from optcc.errors import PrecisionNotAppliedError

ML = "ai.onnx.ml"
RNG = np.random.default_rng(0)
FEATURES = 4
W = RNG.standard_normal((3, FEATURES)).astype(np.float32)
B = RNG.standard_normal(3).astype(np.float32)


def _maps(key: int) -> onnx.TypeProto:
    return helper.make_sequence_type_proto(
        helper.make_map_type_proto(key, helper.make_tensor_type_proto(TensorProto.FLOAT, [])))


def _model(nodes: list[onnx.NodeProto], outputs: list[onnx.ValueInfoProto],
           initializers: tuple[onnx.TensorProto, ...] = ()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "classifier", [helper.make_tensor_value_info("X", TensorProto.FLOAT,
                                                                                  [None, FEATURES])], outputs,
                              list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(ML, 1)])
    onnx.checker.check_model(model, full_check=True)
    return model


def linear_classifier() -> onnx.ModelProto:
    """skl2onnx's LogisticRegression: the label cast after an Identity, the probabilities zipped."""
    return _model([
        helper.make_node("LinearClassifier", ["X"], ["label0", "probs0"], domain=ML, classlabels_ints=[0, 1, 2],
                         coefficients=W.ravel().tolist(), intercepts=B.tolist(), post_transform="SOFTMAX",
                         multi_class=1),
        helper.make_node("Identity", ["label0"], ["label1"]),
        helper.make_node("Cast", ["label1"], ["label"], to=TensorProto.INT64),
        helper.make_node("Identity", ["probs0"], ["probabilities_tensor"]),
        helper.make_node("ZipMap", ["probabilities_tensor"], ["probabilities"], domain=ML,
                         classlabels_int64s=[0, 1, 2]),
    ], [helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
        helper.make_value_info("probabilities", _maps(TensorProto.INT64))])


def tree_classifier() -> onnx.ModelProto:
    """Two stumps voting for 'yes' over 'no' (string labels), the ZipMap's output listed first."""
    trees = helper.make_node(
        "TreeEnsembleClassifier", ["X"], ["label", "probs"], domain=ML, classlabels_strings=["no", "yes"],
        nodes_treeids=[0, 0, 0, 1, 1, 1], nodes_nodeids=[0, 1, 2, 0, 1, 2], nodes_featureids=[0, 0, 0, 2, 0, 0],
        nodes_modes=["BRANCH_LEQ", "LEAF", "LEAF"] * 2, nodes_values=[0.1, 0, 0, -0.3, 0, 0],
        nodes_truenodeids=[1, 0, 0, 1, 0, 0], nodes_falsenodeids=[2, 0, 0, 2, 0, 0], nodes_hitrates=[1.0] * 6,
        nodes_missing_value_tracks_true=[0] * 6, class_treeids=[0, 0, 1, 1], class_nodeids=[1, 2, 1, 2],
        class_ids=[1, 1, 1, 1], class_weights=[0.3, -0.2, 0.5, -0.4], post_transform="LOGISTIC")
    zipmap = helper.make_node("ZipMap", ["probs"], ["probabilities"], domain=ML, classlabels_strings=["no", "yes"])
    return _model([trees, zipmap], [helper.make_value_info("probabilities", _maps(TensorProto.STRING)),
                                    helper.make_tensor_value_info("label", TensorProto.STRING, [None])])


def matmul_classifier() -> onnx.ModelProto:
    """Standard ops (MatMul, Add, Softmax) before the ZipMap: what --fp16 can convert."""
    weights = helper.make_tensor("W", TensorProto.FLOAT, [FEATURES, 3], W.T.ravel().tolist())
    bias = helper.make_tensor("B", TensorProto.FLOAT, [3], B.tolist())
    return _model([
        helper.make_node("MatMul", ["X", "W"], ["logits0"]),
        helper.make_node("Add", ["logits0", "B"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
        helper.make_node("ZipMap", ["probs"], ["probabilities"], domain=ML, classlabels_int64s=[0, 1, 2]),
    ], [helper.make_value_info("probabilities", _maps(TensorProto.INT64))], (weights, bias))


def _samples(count: int = 16) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((count, FEATURES)).astype(np.float32)


def _run(model: onnx.ModelProto | Path) -> dict[str, object]:
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, {"X": _samples()})))


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _as_array(maps: object, keys: list) -> np.ndarray:
    return np.array([[row[key] for key in keys] for row in maps], dtype=np.float64)


@pytest.mark.parametrize("level", [1, 2, 3])
def test_linear_classifier_keeps_its_zipmap(tmp_path: Path, level: int) -> None:
    path = tmp_path / "linear.onnx"
    onnx.save(linear_classifier(), path)
    out = tmp_path / "linear.opt.onnx"
    optcc.optimize(path, level=level).save(out)
    written = onnx.load(out)
    onnx.checker.check_model(written, full_check=True)
    ops = [node.op_type for node in written.graph.node]
    assert "Identity" not in ops and ops[-1] == "ZipMap"  # optimized before, the ZipMap put back after
    assert [o.name for o in written.graph.output] == ["label", "probabilities"]
    assert written.graph.output[1] == linear_classifier().graph.output[1]
    got, original = _run(out), _run(path)
    assert got["probabilities"] == original["probabilities"]  # the same maps, keys and values
    np.testing.assert_array_equal(got["label"], original["label"])
    expected = _softmax(_samples().astype(np.float64) @ W.T.astype(np.float64) + B)
    np.testing.assert_allclose(_as_array(got["probabilities"], [0, 1, 2]), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got["label"], expected.argmax(axis=1))


def test_tree_classifier_through_the_cli(tmp_path: Path) -> None:
    path = tmp_path / "trees.onnx"
    onnx.save(tree_classifier(), path)
    out = tmp_path / "trees.opt.onnx"
    assert cli.main([str(path), "-O3", "-o", str(out), "--quiet"]) == 0
    written = onnx.load(out)
    onnx.checker.check_model(written, full_check=True)
    assert [o.name for o in written.graph.output] == ["probabilities", "label"]  # the original's order
    assert written.graph.node[-1] == tree_classifier().graph.node[-1]  # the ZipMap, unchanged
    got, original = _run(out), _run(path)
    assert got["probabilities"] == original["probabilities"]
    assert got["label"].tolist() == original["label"].tolist()
    assert {"no", "yes"} == set(got["label"].tolist())  # both classes occur: the samples tell the trees apart


def test_model_given_as_proto_is_not_modified() -> None:
    given = linear_classifier()
    before = given.SerializeToString()
    result = optcc.optimize(given)
    assert given.SerializeToString() == before
    assert result.model.graph.node[-1].op_type == "ZipMap"
    assert _run(result.model)["probabilities"] == _run(given)["probabilities"]


def test_fp16_keeps_what_zipmap_reads_float32(tmp_path: Path) -> None:
    """--fp16 with float16 graph inputs and outputs: the tensor a ZipMap reads stays float32
    (ZipMap reads no other type), the layers before it are float16."""
    path = tmp_path / "matmul.onnx"
    onnx.save(matmul_classifier(), path)
    out = tmp_path / "matmul.fp16.onnx"
    optcc.optimize(path, fp16=True, fp16_keep_io=False).save(out)
    written = onnx.load(out)
    onnx.checker.check_model(written, full_check=True)
    assert written.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert any(t.data_type == TensorProto.FLOAT16 for t in written.graph.initializer)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    maps = session.run(None, {"X": _samples().astype(np.float16)})[0]
    expected = _softmax(_samples().astype(np.float64) @ W.T.astype(np.float64) + B)
    np.testing.assert_allclose(_as_array(maps, [0, 1, 2]), expected, atol=5e-3)


@pytest.mark.parametrize("option", ["fp16", "int8"])
def test_ml_ops_decline_reduced_precision(tmp_path: Path, option: str) -> None:
    """The ai.onnx.ml classifiers have no float16 or int8 kernels: the precision is declined
    with the reason, and the float32 result (written with fallback allowed) keeps its ZipMap."""
    path = tmp_path / "linear.onnx"
    onnx.save(linear_classifier(), path)
    precision = {"fp16": True} if option == "fp16" else {"int8_calibration": [{"X": row[None]} for row in _samples()]}
    with pytest.raises(PrecisionNotAppliedError):
        optcc.optimize(path, **precision)
    result = optcc.optimize(path, allow_float_fallback=True, **precision)
    assert result.declined_precision.keys() == {option}
    out = tmp_path / "linear.opt.onnx"
    result.save(out)
    assert _run(out)["probabilities"] == _run(path)["probabilities"]


def test_a_map_input_beside_a_zipmap_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A map the trailing ZipMap does not account for (a DictVectorizer's map input) keeps the
    refusal (exit 2) that names it; nothing is written."""
    maps_in = helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, []))
    nodes = [helper.make_node("DictVectorizer", ["features"], ["X"], domain=ML, int64_vocabulary=[0, 1, 2, 3]),
             *linear_classifier().graph.node]
    graph = helper.make_graph(nodes, "vectorized", [helper.make_value_info("features", maps_in)],
                              list(linear_classifier().graph.output))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(ML, 1)])
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / "vectorized.onnx"
    onnx.save(model, path)
    out = tmp_path / "out.onnx"
    assert cli.main([str(path), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "'features' holds maps" in err and str(path) in err
    assert not out.exists()


def test_compare_judges_zipmap_models_through_the_tensors_their_zipmaps_read(tmp_path: Path, capsys) -> None:
    """``optcc compare`` of a classifier and its optimized result compares the probabilities the
    ZipMaps read (the ZipMaps themselves must be the same); a B whose ZipMap names other
    classes is refused, and a B whose probabilities moved fails (numpy: the reference)."""
    from optcc.compare import compare_models

    path, out = tmp_path / "linear.onnx", tmp_path / "linear.opt.onnx"
    onnx.save(linear_classifier(), path)
    optcc.optimize(path).save(out)
    result = compare_models(str(path), str(out))
    assert result.passed and {m.name for m in result.outputs} == {"label", "probabilities_tensor"}
    assert any("ZipMap outputs compared through the tensors they read ('probabilities_tensor')" in note
               for note in result.notes)
    assert cli.main(["compare", str(path), str(out)]) == 0
    assert "probabilities_tensor" in capsys.readouterr().out
    relabelled = linear_classifier()
    relabelled.graph.node[-1].attribute[0].ints[:] = [0, 1, 5]
    other = tmp_path / "relabelled.onnx"
    onnx.save(relabelled, other)
    with pytest.raises(optcc.BadInputError, match="the ZipMap outputs differ"):
        compare_models(str(path), str(other))
    moved = linear_classifier()  # the intercepts moved: probabilities numpy says differ
    shift = np.array([0.5, 0.0, -0.5])
    next(a for a in moved.graph.node[0].attribute if a.name == "intercepts").floats[:] = (B + shift).tolist()
    x = _samples().astype(np.float64)
    assert not np.allclose(_softmax(x @ W.T + B + shift), _softmax(x @ W.T + B), rtol=1e-3)
    far = tmp_path / "moved.onnx"
    onnx.save(moved, far)
    assert not compare_models(str(path), str(far)).passed


def test_inspect_describes_a_zipmap_classifier_from_its_file(tmp_path: Path, capsys) -> None:
    """``optcc inspect`` of a classifier that ends in ZipMap: its outputs as the file declares
    them (the maps typed, in order) and every node counted, the ZipMap's too (the
    reference: the file's own graph)."""
    from optcc.inspect import inspect_model

    path = tmp_path / "linear.onnx"
    model = linear_classifier()
    onnx.save(model, path)
    info = inspect_model(str(path))
    assert [v["name"] for v in info["outputs"]] == [o.name for o in model.graph.output]
    assert info["outputs"][1]["dtype"] == "seq(map(int64,float))"
    assert info["nodes"] == len(model.graph.node)
    counted = {(n.domain + "::" if n.domain else "") + n.op_type for n in model.graph.node}
    assert set(info["op_histogram"]) == counted
    assert cli.main(["inspect", str(path)]) == 0
    assert "probabilities  seq(map(int64,float))" in capsys.readouterr().out


def test_verify_judges_a_zipmap_classifier_through_the_tensors_its_zipmaps_read(tmp_path: Path) -> None:
    """``optcc.verify`` of a classifier's optimized result passes; a relabelled ZipMap is
    refused; moved probabilities fail (numpy's softmax differs: the reference)."""
    path, out = tmp_path / "linear.onnx", tmp_path / "linear.opt.onnx"
    onnx.save(linear_classifier(), path)
    optcc.optimize(path).save(out)
    assert optcc.verify(str(path), str(out)).status == "passed"
    assert optcc.verify(linear_classifier(), str(out)).status == "passed"
    relabelled = linear_classifier()
    relabelled.graph.node[-1].attribute[0].ints[:] = [0, 1, 5]
    with pytest.raises(optcc.BadInputError, match="the ZipMap outputs differ"):
        optcc.verify(str(path), relabelled)
    moved = linear_classifier()
    shift = np.array([0.5, 0.0, -0.5])
    next(a for a in moved.graph.node[0].attribute if a.name == "intercepts").floats[:] = (B + shift).tolist()
    x = _samples().astype(np.float64)
    assert not np.allclose(_softmax(x @ W.T + B + shift), _softmax(x @ W.T + B), rtol=1e-3)
    assert optcc.verify(str(path), moved).status == "failed"
