"""The dims ``grouped_kv.dim_keys`` proves, checked against numpy on many drawn shapes: the
dim a Reshape infers for its -1, a broadcasting binary op's output dim, and a Slice's
untouched axes. A proved constant must be the dim onnxruntime's shapes have (never a wrong
one); unproved is allowed."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from optcc.passes.grouped_kv import dim_keys
from optcc.rewrite import static_rank


def _unshaped(name: str) -> onnx.ValueInfoProto:
    info = helper.make_tensor_value_info(name, TensorProto.FLOAT, [])
    info.type.tensor_type.ClearField("shape")
    return info


class _Facts:
    def __init__(self) -> None:
        self._ranks: dict[ir.Value, int | None] = {}

    def value_array(self, value: ir.Value) -> np.ndarray | None:
        const = value.const_value
        return None if const is None else const.numpy()

    def rank(self, value: ir.Value) -> int | None:
        return static_rank(value, self._ranks)


def _proved_ints(model: onnx.ModelProto, name: str, rank: int) -> list[int | None]:
    graph = ir.from_proto(model).graph
    value = next(o for n in graph for o in n.outputs if o.name == name)
    facts = _Facts()
    out = []
    for axis in range(rank):
        ints = {k[1] for k in dim_keys(value, axis, facts, facts.rank) if k[0] == "int"}
        assert len(ints) <= 1, ints
        out.append(next(iter(ints)) if ints else None)
    return out


def _check(model: onnx.ModelProto, feeds: dict[str, np.ndarray], expected: tuple[int, ...], name: str = "y"
           ) -> list[int | None]:
    (got,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert got.shape == tuple(expected)  # onnxruntime agrees with numpy's shape
    proved = _proved_ints(model, name, len(expected))
    for p, actual in zip(proved, expected):
        assert p is None or p == actual, (proved, expected)
    return proved


@pytest.mark.parametrize("seed", range(40))
def test_an_inferred_reshape_dim_is_the_one_numpy_infers(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = [int(d) for d in rng.integers(1, 5, size=int(rng.integers(2, 5)))]
    x = np.zeros(shape, np.float32)
    target = list(rng.permutation(shape))  # the same elements, reordered, one of them inferred
    hole = int(rng.integers(len(target)))
    target[hole] = -1
    expected = x.reshape([int(t) for t in target]).shape
    symbolic = [f"d{i}" if rng.random() < 0.5 else d for i, d in enumerate(shape)]  # some dims unknown
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Reshape", ["x", "t"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, symbolic)],
        [_unshaped("y")],
        [numpy_helper.from_array(np.array(target, np.int64), "t")]), opset_imports=[helper.make_opsetid("", 17)])
    proved = _check(model, {"x": x}, expected)
    if all(isinstance(d, int) for d in symbolic):  # every dim known: the -1 is proved
        assert proved[hole] == expected[hole]


def test_an_inferred_dim_beside_an_unknown_one_is_not_proved() -> None:
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Reshape", ["x", "t"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 32])],
        [_unshaped("y")],
        [numpy_helper.from_array(np.array([-1, 16], np.int64), "t")]), opset_imports=[helper.make_opsetid("", 17)])
    assert _proved_ints(model, "y", 2) == [None, 16]


@pytest.mark.parametrize("seed", range(40))
def test_a_broadcast_dim_is_the_one_numpy_broadcasts_to(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    rank = int(rng.integers(1, 5))
    out = [int(d) for d in rng.integers(1, 4, size=rank)]
    a_shape = [d if rng.random() < 0.6 else 1 for d in out]
    b_shape = [d if rng.random() < 0.6 else 1 for d in out][int(rng.integers(rank)):]  # maybe lower rank
    expected = np.broadcast_shapes(tuple(a_shape), tuple(b_shape))
    named = [f"a{i}" if rng.random() < 0.3 else d for i, d in enumerate(a_shape)]
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Mul", ["a", "b"], ["y"])], "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, named)],
        [_unshaped("y")],
        [numpy_helper.from_array(np.ones(b_shape, np.float32), "b")]), opset_imports=[helper.make_opsetid("", 17)])
    proved = _check(model, {"a": np.ones(a_shape, np.float32)}, expected)
    if all(isinstance(d, int) for d in named):  # both operands' dims known: every output dim is proved
        assert proved == list(expected)


def test_a_slice_keeps_only_the_axes_it_does_not_list() -> None:
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Slice", ["x", "s", "e", "a"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8])],
        [_unshaped("y")],
        [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in (("s", [0]), ("e", [4]), ("a", [-1]))]),
        opset_imports=[helper.make_opsetid("", 17)])
    assert _proved_ints(model, "y", 3) == [2, 3, None]
