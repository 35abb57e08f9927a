"""A weight or embedding table holding inf or NaN stays float in the dynamic and weight-only
INT8 passes; the rest is quantized. chython-rxnmap 2.0's rxnmap.onnx has a distance
embedding whose row 0 is -inf (it masks attention): ``--int8-dynamic`` quantized it, every
level became NaN (numpy's "invalid value encountered in divide" warnings on stderr), the
output was NaN in 4096 values and the whole request was declined."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
from onnx import TensorProto as TP

import optcc


def _masked_embedding_model() -> onnx.ModelProto:
    """ids -> Gather(table with a -inf row) -> Softmax (the -inf masks), and x -> MatMul(W)."""
    rng = np.random.default_rng(0)
    table = rng.normal(size=(6, 16)).astype(np.float32)
    table[0] = -np.inf
    w = rng.normal(size=(16, 16)).astype(np.float32) * 0.2
    nodes = [oh.make_node("Gather", ["table", "ids"], ["bias"]),
             oh.make_node("MatMul", ["x", "W"], ["h"]),
             oh.make_node("Add", ["h", "bias"], ["scores"]),
             oh.make_node("Softmax", ["scores"], ["y"], axis=-1)]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TP.FLOAT, [8, 16]),
                                        oh.make_tensor_value_info("ids", TP.INT64, [8])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, [8, 16])],
                          [nh.from_array(table, "table"), nh.from_array(w, "W")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _samples() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.normal(size=(8, 16)).astype(np.float32), "ids": rng.integers(0, 6, 8).astype(np.int64)}
            for _ in range(4)]


def test_int8_dynamic_keeps_a_table_with_inf_float() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "invalid value encountered"
        result = optcc.optimize(_masked_embedding_model(), int8_dynamic=True, inputs=_samples())
    assert not result.declined_precision, result.declined_precision
    ops = [n.op_type for n in result.model.graph.node]
    assert "MatMulInteger" in ops and "Gather" in ops
    stats = next(p.stats for p in result.report.passes if p.name == "quantize-dynamic")
    assert stats["kept_float"].get("embedding table holds inf or NaN") == 1, stats


def test_weight_only_int4_keeps_a_table_with_inf_float(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        result = optcc.optimize(_masked_embedding_model(), weight_only={"bits": 4, "embeddings": True},
                                inputs=_samples(), allow_float_fallback=True)
    stats = next(p.stats for p in result.report.passes if p.name == "quantize-weights")
    assert stats["kept_float"].get("embedding table holds inf or NaN") == 1, stats
    tables = [i for i in result.model.graph.initializer if i.name == "table"]
    assert tables and np.isneginf(nh.to_array(tables[0])[0]).all()
