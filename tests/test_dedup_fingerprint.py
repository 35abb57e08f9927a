"""deduplicate-initializers reads further only the tensors whose dtype, shape and
fingerprint (whole bytes when small, first and last bytes otherwise) another tensor
shares: tensors equal at both ends but different inside, small tensors that are equal as
numbers but not as bytes, and proto tensors without raw_data are still told apart or
merged exactly. Outputs are checked with onnx's reference evaluator against numpy."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.reference
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from optcc.passes.deduplicate_initializers import DeduplicateInitializersPass


def _model(inits: list[TensorProto], width: int) -> onnx.ModelProto:
    """``y_i = x + w_i`` for each initializer ``w_i`` (float, shape [width])."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, width])
    nodes = [helper.make_node("Add", ["x", init.name], [f"y{i}"]) for i, init in enumerate(inits)]
    outputs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [2, width]) for i in range(len(inits))]
    graph = helper.make_graph(nodes, "g", [x], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _dedup_and_check(proto: onnx.ModelProto, weights: list[np.ndarray]) -> list[str]:
    """Run the pass; check every output bit for bit against numpy; return the initializers left."""
    model = ir.from_proto(proto)
    DeduplicateInitializersPass()(model)
    result = ir.to_proto(model)
    x = np.random.default_rng(0).standard_normal((2, weights[0].size)).astype(np.float32)
    got = onnx.reference.ReferenceEvaluator(result).run(None, {"x": x})
    for out, w in zip(got, weights):
        np.testing.assert_array_equal(out.view(np.uint32), (x + w).view(np.uint32))
    assert not DeduplicateInitializersPass()(model).modified  # idempotent
    return sorted(init.name for init in result.graph.initializer)


def test_tensors_equal_at_both_ends_but_not_inside_stay_apart():
    """Equal first and last 32 bytes, one element apart in the middle: a fingerprint
    match that the digest and byte comparison must refuse; the equal copy merges."""
    base = np.random.default_rng(1).standard_normal(64).astype(np.float32)
    inside = base.copy()
    inside[32] += 1.0
    weights = [base, inside, base.copy()]
    names = _dedup_and_check(_model([numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)], 64), weights)
    assert names == ["w0", "w1"]


def test_small_tensors_are_keyed_by_their_bytes():
    """Small tensors equal as numbers but not as bytes (+0.0 and -0.0, two NaN payloads)
    stay apart; a byte-equal copy merges with the first."""
    nan_a = np.array([np.nan] * 4, np.float32)
    nan_b = nan_a.view(np.uint32) | np.uint32(1)
    weights = [np.zeros(4, np.float32), -np.zeros(4, np.float32), nan_a, nan_b.view(np.float32),
               np.zeros(4, np.float32)]
    proto = _model([numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)], 4)
    names = _dedup_and_check(proto, weights)
    assert names == ["w0", "w1", "w2", "w3"]


def test_proto_tensors_without_raw_data_are_compared_by_value_bytes():
    """Tensors stored as float_data (no raw_data), large and small: equal ones merge,
    the one differing inside stays."""
    base = np.random.default_rng(2).standard_normal(64).astype(np.float32)
    inside = base.copy()
    inside[20] = -inside[20]
    weights = [base, base.copy(), inside]
    inits = [helper.make_tensor(f"w{i}", TensorProto.FLOAT, [64], w.tolist()) for i, w in enumerate(weights)]
    assert not any(init.HasField("raw_data") for init in inits)
    assert _dedup_and_check(_model(inits, 64), weights) == ["w0", "w2"]
