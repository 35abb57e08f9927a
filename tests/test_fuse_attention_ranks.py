"""The attention fusions need the mask's rank; with constant folding held back (--fp16 folds
nothing that grows the model) torch's mask-building idioms stay unfolded, and
``exported_rank`` reads them: ConstantOfShape, Shape, Flatten, and torch's Expand-shape
``Where(Equal(s, ConstantOfShape(n) * -1), ConstantOfShape(n), s)`` with its scalar operands."""

from __future__ import annotations

import onnx
import onnx_ir as ir

import optcc
from optcc.passes.fuse_attention import exported_rank

IDIOM = """<ir_version: 9, opset_import: ["": 17]>
g (int64[B, S] ids) => (bool[B, 1, S, S] expanded) {
  shape = Shape(ids)
  zero_s = Constant <value = int64 {0}> ()
  one_s = Constant <value = int64 {1}> ()
  axis0 = Constant <value = int64[1] {0}> ()
  one_i = Constant <value = int64[1] {1}> ()
  b0 = Gather <axis = 0> (shape, zero_s)
  s0 = Gather <axis = 0> (shape, one_s)
  b = Unsqueeze(b0, axis0)
  s = Unsqueeze(s0, axis0)
  target = Concat <axis = 0> (b, one_i, s, s)
  minus = Constant <value = int64[1] {-1}> ()
  flat_target = Reshape(target, minus)
  four = Constant <value = int64[1] {4}> ()
  ones = ConstantOfShape <value = int64[1] {1}> (four)
  scalar = Constant <value = int64 {-1}> ()
  negs = Mul(ones, scalar)
  same = Equal(flat_target, negs)
  expand_to = Where(same, ones, flat_target)
  empty = Constant <value = int64[0] {}> ()
  true_scalar = ConstantOfShape <value = bool[1] {1}> (empty)
  flat = Flatten(ids)
  keep = Cast <to = 9> (flat)
  axes = Constant <value = int64[2] {1, 2}> ()
  keep4 = Unsqueeze(keep, axes)
  both = And(true_scalar, keep4)
  expanded = Expand(both, expand_to)
}"""


class _Ranks:
    """What a pattern match answers: declared ranks and constant arrays only."""

    def rank(self, value: ir.Value) -> int | None:
        return value.shape.rank() if value.is_graph_input() and value.shape is not None else (
            optcc.ir.as_numpy(value).ndim if optcc.ir.as_numpy(value) is not None else None)

    def value_array(self, value: ir.Value):  # noqa: ANN201
        return optcc.ir.as_numpy(value)


def test_mask_rank_through_unfolded_torch_idioms():
    model = optcc.ir.load(onnx.parser.parse_model(IDIOM))
    values = {v.name: v for n in model.graph for v in n.outputs}
    m = _Ranks()
    assert exported_rank(m, values["true_scalar"]) == 0
    assert exported_rank(m, values["shape"]) == 1
    assert exported_rank(m, values["flat"]) == 2
    assert exported_rank(m, values["both"]) == 4
    assert exported_rank(m, values["expanded"]) == 4
