"""``optcc.ir.decoded``: a parsed tensor's array is decoded once, equals a fresh decode,
is read-only and shared by every caller (clones included); large ones are kept only when
asked; other tensors pass through."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper
import onnx_ir as ir
import pytest

import optcc
from optcc.ir.arrays import KEEP_MAX_BYTES, decoded


def _parsed(name: str, dtype: int, dims: list[int], values: list, raw: bool = False) -> ir.TensorProtocol:
    return ir.serde.TensorProtoTensor(oh.make_tensor(name, dtype, dims, values, raw=raw))


@pytest.mark.parametrize("dtype,values", [
    (onnx.TensorProto.FLOAT, [1.0, -2.5, 0.0, 3.0]),  # float_data
    (onnx.TensorProto.INT64, [1, -1, 1 << 40, 0]),  # int64_data
    (onnx.TensorProto.DOUBLE, [1e300, -0.0, 2.5, -7.0]),  # double_data
    (onnx.TensorProto.INT32, [7, -7, 0, 1]),  # int32_data
    (onnx.TensorProto.FLOAT16, [1.0, 0.5, -2.0, 65504.0]),  # int32_data holding float16 bits
    (onnx.TensorProto.BOOL, [True, False, True, True]),
])
def test_a_parsed_tensor_is_decoded_once_to_its_values(dtype, values):
    tensor = _parsed("t", dtype, [2, 2], values)
    first = decoded(tensor)
    np.testing.assert_array_equal(first, tensor.numpy())  # what a fresh decode gives
    assert first.dtype == tensor.numpy().dtype and first.shape == (2, 2)
    assert decoded(tensor) is first
    assert not first.flags.writeable
    with pytest.raises(ValueError):
        first[0, 0] = 0


def test_raw_data_tensors_are_kept_too():
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    tensor = _parsed("r", onnx.TensorProto.FLOAT, [2, 3], array.tobytes(), raw=True)
    np.testing.assert_array_equal(decoded(tensor), array)
    assert decoded(tensor) is decoded(tensor)


def test_a_large_parsed_tensor_is_kept_only_when_asked():
    n = KEEP_MAX_BYTES // 4 + 1
    tensor = _parsed("big", onnx.TensorProto.FLOAT, [n], [1.0] * n)
    first = decoded(tensor)
    assert first is not decoded(tensor) and first.flags.writeable  # decoded each time, as numpy() does
    kept = decoded(tensor, keep_large=True)
    assert kept is decoded(tensor) and not kept.flags.writeable
    np.testing.assert_array_equal(kept, first)


def test_in_memory_tensors_pass_through():
    array = np.ones((2, 2), np.float32)
    tensor = ir.Tensor(array)
    assert decoded(tensor) is tensor.numpy()


def test_clones_share_the_decoded_array():
    node = oh.make_node("Constant", [], ["c"], value=oh.make_tensor("v", onnx.TensorProto.FLOAT, [3], [1, 2, 3]))
    graph = oh.make_graph([node, oh.make_node("Identity", ["c"], ["y"])], "g", [],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3])])
    model = optcc.ir.load(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]))
    tensor = optcc.ir.const_tensor(next(iter(model.graph)).outputs[0])
    clone = optcc.ir.clone(model)
    cloned = optcc.ir.const_tensor(next(iter(clone.graph)).outputs[0])
    assert type(tensor) is ir.serde.TensorProtoTensor and cloned is tensor
    assert decoded(cloned) is decoded(tensor)


def test_fresh_gives_a_writable_copy_of_the_kept_decode():
    from optcc.ir.arrays import fresh

    tensor = _parsed("t", onnx.TensorProto.FLOAT, [3], [1.0, 2.0, 3.0])
    first = fresh(tensor)
    np.testing.assert_array_equal(first, tensor.numpy())
    assert first.flags.writeable and first is not decoded(tensor)
    first[0] = 9.0  # a copy: the kept decode keeps the tensor's values
    np.testing.assert_array_equal(decoded(tensor), [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(fresh(tensor), [1.0, 2.0, 3.0])
    array = np.ones(2, np.float32)
    assert fresh(ir.Tensor(array)) is ir.Tensor(array).numpy()  # an in-memory tensor: its own array


def test_a_shared_decode_is_kept_for_a_tensor_of_the_same_content():
    from optcc.ir.arrays import share_decoded

    first = _parsed("a", onnx.TensorProto.FLOAT, [3], [1.0, -2.0, 0.5])
    second = _parsed("a", onnx.TensorProto.FLOAT, [3], [1.0, -2.0, 0.5])
    array = decoded(first)
    share_decoded(second, array)
    assert decoded(second) is array
    np.testing.assert_array_equal(decoded(second), second.numpy())
    # a writable array, an in-memory tensor or a tensor with a kept decode takes nothing
    third = _parsed("a", onnx.TensorProto.FLOAT, [3], [1.0, -2.0, 0.5])
    share_decoded(third, np.array([1.0, -2.0, 0.5], np.float32))
    assert decoded(third) is not array and not decoded(third).flags.writeable
    share_decoded(second, decoded(third))
    assert decoded(second) is array
    in_memory = ir.Tensor(np.array([1.0, -2.0, 0.5], np.float32))
    share_decoded(in_memory, array)
    assert decoded(in_memory) is in_memory.numpy()


def test_repeated_values_only_where_the_type_s_own_field_holds_every_value():
    from optcc.ir.arrays import repeated_values

    plain = oh.make_tensor("t", onnx.TensorProto.FLOAT, [2], [1.0, 2.0])
    values, dtype = repeated_values(plain)
    assert list(values) == [1.0, 2.0] and dtype == np.dtype("<f4")
    np.testing.assert_array_equal(decoded(ir.serde.TensorProtoTensor(plain)), np.array([1.0, 2.0], np.float32))
    mixed = oh.make_tensor("t", onnx.TensorProto.FLOAT, [2], [1.0, 2.0])
    mixed.int32_data.extend([3, 4])  # malformed: numpy() and tobytes() read different fields
    raw = oh.make_tensor("t", onnx.TensorProto.FLOAT, [2], np.ones(2, np.float32).tobytes(), raw=True)
    int32 = oh.make_tensor("t", onnx.TensorProto.INT32, [2], [1, 2])
    assert repeated_values(mixed) is None and repeated_values(raw) is None and repeated_values(int32) is None


_SPECIAL_FLOAT32 = np.frombuffer(b"".join([
    b"\x01\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\x00\x00\x80\xff", b"\x00\x00\x00\x80",  # NaN payload, +-inf, -0.0
    b"\x01\x00\x00\x00", b"\xff\xff\x7f\x7f"]), "<f4")  # the least subnormal, the largest finite


# fields read element by element (at most 16 values), then ones read whole
@pytest.mark.parametrize("dims", [[], [1], [3, 2], [17], [4, 5, 3]])
@pytest.mark.parametrize("dtype", [onnx.TensorProto.FLOAT, onnx.TensorProto.INT64, onnx.TensorProto.DOUBLE])
def test_a_repeated_field_decodes_bit_for_bit_as_numpy_does(dims, dtype):
    count = int(np.prod(dims))
    if dtype == onnx.TensorProto.FLOAT:
        values = np.resize(_SPECIAL_FLOAT32, count).tolist()
    elif dtype == onnx.TensorProto.INT64:
        values = np.resize(np.array([-(1 << 63), (1 << 63) - 1, -1, 0, 1 << 40], np.int64), count).tolist()
    else:
        values = np.resize(np.array([1e-310, -0.0, np.inf, 1e300, -2.5]), count).tolist()
    proto = oh.make_tensor("t", dtype, dims, values)
    tensor = ir.serde.TensorProtoTensor(proto)
    reference = onnx.numpy_helper.to_array(proto)  # onnx's own decode of the field
    array = decoded(tensor)
    assert array.dtype == reference.dtype and array.shape == reference.shape == tuple(dims)
    assert array.tobytes() == reference.tobytes()


@pytest.mark.parametrize("dtype,element", [
    (np.float32, b"\x01\x00\xc0\x7f"),  # a NaN with a payload
    (np.float32, b"\x00\x00\x00\x80"),  # -0.0
    (np.float16, b"\x00\x3c"),
    (np.int64, (-3).to_bytes(8, "little", signed=True)),
    (np.bool_, b"\x01"),
])
@pytest.mark.parametrize("shape", [(), (1,), (0,), (5, 0), (64, 3, 3, 3)])
def test_filled_view_is_what_broadcast_to_gives(dtype, element, shape):
    """A read-only view repeating the one element: the same shape, strides, bytes and
    read-only flag as NumPy's broadcast_to of that element."""
    one = np.frombuffer(element, dtype=dtype)
    got = optcc.ir.filled_view(one, shape)
    want = np.broadcast_to(one.reshape(()), shape)
    assert got.shape == want.shape and got.dtype == want.dtype and got.strides == want.strides
    assert not got.flags.writeable and not want.flags.writeable
    assert got.copy().tobytes() == want.copy().tobytes() == element * int(np.prod(shape))


def test_filled_view_of_a_shape_numpy_refuses_is_decided_by_broadcast_to():
    one = np.ones(1, np.float32)
    with pytest.raises(ValueError):
        np.broadcast_to(one.reshape(()), (-1, 2))
    with pytest.raises(ValueError):
        optcc.ir.filled_view(one, (-1, 2))
