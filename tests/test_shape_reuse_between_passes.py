"""simplify-reshape-targets and fold-constants run the same shape inference
(``shape_findings``): each uses the one the other kept with the graph while it still holds
(``shape_reuse``), and simplify-reshape-targets keeps its own only from a call that changed
nothing. Every case writes the bytes that fresh inferences give, checked against onnx's
reference evaluator on the model as the passes left it."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.reference
import onnx_ir as ir

import optcc.passes.fold_constants as fold_constants
import optcc.passes.simplify_reshape_targets as simplify_reshape_targets
from optcc.passes.fold_constants import FoldConstantsPass
from optcc.passes.shape_reuse import InferenceSnapshot, recall
from optcc.passes.simplify_reshape_targets import SimplifyReshapeTargetsPass

# the target reads a dim of ``a`` (no declared shape: inference is asked) that is no dim
# of ``z`` and stays unknown, so simplify-reshape-targets changes nothing; fold-constants
# cannot fold the Shape of a dynamic dim either
_OPEN = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,C] x, float[M] z) => (float[P,Q] y) {
    a = Relu(x)
    s = Shape(a)
    one = Constant <value = int64[1] {1}> ()
    two = Constant <value = int64[1] {2}> ()
    c = Slice(s, one, two)
    m = Constant <value = int64[1] {-1}> ()
    t = Concat <axis = 0> (c, m)
    y = Reshape(z, t)
}"""

# ``x`` of static shape and the target's other entry 4: inference finds ``a`` as [2, 3],
# so the target becomes the constant [3, 4] (simplify-reshape-targets changes the model)
_STATIC = _OPEN.replace("float[N,C] x", "float[2,3] x").replace("int64[1] {-1}", "int64[1] {4}")


def _counted(passes, model: ir.Model, monkeypatch, *, reuse: bool) -> int:
    """Run ``passes`` on ``model`` in place; how many shape inferences they ran."""
    calls = []

    def counting(real):
        def run(m: ir.Model):
            calls.append(1)
            return real(m)
        return run

    with monkeypatch.context() as patch:
        for module in (fold_constants, simplify_reshape_targets):
            patch.setattr(module, "shape_findings", counting(module.shape_findings))
        if not reuse:
            patch.setattr(InferenceSnapshot, "still_holds", lambda self, model, findings: False)
        for pass_ in passes:
            pass_(model)
    return len(calls)


def _check(proto: onnx.ModelProto, x: np.ndarray, z: np.ndarray, shape: tuple[int, ...]) -> None:
    (y,) = onnx.reference.ReferenceEvaluator(proto).run(None, {"x": x, "z": z})
    np.testing.assert_array_equal(y, z.reshape(shape))


def _both_ways(text: str, passes, monkeypatch) -> tuple[list[int], bytes]:
    """Inference counts with and without reuse, and the (equal) bytes both give."""
    counts, results = [], []
    for reuse in (True, False):
        model = ir.from_proto(onnx.parser.parse_model(text))
        counts.append(_counted([p() for p in passes], model, monkeypatch, reuse=reuse))
        results.append(ir.to_proto(model).SerializeToString())
    assert results[0] == results[1]
    return counts, results[0]


def test_fold_constants_reuses_the_inference_of_an_unchanged_reshape_call(monkeypatch):
    counts, data = _both_ways(_OPEN, [SimplifyReshapeTargetsPass, FoldConstantsPass], monkeypatch)
    assert counts == [1, 2]
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    z = np.arange(12, dtype=np.float32)
    _check(onnx.ModelProto.FromString(data), x, z, (3, 4))


def test_simplify_reshape_targets_reuses_the_inference_fold_constants_kept(monkeypatch):
    counts, data = _both_ways(_OPEN, [FoldConstantsPass, SimplifyReshapeTargetsPass, FoldConstantsPass],
                              monkeypatch)
    assert counts == [1, 3]
    x = np.random.default_rng(1).standard_normal((4, 2)).astype(np.float32)
    z = np.arange(8, dtype=np.float32)
    _check(onnx.ModelProto.FromString(data), x, z, (2, 4))


def test_a_call_that_changes_a_target_keeps_no_inference():
    """The rewrite makes the target a constant: what inference finds may differ after it,
    so the call keeps nothing for fold-constants (which then runs its own when it needs one)."""
    model = ir.from_proto(onnx.parser.parse_model(_STATIC))
    assert SimplifyReshapeTargetsPass()(model).modified
    assert recall(model) == (None, None)
    reshape = next(n for n in model.graph if n.op_type == "Reshape")
    assert reshape.inputs[1].const_value is not None or reshape.inputs[1].producer().op_type == "Constant"
    FoldConstantsPass()(model)
    x = np.random.default_rng(2).standard_normal((2, 3)).astype(np.float32)
    z = np.arange(12, dtype=np.float32)
    _check(ir.to_proto(model), x, z, (3, 4))
