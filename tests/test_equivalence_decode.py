"""The proof decodes a parsed FLOAT tensor stored in ``float_data`` without onnx-ir's dtype
dispatch, to the very array onnx-ir's ``numpy()`` gives, and leaves every other storage to
onnx-ir."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from optcc.numerics.equivalence import _decoded

NAN_PAYLOAD = np.array([0x7FC00123], dtype=np.uint32).view(np.float32)[0]


def _parsed(proto: onnx.TensorProto) -> ir.TensorProtocol:
    return ir.serde.TensorProtoTensor(proto)


def _same(tensor: ir.TensorProtocol) -> None:
    got, expected = _decoded(tensor), tensor.numpy()
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert got.tobytes() == expected.tobytes()


FLOAT_DATA = [
    helper.make_tensor("m", TensorProto.FLOAT, [2, 3], [1.5, -0.0, 3.4e38, 1e-45, float("inf"), float(NAN_PAYLOAD)]),
    helper.make_tensor("s", TensorProto.FLOAT, [], [2.0]),
    helper.make_tensor("v", TensorProto.FLOAT, [1, 4, 1], [0.1, 0.2, 0.3, 0.4]),
]


@pytest.mark.parametrize("index", range(len(FLOAT_DATA)))
def test_float_data_decodes_to_onnx_irs_array(index):
    _same(_parsed(FLOAT_DATA[index]))


def test_other_storage_is_onnx_irs():
    raw = helper.make_tensor("r", TensorProto.FLOAT, [2], np.array([1.0, 2.0], np.float32).tobytes(), raw=True)
    complex_ = helper.make_tensor("c", TensorProto.COMPLEX64, [1], [1 + 2j])
    ints = helper.make_tensor("i", TensorProto.INT64, [2], [1, -2])
    empty = helper.make_tensor("e", TensorProto.FLOAT, [0, 3], [])
    for proto in (raw, complex_, ints, empty):
        _same(_parsed(proto))
    both = helper.make_tensor("b", TensorProto.FLOAT, [2], [1.0, 2.0])
    both.raw_data = np.array([3.0, 4.0], np.float32).tobytes()  # raw_data wins, as in onnx-ir
    assert _decoded(_parsed(both)).tolist() == [3.0, 4.0]
    _same(ir.Tensor(np.arange(3, dtype=np.float32)))
