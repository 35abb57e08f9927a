"""The equivalence prover keys a graph input with an initializer default (IR >= 4: a
default a caller may replace) as an input, by its name, never by its default's bytes: a
candidate that reads a copy of the default instead computes something else once the
input is fed (onnx's reference evaluator shows it), so none of its outputs is proved.
Below IR 4 such an input is a constant (onnxruntime reads it so) and the copy is proved."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as nh
import onnx_ir as ir
from onnx import TensorProto as TP
from onnx.reference import ReferenceEvaluator

from optcc.numerics.equivalence import number_original, prove_equivalent

DEFAULT = np.linspace(-1.0, 1.0, 6).astype(np.float32)


def _model(read: str, ir_version: int) -> onnx.ModelProto:
    """``y = Relu(x + read)``, ``A`` a graph input with ``DEFAULT`` as its initializer and
    ``A_copy`` (when read) an initializer of the same bytes."""
    inits = [nh.from_array(DEFAULT, "A")] + ([nh.from_array(DEFAULT, "A_copy")] if read == "A_copy" else [])
    graph = oh.make_graph([oh.make_node("Add", ["x", read], ["s"]), oh.make_node("Relu", ["s"], ["y"])], "g",
                          [oh.make_tensor_value_info("x", TP.FLOAT, [6]), oh.make_tensor_value_info("A", TP.FLOAT, [6])],
                          [oh.make_tensor_value_info("y", TP.FLOAT, [6])], inits)
    if ir_version < 4 and read == "A_copy":
        graph.input.append(oh.make_tensor_value_info("A_copy", TP.FLOAT, [6]))  # IR 3 lists every initializer
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 13)], ir_version=ir_version)


def _proofs(original: onnx.ModelProto, candidate: onnx.ModelProto) -> list[bool]:
    whole = prove_equivalent(ir.from_proto(original), ir.from_proto(candidate)).complete
    premise = number_original(ir.from_proto(original))
    assert premise is not None
    try:
        early = premise.prove(ir.from_proto(candidate))
    finally:
        premise.release()
    return [whole, early is not None and early.complete]


def test_a_copy_of_a_fed_default_is_not_proved() -> None:
    original, candidate = _model("A", 8), _model("A_copy", 8)
    feeds = {"x": np.linspace(0.5, -0.5, 6).astype(np.float32), "A": np.full(6, 3.0, np.float32)}
    # fed, the two differ: the candidate still adds the default
    assert not np.allclose(ReferenceEvaluator(original).run(None, feeds)[0],
                           ReferenceEvaluator(candidate).run(None, feeds)[0])
    assert _proofs(original, candidate) == [False, False]


def test_the_unchanged_model_is_proved() -> None:
    assert _proofs(_model("A", 8), _model("A", 8)) == [True, True]


def test_below_ir4_the_listed_initializer_is_a_constant() -> None:
    original, candidate = _model("A", 3), _model("A_copy", 3)
    feeds = {"x": np.linspace(0.5, -0.5, 6).astype(np.float32)}
    np.testing.assert_array_equal(ReferenceEvaluator(original).run(None, feeds)[0],
                                  ReferenceEvaluator(candidate).run(None, feeds)[0])
    assert _proofs(original, candidate) == [True, True]
