"""Shared checks for exact (bit-exact) passes: invariants, onnx's full checker, numerics
against onnxruntime on the original (optcc.numerics.verify and bit for bit), and idempotence."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

import optcc
from optcc.infra.invariants import check_invariants, signature
from optcc.numerics import generate_inputs


def ort_outputs(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The model's outputs on onnxruntime CPU with every graph optimization disabled."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, feeds)


def run_exact_pass(
    pass_type: type, model: ir.Model, feeds: dict[str, np.ndarray] | None = None
) -> optcc.PassResult:
    """Run ``pass_type()`` on ``model`` and assert everything an exact pass promises."""
    original = model.clone()
    result = pass_type()(model)
    assert check_invariants(result.model, signature(original)) == []
    onnx.checker.check_model(ir.to_proto(result.model), full_check=True)
    feeds = feeds if feeds is not None else generate_inputs(original, seed=0)[0]
    verification = optcc.numerics.verify(original, result.model, inputs=feeds)
    assert verification.passed, verification.describe()
    for ref, got in zip(ort_outputs(original, feeds), ort_outputs(result.model, feeds)):
        assert ref.dtype == got.dtype and ref.shape == got.shape
        assert ref.tobytes() == got.tobytes(), "exact pass must be bit-exact"
    assert not pass_type()(result.model).modified, "second run must be a no-op"
    return result
