"""FuseOrtEmbedLayerNormPass (opt-in): BERT embeddings (word + position + token-type Gathers,
Add, LayerNormalization) -> com.microsoft EmbedLayerNormalization, on graphs written the
way torch's TorchScript and dynamo exporters write them; the fused model on onnxruntime
against a float64 NumPy reference, and the matches it must refuse."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import optcc
from optcc.infra.levels import level_of
from optcc.passes.fuse_ort_embed_layernorm import FuseOrtEmbedLayerNormPass

V, P, T, H = 40, 16, 2, 8


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"word": rng.standard_normal((V, H)).astype(np.float32),
            "pos": rng.standard_normal((P, H)).astype(np.float32),
            "type": rng.standard_normal((T, H)).astype(np.float32),
            "gamma": (1 + 0.1 * rng.standard_normal(H)).astype(np.float32),
            "beta": (0.1 * rng.standard_normal(H)).astype(np.float32)}


def embeddings(style: str = "torchscript", segment: bool = True, positions: np.ndarray | None = None,
               order: str = "wtp", sum_output: bool = False, segment_dims: tuple = ("b", "s"),
               ln_axis: int = -1, end_from: str = "input_ids", gamma_input: bool = False,
               beta: bool = True, opset: int = 17) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """input_ids [b, s] (+ token_type_ids) -> LayerNormalization(sum of the embedding rows)."""
    w = _weights()
    table = np.arange(P, dtype=np.int64)[None] if positions is None else positions
    inits = [numpy_helper.from_array(w[n], n) for n in ("word", "pos", "type", "beta")]
    inits += [numpy_helper.from_array(table, "pos_buffer"),
              numpy_helper.from_array(np.array([0], np.int64), "zero1"),
              numpy_helper.from_array(np.array([1], np.int64), "one1"),
              numpy_helper.from_array(np.array(1, np.int64), "one")]
    if not gamma_input:
        inits.append(numpy_helper.from_array(w["gamma"], "gamma"))
    nodes = []
    if style == "torchscript":  # Unsqueeze(Gather(Shape(ids), 1))
        nodes += [helper.make_node("Shape", [end_from], ["shape"]),
                  helper.make_node("Gather", ["shape", "one"], ["len"], axis=0),
                  helper.make_node("Unsqueeze", ["len", "zero1"], ["end"])]
    else:  # dynamo: Shape(ids, start=1, end=2)
        nodes.append(helper.make_node("Shape", [end_from], ["end"], start=1, end=2))
    nodes += [helper.make_node("Slice", ["pos_buffer", "zero1", "end", "one1", "one1"], ["position_ids"]),
              helper.make_node("Gather", ["word", "input_ids"], ["w_rows"]),
              helper.make_node("Gather", ["pos", "position_ids"], ["p_rows"])]
    rows = {"w": "w_rows", "p": "p_rows"}
    if segment:
        nodes.append(helper.make_node("Gather", ["type", "token_type_ids"], ["t_rows"]))
        rows["t"] = "t_rows"
    parts = [rows[c] for c in order if c in rows]
    nodes.append(helper.make_node("Add", parts[:2], ["partial"]))
    total = "partial"
    if len(parts) == 3:
        nodes.append(helper.make_node("Add", [parts[2], "partial"], ["total"]))
        total = "total"
    nodes.append(helper.make_node("LayerNormalization", [total, "gamma", "beta" if beta else ""], ["y"], axis=ln_axis,
                                  epsilon=1e-12))
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])]
    if segment:
        inputs.append(helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, list(segment_dims)))
    if end_from == "n":
        inputs.append(helper.make_tensor_value_info("n", TensorProto.INT64, ["b", "s"]))
    if gamma_input:
        inputs.append(helper.make_tensor_value_info("gamma", TensorProto.FLOAT, [H]))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", H])]
    if sum_output:
        outputs.append(helper.make_tensor_value_info(total, TensorProto.FLOAT, ["b", "s", H]))
    graph = helper.make_graph(nodes, "embeddings", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    onnx.checker.check_model(model)
    return model, w


def _feeds(batch: int = 3, seq: int = 7, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(0, V, (batch, seq)), "token_type_ids": rng.integers(0, T, (batch, seq))}


def _reference(w: dict[str, np.ndarray], feeds: dict[str, np.ndarray], segment: bool = True) -> np.ndarray:
    w = {k: v.astype(np.float64) for k, v in w.items()}
    seq = feeds["input_ids"].shape[1]
    e = w["word"][feeds["input_ids"]] + w["pos"][np.arange(seq)][None]
    if segment:
        e = e + w["type"][feeds["token_type_ids"]]
    mu = e.mean(-1, keepdims=True)
    var = ((e - mu) ** 2).mean(-1, keepdims=True)
    return (e - mu) / np.sqrt(var + 1e-12) * w["gamma"] + w["beta"]


def _run(model: ir.Model | onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    names = {i.name for i in proto.graph.input}
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {k: v for k, v in feeds.items() if k in names})


def _close(got: np.ndarray, ref: np.ndarray) -> None:
    assert np.abs(got.astype(np.float64) - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def _ops(model: ir.Model) -> dict[str, int]:
    return optcc.ir.op_histogram(model)


@pytest.mark.parametrize("style", ["torchscript", "dynamo"])
@pytest.mark.parametrize("order", ["wtp", "wpt", "ptw"])
def test_bert_embeddings_fuse(style: str, order: str) -> None:
    proto, w = embeddings(style, order=order)
    result = FuseOrtEmbedLayerNormPass()(ir.from_proto(proto))
    assert result.stats["applied"] == {"embed-layernorm": 1}
    hist = _ops(result.model)
    assert hist.get("com.microsoft::EmbedLayerNormalization") == 1
    assert "LayerNormalization" not in hist and hist.get("Gather", 0) <= 1  # only a Shape's Gather
    assert result.model.opset_imports["com.microsoft"] == 1
    onnx.checker.check_model(ir.to_proto(result.model))
    assert not FuseOrtEmbedLayerNormPass()(result.model).modified
    feeds = _feeds()
    _close(_run(result.model, feeds)[0], _reference(w, feeds))
    _close(_run(proto, feeds)[0], _reference(w, feeds))  # the reference is the graph's


def test_without_token_types() -> None:
    proto, w = embeddings("dynamo", segment=False)
    result = FuseOrtEmbedLayerNormPass()(ir.from_proto(proto))
    assert result.stats["applied"] == {"embed-layernorm-no-segment": 1}
    feeds = _feeds(batch=2, seq=P)  # the whole position table
    _close(_run(result.model, feeds)[0], _reference(w, feeds, segment=False))


def test_without_beta() -> None:
    proto, w = embeddings(beta=False)
    result = FuseOrtEmbedLayerNormPass()(ir.from_proto(proto))
    assert result.stats["applied"] == {"embed-layernorm": 1}
    feeds = _feeds()
    _close(_run(result.model, feeds)[0], _reference({**w, "beta": np.zeros(H, np.float32)}, feeds))


def test_opt_in_named_after_o3() -> None:
    assert level_of("fuse-ort-embed-layernorm") is None
    proto, w = embeddings()
    feeds = _feeds(seq=5)
    o3 = optcc.optimize(proto, level=3, inputs=feeds).model  # verified on valid ids
    assert "EmbedLayerNormalization" not in str(optcc.ir.op_histogram(optcc.ir.load(o3)))
    named = optcc.optimize(o3, passes=["fuse-ort-embed-layernorm", "eliminate-dead-nodes"], inputs=feeds).model
    ops = optcc.ir.op_histogram(optcc.ir.load(named))
    assert ops.get("com.microsoft::EmbedLayerNormalization") == 1
    assert "Slice" not in ops  # the position-id computation went with the Gather
    _close(_run(named, feeds)[0], _reference(w, feeds))


@pytest.mark.parametrize("case, reason", [
    ({"positions": np.arange(2, P + 2, dtype=np.int64)[None]}, "position ids not proved to be 0..S-1"),
    ({"end_from": "n"}, "position ids not proved to be 0..S-1"),
    ({"segment_dims": ("b", "t")}, "segment ids not declared with the input ids' shape"),
    ({"ln_axis": 1}, "LayerNormalization not over the last axis"),
    ({"sum_output": True}, "intermediate 'total' is a graph output"),
])
def test_refused(case: dict, reason: str) -> None:
    proto, _ = embeddings(**case)
    result = FuseOrtEmbedLayerNormPass()(ir.from_proto(proto))
    assert not result.modified
    rejected = result.stats["rejected"]["embed-layernorm"]
    assert reason in rejected, rejected


def test_gamma_not_constant_is_not_matched() -> None:
    proto, w = embeddings(gamma_input=True)
    result = FuseOrtEmbedLayerNormPass()(ir.from_proto(proto))
    assert not result.modified
    feeds = {**_feeds(), "gamma": w["gamma"]}
    _close(_run(result.model, feeds)[0], _reference(w, feeds))
