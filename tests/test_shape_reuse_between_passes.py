"""simplify-reshape-targets and fold-constants run the same shape inference
(``shape_findings``): each uses the one the other kept with the graph while it still holds
(``shape_reuse``), and simplify-reshape-targets keeps the one it used when it still holds
after its rewrites (none, or none in the cone of what the Shapes read). Every case writes
the bytes that fresh inferences give, checked against onnx's reference evaluator on the
model as the passes left it."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.reference
import onnx_ir as ir

import optcc.passes.shape_reuse as shape_reuse
from optcc.ir import const_array
from optcc.passes.fold_constants import FoldConstantsPass
from optcc.passes.shape_reuse import InferenceSnapshot, recall
from optcc.passes.simplify_reshape_targets import SimplifyReshapeTargetsPass
from calls import first_arguments

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

# ``x`` of static shape: inference finds ``a`` as [2, 3], so the target (z's own first dim,
# then a's second) becomes the constant [0, 3] (simplify-reshape-targets changes the model,
# outside the cone of what the Shapes read)
_STATIC = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,3] x, float[M,3] z) => (float[P,Q] y) {
    a = Relu(x)
    s = Shape(a)
    r = Shape(z)
    zero = Constant <value = int64[1] {0}> ()
    one = Constant <value = int64[1] {1}> ()
    two = Constant <value = int64[1] {2}> ()
    c = Slice(s, one, two)
    d = Slice(r, zero, one)
    t = Concat <axis = 0> (d, c)
    y = Reshape(z, t)
}"""


def _counted(passes, model: ir.Model, monkeypatch, *, reuse: bool) -> int:
    """Run ``passes`` on ``model`` in place; how many shape inferences they ran."""
    with monkeypatch.context() as patch:
        # both passes infer through ``shape_reuse.holding``
        calls = first_arguments(patch, shape_reuse, "shape_findings")
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


def test_a_rewrite_outside_the_inferred_cone_keeps_the_inference(monkeypatch):
    """The Reshape whose target becomes a constant computes nothing a Shape reads: the
    inference still holds after the rewrite, and fold-constants folds the static Shape
    with it instead of running its own."""
    counts, data = _both_ways(_STATIC, [SimplifyReshapeTargetsPass, FoldConstantsPass], monkeypatch)
    assert counts[0] == 1 and counts[1] > 1
    model = ir.from_proto(onnx.ModelProto.FromString(data))
    reshape = next(n for n in model.graph if n.op_type == "Reshape")
    assert const_array(reshape.inputs[1]).tolist() == [0, 3]
    x = np.random.default_rng(2).standard_normal((2, 3)).astype(np.float32)
    z = np.arange(12, dtype=np.float32).reshape(4, 3)
    _check(onnx.ModelProto.FromString(data), x, z, (4, 3))


def test_a_rewrite_inside_the_inferred_cone_keeps_no_inference():
    """A Shape reads the Reshape's output: rewriting its target may change what inference
    finds there, so the call keeps nothing for fold-constants (which runs its own)."""
    text = _STATIC.replace("=> (float[P,Q] y)", "=> (float[P,Q] y, int64[2] n)").replace(
        "y = Reshape(z, t)", "y = Reshape(z, t)\n    n = Shape(y)")
    model = ir.from_proto(onnx.parser.parse_model(text))
    assert SimplifyReshapeTargetsPass()(model).modified
    assert recall(model) == (None, None)
    FoldConstantsPass()(model)
    proto = ir.to_proto(model)
    x = np.random.default_rng(3).standard_normal((2, 3)).astype(np.float32)
    z = np.arange(12, dtype=np.float32).reshape(4, 3)
    y, n = onnx.reference.ReferenceEvaluator(proto).run(None, {"x": x, "z": z})
    np.testing.assert_array_equal(y, z)
    np.testing.assert_array_equal(n, np.array([4, 3], np.int64))
