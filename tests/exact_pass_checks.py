"""Shared checks for exact (bit-exact) passes: invariants, onnx's full checker, numerics
against independent references (onnx's reference evaluator within the exact tolerance,
and onnxruntime on the original bit for bit), and idempotence. optcc's verifier is not
consulted: it is code under test."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

import optcc
from optcc.infra.invariants import check_invariants, signature
from optcc.numerics import generate_inputs
from reference import EXACT_RTOL, assert_close, expected_outputs, onnxruntime_outputs

__all__ = ["ort_outputs", "run_exact_pass"]

ort_outputs = onnxruntime_outputs  # the name the exact-pass tests import


def run_exact_pass(
    pass_type: type,
    model: ir.Model,
    feeds: dict[str, np.ndarray] | None = None,
    *,
    evaluator: bool = True,
) -> optcc.PassResult:
    """Run ``pass_type()`` on ``model`` and assert everything an exact pass promises.

    ``evaluator=False`` for a model onnx's reference evaluator cannot run or computes
    differently from onnxruntime (legacy ops): then onnxruntime on the original is the only
    reference (still bit for bit)."""
    original = model.clone()
    result = pass_type()(model)
    assert check_invariants(result.model, signature(original)) == []
    onnx.checker.check_model(ir.to_proto(result.model), full_check=True)
    feeds = feeds if feeds is not None else generate_inputs(original, seed=0)[0]
    got = ort_outputs(result.model, feeds)
    if evaluator:
        assert_close(got, expected_outputs(original, feeds), EXACT_RTOL,
                     what=f"{pass_type.__name__} vs onnx reference evaluator")
    for ref, out in zip(ort_outputs(original, feeds), got):
        assert ref.dtype == out.dtype and ref.shape == out.shape
        assert ref.tobytes() == out.tobytes(), "exact pass must be bit-exact"
    assert not pass_type()(result.model).modified, "second run must be a no-op"
    return result
