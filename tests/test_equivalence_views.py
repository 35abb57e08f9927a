"""The proof of equivalence for layout views (optcc.numerics.equivalence): a Transpose of a
Transpose keyed as one Transpose over the composed permutation (the identity: its input),
an Unsqueeze undoing a Squeeze (and the other way) keyed as the input, a Reshape to one dim
keyed as the input's elements in order. What merge-consecutive and fold-shapes make of them
is proved, and computes what the original computes on onnx's reference evaluator; planted
wrong candidates (another permutation, other axes, a squeeze of a dim that is not 1, a
transpose or reshape that the original never shows to be valid) are not proved."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import optcc
from optcc.numerics.equivalence import number_original, prove_equivalent
from tests.reference import expected_outputs_float64

RNG = np.random.default_rng(0)


def _model(body: str, inputs: str = "float[N, 3, 1, 5] x", outputs: str = "float[N, 3, 1, 5] y",
           opset: int = 17) -> onnx.ModelProto:
    return onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["": {opset}]>
        g ({inputs}) => ({outputs}) {{
            {body}
        }}""")


def _load(proto: onnx.ModelProto) -> ir.Model:
    return optcc.ir.load(proto)


def _optimized(proto: onnx.ModelProto, passes: list[str]) -> ir.Model:
    return optcc.optimize(proto, passes=passes, verify=False).ir_model


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph if n.op_type != "Constant"]


def _proved(original: onnx.ModelProto, candidate: ir.Model) -> bool:
    return prove_equivalent(_load(original), optcc.ir.clone(candidate)).complete


def _same_in_float64(a: onnx.ModelProto, b: ir.Model, feeds: dict[str, np.ndarray]) -> None:
    for u, v in zip(expected_outputs_float64(a, feeds), expected_outputs_float64(optcc.ir.serialize(b), feeds)):
        np.testing.assert_array_equal(v, u)


def _planted(proto: onnx.ModelProto, body: str, **kwargs) -> ir.Model:  # noqa: ANN003 - _model's
    return _load(_model(body, **kwargs))


X = RNG.standard_normal((2, 3, 1, 5)).astype(np.float32)
W = RNG.standard_normal(5).astype(np.float32)

# ------------------------------------------------------------------ Transpose of Transpose


@pytest.mark.parametrize("first,second,left", [
    pytest.param([0, 2, 3, 1], [0, 3, 1, 2], [], id="cancelling"),
    pytest.param([0, 2, 3, 1], [0, 2, 3, 1], ["Transpose"], id="composed"),
    pytest.param([3, 2, 1, 0], [1, 0, 3, 2], ["Transpose"], id="composed-reversal"),
])
def test_a_transpose_pair_merged_is_proved(first, second, left):
    p = [first[i] for i in second]
    dims = "float[N, 3, 1, 5]".replace("N, 3, 1, 5", ", ".join(["N", "3", "1", "5"][i] for i in p))
    proto = _model(f"t = Transpose <perm = {first}> (x)\n v = Transpose <perm = {second}> (t)\n y = Relu(v)",
                   outputs=f"{dims} y")
    candidate = _optimized(proto, ["merge-consecutive", "eliminate-dead-nodes"])
    assert _ops(candidate).count("Transpose") == len(left)
    assert _proved(proto, candidate)
    _same_in_float64(proto, candidate, {"x": X})


def test_a_transpose_pair_composed_to_another_permutation_is_not_proved():
    proto = _model("t = Transpose <perm = [0, 2, 3, 1]> (x)\n v = Transpose <perm = [0, 2, 3, 1]> (t)\n y = Relu(v)",
                   outputs="float[N, 5, 3, 1] y")
    right = _planted(proto, "v = Transpose <perm = [0, 3, 1, 2]> (x)\n y = Relu(v)", outputs="float[N, 5, 3, 1] y")
    wrong = _planted(proto, "v = Transpose <perm = [0, 2, 3, 1]> (x)\n y = Relu(v)", outputs="float[N, 1, 5, 3] y")
    assert _proved(proto, right)
    assert not _proved(proto, wrong)
    # two transposes that do not cancel are not their input
    dropped = _planted(proto, "y = Relu(x)")
    assert not _proved(proto, dropped)


def test_a_transpose_pair_the_original_does_not_have_is_not_proved_to_be_its_input():
    """``Transpose(Transpose(x, p), p^-1)`` is ``x`` only where ``x`` has ``p``'s rank: a
    candidate adding such a pair of rank 3 over a rank-2 ``x`` fails where the original
    runs, and nothing in the original shows ``x``'s rank."""
    proto = _model("y = Relu(x)", inputs="float[N, M] x", outputs="float[N, M] y")
    planted = _planted(proto, "t = Transpose <perm = [1, 2, 0]> (x)\n v = Transpose <perm = [2, 0, 1]> (t)\n"
                              "y = Relu(v)", inputs="float[N, M] x", outputs="float[N, M] y")
    assert not _proved(proto, planted)
    identity = _planted(proto, "v = Transpose <perm = [0, 1, 2]> (x)\n y = Relu(v)",
                        inputs="float[N, M] x", outputs="float[N, M] y")
    assert not _proved(proto, identity)


# ------------------------------------------------------------------ Squeeze and Unsqueeze

def _squeeze(op: str, out: str, x: str, axis: int, opset: int) -> str:
    """``out = op(x)`` at ``axis``: an attribute before opset 13, a Constant input from 13."""
    if opset < 13:
        return f"{out} = {op} <axes = [{axis}]> ({x})"
    return f"{out}_axes = Constant <value = int64[1] {{{axis}}}> ()\n {out} = {op} ({x}, {out}_axes)"


@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize("axis", [2, -2])
def test_an_unsqueeze_undoing_a_squeeze_is_proved(opset, axis):
    # as in a PaddleOCR head: Squeeze -> a Transpose pair -> Unsqueeze, all cancelled
    proto = _model(f"""{_squeeze("Squeeze", "s", "x", axis, opset)}
            t = Transpose <perm = [0, 2, 1]> (s)
            w = Transpose <perm = [0, 2, 1]> (t)
            {_squeeze("Unsqueeze", "v", "w", axis, opset)}
            y = Relu(v)""", opset=opset)
    candidate = _optimized(proto, ["merge-consecutive", "eliminate-dead-nodes"])
    assert _ops(candidate) == ["Relu"]
    assert _proved(proto, candidate)
    _same_in_float64(proto, candidate, {"x": X})


@pytest.mark.parametrize("opset", [11, 13])
def test_a_squeeze_undoing_an_unsqueeze_is_proved(opset):
    proto = _model(f"""{_squeeze("Unsqueeze", "u", "x", 1, opset)}
            {_squeeze("Squeeze", "v", "u", 1, opset)}
            y = Relu(v)""", opset=opset)
    candidate = _optimized(proto, ["merge-consecutive", "eliminate-dead-nodes"])
    assert _ops(candidate) == ["Relu"]
    assert _proved(proto, candidate)
    _same_in_float64(proto, candidate, {"x": X})


@pytest.mark.parametrize("opset", [11, 13])
def test_an_unsqueeze_at_other_axes_is_not_proved(opset):
    proto = _model(f"""{_squeeze("Squeeze", "s", "x", 2, opset)}
            {_squeeze("Unsqueeze", "v", "s", 2, opset)}
            y = Relu(v)""", opset=opset)
    assert _proved(proto, _planted(proto, "y = Relu(x)", opset=opset))
    planted = _planted(proto, f"""{_squeeze("Squeeze", "s", "x", 2, opset)}
            {_squeeze("Unsqueeze", "v", "s", 3, opset)}
            y = Relu(v)""", outputs="float[N, 3, 5, 1] y", opset=opset)
    assert not _proved(proto, planted)
    # the same axis written from the end is another integer: not matched (no rank read)
    planted = _planted(proto, f"""{_squeeze("Squeeze", "s", "x", 2, opset)}
            {_squeeze("Unsqueeze", "v", "s", -2, opset)}
            y = Relu(v)""", opset=opset)
    assert not _proved(proto, planted)


@pytest.mark.parametrize("opset", [11, 13])
def test_a_squeeze_of_a_dim_that_may_not_be_1_is_not_proved(opset):
    """``Unsqueeze(Squeeze(x, a), a)`` is ``x`` only where x's dims at ``a`` are 1 (else
    the Squeeze fails): an original that never squeezes them proves nothing about them."""
    planted = _load(_model(f"""{_squeeze("Squeeze", "s", "x", 1, opset)}
            {_squeeze("Unsqueeze", "v", "s", 1, opset)}
            y = Relu(v)""", opset=opset))
    assert not _proved(_model("y = Relu(x)", opset=opset), optcc.ir.clone(planted))
    # an original squeezing axis 2 says nothing about axis 1
    proto = _model(f"""{_squeeze("Squeeze", "s", "x", 2, opset)}
            {_squeeze("Unsqueeze", "v", "s", 2, opset)}
            y = Relu(v)""", opset=opset)
    assert not _proved(proto, planted)


def test_a_squeeze_of_an_unsqueeze_the_original_does_not_have_is_not_proved():
    """``Squeeze(Unsqueeze(x, [3]), [3])`` fails for a rank-1 ``x`` (axis 3 is past the
    rank 2 the Unsqueeze makes); the original computing ``x`` alone shows no such rank."""
    proto = _model("y = Relu(x)", inputs="float[N] x", outputs="float[N] y", opset=11)
    planted = _planted(proto, "u = Unsqueeze <axes = [3]> (x)\n v = Squeeze <axes = [3]> (u)\n y = Relu(v)",
                       inputs="float[N] x", outputs="float[N] y", opset=11)
    assert not _proved(proto, planted)


@pytest.mark.parametrize("opset", [11, 13])
def test_an_unsqueeze_of_an_unsqueeze_merged_is_proved(opset):
    # as in a T5 encoder's attention mask: [N, S] -> [N, 1, S] -> [N, 1, 1, S]
    proto = _model(f"""{_squeeze("Unsqueeze", "u", "x", 1, opset)}
            {_squeeze("Unsqueeze", "v", "u", 2, opset)}
            y = Relu(v)""", inputs="float[N, S] x", outputs="float[N, 1, 1, S] y", opset=opset)
    candidate = _optimized(proto, ["merge-consecutive", "eliminate-dead-nodes"])
    assert _ops(candidate) == ["Unsqueeze", "Relu"]
    assert _proved(proto, candidate)
    _same_in_float64(proto, candidate, {"x": X.reshape(2, 15)})


def _unsqueezed_axes(rank: int, first: list[int], second: list[int]) -> list[int]:
    """Where onnx's reference evaluator puts the dims of 1 that two Unsqueezes insert into
    a tensor of ``rank`` dims 2, 3, ... (none of them 1)."""
    proto = onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["": 13]>
        g (float[{", ".join(str(d + 2) for d in range(rank))}] x) => (float y) {{
            a = Constant <value = int64[{len(first)}] {{{", ".join(map(str, first))}}}> ()
            b = Constant <value = int64[{len(second)}] {{{", ".join(map(str, second))}}}> ()
            u = Unsqueeze(x, a)
            y = Unsqueeze(u, b)
        }}""")
    x = np.zeros([d + 2 for d in range(rank)], np.float32)
    shape = ReferenceEvaluator(proto).run(None, {"x": x})[0].shape
    return [i for i, d in enumerate(shape) if d == 1]


@pytest.mark.parametrize("rank,first,second", [
    (2, [1], [2]), (2, [1], [1]), (2, [0], [3]), (1, [0, 2], [1]), (3, [3, 4], [0, 2]), (1, [1], [0, 1]),
])
def test_an_unsqueeze_pair_is_proved_to_be_one_unsqueeze_at_the_axes_it_inserts(rank, first, second):
    axes = _unsqueezed_axes(rank, first, second)
    dims = ", ".join(f"D{i}" for i in range(rank))
    out = ", ".join(["1" if i in axes else "?" for i in range(rank + len(axes))])

    def unsqueezes(*pairs):
        return "\n".join(f"{o}_axes = Constant <value = int64[{len(a)}] {{{', '.join(map(str, a))}}}> ()\n"
                         f" {o} = Unsqueeze({i}, {o}_axes)" for o, i, a in pairs)
    proto = _model(f"{unsqueezes(('u', 'x', first), ('v', 'u', second))}\n y = Relu(v)",
                   inputs=f"float[{dims}] x", outputs=f"float[{out}] y", opset=13)
    right = _planted(proto, f"{unsqueezes(('v', 'x', axes))}\n y = Relu(v)",
                     inputs=f"float[{dims}] x", outputs=f"float[{out}] y", opset=13)
    assert _proved(proto, right)
    x = RNG.standard_normal([d + 2 for d in range(rank)]).astype(np.float32)
    _same_in_float64(proto, right, {"x": x})
    shifted = [a + 1 for a in axes[:-1]] + [axes[-1]] if axes[-1] + 1 not in axes else axes[:-1] + [axes[-1] + 1]
    wrong = _planted(proto, f"{unsqueezes(('v', 'x', sorted(set(shifted))))}\n y = Relu(v)",
                     inputs=f"float[{dims}] x", outputs="float y", opset=13)
    assert not _proved(proto, wrong)
    # the pair in the other order is proved only where it inserts the same axes
    if max(second) < rank + len(second) and max(first) < rank + len(first) + len(second):  # runs swapped
        swapped = _planted(proto, f"{unsqueezes(('u', 'x', second), ('v', 'u', first))}\n y = Relu(v)",
                           inputs=f"float[{dims}] x", outputs="float y", opset=13)
        assert _proved(proto, swapped) == (_unsqueezed_axes(rank, second, first) == axes)


# ------------------------------------------------------------------ Reshape to one dim

def _layer_norm_scale(target: str) -> onnx.ModelProto:
    """x * Reshape(w, [dim 2 of x]): a per-channel weight reshaped to x's last dim, as
    PaddlePaddle exports a LayerNorm's scale."""
    w = numpy_helper.from_array(W, "w")
    proto = _model(f"""s = Shape(x)
            {target}
            r = Reshape(w, d)
            y = Mul(x, r)""", inputs="float[N, 3, 5] x", outputs="float[N, 3, 5] y")
    proto.graph.initializer.append(w)
    return proto


LAST_DIM = """start = Constant <value = int64[1] {2}> ()
            end = Constant <value = int64[1] {3}> ()
            d = Slice(s, start, end)"""


def test_a_reshape_of_a_weight_to_a_dim_of_the_input_folded_is_proved():
    proto = _layer_norm_scale(LAST_DIM)
    candidate = _optimized(proto, ["fold-constants", "eliminate-dead-nodes"])
    assert _ops(candidate) == ["Mul"]
    assert _proved(proto, candidate)
    _same_in_float64(proto, candidate, {"x": RNG.standard_normal((2, 3, 5)).astype(np.float32)})


def test_a_reshape_to_one_dim_is_not_proved_equal_to_other_elements_or_where_it_may_fail():
    proto = _layer_norm_scale(LAST_DIM)

    def replace_weight(model: ir.Model, array: np.ndarray) -> ir.Model:
        mul = next(n for n in model.graph if n.op_type == "Mul")
        mul.replace_input_with(1, ir.Value(name="w2", const_value=ir.tensor(array)))
        model.graph.register_initializer(mul.inputs[1])
        return model

    w = numpy_helper.to_array(proto.graph.initializer[0])
    assert _proved(proto, replace_weight(_load(proto), w.copy()))
    assert not _proved(proto, replace_weight(_load(proto), w[::-1].copy()))
    assert not _proved(proto, replace_weight(_load(proto), w.reshape(1, 5).copy()))
    # a candidate reshaping the weight to another dim of x (3, not 5: it fails) is not proved
    middle = LAST_DIM.replace("{2}", "{1}").replace("{3}", "{2}")
    assert not _proved(proto, _load(_layer_norm_scale(middle)))


def test_a_flatten_to_a_dim_the_original_never_reshapes_to_is_not_proved():
    """``Reshape(x, [-1])`` always succeeds; ``Reshape(x, [dim 0 of x])`` only where x has
    one element per row: not the same model, though both give x's elements in order."""
    proto = _model("m = Constant <value = int64[1] {-1}> ()\n y = Reshape(x, m)",
                   inputs="float[N, 4] x", outputs="float[K] y")
    planted = _planted(proto, "s = Shape <end = 1> (x)\n y = Reshape(x, s)", inputs="float[N, 4] x",
                       outputs="float[K] y")
    assert not _proved(proto, planted)
    # the other way (the original's Reshape succeeded, so the candidate's [-1] is the same)
    assert _proved(_model("s = Shape <end = 1> (x)\n y = Reshape(x, s)", inputs="float[N, 4] x",
                          outputs="float[K] y"), _load(proto))


# ------------------------------------------------------------------ through the verifier's premise

def _premise_proves(original: onnx.ModelProto, candidate: ir.Model) -> bool | None:
    """The original numbered first (``number_original``, as the verifier does), then the
    candidate judged against it; None where the original cannot be numbered first."""
    premise = number_original(_load(original))
    if premise is None:
        return None
    try:
        proof = premise.prove(candidate)
        return None if proof is None else proof.complete
    finally:
        premise.release()


def test_the_views_are_judged_alike_when_the_original_is_numbered_first():
    cancelled = _model(f"""{_squeeze("Squeeze", "s", "x", 2, 13)}
            t = Transpose <perm = [0, 2, 1]> (s)
            w = Transpose <perm = [0, 2, 1]> (t)
            {_squeeze("Unsqueeze", "v", "w", 2, 13)}
            y = Relu(v)""", opset=13)
    relu = _model("y = Relu(x)", opset=13)
    assert _premise_proves(cancelled, _load(relu)) is True
    # the planted squeeze of axis 1 (not shown to be 1 by the original) stays unproved
    planted = _model(f"""{_squeeze("Squeeze", "s", "x", 1, 13)}
            {_squeeze("Unsqueeze", "v", "s", 1, 13)}
            y = Relu(v)""", opset=13)
    assert _premise_proves(relu, _load(planted)) is False
    assert _premise_proves(cancelled, _load(planted)) is False
    result = optcc.optimize(cancelled, passes=["merge-consecutive", "eliminate-dead-nodes"])
    assert result.report.verification["reference"] == "proof"


# ------------------------------------------------------------------ Reshape targets with one dim read

def _view_of(target: str, allowzero: int = 0) -> onnx.ModelProto:
    """Reshape(x, target) of x [N, 8, 4] to [N, 4, 8] (target: the lines making ``t``)."""
    return _model(f"""{target}
            y = Reshape <allowzero = {allowzero}> (x, t)""", inputs="float[N, 8, 4] x", outputs="float[N, 4, 8] y")


BATCH_READ = """s = Shape(x)
            zero = Constant <value = int64[1] {0}> ()
            one = Constant <value = int64[1] {1}> ()
            n = Slice(s, zero, one)
            scalar = Squeeze(n, zero)
            batch = Unsqueeze(scalar, zero)
            rest = Constant <value = int64[2] {4, 8}> ()
            t = Concat <axis = 0> (batch, rest)"""


@pytest.mark.parametrize("allowzero", [0, 1])
def test_a_reshape_target_reading_one_dim_is_proved_equal_to_its_inferred_form(allowzero):
    """[dim 0 of x, 4, 8] (through a Squeeze of the sliced shape and an Unsqueeze back) and
    [-1, 4, 8]: where the first runs, -1 infers that dim (the others are positive)."""
    proto = _view_of(BATCH_READ, allowzero)
    candidate = _optimized(proto, ["simplify-reshape-targets", "eliminate-dead-nodes"])
    assert _ops(candidate) == ["Reshape"]
    assert _proved(proto, candidate)
    feeds = {"x": RNG.standard_normal((3, 8, 4)).astype(np.float32)}
    _same_in_float64(proto, candidate, feeds)
    inferred = _load(_view_of("t = Constant <value = int64[3] {-1, 4, 8}> ()", allowzero))
    assert _proved(proto, inferred)
    _same_in_float64(proto, inferred, feeds)


def test_a_reshape_target_reading_another_dim_or_other_sizes_is_not_proved():
    proto = _view_of(BATCH_READ)
    assert not _proved(proto, _load(_view_of("t = Constant <value = int64[3] {-1, 8, 4}> ()")))
    # dim 1 of x in place of dim 0: both "infer" the first dim, but the candidate runs only
    # where dim 1 is the batch, which nothing in the original says
    other = _view_of(BATCH_READ.replace("{0}", "{1}").replace("{1}", "{2}", 1).replace("Squeeze(n, zero)",
                                                                                          "Squeeze(n)"))
    assert not _proved(proto, _load(other))
    # the inferred form does not prove a candidate that reads the dim where x's other dims
    # are not known: that one may fail
    dynamic = dict(inputs="float[N, M, 4] x", outputs="float[N, 4, 8] y")
    inferred = _model("t = Constant <value = int64[3] {-1, 4, 8}> ()\n y = Reshape(x, t)", **dynamic)
    assert not _proved(inferred, _load(_model(f"{BATCH_READ}\n y = Reshape(x, t)", **dynamic)))


def test_a_reshape_target_reading_one_dim_of_a_value_whose_other_dims_are_known_always_runs():
    """[dim 0 of x, 4, 8] of x [N, 8, 4]: x's element count is dim 0 times 32 = 4 * 8, so
    the Reshape runs wherever x exists, and is [-1, 4, 8] (the form PyTorch's exporter
    gives a view of a Transpose: a target copying the Transpose's batch dim, proved against
    one reading that dim from another value)."""
    inferred = _view_of("t = Constant <value = int64[3] {-1, 4, 8}> ()")
    gathered = _view_of("""s = Shape(x)
            zero = Constant <value = int64[1] {0}> ()
            n = Gather <axis = 0> (s, zero)
            rest = Constant <value = int64[2] {4, 8}> ()
            t = Concat <axis = 0> (n, rest)""")
    assert _proved(inferred, _load(gathered))
    copied = _model("p = Transpose <perm = [1, 0, 2]> (x)\n t = Constant <value = int64[3] {8, 0, 4}> ()\n"
                    " y = Reshape(p, t)", inputs="float[N, 8, 4] x", outputs="float[8, N, 4] y")
    read = _model("""p = Transpose <perm = [1, 0, 2]> (x)
            s = Shape(x)
            zero = Constant <value = int64[1] {0}> ()
            n = Gather <axis = 0> (s, zero)
            e = Constant <value = int64[1] {8}> ()
            f = Constant <value = int64[1] {4}> ()
            t = Concat <axis = 0> (e, n, f)
            y = Reshape(p, t)""", inputs="float[N, 8, 4] x", outputs="float[8, N, 4] y")
    assert _proved(read, _load(copied))
    _same_in_float64(read, _load(copied), {"x": RNG.standard_normal((3, 8, 4)).astype(np.float32)})


# ------------------------------------------------------------------ an affine chain through Identity

def test_an_affine_chain_through_identities_is_proved_folded():
    """Conv -> Add(per-channel bias) -> Identity -> Mul(one factor, first operand) ->
    Identity -> Add(one shift), as PaddlePaddle exports a learnable affine block: folded into
    one Conv by the passes, proved by the chain's normal form through the Identities."""
    w = numpy_helper.from_array(RNG.standard_normal((4, 1, 3, 3)).astype(np.float32), "w")
    bias = numpy_helper.from_array(RNG.standard_normal((1, 4, 1, 1)).astype(np.float32), "bias")
    scale = numpy_helper.from_array(np.array([1.7], np.float32), "scale")
    shift = numpy_helper.from_array(np.array([-0.3], np.float32), "shift")
    proto = _model("""c = Conv <group = 4, pads = [1, 1, 1, 1]> (x, w)
            a = Add(c, bias)
            i = Identity(a)
            m = Mul(scale, i)
            j = Identity(m)
            y = Add(j, shift)""", inputs="float[N, 4, 6, 6] x", outputs="float[N, 4, 6, 6] y")
    proto.graph.initializer.extend([w, bias, scale, shift])
    candidate = _optimized(proto, ["eliminate-identities", "fuse-conv-affine"])
    assert _ops(candidate) == ["Conv"]
    assert _proved(proto, candidate)
    feeds = {"x": RNG.standard_normal((2, 4, 6, 6)).astype(np.float32)}
    for u, v in zip(expected_outputs_float64(proto, feeds),
                    expected_outputs_float64(optcc.ir.serialize(candidate), feeds)):
        np.testing.assert_allclose(v, u, rtol=1e-5, atol=1e-5)
    # the shift folded without the factor (bias + shift where it should be 1.7 * bias + shift)
    wrong = optcc.ir.clone(candidate)
    conv = next(n for n in wrong.graph if n.op_type == "Conv")
    folded = conv.inputs[2].const_value.numpy()
    conv.inputs[2].const_value = ir.tensor((folded - 0.7 * bias.float_data[0] if bias.float_data else
                                            folded - 0.7 * numpy_helper.to_array(bias).reshape(-1)).astype(np.float32))
    assert not _proved(proto, wrong)


# ------------------------------------------------------------------ the second look: inferred dims and types

def test_a_cast_to_the_type_its_input_has_is_proved_removed_and_a_conversion_is_not():
    proto = _model("""t = Transpose <perm = [0, 2, 1]> (x)
            c = Cast <to = 1> (t)
            y = Relu(c)""", inputs="float[N, 3, 5] x", outputs="float[N, 5, 3] y")
    candidate = _optimized(proto, ["eliminate-noops"])
    assert _ops(candidate) == ["Transpose", "Relu"]
    assert _proved(proto, candidate)
    _same_in_float64(proto, candidate, {"x": RNG.standard_normal((2, 3, 5)).astype(np.float32)})
    # a Cast to float16 and back is not its input (it rounds)
    rounding = _model("""t = Transpose <perm = [0, 2, 1]> (x)
            h = Cast <to = 10> (t)
            c = Cast <to = 1> (h)
            y = Relu(c)""", inputs="float[N, 3, 5] x", outputs="float[N, 5, 3] y")
    assert not _proved(rounding, _load(_model("t = Transpose <perm = [0, 2, 1]> (x)\n y = Relu(t)",
                                                 inputs="float[N, 3, 5] x", outputs="float[N, 5, 3] y")))


def _static_view(target: str) -> onnx.ModelProto:
    """x [N, 6, 4] -> Conv 1x1 to 8 channels -> Reshape(target) -> [N, 8, 24]: the conv's
    channels (8) are static only to shape inference (from the weight)."""
    w = numpy_helper.from_array(W8, "w")
    proto = _model(f"""c = Conv(x, w)
            s = Shape(c)
            {target}
            y = Reshape(c, t)""", inputs="float[N, 6, 4, 6] x", outputs="float[N, 8, 24] y")
    proto.graph.initializer.append(w)
    return proto


W8 = RNG.standard_normal((8, 6, 1, 1)).astype(np.float32)
READ_CHANNELS = """zero = Constant <value = int64[1] {0}> ()
            one = Constant <value = int64[1] {1}> ()
            two = Constant <value = int64[1] {2}> ()
            n = Slice(s, zero, one)
            ch = Slice(s, one, two)
            rest = Constant <value = int64[1] {-1}> ()
            t = Concat <axis = 0> (n, ch, rest)"""


def test_a_target_dim_shape_inference_knows_is_proved_equal_to_that_integer():
    proto = _static_view(READ_CHANNELS)
    constant = _static_view("t = Constant <value = int64[3] {0, 8, -1}> ()")
    assert _proved(proto, _load(constant))
    feeds = {"x": RNG.standard_normal((2, 6, 4, 6)).astype(np.float32)}
    _same_in_float64(proto, _load(constant), feeds)
    for wrong in ("{0, 4, -1}", "{0, 24, -1}"):  # another channel count
        other = _static_view(f"t = Constant <value = int64[3] {wrong}> ()")
        assert not _proved(proto, _load(other)), wrong


# ------------------------------------------------------------------ zero initial states

def _lstm(states: str, inputs: str = "x, W, R, B", r_scale: float = 0.5) -> onnx.ModelProto:
    """An LSTM over x [5, 2, 3], hidden 4 (states: lines making h0 and c0, or nothing)."""
    rng = np.random.default_rng(1)
    proto = _model(f"""{states}
            y, y_h = LSTM <hidden_size = 4> ({inputs})""",
                   inputs="float[5, 2, 3] x", outputs="float[5, 1, 2, 4] y, float[1, 2, 4] y_h")
    proto.graph.initializer.extend([
        numpy_helper.from_array((0.5 * rng.standard_normal((1, 16, 3))).astype(np.float32), "W"),
        numpy_helper.from_array((r_scale * rng.standard_normal((1, 16, 4))).astype(np.float32), "R"),
        numpy_helper.from_array((0.1 * rng.standard_normal((1, 32))).astype(np.float32), "B")])
    return proto


ZERO_STATES = """shape = Constant <value = int64[3] {1, 2, 4}> ()
            h0 = ConstantOfShape(shape)
            c0 = ConstantOfShape(shape)"""


def test_zero_initial_states_dropped_are_proved_and_others_are_not():
    proto = _lstm(ZERO_STATES, "x, W, R, B, , h0, c0")
    candidate = _optimized(proto, ["drop-zero-rnn-states", "eliminate-dead-nodes"])
    assert _ops(candidate) == ["LSTM"] and len(next(iter(candidate.graph)).inputs) == 4
    assert _proved(proto, candidate)
    _same_in_float64(proto, candidate, {"x": RNG.standard_normal((5, 2, 3)).astype(np.float32)})
    # a state of ones is not the default state
    ones = _lstm(ZERO_STATES.replace("ConstantOfShape(shape)", "ConstantOfShape <value = float[1] {1.0}> (shape)"),
                 "x, W, R, B, , h0, c0")
    assert not _proved(ones, _load(_lstm("")))
    # zero states of a shape the node cannot take (batch 3 for a batch of 2): that candidate fails
    def with_zeros(batch: int) -> onnx.ModelProto:
        model = _lstm("", "x, W, R, B, , h0, c0")
        model.graph.initializer.extend([numpy_helper.from_array(np.zeros((1, batch, 4), np.float32), name)
                                        for name in ("h0", "c0")])
        return model

    assert _proved(with_zeros(2), _load(_lstm("")))
    assert not _proved(_lstm(""), _load(with_zeros(3)))
    # the right shape, but the original shows none: the candidate's states are assumed, not proved
    assert not _proved(_lstm(""), _load(with_zeros(2)))
    assert _proved(with_zeros(2), _load(with_zeros(2)))
    # an infinite recurrence weight times the zero state is NaN, not the absent state's zero
    infinite = _lstm(ZERO_STATES, "x, W, R, B, , h0, c0", r_scale=np.inf)
    assert not _proved(infinite, _load(_lstm("", r_scale=np.inf)))


def _gru(states: str, inputs: str = "x, W, R, B", fill: str = "") -> onnx.ModelProto:
    """A GRU over x [5, N, 3], hidden 4 (states: lines making h0 from ``layers``, a zero
    fill [2, N, 4] of a shape read from x, as PyTorch exports a stacked GRU's state)."""
    rng = np.random.default_rng(2)
    proto = _model(f"""s = Shape(x)
            one = Constant <value = int64[1] {{1}}> ()
            two = Constant <value = int64[1] {{2}}> ()
            four = Constant <value = int64[1] {{4}}> ()
            n = Slice(s, one, two)
            shape = Concat <axis = 0> (two, n, four)
            layers = ConstantOfShape {fill} (shape)
            {states}
            y, y_h = GRU <hidden_size = 4> ({inputs})""",
                   inputs="float[5, N, 3] x", outputs="float[5, 1, N, 4] y, float[1, N, 4] y_h")
    proto.graph.initializer.extend([
        numpy_helper.from_array((0.5 * rng.standard_normal((1, 12, 3))).astype(np.float32), "W"),
        numpy_helper.from_array((0.5 * rng.standard_normal((1, 12, 4))).astype(np.float32), "R"),
        numpy_helper.from_array((0.1 * rng.standard_normal((1, 24))).astype(np.float32), "B")])
    return proto


SLICED_STATE = """zero = Constant <value = int64[1] {0}> ()
            axis = Constant <value = int64[1] {0}> ()
            h0 = Slice(layers, one, two, axis)"""


def test_a_zero_state_sliced_from_a_fill_of_a_read_shape_dropped_is_proved():
    proto = _gru(SLICED_STATE, "x, W, R, B, , h0")
    candidate = _optimized(proto, ["drop-zero-rnn-states", "eliminate-dead-nodes"])
    assert _ops(candidate) == ["GRU"]
    assert _proved(proto, candidate)
    _same_in_float64(proto, candidate, {"x": RNG.standard_normal((5, 3, 3)).astype(np.float32)})
    # a fill of ones, or of -0.0 (other bits), is not the absent state
    for fill in ("<value = float[1] {1.0}>", "<value = float[1] {-0.0}>"):
        assert not _proved(_gru(SLICED_STATE, "x, W, R, B, , h0", fill), _load(_gru("")))
    # the candidate's zero state, where the original has none, is assumed of the right shape: not proved
    assert not _proved(_gru(""), _load(proto))


# ------------------------------------------------------------------ a Reshape of a Reshape

def _two_reshapes(second: str, first: str = "0, 0, 2, 3") -> onnx.ModelProto:
    """x [N, 4, 6] -> Reshape [first] -> Reshape(second: lines making t2, which may read
    the middle value m's shape)."""
    return _model(f"""t1 = Constant <value = int64[4] {{{first}}}> ()
            m = Reshape(x, t1)
            s = Shape(m)
            {second}
            y = Reshape(m, t2)""", inputs="float[N, 4, 6] x", outputs="float[N, 4, 6] y")


SECOND = """zero = Constant <value = int64[1] {0}> ()
            two = Constant <value = int64[1] {2}> ()
            nc = Slice(s, zero, two)
            six = Constant <value = int64[1] {6}> ()
            t2 = Concat <axis = 0> (nc, six)"""


def test_a_reshape_of_a_reshape_is_proved_as_one_reshape():
    """[dims 0 and 1 of m, 6] of m = Reshape(x, [0, 0, 2, 3]): m's dims 0 and 1 are x's
    (copied), so the pair is Reshape(x, [0, 0, 6]), what the passes make of it."""
    proto = _two_reshapes(SECOND)
    candidate = optcc.optimize(proto, level=2, verify=False).ir_model  # simplify-reshape-targets, merge-consecutive
    assert _ops(candidate) == ["Reshape"]
    assert _proved(proto, candidate)
    _same_in_float64(proto, candidate, {"x": RNG.standard_normal((2, 4, 6)).astype(np.float32)})
    one = _model("t = Constant <value = int64[3] {0, 0, 6}> ()\n y = Reshape(x, t)",
                 inputs="float[N, 4, 6] x", outputs="float[N, 4, 6] y")
    assert _proved(proto, _load(one))


def test_a_reshape_of_a_reshape_is_not_proved_as_another_or_where_the_first_may_fail():
    proto = _two_reshapes(SECOND)
    for wrong in ("{0, 6, 4}", "{-1, 6, 4}"):
        assert not _proved(proto, _load(_model(f"t = Constant <value = int64[3] {wrong}> ()\n y = Reshape(x, t)",
                                                 inputs="float[N, 4, 6] x", outputs="float[N, 6, 4] y"))), wrong
    # a candidate adding a first Reshape (to [0, 0, 5, 3]: it fails) over the original's one
    one = _model("t = Constant <value = int64[3] {0, 0, 6}> ()\n y = Reshape(x, t)",
                 inputs="float[N, 4, 6] x", outputs="float[N, 4, 6] y")
    assert not _proved(one, _load(_two_reshapes(SECOND, "0, 0, 5, 3")))
    assert not _proved(one, _load(_two_reshapes(SECOND)))  # valid here, but the original shows nothing of it
    # a middle dim that a -1 inferred is not read from the first target; here the second
    # target's other dims are x's (4 and 6, inferred), so it is [-1, 4, 6] of x
    middle = _two_reshapes(SECOND, "-1, 4, 2, 3")
    assert _proved(middle, _load(one))
    _same_in_float64(middle, _load(one), {"x": RNG.standard_normal((2, 4, 6)).astype(np.float32)})


# ------------------------------------------------------------------ Slice of Slice

FOCUS = RNG.standard_normal((2, 3, 6, 8)).astype(np.float32)
_FOCUS_TYPES = dict(inputs="float[N, 3, 6, 8] x", outputs="float[N, 3, 3, 4] y")
END = 2**63 - 1


def _ints(**lists: list[int]) -> str:
    """Constant int64 lists, one node each."""
    return "\n".join(f"{name} = Constant <value = int64[{len(v)}] {{{', '.join(map(str, v))}}}> ()"
                     for name, v in lists.items())


_CORNER = _ints(s0=[0], s1=[1], e=[END], a2=[2], a3=[3], st=[2])


def _slices(body: str, opset: int = 17, **types: str) -> onnx.ModelProto:
    return _model(body, opset=opset, **{**_FOCUS_TYPES, **types})


def test_a_slice_of_a_slice_on_other_axes_merged_is_proved():
    """A focus layer's corner (rows 0::2, then columns 1::2) as two Slices: merge-consecutive
    makes them one Slice over both axes, and the proof keys both forms alike."""
    proto = _slices(f"{_CORNER}\n r = Slice(x, s0, e, a2, st)\n c = Slice(r, s1, e, a3, st)\n y = Relu(c)")
    candidate = _optimized(proto, ["merge-consecutive", "eliminate-dead-nodes"])
    assert _ops(candidate).count("Slice") == 1
    assert _proved(proto, candidate)
    _same_in_float64(proto, candidate, {"x": FOCUS})


def test_slices_with_attributes_and_with_inputs_are_keyed_alike():
    """Slice-1's attributes and Slice-10's inputs say the same thing (the candidate's axes
    in the other order, its steps implied; the graph output is the Slice itself, as other
    operators are keyed by their opset version)."""
    proto = _slices("r = Slice <starts = [0], ends = [3], axes = [2]> (x)\n"
                    "y = Slice <starts = [1], ends = [5], axes = [3]> (r)", opset=9)
    candidate = _planted(proto, f"{_ints(s=[1, 0], e=[5, 3], a=[3, 2])}\n y = Slice(x, s, e, a)",
                         opset=13, **_FOCUS_TYPES)
    assert _proved(proto, candidate)
    _same_in_float64(proto, candidate, {"x": FOCUS})


def test_a_merged_slice_with_other_entries_is_not_proved():
    proto = _slices(f"{_CORNER}\n r = Slice(x, s0, e, a2, st)\n c = Slice(r, s1, e, a3, st)\n y = Relu(c)")
    wrong = {
        "axes-swapped": _ints(s=[1, 0], e=[END, END], a=[2, 3], st=[2, 2]),
        "other-step": _ints(s=[0, 1], e=[END, END], a=[2, 3], st=[2, 1]),
        "one-axis-only": _ints(s=[1], e=[END], a=[3], st=[2]),
    }
    for name, constants in wrong.items():
        planted = _planted(proto, f"{constants}\n c = Slice(x, s, e, a, st)\n y = Relu(c)", **_FOCUS_TYPES)
        assert not _proved(proto, planted), name


def test_a_slice_of_a_slice_on_the_same_axis_is_not_merged_by_the_proof():
    """Two Slices of one axis compose by clamping against its dim: the proof does not read
    them as one Slice with both entries (a candidate of either entry alone is not proved)."""
    proto = _slices(f"{_CORNER}\n r = Slice(x, s1, e, a3, st)\n c = Slice(r, s1, e, a3, st)\n y = Relu(c)",
                    outputs="float[N, 3, 6, 2] y")
    planted = _planted(proto, f"{_CORNER}\n c = Slice(x, s1, e, a3, st)\n y = Relu(c)", **_FOCUS_TYPES)
    assert not _proved(proto, planted)


def test_a_negative_slice_axis_is_normalized_only_against_a_known_rank():
    def last(axis: int) -> str:
        return f"{_ints(s=[1], e=[5], a=[axis])}\n c = Slice(x, s, e, a)\n y = Relu(c)"
    proto = _slices(last(-1), outputs="float[N, 3, 6, 4] y")
    positive = _planted(proto, last(3), **_FOCUS_TYPES)
    assert _proved(proto, positive)
    _same_in_float64(proto, positive, {"x": FOCUS})
    unranked = dict(inputs="float x", outputs="float y")
    assert not _proved(_slices(last(-1), **unranked), _planted(proto, last(3), **unranked))


def _declared_rank_2(body: str) -> onnx.ModelProto:
    """``y = Reshape(x, s)`` to a shape the input ``s`` decides, declared as rank 2 among the
    graph outputs (onnxruntime warns, and runs it at any rank), and ``z`` read from it."""
    return _model(f"y = Reshape(x, s)\n {body}", inputs="float[n] x, int64[r] s, float[m] w",
                  outputs="float[d0, d1] y, float z")


def _run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def test_a_rank_declared_on_a_graph_output_is_not_believed():
    """onnxruntime does not hold a graph output to its declared dims: a rank read from them
    would make axis -1 of a rank-3 ``y`` its axis 1, and a Reshape of ``w`` to ``Shape(y)``
    one to y's first two dims. Neither pair is proved; onnxruntime shows that they differ."""
    w = np.arange(6, dtype=np.float32)
    last = [_declared_rank_2(f"{_ints(st=[0], en=[1], ax=[axis])}\n z = Slice(y, st, en, ax)") for axis in (-1, 1)]
    target = [_declared_rank_2(f"sh = Shape(y)\n {body}\n z = Reshape(w, t)") for body in (
        "t = Identity(sh)",
        f"{_ints(z0=[0], o1=[1], t2=[2])}\n d0 = Slice(sh, z0, o1)\n d1 = Slice(sh, o1, t2)\n t = Concat <axis = 0> (d0, d1)")]
    for (original, candidate), dims in ((last, [2, 3, 4]), (target, [2, 3, 1])):
        feeds = {"x": np.arange(np.prod(dims), dtype=np.float32), "s": np.array(dims, np.int64), "w": w}
        assert _run(original, feeds)[1].shape != _run(candidate, feeds)[1].shape
        assert not _proved(original, _load(candidate))


def test_slice_indices_of_two_types_are_not_keyed_alike():
    """Slice's starts, ends, axes and steps share one index type: int32 starts with int64 ends
    is not a model onnxruntime loads, and not proved equal to one that is."""
    proto = _slices(f"{_ints(s=[1], e=[5], a=[3])}\n c = Slice(x, s, e, a)\n y = Relu(c)", outputs="float[N, 3, 6, 4] y")
    mixed = _planted(proto, "s = Constant <value = int32[1] {1}> ()\n"
                            f"{_ints(e=[5], a=[3])}\n c = Slice(x, s, e, a)\n y = Relu(c)", **_FOCUS_TYPES)
    assert not _proved(proto, mixed)


def test_a_slice_with_axes_fed_at_run_time_is_not_keyed_as_one_without_axes():
    """Axes given as a graph input are not the default axes an omitted input means."""
    types = dict(inputs="float[N, 3, 6, 8] x, int64[1] ax", outputs="float y")
    fed = _slices(f"{_ints(s=[1], e=[5])}\n y = Slice(x, s, e, ax)", **types)
    omitted = _planted(fed, f"{_ints(s=[1], e=[5])}\n y = Slice(x, s, e)", **types)
    assert not _proved(fed, omitted)


def _clip(inputs: list[str]) -> onnx.ModelProto:
    """y = Clip(x, ...) over ``inputs`` ('' an optional input given empty), lo = -0.5, hi = 0.5."""
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 5])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 5])
    inits = [numpy_helper.from_array(np.array(-0.5, np.float32), "lo"),
             numpy_helper.from_array(np.array(0.5, np.float32), "hi")]
    graph = helper.make_graph([helper.make_node("Clip", inputs, ["y"])], "g", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_an_optional_input_given_empty_at_the_end_is_proved_the_same_as_one_not_given():
    x = RNG.standard_normal((2, 5)).astype(np.float32)
    given, omitted = _clip(["x", "lo", ""]), _clip(["x", "lo"])
    np.testing.assert_array_equal(ReferenceEvaluator(given).run(None, {"x": x})[0],
                                  ReferenceEvaluator(omitted).run(None, {"x": x})[0])
    assert _proved(given, _load(omitted)) and _proved(omitted, _load(given))
    # an empty input before a given one keeps its position: Clip(x, '', hi) is not Clip(x, hi)
    upper, lower = _clip(["x", "", "hi"]), _clip(["x", "hi"])
    assert not np.array_equal(ReferenceEvaluator(upper).run(None, {"x": x})[0],
                              ReferenceEvaluator(lower).run(None, {"x": x})[0])
    assert not _proved(upper, _load(lower))


# ------------------------------------------------------------------ Reshape through order-keeping views

_THROUGH_VIEWS = """
    s1 = Constant <value = int64[3] {-1, 12, 1}> ()
    m = Reshape(x, s1)
    a = Constant <value = int64[1] {-3}> ()
    u = Unsqueeze(m, a)
    s2 = Constant <value = int64[4] {-1, 1, 1, 12}> ()
    y = Reshape(u, s2)"""
_THROUGH_TYPES = dict(inputs="float[2, 12] x", outputs="float[2, 1, 1, 12] y")


def test_a_reshape_through_a_reshape_and_an_unsqueeze_merged_is_proved():
    """Reshape(Unsqueeze(Reshape(x, [-1, 12, 1]), [-3]), [-1, 1, 1, 12]): the last target reads
    no dim, so only x's elements in order count, which the views between keep: what
    merge-consecutive makes of it (one Reshape of x) is proved."""
    proto = _model(_THROUGH_VIEWS, **_THROUGH_TYPES)
    candidate = _optimized(proto, ["merge-consecutive", "eliminate-dead-nodes"])
    assert _ops(candidate) == ["Reshape"]
    assert _proved(proto, candidate)
    _same_in_float64(proto, candidate, {"x": RNG.standard_normal((2, 12)).astype(np.float32)})


def test_a_reshape_through_a_transpose_or_a_view_the_original_lacks_is_not_proved():
    one = _model("s = Constant <value = int64[4] {-1, 1, 1, 12}> ()\n y = Reshape(x, s)", **_THROUGH_TYPES)
    # a Transpose between changes the elements' order
    transposed = _model("p = Transpose <perm = [1, 0]> (x)\n s = Constant <value = int64[4] {-1, 1, 1, 12}> ()\n"
                        " y = Reshape(p, s)", inputs="float[12, 2] x", outputs="float[2, 1, 1, 12] y")
    assert not _proved(transposed, _load(one)) and not _proved(one, _load(transposed))
    # a candidate adding views the original never shows to run
    assert not _proved(one, _load(_model(_THROUGH_VIEWS, **_THROUGH_TYPES)))
    squeezed = _model("a = Constant <value = int64[1] {0}> ()\n q = Squeeze(x, a)\n"
                      " s = Constant <value = int64[4] {-1, 1, 1, 12}> ()\n y = Reshape(q, s)", **_THROUGH_TYPES)
    assert not _proved(one, _load(squeezed))


def test_a_reshape_squeezed_or_unsqueezed_merged_is_proved():
    """Unsqueeze(Reshape(x, [-1, 12]), [-1]) and Squeeze(Reshape(x, [2, 1, 12]), [1]) are x's
    elements in order, as Reshape(x, [-1, 12, 1]) and Reshape(x, [2, 12]) give them."""
    for body, outputs, target in [
        ("s = Constant <value = int64[2] {-1, 12}> ()\n m = Reshape(x, s)\n a = Constant <value = int64[1] {-1}> ()\n"
         " y = Unsqueeze(m, a)", "float[2, 12, 1] y", "{-1, 12, 1}"),
        ("s = Constant <value = int64[3] {2, 1, 12}> ()\n m = Reshape(x, s)\n a = Constant <value = int64[1] {1}> ()\n"
         " y = Squeeze(m, a)", "float[2, 12] y", "{2, 12}"),
    ]:
        proto = _model(body, inputs="float[4, 6] x", outputs=outputs)
        rank = target.count(",") + 1
        one = _model(f"s = Constant <value = int64[{rank}] {target}> ()\n y = Reshape(x, s)",
                     inputs="float[4, 6] x", outputs=outputs)
        assert _proved(proto, _load(one))
        _same_in_float64(proto, _load(one), {"x": RNG.standard_normal((4, 6)).astype(np.float32)})
        if "Unsqueeze" in body:  # what merge-consecutive makes of it
            candidate = _optimized(proto, ["merge-consecutive", "eliminate-dead-nodes"])
            assert _ops(candidate) == ["Reshape"]
            assert _proved(proto, candidate)
        assert not _proved(one, _load(proto))  # the original never shows the Reshape in the middle to run
    # an Unsqueeze elsewhere, and a Squeeze of a dim the target does not give as 1, are not
    proto = _model("s = Constant <value = int64[2] {-1, 12}> ()\n m = Reshape(x, s)\n"
                   " a = Constant <value = int64[1] {0}> ()\n y = Unsqueeze(m, a)",
                   inputs="float[4, 6] x", outputs="float[1, 2, 12] y")
    wrong = _model("s = Constant <value = int64[3] {-1, 12, 1}> ()\n y = Reshape(x, s)",
                   inputs="float[4, 6] x", outputs="float[1, 2, 12] y")
    assert not _proved(proto, _load(wrong))
    proto = _model("s = Constant <value = int64[3] {2, -1, 1}> ()\n m = Reshape(x, s)\n"
                   " a = Constant <value = int64[1] {1}> ()\n y = Squeeze(m, a)",
                   inputs="float[4, 6] x", outputs="float[2, 1] y")
    assert not _proved(proto, _load(_model("s = Constant <value = int64[2] {2, 1}> ()\n y = Reshape(x, s)",
                                           inputs="float[4, 6] x", outputs="float[2, 1] y")))


def test_a_concat_of_a_concat_on_the_same_axis_merged_is_proved():
    proto = _model("i = Concat <axis = 1> (x, x)\n y = Concat <axis = 1> (i, x)",
                   inputs="float[2, 3] x", outputs="float[2, 9] y")
    candidate = _optimized(proto, ["merge-consecutive", "eliminate-dead-nodes"])
    assert _ops(candidate) == ["Concat"]
    assert _proved(proto, candidate)
    _same_in_float64(proto, candidate, {"x": RNG.standard_normal((2, 3)).astype(np.float32)})
    # other axes, or another order, are another computation
    other = _model("i = Concat <axis = 0> (x, x)\n y = Concat <axis = 1> (i, x)",
                   inputs="float[1, 3] x", outputs="float[2, 6] y")
    flat = _model("y = Concat <axis = 1> (x, x, x)", inputs="float[1, 3] x", outputs="float[1, 9] y")
    assert not _proved(other, _load(flat))
    square = _model("w = Neg(x)\n i = Concat <axis = 1> (x, w)\n y = Concat <axis = 1> (i, x)",
                    inputs="float[2, 3] x", outputs="float[2, 9] y")
    assert not _proved(square, _load(_model("w = Neg(x)\n y = Concat <axis = 1> (x, x, w)",
                                            inputs="float[2, 3] x", outputs="float[2, 9] y")))


_SYMBOLIC_FIRST = """s = Shape(x)
            z = Constant <value = int64[1] {0}> ()
            o = Constant <value = int64[1] {1}> ()
            n = Slice(s, z, o)
            b = Squeeze(n, z)
            three = Constant <value = int64 {3}> ()
            bm = Mul(b, three)
            flat = Constant <value = int64[1] {-1}> ()
            rows = Reshape(bm, flat)
            four = Constant <value = int64[1] {4}> ()
            t1 = Concat <axis = 0> (rows, four)
            m = Reshape(x, t1)
            rest = Constant <value = int64[2] {3, 4}> ()
            t2 = Concat <axis = 0> (n, rest)"""


def test_a_reshape_of_a_reshape_to_a_target_not_read_is_proved_as_one_reshape():
    """Reshape(Reshape(x, [N * 3, 4]), [N, 3, 4]) (PyTorch's view of a view, the first target
    a product of dims the proof does not read) is Reshape(x, [N, 3, 4]): the second target
    reads no dim of the middle value, and the first Reshape keeps x's elements in order."""
    types = dict(inputs="float[N, 3, 4] x", outputs="float[N, 3, 4] y")
    proto = _model(f"{_SYMBOLIC_FIRST}\n y = Reshape(m, t2)", **types)
    one = _model(f"{_SYMBOLIC_FIRST}\n y = Reshape(x, t2)", **types)
    assert _proved(proto, _load(one))
    _same_in_float64(proto, _load(one), {"x": RNG.standard_normal((2, 3, 4)).astype(np.float32)})
    assert not _proved(one, _load(proto))  # the original never shows the first Reshape to run


def test_a_where_of_a_negated_condition_and_a_shape_of_a_negation_are_proved_swapped():
    """Where(Not(m), Expand(0, Shape(Not(m))), -inf) selects as Where(m, -inf, Expand(0,
    Shape(m))): Not keeps the shape and swaps the branches."""
    types = dict(inputs="bool[2, 5] m", outputs="float[2, 5] y")
    proto = _model("""k = Not(m)
            s = Shape(k)
            zero = Constant <value = float {0.0}> ()
            z = Expand(zero, s)
            low = Constant <value = float {-inf}> ()
            y = Where(k, z, low)""", **types)
    swapped = _model("""s = Shape(m)
            zero = Constant <value = float {0.0}> ()
            z = Expand(zero, s)
            low = Constant <value = float {-inf}> ()
            y = Where(m, low, z)""", **types)
    assert _proved(proto, _load(swapped))
    _same_in_float64(proto, _load(swapped), {"m": RNG.random((2, 5)) < 0.5})
    unswapped = _model("""s = Shape(m)
            zero = Constant <value = float {0.0}> ()
            z = Expand(zero, s)
            low = Constant <value = float {-inf}> ()
            y = Where(m, z, low)""", **types)
    assert not _proved(proto, _load(unswapped))
