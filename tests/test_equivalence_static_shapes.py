"""Rewrites that are exact by construction on shape computations, proved without samples:
a selection of a Shape's static dims folded to its integers (a Slice of an integer Cast, a
Gather feeding arithmetic the candidate folds), a Concat piece of no elements removed,
and a Reshape target whose one read entry is arithmetic on a dim written as -1. Each has
a twin the proof must not accept: a dynamic dim folded to the value one sample has, a
piece whose dims could be anything, a target that reads a dim of another input."""

from __future__ import annotations

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator

import optcc
from optcc.numerics.equivalence import prove_equivalent

_HEADER = '<ir_version: 8, opset_import: ["": 17]>'


def _model(body: str, signature: str) -> onnx.ModelProto:
    return onnx.parser.parse_model(f"{_HEADER}\n{signature} {{\n{body}\n}}")


def _same_on(original: onnx.ModelProto, candidate: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> bool:
    """Whether onnx's reference evaluator gives both models the same outputs on ``feeds``."""
    want = ReferenceEvaluator(original).run(None, feeds)
    got = ReferenceEvaluator(candidate).run(None, feeds)
    return all(a.shape == b.shape and np.array_equal(a, b) for a, b in zip(want, got))


def _proved(original: onnx.ModelProto, candidate: onnx.ModelProto) -> dict[str, bool]:
    return prove_equivalent(optcc.ir.load(original), optcc.ir.load(candidate)).outputs


_SELECTION_SIGNATURE = "g (float[N, 3, 4] x) => (float[2] e)"
_SELECTION = """
    zero = Constant<value = int64[1] {0}>()
    one = Constant<value = int64[1] {1}>()
    two = Constant<value = int64[1] {2}>()
    end = Constant<value = int64[1] {2147483647}>()
    s = Shape(x)
    c = Cast<to = 6>(s)
    n = Slice(c, zero, one, zero)
    last = Slice(c, two, end, zero)
    joined = Concat<axis = 0>(n, last)
    e = Cast<to = 1>(joined)
"""


def test_a_static_dim_selected_from_a_shape_folds_to_its_integer():
    candidate = _SELECTION.replace("last = Slice(c, two, end, zero)", "last = Constant<value = int32[1] {4}>()")
    original, folded = _model(_SELECTION, _SELECTION_SIGNATURE), _model(candidate, _SELECTION_SIGNATURE)
    x = np.zeros((2, 3, 4), np.float32)
    assert _same_on(original, folded, {"x": x})
    assert _proved(original, folded) == {"e": True}


def test_a_dynamic_dim_folded_to_one_samples_value_is_not_proved():
    candidate = _SELECTION.replace("n = Slice(c, zero, one, zero)", "n = Constant<value = int32[1] {2}>()")
    original, folded = _model(_SELECTION, _SELECTION_SIGNATURE), _model(candidate, _SELECTION_SIGNATURE)
    assert _same_on(original, folded, {"x": np.zeros((2, 3, 4), np.float32)})  # equal on this sample only
    assert not _same_on(original, folded, {"x": np.zeros((5, 3, 4), np.float32)})
    assert _proved(original, folded) == {"e": False}


def test_a_wrong_integer_for_a_static_dim_is_not_proved():
    candidate = _SELECTION.replace("last = Slice(c, two, end, zero)", "last = Constant<value = int32[1] {3}>()")
    original, folded = _model(_SELECTION, _SELECTION_SIGNATURE), _model(candidate, _SELECTION_SIGNATURE)
    assert not _same_on(original, folded, {"x": np.zeros((2, 3, 4), np.float32)})
    assert _proved(original, folded) == {"e": False}


_PADS_SIGNATURE = "g (float[N, 3, 4] x) => (float[N, 3, 5] y)"
_PADS = """
    two = Constant<value = int64 {2}>()
    three = Constant<value = int64 {3}>()
    axis = Constant<value = int64[1] {0}>()
    zeros = Constant<value = int64[5] {0, 0, 0, 0, 0}>()
    s = Shape(x)
    dim = Gather<axis = 0>(s, two)
    after = Sub(dim, three)
    entry = Unsqueeze(after, axis)
    pads = Concat<axis = 0>(zeros, entry)
    y = Pad(x, pads)
"""


def test_arithmetic_on_a_static_dim_is_evaluated_where_the_candidate_folds_it():
    candidate = """
    pads = Constant<value = int64[6] {0, 0, 0, 0, 0, 1}>()
    y = Pad(x, pads)
"""
    original, folded = _model(_PADS, _PADS_SIGNATURE), _model(candidate, _PADS_SIGNATURE)
    assert _same_on(original, folded, {"x": np.arange(24, dtype=np.float32).reshape(2, 3, 4)})
    assert _proved(original, folded) == {"y": True}


def test_arithmetic_folded_to_another_value_is_not_proved():
    candidate = """
    pads = Constant<value = int64[6] {0, 0, 0, 0, 0, 2}>()
    y = Pad(x, pads)
"""
    signature = _PADS_SIGNATURE.replace("float[N, 3, 5] y", "float[N, 3, 6] y")
    original, folded = _model(_PADS, _PADS_SIGNATURE), _model(candidate, signature)
    assert not _same_on(original, folded, {"x": np.arange(24, dtype=np.float32).reshape(2, 3, 4)})
    assert _proved(original, folded) == {"y": False}


_EMPTY_SIGNATURE = "g (float[N, 3] x, float[K] k) => (float[N, 3] y)"
_EMPTY = """
    zero = Constant<value = int64[1] {0}>()
    index = Constant<value = int64 {0}>()
    scale = Constant<value = float {-1000000000.0}>()
    s = Shape(x)
    dim = Gather<axis = 0>(s, index)
    rows = Unsqueeze(dim, zero)
    shape = Concat<axis = 0>(rows, zero)
    fill = ConstantOfShape(shape)
    piece = Mul(fill, scale)
    y = Concat<axis = 1>(x, piece)
"""


def test_a_concat_piece_of_no_elements_removed_is_proved():
    original, removed = _model(_EMPTY, _EMPTY_SIGNATURE), _model("y = Identity(x)", _EMPTY_SIGNATURE)
    feeds = {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "k": np.zeros(2, np.float32)}
    assert _same_on(original, removed, feeds)
    assert _proved(original, removed) == {"y": True}


def test_a_piece_whose_width_is_read_at_run_time_is_not_removed():
    # the piece's width is another input's length: zero on one sample, not on others
    body = _EMPTY.replace("shape = Concat<axis = 0>(rows, zero)", "sk = Shape(k)\n    shape = Concat<axis = 0>(rows, sk)")
    original, removed = _model(body, _EMPTY_SIGNATURE), _model("y = Identity(x)", _EMPTY_SIGNATURE)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert _same_on(original, removed, {"x": x, "k": np.zeros(0, np.float32)})
    assert _proved(original, removed) == {"y": False}


def test_a_candidate_that_adds_an_empty_piece_is_not_proved():
    # the added Concat fails where the piece's rows differ from x's: nothing in the original
    # establishes that they agree
    body = _EMPTY.replace("rows = Unsqueeze(dim, zero)", "rows = Shape(k)")
    candidate, original = _model(body, _EMPTY_SIGNATURE), _model("y = Identity(x)", _EMPTY_SIGNATURE)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert _same_on(original, candidate, {"x": x, "k": np.zeros(2, np.float32)})
    assert _proved(original, candidate) == {"y": False}


def test_a_piece_empty_along_another_axis_is_not_removed():
    # [0, 5] on axis 1 adds 5 columns where x has no rows: the Concat of x [0, 3] is [0, 8]
    signature = "g (float[N, 3] x) => (int64[2] z)"
    body = """
    e = Constant<value = float[0, 5] {}>()
    y = Concat<axis = 1>(x, e)
    z = Shape(y)
"""
    original, removed = _model(body, signature), _model("z = Shape(x)", signature)
    want = ReferenceEvaluator(original).run(None, {"x": np.zeros((0, 3), np.float32)})[0]
    got = ReferenceEvaluator(removed).run(None, {"x": np.zeros((0, 3), np.float32)})[0]
    assert want.tolist() == [0, 8] and got.tolist() == [0, 3]
    assert _proved(original, removed) == {"z": False}



def test_a_constant_piece_of_no_elements_along_the_axis_is_removed():
    # x declares no shape: the Concat's axis is read against the constant piece's rank
    signature = "g (float x) => (float y)"
    body = """
    r = Relu(x)
    e = Constant<value = float[2, 0] {}>()
    y = Concat<axis = 1>(r, e)
"""
    original, removed = _model(body, signature), _model("y = Relu(x)", signature)
    assert _same_on(original, removed, {"x": np.arange(-3, 3, dtype=np.float32).reshape(2, 3)})
    assert _proved(original, removed) == {"y": True}


def test_a_concat_of_pieces_with_elements_keeps_every_piece():
    # no piece is empty along any dim: the candidate that drops one is not proved, the same
    # Concat written again is
    signature = "g (float[N, 3] x, float[N, 2] w) => (float[N, 5] y)"
    body = "y = Concat<axis = 1>(x, w)"
    original = _model(body, signature)
    feeds = {"x": np.ones((2, 3), np.float32), "w": np.zeros((2, 2), np.float32)}
    assert _same_on(original, _model(body, signature), feeds)
    assert _proved(original, _model(body, signature)) == {"y": True}
    assert _proved(original, _model("y = Identity(x)", signature.replace("float[N, 5] y", "float[N, 3] y"))) \
        == {"y": False}


def test_a_concat_of_no_empty_piece_is_numbered_without_inferring_ranks(monkeypatch):
    # TopK's outputs have no rank by definition here, so a piece's rank is onnx's shape
    # inference's to say: a Concat none of whose pieces is empty along any dim needs no
    # rank, and none is inferred
    import optcc.numerics.equivalence as equivalence
    from calls import first_arguments

    signature = "g (float[2, 3] x) => (float y)"
    body = "k = Constant<value = int64[1] {2}>()\n    v, i = TopK(x, k)\n    y = Concat<axis = 1>(v, v)"
    original = _model(body, signature)
    inferred = first_arguments(monkeypatch, equivalence, "_inferred_ranks")
    assert _proved(original, _model(body, signature)) == {"y": True}
    assert inferred == []
    feeds = {"x": np.arange(-3, 3, dtype=np.float32).reshape(2, 3)}
    assert _same_on(original, _model(body, signature), feeds)

_TARGET_SIGNATURE = "g (float[N, 64] x, float[K] k) => (float[M, 32] y)"
_TARGET = """
    zero = Constant<value = int64[1] {0}>()
    one = Constant<value = int64[1] {1}>()
    two = Constant<value = int64 {2}>()
    minus = Constant<value = int64[1] {-1}>()
    width = Constant<value = int64[1] {32}>()
    s = Shape(x)
    first = Slice(s, zero, one)
    dim = Squeeze(first, zero)
    doubled = Mul(dim, two)
    rows = Reshape(doubled, minus)
    target = Concat<axis = 0>(rows, width)
    y = Reshape(x, target)
"""


def test_a_target_entry_computed_from_a_dim_is_written_as_minus_one():
    candidate = """
    target = Constant<value = int64[2] {-1, 32}>()
    y = Reshape(x, target)
"""
    original, rewritten = _model(_TARGET, _TARGET_SIGNATURE), _model(candidate, _TARGET_SIGNATURE)
    feeds = {"x": np.arange(192, dtype=np.float32).reshape(3, 64), "k": np.zeros(32, np.float32)}
    assert _same_on(original, rewritten, feeds)
    assert _proved(original, rewritten) == {"y": True}


def test_a_target_that_also_reads_another_inputs_dim_is_not_proved():
    # two entries read at run time: the width is k's length, 32 on one sample only
    body = _TARGET.replace("target = Concat<axis = 0>(rows, width)", "sk = Shape(k)\n    target = Concat<axis = 0>(rows, sk)")
    candidate = """
    target = Constant<value = int64[2] {-1, 32}>()
    y = Reshape(x, target)
"""
    original, rewritten = _model(body, _TARGET_SIGNATURE), _model(candidate, _TARGET_SIGNATURE)
    x = np.arange(192, dtype=np.float32).reshape(3, 64)
    assert _same_on(original, rewritten, {"x": x, "k": np.zeros(32, np.float32)})
    assert _proved(original, rewritten) == {"y": False}


_CHAINED_SIGNATURE = "g (float[N, 3, 5] x) => (float[N, 3, 8] y)"
_CHAINED = """
    one = Constant<value = int64 {1}>()
    two = Constant<value = int64 {2}>()
    half = Constant<value = float {2.0}>()
    axis = Constant<value = int64[1] {0}>()
    zeros = Constant<value = int64[5] {0, 0, 0, 0, 0}>()
    s = Shape(x)
    d = Gather<axis = 0>(s, two)
    f = Cast<to = 1>(d)
    h = Div(f, half)
    c = Ceil(h)
    back = Cast<to = 7>(c)
    after = Sub(back, two)
    entry = Unsqueeze(after, axis)
    pads = Concat<axis = 0>(zeros, entry)
    padded = Pad(x, pads)
    s2 = Shape(padded)
    d2 = Gather<axis = 0>(s2, two)
    f2 = Cast<to = 1>(d2)
    h2 = Div(f2, half)
    c2 = Ceil(h2)
    back2 = Cast<to = 7>(c2)
    after2 = Sub(back2, one)
    entry2 = Unsqueeze(after2, axis)
    pads2 = Concat<axis = 0>(zeros, entry2)
    y = Pad(padded, pads2)
"""


def test_a_dim_that_follows_from_an_evaluated_fold_is_read_in_a_later_look():
    # the second Pad's pads read the first Pad's output dims, which shape inference knows
    # only once the first pads are read as the constant they fold to
    candidate = """
    first = Constant<value = int64[6] {0, 0, 0, 0, 0, 1}>()
    second = Constant<value = int64[6] {0, 0, 0, 0, 0, 2}>()
    padded = Pad(x, first)
    y = Pad(padded, second)
"""
    original, folded = _model(_CHAINED, _CHAINED_SIGNATURE), _model(candidate, _CHAINED_SIGNATURE)
    assert _same_on(original, folded, {"x": np.arange(30, dtype=np.float32).reshape(2, 3, 5)})
    assert _proved(original, folded) == {"y": True}
    wrong = _model(candidate.replace("0, 0, 0, 0, 0, 2", "0, 0, 0, 0, 0, 3"),
                   _CHAINED_SIGNATURE.replace("float[N, 3, 8] y", "float[N, 3, 9] y"))
    assert _proved(original, wrong) == {"y": False}
