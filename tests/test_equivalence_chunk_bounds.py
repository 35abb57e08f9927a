"""``torch.chunk`` as PyTorch exports it: the chunk size is read from the input's shape and
computed in integers (``(dim + n - 1) / n``, then times 1, 2, ... for each chunk's end), and
each chunk is a Slice between two of those. Folded to constants (the dim is static), the
Slices are proved to compute the original's: the bounds are integers the proof reads, as
Slice entries, through Shape, Gather, Add, Sub, Div and Mul of one-element integer tensors.
Wrong bounds are not proved."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx.reference import ReferenceEvaluator

import optcc
from optcc.numerics.equivalence import prove_equivalent

_ORIGINAL = """
<ir_version: 8, opset_import: ["": 17]>
g (float[N, 4] x, float[4, 9] w) => (float[N, A] y0, float[N, B] y1, float[N, C] y2) {
    h = MatMul(x, w)
    one = Constant<value = int64[1] {1}>()
    two = Constant<value = int64[1] {2}>()
    three = Constant<value = int64[1] {3}>()
    zero = Constant<value = int64[1] {0}>()
    s = Shape(h)
    d = Gather<axis = 0>(s, one)
    d2 = Add(d, two)
    size = Div(d2, three)
    e0 = Mul(size, one)
    e1 = Mul(size, two)
    e2 = Mul(size, three)
    y0 = Slice(h, zero, e0, one)
    y1 = Slice(h, e0, e1, one)
    m = Sub(e2, zero)
    y2 = Slice(h, e1, m, one)
}
"""


def _candidate(bounds: tuple[int, int, int]) -> str:
    """The original with its chunk bounds folded to ``bounds``."""
    b0, b1, b2 = bounds
    return f"""
<ir_version: 8, opset_import: ["": 17]>
g (float[N, 4] x, float[4, 9] w) => (float[N, A] y0, float[N, B] y1, float[N, C] y2) {{
    h = MatMul(x, w)
    one = Constant<value = int64[1] {{1}}>()
    zero = Constant<value = int64[1] {{0}}>()
    e0 = Constant<value = int64[1] {{{b0}}}>()
    e1 = Constant<value = int64[1] {{{b1}}}>()
    e2 = Constant<value = int64[1] {{{b2}}}>()
    y0 = Slice(h, zero, e0, one)
    y1 = Slice(h, e0, e1, one)
    y2 = Slice(h, e1, e2, one)
}}
"""


def _outputs(text: str, x: np.ndarray, w: np.ndarray) -> list[np.ndarray]:
    return ReferenceEvaluator(onnx.parser.parse_model(text)).run(None, {"x": x, "w": w})


@pytest.mark.parametrize("bounds", [(3, 6, 9), (3, 6, 8), (4, 6, 9)])
def test_folded_chunk_bounds_are_proved_only_where_right(bounds):
    """Each chunk is proved exactly where its two bounds are the original's (the outputs
    of onnx's reference evaluator agree there and only there)."""
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, 4)).astype(np.float32), rng.standard_normal((4, 9)).astype(np.float32)
    want = _outputs(_ORIGINAL, x, w)
    assert all(np.array_equal(a, b) for a, b in zip(want, np.split(x @ w, 3, axis=1)))
    right = {f"y{i}": a.shape == b.shape and np.array_equal(a, b)
             for i, (a, b) in enumerate(zip(want, _outputs(_candidate(bounds), x, w)))}
    assert right == {f"y{i}": (0, 3, 6, 9)[i:i + 2] == ((0,) + bounds)[i:i + 2] for i in range(3)}
    original = optcc.ir.load(onnx.parser.parse_model(_ORIGINAL))
    candidate = optcc.ir.load(onnx.parser.parse_model(_candidate(bounds)))
    assert prove_equivalent(original, candidate).outputs == right


def test_optimized_chunks_pass_by_proof():
    result = optcc.optimize(onnx.parser.parse_model(_ORIGINAL), level=2)
    assert not any(n.op_type in ("Shape", "Div") for n in result.model.graph.node)
    assert result.report.verification["reference"] == "proof"


def test_integer_arithmetic_reads_only_what_it_can_compute_exactly():
    from optcc.numerics.equivalence import _integer_arithmetic

    assert _integer_arithmetic("Div", [(False, [11]), (True, [3])]) == (False, [3])
    assert _integer_arithmetic("Sub", [(True, [2]), (True, [5])]) == (True, [-3])
    assert _integer_arithmetic("Mul", [(False, [1, 2, 3]), (False, [4])]) == (False, [4, 8, 12])
    assert _integer_arithmetic("Add", [(False, [1, 2]), (False, [1, 2, 3])]) is None  # no broadcast
    assert _integer_arithmetic("Div", [(True, [-7]), (True, [2])]) is None  # truncation and floor differ
    assert _integer_arithmetic("Div", [(True, [7]), (True, [0])]) is None
    assert _integer_arithmetic("Add", [(True, [("dim", 1, 0)]), (True, [2])]) is None
    assert _integer_arithmetic("Mul", [(True, [1 << 40]), (True, [1 << 30])]) is None
